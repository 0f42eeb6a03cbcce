"""The batch lock: one ``medgen batch`` per output folder, released when its holder dies."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from medgen.archive.manifest import utc_now

__all__ = ["LOCK_NAME", "BatchLock"]

LOCK_NAME = ".medgen-batch.lock"


class BatchLock:
    """An exclusive lock on an output folder that dies with its holder.

    ``fcntl.flock`` on ``OUT/.medgen-batch.lock``: the kernel releases it when the holding
    process exits in any way (SIGKILL included), so a crashed run never blocks the next
    one, while a live run refuses a second one with a message naming its pid, host and
    start time (written into the lock file). On systems without ``fcntl`` the lock file's
    pid is checked for life instead.
    """

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self._handle = None

    def acquire(self) -> BatchLock:
        """Take the lock or raise :class:`medgen.errors.InputError` naming the holder."""
        from medgen.errors import InputError

        handle = open(self.path, "a+b")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(self.path)
                handle.close()
                raise InputError(
                    self.path.parent,
                    f"another medgen batch{holder} is writing to this folder; wait for it to "
                    "finish or stop it, then run again",
                ) from None
        else:  # pragma: no cover - Windows
            info = _read_holder(self.path)
            if info and info.get("host") == socket.gethostname() and _pid_alive(info.get("pid", 0)):
                handle.close()
                raise InputError(self.path.parent, f"another medgen batch{_holder_text(self.path)} "
                                 "is writing to this folder")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder).encode())
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Drop the lock (also happens when the process dies)."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()  # nobody holds it now: `medgen status` must not name a pid
        self._handle.flush()
        try:
            import fcntl

            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        except ImportError:  # pragma: no cover - Windows
            pass
        self._handle.close()
        self._handle = None

    def __enter__(self) -> BatchLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _holder_text(path: Path) -> str:
    info = _read_holder(path)
    if not info:
        return ""
    return f" (pid {info.get('pid')} on {info.get('host')}, started {info.get('started')})"


def _pid_alive(pid: int) -> bool:  # pragma: no cover - Windows fallback only
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True
