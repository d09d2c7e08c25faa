"""BAM's exception hierarchy.

Every error that bad input can cause derives from :class:`BamError`, so the CLI can print one
clear line (naming the file, line and problem) and exit non-zero instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class BamError(Exception):
    """Base class for errors caused by input or environment, shown to users as one line."""


class TraceFormatError(BamError):
    """A trace file is malformed; names the file and, where known, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ModelError(BamError):
    """A saved model or baseline is unreadable, of an unknown version, or fails its integrity check."""


class ModelIntegrityError(ModelError):
    """A model file's content does not match its recorded or expected ``model_id``."""
