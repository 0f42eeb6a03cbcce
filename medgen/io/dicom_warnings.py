"""Keep library warnings (pydicom, nibabel) off the terminal and next to the file they are about.

pydicom reports damaged values with :func:`warnings.warn`, two raw lines on stderr per
file, with paths and UIDs in them. While :func:`routed_warnings` is active, every warning
goes instead to the list of the file being read in that thread (:func:`file_warnings`),
or, outside any file, to a fallback (a log). The standard library's ``catch_warnings`` is
process-wide and not thread-safe, so the routing is installed once, by the caller's
thread, and files are told apart by a thread-local sink.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["file_warnings", "routed_warnings", "warning_text"]

_local = threading.local()
_log = logging.getLogger("medgen.io")


def warning_text(message: Warning | str, category: type | None = None) -> str:
    """One short line for a warning: ``"UserWarning: first line of the message"``."""
    name = (category or type(message)).__name__
    lines = str(message).strip().splitlines()
    return f"{name}: {(lines[0] if lines else '').strip()[:200]}"


@contextmanager
def file_warnings() -> Iterator[list[str]]:
    """Collect, in the yielded list, the warnings raised in this thread inside the block.

    Only effective while :func:`routed_warnings` is active (in any thread of the process).
    """
    previous = getattr(_local, "sink", None)
    sink: list[str] = []
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = previous


@contextmanager
def routed_warnings(fallback: Callable[[str], None] | None = None) -> Iterator[None]:
    """Send every warning to the current thread's :func:`file_warnings` list, else ``fallback``.

    ``fallback`` defaults to the ``medgen.io`` logger (silent unless logging is set up).
    Enter it from the thread that starts any reader threads, and leave it after they end.
    """
    sink_default = fallback or (lambda text: _log.warning(text))

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        text = warning_text(message, category)
        sink = getattr(_local, "sink", None)
        if sink is not None:
            if text not in sink:
                sink.append(text)
        else:
            sink_default(text)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def drop_unreadable_elements(ds) -> list[str]:  # noqa: ANN001 - a pydicom Dataset
    """Convert every top-level element of ``ds`` now; drop those that cannot be read.

    pydicom converts values lazily, so an element with an unknown VR code or a malformed
    value raises only when some later code touches it, far from the file it came from.
    Returns one line per dropped element (for the file's warnings); what the image
    needs and is dropped is reported later as missing, naming the file.
    """
    dropped: list[str] = []
    for tag in list(ds.keys()):
        try:
            ds[tag]
        except Exception as exc:  # noqa: BLE001 - any damage in one element drops only it
            del ds[tag]
            dropped.append(f"dropped unreadable element {tag}: {warning_text(exc)}")
    return dropped
