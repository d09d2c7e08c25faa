"""The primary system-call sensor: eBPF CO-RE on BTF raw tracepoints, read by mmap + numpy.

Lifecycle (also a context manager; :meth:`close` is idempotent and always detaches):

1. :meth:`EbpfSyscallSensor.start` finds or builds ``syscalls.bpf.o`` (:mod:`bam.sensors.build`),
   writes the filter configuration into its read-only data (so the verifier removes the code of
   the modes that are off), sizes the maps, loads, seeds the in-kernel pid bitmap with the
   workload's processes, and attaches fork/exit tracking *before* the syscall tracepoints, so
   no child escapes between the scan and the attach.
2. :meth:`poll` (call it every few ms; :meth:`run_until` does) copies complete chunks out of
   the ring buffer; numpy does the per-event work later.
3. :meth:`close` detaches every program first (from then on the host's syscalls pay nothing),
   drains the ring, collects the events still staged per CPU, reads the loss counters, unloads
   the object and returns a :class:`~bam.sensors.capture.Capture`.

Attaching any raw syscall tracepoint taxes *every* syscall on the host (~140-200 ns here), even
when the in-kernel filter rejects it: attach only while watching.

:class:`EbpfAggregateSensor` uses the same object in aggregation mode: no events leave the
kernel, only per-workload syscall-pair counts (built per thread, so interleaved threads never
create pairs no thread executed) in an mmap-able array that numpy reads in place.
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
import os
import resource
import struct
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from bam.sensors import libbpf
from bam.sensors.build import bpf_object
from bam.sensors.capture import (
    RAW_EVENT,
    Capture,
    map_flags_text,
    normalise,
    nr_to_ids,
    prot_text,
)
from bam.sensors.errors import SensorError
from bam.sensors.ringbuf import RingBuffer
from bam.sensors.workload import Target
from bam.syscalls import name_of

STAGE_N: Final = 256
NSLOT: Final = 512
START_SLOT: Final = 511
OTHER_SLOT: Final = 510
BPF_F_MMAPABLE: Final = 1 << 10
FILTER_ALL, FILTER_PIDS, FILTER_CGROUP = 0, 1, 2
PROGRAMS: Final = (
    "bam_sys_enter",
    "bam_sys_exit",
    "bam_agg_enter",
    "bam_fork",
    "bam_pexit",
    "bam_switch",
    "bam_pfault",
    "bam_net_send",
    "bam_net_recv",
)

_STAGE_HDR: Final = [
    ("n", "<u4"),
    ("busy", "<u4"),
    *(
        (name, "<u8")
        for name in (
            "first_ts",
            "seen",
            "lost",
            "details_lost",
            "chunks",
            "contended",
            "faults",
            "faults_write",
            "faults_exec",
            "faults_unbinned",
            "pending_lost",
            "lost_ts",
            "clk_ts",
            "clk_csw",
            "clk_j",
        )
    ),
    ("clk_tid", "<u4"),
    ("clk_run", "<u4"),
]
STAGE: Final = np.dtype([*_STAGE_HDR, ("ev", RAW_EVENT, (STAGE_N,))])
"""``struct stage`` of the BPF program (per-CPU header and counters, then staged events)."""
DETAIL: Final = np.dtype(
    [
        ("ts", "<u8"),
        ("tgid", "<u4"),
        ("tid", "<u4"),
        ("nr", "<u4"),
        ("len", "<u4"),
        ("args", "<u8", (6,)),
        ("data", "u1", (256,)),
    ]
)
_CONFIG = struct.Struct("<IIQIIQII")
FAULT_SHIFT: Final = 21
"""Page-fault histogram regions: 2 MiB of address space each."""
FAULT_REGIONS: Final = 16384
"""(process, region) slots of the in-kernel histogram; faults beyond are counted unbinned."""
_FAULT_KEY = struct.Struct("<IIQ")
_FAULT_VAL = struct.Struct("<QQQ")
CLK_RUN: Final = 16
"""Events of one thread's uninterrupted run per precise timestamp (see the BPF source)."""


def pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22


