"""Core data types that flow from sensors and trace readers to the detectors.

System calls travel as :class:`SyscallBatch`: parallel numpy arrays, never one Python object per
event, because hot paths handle millions of events per second. Syscalls are stored as canonical
ids (see :mod:`bam.syscalls`), so models never care which ABI or reader produced them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SyscallBatch:
    """A batch of system-call events in capture order.

    ``ts`` are seconds (float64; relative or epoch, as the source gives them, NaN where unknown);
    ``pid``/``tid`` the process and thread ids (0 where the source has none); ``sid`` canonical
    syscall ids; ``ret`` the return value where known (``None`` if the source has none).
    """

    ts: F64
    pid: I32
    tid: I32
    sid: I32
    ret: I64 | None = None

    def __post_init__(self) -> None:
        n = len(self.sid)
        for name in ("ts", "pid", "tid") + (("ret",) if self.ret is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"SyscallBatch.{name} has {len(getattr(self, name))} rows, sid {n}"
                )

    def __len__(self) -> int:
        return len(self.sid)

    @classmethod
    def from_ids(cls, sid: npt.ArrayLike, ts: npt.ArrayLike | None = None) -> SyscallBatch:
        """A single-thread batch from canonical ids (timestamps default to the call index)."""
        s = np.ascontiguousarray(sid, dtype=np.int32)
        t = np.arange(len(s), dtype=np.float64) if ts is None else np.asarray(ts, np.float64)
        z = np.zeros(len(s), dtype=np.int32)
        return cls(ts=t, pid=z, tid=z.copy(), sid=s)

    @classmethod
    def concat(cls, batches: list[SyscallBatch]) -> SyscallBatch:
        """Concatenate batches in order (``ret`` kept only if every batch has it)."""
        if not batches:
            return cls.from_ids(np.empty(0, np.int32))
        has_ret = all(b.ret is not None for b in batches)
        return cls(
            ts=np.concatenate([b.ts for b in batches]),
            pid=np.concatenate([b.pid for b in batches]),
            tid=np.concatenate([b.tid for b in batches]),
            sid=np.concatenate([b.sid for b in batches]),
            ret=np.concatenate([b.ret for b in batches if b.ret is not None]) if has_ret else None,
        )

    def threads(self) -> Iterator[tuple[int, npt.NDArray[np.intp]]]:
        """Yield ``(tid, indices)`` per thread, indices in capture order.

        Detectors model each thread's sequence separately: interleaving threads would create
        n-grams that no program ever executed.
        """
        if len(self) == 0:
            return
        order = np.argsort(self.tid, kind="stable")
        tids = self.tid[order]
        cuts = np.flatnonzero(np.diff(tids)) + 1
        for chunk in np.split(order, cuts):
            yield int(self.tid[chunk[0]]), chunk


@dataclass(slots=True)
class Trace:
    """One recorded run: a name (usually the file), its events, and an optional label."""

    name: str
    events: SyscallBatch
    label: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def sequences(self) -> list[I32]:
        """Per-thread syscall id sequences (threads in order of their first event)."""
        seqs = [(int(idx[0]), self.events.sid[idx]) for _, idx in self.events.threads()]
        seqs.sort(key=lambda p: p[0])
        return [s for _, s in seqs]


@dataclass(frozen=True, slots=True)
class Window:
    """A scored window: a span of one thread's calls in one trace."""

    trace: str
    tid: int
    start: int
    end: int
    t_start: float
    t_end: float
    score: float
