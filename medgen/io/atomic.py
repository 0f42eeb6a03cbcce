"""Atomic output: write under a temporary name in the target folder, then ``os.replace``.

A reader (or a crashed run) never sees a half-written file: the final name appears only
once its content is complete and flushed to disk. The temporary name starts with a dot and
ends with ``.tmp-<pid>-<random>`` so that stale leftovers are easy to spot and to clean.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "fsync_file",
    "replace_into",
    "staging_dir",
    "temp_name",
]


def temp_name(path: Path) -> Path:
    """A hidden sibling name: ``dir/.name.tmp-<pid>-<8 hex>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: str | Path) -> None:
    """Flush a written file's content to the disk (no-op for folders)."""
    path = Path(path)
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/file system.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    The caller writes a file to the yielded path. When the ``with`` block ends normally the
    file is fsync-ed and moved onto ``path`` with :func:`os.replace` (atomic on POSIX and
    Windows). If the block raises, the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('hello', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written to the temporary file")
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        # After a successful replace the temporary name no longer exists.
        _remove(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "x.bin", b"abc")
    >>> p.read_bytes()
    b'abc'
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


@contextmanager
def staging_dir(parent: str | Path, name: str = "staging") -> Iterator[Path]:
    """Yield a new empty temporary folder inside ``parent``; it is deleted on exit.

    Used for outputs made of several files (DICOM series, ``.mhd`` + ``.raw``): write them
    all here, then move them into place with :func:`replace_into` or rename the folder.
    Whatever is still inside when the block ends is removed, also after an error.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(parent / name)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        _remove(tmp)


def replace_into(files: list[Path], target_dir: str | Path) -> list[Path]:
    """fsync each file, then move it into ``target_dir`` under its own name, in order.

    Each move is atomic; put the file that makes the set visible (a header) last.
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        fsync_file(f)
    out = []
    for f in files:
        dest = target_dir / f.name
        os.replace(f, dest)
        out.append(dest)
    _fsync_dir(target_dir)
    return out
