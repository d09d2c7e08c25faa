"""Live sensor batches → per-thread window scores, incrementally, in numpy.

The eBPF sensor hands out raw chunks in arrival order every few ms (:meth:`take_raw`); each
tick :class:`LiveSensor` turns them into one time-ordered :class:`~bam.events.SyscallBatch`.
:class:`WindowScorer` keeps, per thread, the last ``window + context`` calls, so a frame that
spans two ticks is scored exactly as it would be offline, and scores all threads' new frames
in one batched call of :meth:`~bam.detect.Baseline.score_windows` (no per-event Python).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from bam.detect import Baseline
from bam.events import SyscallBatch
from bam.sensors.capture import normalise
from bam.sensors.errors import SensorUnavailableError
from bam.sensors.select import choose
from bam.sensors.workload import Target
from bam.syscalls import id_of

I32 = npt.NDArray[np.int32]
F64 = npt.NDArray[np.float64]


def _ids(*names: str) -> I32:
    out = []
    for n in names:
        try:
            out.append(id_of(n))
        except (KeyError, ValueError):
            continue
    return np.array(out, dtype=np.int32)


FORK_IDS = _ids("clone", "clone3", "fork", "vfork")
EXEC_IDS = _ids("execve", "execveat")
LISTEN_IDS = _ids("listen")
MPROTECT_IDS = _ids("mprotect")


def self_cpu_s() -> float:
    """CPU seconds used by this process (user + system), all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LiveSensor:
    """A streaming system-call sensor (eBPF ring buffer) for one target.

    The ring is 4 MiB (131k events): its pages are mapped twice and count fully in the
    agent's resident memory (16 MiB cost 35 MB here), and the agent drains it every 20 ms.
    """

    def __init__(
        self,
        target: Target,
        *,
        backend: str = "auto",
        trim_tid: int | None = None,
        ring_bytes: int = 4 << 20,
    ):
        choice = choose(backend)
        if choice.backend != "ebpf":
            raise SensorUnavailableError(
                f"live monitoring streams from the eBPF sensor; {choice.describe()} cannot "
                "stream yet (record with `bam record` instead)"
            )
        from bam.sensors.ebpf import EbpfSyscallSensor

        self.choice = choice
        self.sensor = EbpfSyscallSensor(
            target, args=False, flush_age_ms=50.0, ring_bytes=ring_bytes
        )
        self.trim_tid = trim_tid
        self.events = 0
        self._dropped = 0

    def start(self) -> None:
        self.sensor.start()

    def poll(self) -> None:
        self.sensor.poll()

    def take(self) -> SyscallBatch:
        raw = self.sensor.take_raw()
        if len(raw) == 0:
            return SyscallBatch.from_ids(np.empty(0, np.int32))
        norm = normalise(
            raw, clock_offset=self.sensor._offset, returns=False, trim_tid=self.trim_tid
        )
        if self.trim_tid is not None and norm.trimmed >= 0 and len(norm.batch):
            self.trim_tid = None  # only the gated command's first exec is trimmed
        self.events += len(norm.batch)
        self._dropped += int(norm.drop_counts.sum())
        return norm.batch

    def take_dropped(self) -> int:
        """Events lost (ring buffer full) in what :meth:`take` returned since the last call."""
        n, self._dropped = self._dropped, 0
        return n

    def close(self) -> Any:
        if self.sensor.running:
            return self.sensor.close()
        return None


@dataclass
class WindowUpdate:
    """What one tick added: new frames' magnitudes and where the worst one is."""

    calls: int = 0
    magnitudes: F64 = field(default_factory=lambda: np.empty(0))
    """Magnitudes of new, non-overlapping frames (1 = at threshold)."""
    peak: float = 0.0
    peak_segment: I32 | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    first_anomaly_ts: float | None = None
    per_thread: list[tuple[int, F64]] = field(default_factory=list)
    """``(tid, magnitudes)`` of each thread's new non-overlapping frames, in order."""
    forks: int = 0
    execs: int = 0
    listens: int = 0
    mprotects: int = 0


