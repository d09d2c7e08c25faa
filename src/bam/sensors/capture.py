"""What a system-call capture produces, whatever the backend: a :class:`Capture`.

Raw events from any backend (eBPF, tracefs, strace) are normalised here, once, with numpy:
sorted by time (per-CPU buffers arrive out of order across CPUs; each thread's own order is
kept because a thread's timestamps only grow), exit events paired with their entries to give
return values, and x86-64 numbers converted to canonical ids in one vectorised call.

Drops are never hidden: ``drops`` counts every event a backend selected but could not deliver,
``drop_ts`` says *when* (so windows overlapping a loss are marked incomplete, see
:meth:`Capture.to_trace`), and ``complete`` is true only when nothing was lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from bam.events import SyscallBatch, Trace
from bam.syscalls import canonical_ids
from bam.traces.strace import RET_UNKNOWN

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]

EXIT_FLAG: Final = 0x8000_0000
DROP_MARK: Final = 0xFFFF_FFFF
X32_BIT: Final = 0x4000_0000
NR_EXECVE: Final = 59
NR_EXECVEAT: Final = 322

RAW_EVENT: Final = np.dtype(
    [
        ("ts", "<u8"),  # ns, CLOCK_MONOTONIC
        ("tgid", "<u4"),
        ("tid", "<u4"),
        ("nr", "<u4"),  # EXIT_FLAG on exit events, DROP_MARK for loss markers
        ("aux", "<u4"),
        ("arg", "<u8"),
    ]
)
"""The raw event every backend decodes into (the eBPF ``struct event``, 32 bytes)."""


@dataclass
class Capture:
    """One capture: events in time order plus everything needed to trust (or not) them."""

    backend: str
    events: SyscallBatch
    nr: npt.NDArray[np.int32]
    arg: U64 | None = None
    aux: U32 | None = None
    args: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    seen: int = 0
    drops: int = 0
    drop_ts: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0, np.float64))
    drop_counts: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    sensor_cpu_s: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def complete(self) -> bool:
        """True when the backend lost nothing it selected."""
        return self.drops == 0

    def to_trace(
        self, name: str, *, command: str | list[str] | None = None, label: str | None = None
    ) -> Trace:
        """A :class:`Trace` for the recording writer and the detectors (meta says backend,
        drops and where they happened, and the security-relevant arguments seen)."""
        meta: dict[str, Any] = {
            "format": "bam-sensor",
            "arch": "x86_64",
            "backend": self.backend,
            "seen": int(self.seen),
            "drops": int(self.drops),
            "complete": self.complete,
            "args": {k: [list(p) for p in v] for k, v in self.args.items()},
            **self.extra,
        }
        if command is not None:
            meta["command"] = command
        if len(self.drop_ts):
            meta["drop_ts"] = self.drop_ts
            meta["drop_counts"] = self.drop_counts
        return Trace(name=name, events=self.events, label=label, meta=meta)


def nr_to_ids(nr: npt.NDArray[np.uint32]) -> npt.NDArray[np.int32]:
    """Canonical ids of raw x86-64 numbers (x32-ABI calls folded onto their 64-bit names,
    nonsense numbers onto the unnamed number 1023 rather than failing the batch)."""
    n = (nr & ~np.uint32(X32_BIT)).astype(np.int64)
    n[(n < 0) | (n >= 1024)] = 1023
    return canonical_ids(n, "x86_64")


class Normalised(NamedTuple):
    batch: SyscallBatch
    entries: np.ndarray[Any, Any]
    drop_ts: npt.NDArray[np.float64]
    drop_counts: npt.NDArray[np.int64]
    trimmed: int  # events of the gated command before its exec, removed


def normalise(
    raw: np.ndarray[Any, Any],
    *,
    clock_offset: float,
    returns: bool,
    trim_tid: int | None = None,
) -> Normalised:
    """Turn raw events (any order) into a time-ordered :class:`SyscallBatch`.

    ``entries`` in the result are the raw entry events aligned with the batch (for
    ``nr``/``arg``/``aux``). ``clock_offset`` converts the
    raw monotonic nanoseconds to epoch seconds. With ``returns``, each exit event gives its
    return value to the entry just before it in the same thread; entries without an exit
    (``exit_group``, calls still blocked at the end) keep :data:`RET_UNKNOWN`. ``trim_tid``
    drops that thread's events before its first ``execve`` (the gate of a started command).
    """
    raw = np.asarray(raw, dtype=RAW_EVENT)
    marks = raw["nr"] == DROP_MARK
    drop_ts = raw["ts"][marks].astype(np.float64) * 1e-9 + clock_offset
    drop_counts = raw["arg"][marks].astype(np.int64)
    ev = raw[~marks]
    ev = ev[np.argsort(ev["ts"], kind="stable")]

    ret: npt.NDArray[np.int64] | None = None
    if returns:
        is_exit = (ev["nr"] & EXIT_FLAG) != 0
        # per thread, in time order: an exit belongs to the entry right before it
        order = np.lexsort((np.arange(len(ev)), ev["tid"]))
        tid_o = ev["tid"][order]
        exit_o = is_exit[order]
        nr_o = ev["nr"][order] & ~np.uint32(EXIT_FLAG)
        prev_ok = np.zeros(len(ev), dtype=bool)
        prev_ok[1:] = (tid_o[1:] == tid_o[:-1]) & ~exit_o[:-1] & (nr_o[1:] == nr_o[:-1])
        paired = exit_o & prev_ok
        ret_all = np.full(len(ev), RET_UNKNOWN, dtype=np.int64)
        tgt = order[np.flatnonzero(paired) - 1]
        ret_all[tgt] = ev["arg"][order[paired]].view(np.int64)
        keep = ~is_exit
        ev, ret = ev[keep], ret_all[keep]

    trimmed = 0
    if trim_tid is not None and len(ev):
        mine = ev["tid"] == trim_tid
        execs = np.flatnonzero(mine & ((ev["nr"] == NR_EXECVE) | (ev["nr"] == NR_EXECVEAT)))
        if len(execs):
            drop = mine & (np.arange(len(ev)) < execs[0])
            trimmed = int(drop.sum())
            ev = ev[~drop]
            if ret is not None:
                ret = ret[~drop]

    batch = SyscallBatch(
        ts=ev["ts"].astype(np.float64) * 1e-9 + clock_offset,
        pid=ev["tgid"].astype(np.int32),
        tid=ev["tid"].astype(np.int32),
        sid=nr_to_ids(ev["nr"]),
        ret=ret,
    )
    return Normalised(batch, ev, drop_ts, drop_counts, trimmed)


_PROT = ((1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC"))
_MAP = ((0x01, "MAP_SHARED"), (0x02, "MAP_PRIVATE"), (0x10, "MAP_FIXED"), (0x20, "MAP_ANONYMOUS"))


def prot_text(prot: int) -> str:
    """``PROT_READ|PROT_EXEC`` style text, as strace prints it."""
    names = [n for bit, n in _PROT if prot & bit]
    return "|".join(names) if names else "PROT_NONE"


def map_flags_text(flags: int) -> str:
    names = [n for bit, n in _MAP if flags & bit]
    rest = flags & ~sum(b for b, _ in _MAP)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"
