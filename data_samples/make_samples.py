"""Regenerate the synthetic sample data in this folder (deterministic, byte-identical).

Usage: ``python data_samples/make_samples.py [OUT_DIR]`` (default: this folder).
The phantoms are defined in :mod:`medgen.samples`; see README.md here for what each file is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medgen.samples import write_samples


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent
    for name, path in write_samples(out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