class WindowScorer:
    """Incremental per-thread window scoring against a fitted baseline."""

    def __init__(self, baseline: Baseline, context: int = 8, forget_s: float = 120.0) -> None:
        baseline.check_fitted()
        self.baseline = baseline
        self.w = baseline.window
        self.keep = baseline.window + context
        self.context = context
        self.forget_s = forget_s
        self.tails: dict[int, I32] = {}
        self.tail_ts: dict[int, F64] = {}
        self.seen: dict[int, float] = {}

    def reset(self) -> None:
        """Forget every thread's context (after a gap in the stream)."""
        self.tails.clear()
        self.tail_ts.clear()

    def seed(self, batch: SyscallBatch) -> None:
        """Prime the per-thread context with calls already seen (the end of profiling), so
        the first monitored frames are not scored without their preceding calls."""
        now = time.monotonic()
        for tid, idx in batch.threads():
            self.tails[tid] = batch.sid[idx][-self.keep :]
            self.tail_ts[tid] = batch.ts[idx][-self.keep :]
            self.seen[tid] = now

    def feed(self, batch: SyscallBatch) -> WindowUpdate:
        up = WindowUpdate(calls=len(batch))
        if len(batch) == 0:
            return up
        up.t_start, up.t_end = float(np.nanmin(batch.ts)), float(np.nanmax(batch.ts))
        sid = batch.sid
        up.forks = int(np.isin(sid, FORK_IDS).sum())
        up.execs = int(np.isin(sid, EXEC_IDS).sum())
        up.listens = int(np.isin(sid, LISTEN_IDS).sum())
        up.mprotects = int(np.isin(sid, MPROTECT_IDS).sum())
        now = time.monotonic()
        seqs: list[I32] = []
        meta: list[tuple[int, int, F64]] = []  # (tid, old length, timestamps of full)
        for tid, idx in batch.threads():
            tail = self.tails.get(tid, np.empty(0, np.int32))
            tts = self.tail_ts.get(tid, np.empty(0))
            full = np.concatenate([tail, sid[idx]])
            fts = np.concatenate([tts, batch.ts[idx]])
            seqs.append(full)
            meta.append((tid, len(tail), fts))
            self.tails[tid] = full[-self.keep :]
            self.tail_ts[tid] = fts[-self.keep :]
            self.seen[tid] = now
        threads = self.baseline.score_windows(seqs)
        mags: list[F64] = []
        best = -np.inf
        for ts, (tid, n_old, fts) in zip(threads, meta, strict=True):
            if len(ts.scores) == 0:
                continue
            new = ts.starts + self.w > n_old if len(seqs[ts.tid_index]) > self.w else None
            starts = ts.starts if new is None else ts.starts[new]
            scores = ts.scores if new is None else ts.scores[new]
            if len(scores) == 0:
                continue
            m = np.asarray(self.baseline.window_magnitude(scores), dtype=np.float64)
            k = int(np.argmax(m))
            pick = np.unique(np.concatenate([np.arange(0, len(m), self.w), [k]]))
            mags.append(m[pick])
            up.per_thread.append((tid, m[pick]))
            if m[k] > best:
                best = float(m[k])
                a = int(starts[k])
                up.peak_segment = seqs[ts.tid_index][max(0, a - self.context) : a + self.w]
            over = np.flatnonzero(m > 1.0)
            if len(over):
                t0 = float(fts[min(int(starts[over[0]]), len(fts) - 1)])
                if up.first_anomaly_ts is None or t0 < up.first_anomaly_ts:
                    up.first_anomaly_ts = t0
        if mags:
            up.magnitudes = np.concatenate(mags)
            up.peak = best
        self._forget(now)
        return up

    def _forget(self, now: float) -> None:
        old = [t for t, s in self.seen.items() if now - s > self.forget_s]
        for t in old:
            self.tails.pop(t, None)
            self.tail_ts.pop(t, None)
            self.seen.pop(t, None)