def _clock_offset() -> float:
    """Seconds to add to CLOCK_MONOTONIC (bpf_ktime_get_ns) to get epoch time."""
    return time.time() - time.monotonic()


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Loaded:
    """The BPF object opened, configured, loaded; the shared part of both sensor kinds."""

    def __init__(
        self,
        target: Target,
        *,
        progs: tuple[str, ...],
        want_args: bool,
        ring_bytes: int,
        flush_age_ns: int,
        aggregate: bool,
        precise_ts: bool = False,
        fault_regions: int = 1,
    ) -> None:
        libbpf.check_privilege()
        libbpf.check_btf()
        self.target = target
        self.obj = libbpf.BpfObject(bpf_object())
        self._watched_mm: mmap.mmap | None = None
        self.watched: npt.NDArray[np.uint64] | None = None
        try:
            filt, cg_id, cg_level = FILTER_PIDS, 0, 0
            if target.kind == "all":
                filt = FILTER_ALL
            elif target.kind == "cgroup" and target.cgroup_v2:
                filt = FILTER_CGROUP
                cg_id, cg_level = target.cgroup_id_level()
            self.filter = filt
            self.obj.set_rodata(
                _CONFIG.pack(
                    filt,
                    os.getpid(),
                    cg_id,
                    cg_level,
                    int(want_args),
                    flush_age_ns,
                    int(precise_ts),
                    CLK_RUN,
                )
            )
            pm = pid_max()
            self.obj.set_max_entries("watched", pm // 64 + 1)
            self.obj.add_map_flags("watched", BPF_F_MMAPABLE)
            self.obj.set_max_entries("events", ring_bytes)
            self.obj.set_max_entries("prev_nr", pm + 1 if aggregate else 1)
            self.obj.set_max_entries("pairs", NSLOT * NSLOT if aggregate else 1)
            self.obj.set_max_entries("fault_hist", fault_regions)
            if aggregate:
                self.obj.add_map_flags("pairs", BPF_F_MMAPABLE)
            for p in PROGRAMS:
                self.obj.set_autoload(p, p in progs)
            self.obj.load()
            n = self.obj.max_entries("watched")
            self._watched_mm = mmap.mmap(
                self.obj.map_fd("watched"), max(n * 8, mmap.PAGESIZE), mmap.MAP_SHARED
            )
            self.watched = np.frombuffer(self._watched_mm, dtype=np.uint64, count=n)
        except BaseException:
            self.close()
            raise

    def seed(self) -> int:
        """Mark the workload's current processes in the in-kernel bitmap; returns how many."""
        if self.filter != FILTER_PIDS or self.watched is None:
            return 0
        pids = self.target.current_pids() | set(self.target.pids)
        w = self.watched
        for p in pids:
            w[p >> 6] |= np.uint64(1 << (p & 63))
        return len(pids)

    def stage_values(self) -> np.ndarray[Any, Any]:
        """The per-CPU staging areas (one STAGE record per possible CPU)."""
        ncpu = libbpf.possible_cpus()
        size = self.obj.value_size("stage")
        if size != STAGE.itemsize:
            raise SensorError(f"BPF stage is {size} bytes, BAM expects {STAGE.itemsize}: rebuild")
        buf = ctypes.create_string_buffer(size * ncpu)
        self.obj.lookup("stage", 0, buf)
        return np.frombuffer(buf.raw, dtype=STAGE, count=ncpu).copy()

    def close(self) -> None:
        self.watched = None
        if self._watched_mm is not None:
            self._watched_mm.close()
            self._watched_mm = None
        self.obj.close()


class EbpfSyscallSensor:
    """Stream every system call of a workload through the eBPF ring buffer.

    ``args``: capture byte counts, mmap/mprotect protections and the details of rare
    security-relevant calls (exec paths, connect/bind addresses, executable mappings).
    ``returns``: also attach ``sys_exit`` for return values (costs a second tracepoint on every
    host syscall). ``page_faults``: count the workload's user page faults (total, write, exec).
    ``precise_ts``: read the clock for every event (default: once per ``CLK_RUN`` events of a
    thread running uninterrupted on one CPU, the others stamped +1 ns: a lower bound within a
    jiffy and ``CLK_RUN`` calls of the true time; each thread's order stays exact).
    """

    name = "ebpf"

    def __init__(
        self,
        target: Target,
        *,
        args: bool = True,
        returns: bool = False,
        page_faults: bool = False,
        ring_bytes: int = 64 << 20,
        flush_age_ms: float = 50.0,
        trim_tid: int | None = None,
        precise_ts: bool = False,
    ) -> None:
        if ring_bytes & (ring_bytes - 1) or ring_bytes < mmap.PAGESIZE:
            raise ValueError("ring_bytes must be a power of two, at least one page")
        self.target = target
        self.args = args
        self.returns = returns
        self.page_faults = page_faults
        self.ring_bytes = ring_bytes
        self.flush_age_ns = int(flush_age_ms * 1e6)
        self.trim_tid = trim_tid
        self.precise_ts = precise_ts
        self.faults_unsupported: str | None = None
        """Why page faults could not be watched (``page_faults=True`` only), else None."""
        self._bpf: _Loaded | None = None
        self._ring: RingBuffer | None = None
        self._details: RingBuffer | None = None
        self._chunks: list[bytes] = []
        self._detail_chunks: list[bytes] = []
        self._cpu0 = 0.0
        self._t0 = 0.0
        self._offset = 0.0
        self.result: Capture | None = None

    def __enter__(self) -> EbpfSyscallSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._bpf is not None

    def start(self) -> None:
        """Load, seed and attach (see the module docstring for the order and why)."""
        if self._bpf is not None:
            raise SensorError("sensor already started")
        progs = ["bam_sys_enter", "bam_fork", "bam_pexit", "bam_switch"]
        if self.returns:
            progs.append("bam_sys_exit")
        self._cpu0, self._t0, self._offset = _cpu_self(), time.monotonic(), _clock_offset()
        self.faults_unsupported = None
        faults = self.page_faults
        if faults:
            try:
                bpf = self._load((*progs, "bam_pfault"), FAULT_REGIONS)
            except SensorError as e:  # e.g. no exceptions:page_fault_user on this kernel
                self.faults_unsupported = (
                    "page-fault tracepoint unavailable: " + str(e).splitlines()[0]
                )
                faults = False
        if not faults:
            bpf = self._load(tuple(progs), 1)
        self._bpf = bpf
        try:
            self._ring = RingBuffer(bpf.obj.map_fd("events"), bpf.obj.max_entries("events"))
            self._details = RingBuffer(bpf.obj.map_fd("details"), bpf.obj.max_entries("details"))
            bpf.seed()
            bpf.obj.attach("bam_fork")
            bpf.obj.attach("bam_pexit")
            bpf.seed()  # children forked between the first scan and the fork hook
            if faults:
                try:
                    bpf.obj.attach("bam_pfault")
                except SensorError as e:
                    self.faults_unsupported = f"page-fault tracepoint unavailable: {e}"
            bpf.obj.attach("bam_switch")  # before the syscall hooks: nothing staged yet
            if self.returns:
                bpf.obj.attach("bam_sys_exit")
            bpf.obj.attach("bam_sys_enter")
        except BaseException:
            self._teardown()
            raise

    def _load(self, progs: tuple[str, ...], fault_regions: int) -> _Loaded:
        return _Loaded(
            self.target,
            progs=progs,
            want_args=self.args,
            ring_bytes=self.ring_bytes,
            flush_age_ns=self.flush_age_ns,
            aggregate=False,
            precise_ts=self.precise_ts,
            fault_regions=fault_regions,
        )

    def poll(self) -> int:
        """Move complete chunks from the kernel ring to memory; returns bytes moved."""
        if self._ring is None or self._details is None:
            return 0
        n = self._ring.drain(self._chunks)
        self._details.drain(self._detail_chunks)
        return n

    def take_raw(self) -> np.ndarray[Any, Any]:
        """Raw events polled since the last call (arrival order; see ``normalise``)."""
        self.poll()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return np.frombuffer(data, dtype=RAW_EVENT).copy()

    def run_until(self, done: Any, interval: float = 0.005) -> None:
        """Poll every ``interval`` s until ``done()`` is true."""
        while not done():
            self.poll()
            time.sleep(interval)

    def _teardown(self) -> None:
        if self._bpf is not None:
            self._bpf.obj.detach_all()
        for rb in (self._ring, self._details):
            if rb is not None:
                rb.close()
        self._ring = self._details = None
        if self._bpf is not None:
            self._bpf.close()
            self._bpf = None

    def close(self) -> Capture:
        """Detach, drain, unload; returns the capture (the same one on later calls)."""
        if self.result is not None:
            return self.result
        bpf = self._bpf
        if bpf is None:
            raise SensorError("sensor was never started")
        try:
            bpf.obj.detach_all()  # first: the host stops paying, and nothing new arrives
            self.poll()
            stages = bpf.stage_values()
            regions = (
                bpf.obj.items("fault_hist", _FAULT_KEY.size, _FAULT_VAL.size)
                if self.page_faults and self.faults_unsupported is None
                else []
            )
        finally:
            wall = time.monotonic() - self._t0
            self._teardown()
        staged = [st["ev"][: int(st["n"])] for st in stages]
        raw = np.concatenate([np.frombuffer(b"".join(self._chunks), dtype=RAW_EVENT), *staged])
        self._chunks.clear()
        norm = normalise(
            raw, clock_offset=self._offset, returns=self.returns, trim_tid=self.trim_tid
        )
        batch, entries, drop_ts, drop_counts = norm[:4]
        lost = int(stages["lost"].sum())
        # drops still pending (never reported in-stream) are dated by the kernel counters
        pend = stages[stages["pending_lost"] > 0]
        if len(pend):
            drop_ts = np.concatenate([drop_ts, pend["lost_ts"] * 1e-9 + self._offset])
            drop_counts = np.concatenate([drop_counts, pend["pending_lost"].astype(np.int64)])
        details = np.frombuffer(b"".join(self._detail_chunks), dtype=DETAIL)
        self._detail_chunks.clear()
        extra: dict[str, Any] = {
            "details_lost": int(stages["details_lost"].sum()),
            "contended": int(stages["contended"].sum()),
            "chunks": int(stages["chunks"].sum()),
            "target": self.target.label,
            "trimmed": norm.trimmed,
        }
        if self.page_faults and self.faults_unsupported is not None:
            extra["page_faults"] = {"unsupported": self.faults_unsupported}
        elif self.page_faults:
            extra["page_faults"] = {
                "total": int(stages["faults"].sum()),
                "write": int(stages["faults_write"].sum()),
                "exec": int(stages["faults_exec"].sum()),
                "unbinned": int(stages["faults_unbinned"].sum()),
                "region_bytes": 1 << FAULT_SHIFT,
                "regions": fault_regions(regions),
            }
        # 'seen' counts entries and exits; report entries (what becomes events)
        seen = int(stages["seen"].sum())
        self.result = Capture(
            backend=self.name,
            events=batch,
            nr=entries["nr"].astype(np.int32),
            arg=entries["arg"].copy() if self.args else None,
            aux=entries["aux"].copy() if self.args else None,
            args=_details_to_args(details, entries),
            seen=seen // 2 if self.returns else seen,
            drops=lost // 2 if self.returns else lost,
            drop_ts=drop_ts,
            drop_counts=drop_counts,
            sensor_cpu_s=_cpu_self() - self._cpu0,
            wall_s=wall,
            extra=extra,
        )
        return self.result


def _details_to_args(
    details: np.ndarray[Any, Any], entries: np.ndarray[Any, Any]
) -> dict[str, list[tuple[int, str]]]:
    """Rare-call details as ``{call: [(event index, text)]}`` (the strace reader's
    ``meta["args"]`` shape). A detail carries the same kernel timestamp as its entry event,
    which finds the index exactly (-1 if that event was lost)."""
    out: dict[str, list[tuple[int, str]]] = {}
    if not len(details):
        return out
    ts, tids = entries["ts"], entries["tid"]
    pos = np.searchsorted(ts, details["ts"])
    ids = nr_to_ids(details["nr"].astype(np.uint32))
    for d, p, cid in zip(details, pos.tolist(), ids.tolist(), strict=True):
        nr, a = int(d["nr"]), d["args"]
        data = bytes(d["data"][: int(d["len"])])
        if nr in (59, 322):
            text = data.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        elif nr in (42, 49):
            text = sockaddr_text(data)
        elif nr == 9:
            fd = int(a[4]) & 0xFFFFFFFF
            fd_text = "-1" if fd == 0xFFFFFFFF else str(fd)
            text = f"{prot_text(int(a[2]))} {map_flags_text(int(a[3]))} fd={fd_text}"
        else:
            text = prot_text(int(a[2]))
        idx = -1
        while p < len(ts) and ts[p] == d["ts"]:
            if tids[p] == d["tid"]:
                idx = p
                break
            p += 1
        out.setdefault(name_of(cid), []).append((idx, text))
    return out


def fault_regions(items: list[tuple[bytes, bytes]]) -> list[dict[str, int]]:
    """The in-kernel page-fault histogram as ``[{pid, start, faults, write, exec}]`` (one
    entry per process and 2 MiB region that faulted), by pid then address."""
    out = []
    for k, v in items:
        tgid, _, region = _FAULT_KEY.unpack(k)
        n, w, x = _FAULT_VAL.unpack(v)
        out.append(
            {"pid": tgid, "start": region << FAULT_SHIFT, "faults": n, "write": w, "exec": x}
        )
    out.sort(key=lambda r: (r["pid"], r["start"]))
    return out


def sockaddr_text(data: bytes) -> str:
    """``1.2.3.4:80``, ``[::1]:22``, ``unix:/path`` for a raw ``struct sockaddr``."""
    if len(data) < 2:
        return "?"
    fam = int.from_bytes(data[:2], "little")
    if fam == 2 and len(data) >= 8:
        port = int.from_bytes(data[2:4], "big")
        return f"{'.'.join(str(b) for b in data[4:8])}:{port}"
    if fam == 10 and len(data) >= 24:
        port = int.from_bytes(data[2:4], "big")
        return f"[{ipaddress.IPv6Address(data[8:24])}]:{port}"
    if fam == 1:
        path = data[2:].split(b"\0", 1)[0] if data[2:3] != b"\0" else b"@" + data[3:].rstrip(b"\0")
        return "unix:" + path.decode("utf-8", "backslashreplace")
    return f"family {fam}"


class PairCounts:
    """In-kernel aggregation result: how often each syscall followed each other, per thread.

    ``pairs[p, n]`` counts calls ``n`` that followed call ``p`` in the same thread (row
    ``START_SLOT``: a thread's first call); slots are x86-64 numbers, numbers >= ``OTHER_SLOT``
    share one slot. Counts are exact: nothing is queued, so nothing can be lost.
    """

    def __init__(self, pairs: npt.NDArray[np.uint64], wall_s: float, sensor_cpu_s: float) -> None:
        self.pairs = pairs
        self.wall_s = wall_s
        self.sensor_cpu_s = sensor_cpu_s
        self.drops = 0

    @property
    def counts(self) -> npt.NDArray[np.uint64]:
        """Calls per syscall slot."""
        out: npt.NDArray[np.uint64] = self.pairs.sum(axis=0, dtype=np.uint64)
        return out

    @property
    def total(self) -> int:
        return int(self.pairs.sum(dtype=np.uint64))

    @property
    def threads(self) -> int:
        """Thread sequences started (calls in the START row)."""
        return int(self.pairs[START_SLOT].sum(dtype=np.uint64))

    def bigrams(self) -> list[tuple[str, str, int]]:
        """Non-zero pairs as ``(previous, call, count)`` names, most frequent first."""
        p, n = np.nonzero(self.pairs)
        c = self.pairs[p, n]
        order = np.argsort(c)[::-1]

        def nm(slot: int) -> str:
            if slot == START_SLOT:
                return "^"
            if slot == OTHER_SLOT:
                return "<other>"
            return name_of(int(nr_to_ids(np.array([slot], np.uint32))[0]))

        return [(nm(int(p[i])), nm(int(n[i])), int(c[i])) for i in order]


class EbpfAggregateSensor:
    """Count syscall pairs of a workload in the kernel; no event stream at all.

    The cheapest eBPF mode: two array lookups (inlined by the verifier) and one atomic add per
    call. What the n-gram detectors need as *frequencies* (pair histograms, call counts) comes
    out exact, at any rate; what needs *order* beyond pairs needs :class:`EbpfSyscallSensor`.
    """

    name = "ebpf-agg"

    def __init__(self, target: Target) -> None:
        self.target = target
        self._bpf: _Loaded | None = None
        self._mm: mmap.mmap | None = None
        self._cpu0 = 0.0
        self._t0 = 0.0
        self.result: PairCounts | None = None

    def __enter__(self) -> EbpfAggregateSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._bpf is not None:
            raise SensorError("sensor already started")
        self._cpu0, self._t0 = _cpu_self(), time.monotonic()
        bpf = _Loaded(
            self.target,
            progs=("bam_agg_enter", "bam_fork", "bam_pexit"),
            want_args=False,
            ring_bytes=mmap.PAGESIZE,
            flush_age_ns=0,
            aggregate=True,
        )
        self._bpf = bpf
        try:
            size = NSLOT * NSLOT * 8
            self._mm = mmap.mmap(bpf.obj.map_fd("pairs"), size, mmap.MAP_SHARED, mmap.PROT_READ)
            bpf.seed()
            bpf.obj.attach("bam_fork")
            bpf.obj.attach("bam_pexit")
            bpf.seed()
            bpf.obj.attach("bam_agg_enter")
        except BaseException:
            self._teardown()
            raise

    def snapshot(self) -> npt.NDArray[np.uint64]:
        """Current pair counts (a copy; the kernel keeps counting)."""
        if self._mm is None:
            raise SensorError("sensor not running")
        return np.frombuffer(self._mm, dtype=np.uint64).reshape(NSLOT, NSLOT).copy()

    def poll(self) -> int:
        return 0  # nothing to drain: counts live in the kernel until read

    def _teardown(self) -> None:
        if self._bpf is not None:
            self._bpf.obj.detach_all()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._bpf is not None:
            self._bpf.close()
            self._bpf = None

    def close(self) -> PairCounts:
        if self.result is not None:
            return self.result
        if self._bpf is None:
            raise SensorError("sensor was never started")
        try:
            self._bpf.obj.detach_all()
            pairs = self.snapshot()
        finally:
            wall = time.monotonic() - self._t0
            self._teardown()
        self.result = PairCounts(pairs, wall, _cpu_self() - self._cpu0)
        return self.result
