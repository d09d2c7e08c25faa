"""System-call vocabulary: names <-> numbers for x86_64 and i386, and BAM's canonical ids.

Traces come with different numberings (ADFA-LD uses i386 numbers, live x86_64 sensors and strace
use x86_64 or names). Models must see one vocabulary, so every reader converts to *canonical ids*:
indices into the sorted union of syscall names of both architectures. A number that has no name in
its architecture's table still gets a stable id (``UNKNOWN_BASE + arch offset + nr``) so that unknown
calls remain distinct rather than collapsing together.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Literal

import numpy as np
import numpy.typing as npt

Arch = Literal["x86_64", "i386"]
ARCHES: tuple[Arch, ...] = ("x86_64", "i386")


@cache
def table(arch: Arch) -> dict[str, int]:
    """Name -> number for ``arch`` (generated from the kernel UAPI headers)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHES)}")
    text = resources.files("bam").joinpath(f"data/syscalls_{arch}.json").read_text()
    data: dict[str, int] = json.loads(text)
    return data


@cache
def canonical_names() -> tuple[str, ...]:
    """All syscall names of all supported architectures, sorted: canonical id = index."""
    names: set[str] = set()
    for arch in ARCHES:
        names.update(table(arch))
    return tuple(sorted(names))


@cache
def _name_to_id() -> dict[str, int]:
    return {n: i for i, n in enumerate(canonical_names())}


_MAX_NR = 1024
UNKNOWN_BASE = 4096  # ids >= this are "unnamed number nr in arch"


@cache
def _number_lut(arch: Arch) -> npt.NDArray[np.int32]:
    lut = np.empty(_MAX_NR, dtype=np.int32)
    offset = UNKNOWN_BASE + ARCHES.index(arch) * _MAX_NR
    lut[:] = offset + np.arange(_MAX_NR, dtype=np.int32)
    ids = _name_to_id()
    for name, nr in table(arch).items():
        if 0 <= nr < _MAX_NR:
            lut[nr] = ids[name]
    return lut


def canonical_ids(numbers: npt.ArrayLike, arch: Arch) -> npt.NDArray[np.int32]:
    """Map syscall numbers of ``arch`` to canonical ids (vectorised).

    Raises ``ValueError`` for numbers outside ``0..1023``, which no Linux ABI uses.
    """
    nrs = np.asarray(numbers, dtype=np.int64)
    if nrs.size and (nrs.min() < 0 or nrs.max() >= _MAX_NR):
        bad = int(nrs[(nrs < 0) | (nrs >= _MAX_NR)][0])
        raise ValueError(f"syscall number {bad} out of range 0..{_MAX_NR - 1}")
    return _number_lut(arch)[nrs]


def id_of(name: str) -> int:
    """Canonical id of a syscall name; ``KeyError`` naming it if no supported ABI has it."""
    try:
        return _name_to_id()[name]
    except KeyError:
        raise KeyError(f"unknown system call name {name!r}") from None


def name_of(cid: int) -> str:
    """Human-readable name of a canonical id (``i386#nr`` style for unnamed numbers)."""
    names = canonical_names()
    if 0 <= cid < len(names):
        return names[cid]
    if cid >= UNKNOWN_BASE:
        arch_i, nr = divmod(cid - UNKNOWN_BASE, _MAX_NR)
        if arch_i < len(ARCHES):
            return f"{ARCHES[arch_i]}#{nr}"
    return f"#{cid}"


def number_of(name: str, arch: Arch) -> int:
    """Number of syscall ``name`` in ``arch``."""
    try:
        return table(arch)[name]
    except KeyError:
        raise KeyError(f"system call {name!r} does not exist on {arch}") from None
