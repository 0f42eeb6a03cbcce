"""Errors meant for people: one line naming the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class MedgenError(Exception):
    """Base class for errors that the CLI prints as one line, without a traceback."""


class InputError(MedgenError):
    """An input file or series cannot be used; ``str()`` reads ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


class ConfigError(MedgenError):
    """A config file has an unknown key or a value of the wrong type."""
