"""ADFA-LD reader: one trace per ``.txt`` file of whitespace-separated i386 syscall numbers.

ADFA-LD (Creech & Hu, UNSW Canberra, 2013) has no timestamps or thread ids; each file is one
process's calls, so the reader gives a single-thread batch with the call index as time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bam.errors import TraceFormatError
from bam.events import SyscallBatch, Trace
from bam.syscalls import canonical_ids

_MAX_BYTES = 64 * 1024 * 1024
_ATTACK_DIR = re.compile(r"^(?P<type>[A-Za-z_]+?)_(?P<run>\d+)$")


def _first_bad_token(text: str) -> tuple[int, str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        for tok in line.split():
            if not tok.isdigit() or int(tok) >= 1024:
                return lineno, tok
    return 0, ""


def read_adfa(path: str | Path) -> Trace:
    """Read one ADFA-LD trace file; labels attack traces by their ``<Type>_<run>`` folder."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TraceFormatError(p, f"cannot read: {e.strerror or e}") from None
    if len(raw) > _MAX_BYTES:
        raise TraceFormatError(p, f"file is {len(raw)} bytes, larger than {_MAX_BYTES}")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TraceFormatError(
            p, "not an ADFA-LD trace: non-ASCII (binary?) content", line
        ) from None
    tokens = text.split()
    if not tokens:
        raise TraceFormatError(p, "empty trace: no system-call numbers")
    try:
        nrs = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        line, tok = _first_bad_token(text)
        if tok.isdigit():
            raise TraceFormatError(
                p, f"syscall number {tok[:40]} out of range 0..1023", line
            ) from None
        raise TraceFormatError(p, f"expected a syscall number, found {tok[:40]!r}", line) from None
    if nrs.min() < 0 or nrs.max() >= 1024:
        line, tok = _first_bad_token(text)
        raise TraceFormatError(p, f"syscall number {tok[:40]} out of range 0..1023", line)
    label, meta = None, {}
    m = _ATTACK_DIR.match(p.parent.name)
    if m and p.parent.parent.name == "Attack_Data_Master":
        label, meta = m.group("type"), {"attack_type": m.group("type"), "run": int(m.group("run"))}
    elif p.parent.name in ("Training_Data_Master", "Validation_Data_Master"):
        label = "normal"
    return Trace(
        name=str(p),
        events=SyscallBatch.from_ids(canonical_ids(nrs, "i386")),
        label=label,
        meta=meta,
    )


def iter_adfa(path: str | Path) -> Iterator[Trace]:
    """A file, or every ``*.txt`` below a folder (sorted, so runs are reproducible)."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*.txt")):
            yield read_adfa(f)
    else:
        yield read_adfa(p)


@dataclass(frozen=True, slots=True)
class AdfaDataset:
    """ADFA-LD split as its authors define it: fit on ``training``; ``validation`` vs ``attack``."""

    training: list[Trace]
    validation: list[Trace]
    attack: list[Trace]


def load_adfa_dataset(root: str | Path) -> AdfaDataset:
    """Load the three ``*_Master`` folders of an ADFA-LD copy."""
    r = Path(root)
    parts = {}
    for key, folder in (
        ("training", "Training_Data_Master"),
        ("validation", "Validation_Data_Master"),
        ("attack", "Attack_Data_Master"),
    ):
        d = r / folder
        if not d.is_dir():
            raise TraceFormatError(r, f"not an ADFA-LD folder: {folder}/ is missing")
        parts[key] = list(iter_adfa(d))
    return AdfaDataset(**parts)
