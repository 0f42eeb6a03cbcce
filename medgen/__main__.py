"""``python -m medgen``: the same as the ``medgen`` command."""

from medgen.cli import main

if __name__ == "__main__":
    main()
