"""The per-output-folder secret that keys every pseudonym an ingest writes.

``DST/pseudonym.key`` holds 32 random bytes (hex). Series keys, output names and the
pseudonymous source paths in the manifest, the log and the messages are keyed hashes
under it: without the key nobody can check a guess ("is ``Doe^Jane/...`` in this
archive?") against them; with it and the source folder the owner can map a pseudonym
back to its file. Keep it private; copy it into another output folder to get the same
pseudonyms there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_NAME = "pseudonym.key"

__all__ = ["KEY_NAME", "folder_secret"]


def folder_secret(dst: str | Path, *, create: bool = True) -> str | None:
    """The secret of output folder ``dst``; made (readable by the owner only) if missing.

    Returns None when it is missing and ``create`` is false. A key file that is not
    64 hex characters raises ``ValueError`` naming it.
    """
    path = Path(dst) / KEY_NAME
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        text = secrets.token_hex(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another process: use that one
            return folder_secret(dst, create=False)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text + "\n")
        return text
    except UnicodeDecodeError:
        text = ""
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{path}: not a medgen pseudonym key (64 hex characters expected)")
    return text
