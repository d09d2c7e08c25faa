"""Format name -> reader, so the CLI and library open any supported trace the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bam.errors import TraceFormatError
from bam.events import Trace
from bam.traces.adfa import iter_adfa
from bam.traces.lidds import iter_lidds
from bam.traces.recording import iter_recordings
from bam.traces.strace import iter_strace

Reader = Callable[[Path], Iterator[Trace]]

_READERS: dict[str, Reader] = {
    "adfa": iter_adfa,
    "strace": iter_strace,
    "lidds": iter_lidds,
    "bam": iter_recordings,
}


def register(name: str, reader: Reader) -> None:
    """Make ``reader`` available as ``--format name``."""
    _READERS[name] = reader


def formats() -> list[str]:
    """Names of the supported trace formats."""
    return sorted(_READERS)


def read_traces(fmt: str, paths: Iterable[str | Path]) -> Iterator[Trace]:
    """Yield every trace in ``paths`` (files or folders) read as format ``fmt``."""
    try:
        reader = _READERS[fmt]
    except KeyError:
        raise TraceFormatError(
            fmt, f"unknown trace format; expected one of {', '.join(formats())}"
        ) from None
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise TraceFormatError(path, "no such file or folder")
        yield from reader(path)
