"""Fallback system-call backend: the kernel's own tracing ring (tracefs), read as binary pages.

Used where eBPF cannot run (no BTF, no libbpf, a locked-down BPF). It needs root and tracefs.
Why binary: the text ``trace_pipe`` is formatted by the kernel and parsed by Python per line,
which loses ~70% of events at 1 M/s here; ``per_cpu/cpuN/trace_pipe_raw`` hands out the ring's
pages as they are, and this module decodes them with numpy (runs of same-sized records are
decoded at once; only the rare time-extend records are walked one by one).

Isolation and clean-up: everything happens in a private tracing *instance*
(``instances/bam-<pid>-<n>``) with its own buffer, event enable and pid filter, so the
host's global tracing settings are never touched, and the instance is removed on close. If
tracefs is not mounted, a private mount is made in a temporary folder and unmounted on close.

Workload filter: ``set_event_pid`` with the ``event-fork`` option, so children and threads
created after the start are followed by the kernel. tracefs records thread ids only: thread
groups are resolved from ``/proc`` (a thread already gone is its own group). Drops are read
from the per-CPU ``stats`` (``overwrite`` is off, so a full buffer drops new events and counts
them) and from the "missed events" flag of each page.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import re
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from bam.sensors.capture import RAW_EVENT, Capture, normalise
from bam.sensors.errors import SensorError, SensorUnavailableError
from bam.sensors.workload import Target

_CANDIDATES: Final = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
_PAGE_HDR: Final = 16
_MISSED_EVENTS: Final = 1 << 31
_MISSED_STORED: Final = 1 << 30
_SIZE_MASK: Final = (1 << 27) - 1
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _mounted() -> Path | None:
    for c in _CANDIDATES:
        if (c / "events").is_dir() and (c / "instances").is_dir():
            return c
    return None


def probe() -> None:
    """Raise :class:`SensorUnavailableError` unless this backend can run."""
    if os.geteuid() != 0:
        raise SensorUnavailableError("tracefs needs root")
    if _mounted() is None:
        try:
            fs = Path("/proc/filesystems").read_text()
        except OSError:
            fs = ""
        if "tracefs" not in fs:
            raise SensorUnavailableError("the kernel has no tracefs")
    elif not (_mounted() or Path()).joinpath("events/raw_syscalls/sys_enter").is_dir():
        raise SensorUnavailableError("the kernel has no raw_syscalls tracepoints")


class _Mount:
    """tracefs as found, or privately mounted for the sensor's lifetime."""

    def __init__(self) -> None:
        found = _mounted()
        self.private: Path | None = None
        if found is not None:
            self.root = found
            return
        d = Path(tempfile.mkdtemp(prefix="bam-tracefs-"))
        if _libc.mount(b"nodev", os.fsencode(d), b"tracefs", 0, None) != 0:
            e = ctypes.get_errno()
            d.rmdir()
            raise SensorUnavailableError(f"cannot mount tracefs: {os.strerror(e)}")
        self.private = self.root = d

    def close(self) -> None:
        if self.private is not None:
            if _libc.umount2(os.fsencode(self.private), 0) == 0:
                with contextlib.suppress(OSError):
                    self.private.rmdir()
            self.private = None


def _layout(fmt: str) -> dict[str, tuple[int, int]]:
    """field name -> (offset, size) from an event's ``format`` file."""
    out = {}
    for m in re.finditer(r"field:[^;]*?(\w+)(?:\[\d+\])?;\s*offset:(\d+);\s*size:(\d+);", fmt):
        out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def decode_pages(
    data: bytes, rec_payload: int, pid_off: int, id_off: int, arg_off: int
) -> tuple[
    npt.NDArray[np.uint64],
    npt.NDArray[np.int32],
    npt.NDArray[np.int64],
    npt.NDArray[np.uint64],
    int,
]:
    """Decode concatenated ring-buffer pages of one CPU: (ts ns, tid, nr, args[0..5], missed).

    ``rec_payload`` is the event's size (64 for ``raw_syscalls:sys_enter``); records of that
    size are found in runs and decoded by numpy, other record types are stepped over.
    """
    page = 4096
    words = np.frombuffer(data[: len(data) - len(data) % 4], dtype="<u4")
    u64 = np.frombuffer(data[: len(data) - len(data) % 8], dtype="<u8")
    small = rec_payload <= 112 and rec_payload % 4 == 0
    tl_want = rec_payload // 4
    step = 4 + rec_payload
    starts: list[npt.NDArray[np.int64]] = []
    stamps: list[npt.NDArray[np.uint64]] = []
    missed = 0
    for base in range(0, len(data) - _PAGE_HDR + 1, page):
        t = int(u64[base // 8])
        commit = int(u64[base // 8 + 1])
        size = commit & _SIZE_MASK
        end = base + _PAGE_HDR + min(size, page - _PAGE_HDR)
        if commit & _MISSED_STORED and end + 8 <= base + page:
            missed += int(np.frombuffer(data, "<u8", 1, end)[0])
        elif commit & _MISSED_EVENTS:
            missed += 1  # at least one; the per-CPU stats give the exact total
        pos = base + _PAGE_HDR
        while pos + 4 <= end:
            h = int(words[pos // 4])
            tl, td = h & 31, h >> 5
            if small and tl == tl_want:
                k = np.arange(0, (end - pos) // step, dtype=np.int64)
                hdr = words[(pos + k * step) // 4]
                bad = np.flatnonzero((hdr & 31) != tl_want)
                run = int(bad[0]) if len(bad) else len(k)
                run = max(run, 1)
                ts = t + np.cumsum(hdr[:run] >> 5, dtype=np.uint64)
                starts.append(pos + k[:run] * step + 4)
                stamps.append(ts)
                t = int(ts[-1])
                pos += run * step
            elif tl == 30:  # time extend
                t += (int(words[pos // 4 + 1]) << 27) | td
                pos += 8
            elif tl == 31:  # absolute time stamp
                t = (int(words[pos // 4 + 1]) << 27) | td
                pos += 8
            elif tl == 29:  # padding: the rest of the page, or a discarded event
                if td == 0:
                    break
                pos += 4 + int(words[pos // 4 + 1])
            elif tl == 0:  # large record: length in array[0]
                t += td
                pos += 4 + int(words[pos // 4 + 1])
            else:
                t += td
                pos += 4 + tl * 4
    if not starts:
        z = np.empty(0, np.int64)
        return (
            z.astype(np.uint64),
            z.astype(np.int32),
            z,
            np.empty((0, 6), np.uint64),
            missed,
        )
    s = np.concatenate(starts)
    ts_all = np.concatenate(stamps)
    tid = words[(s + pid_off) // 4].astype(np.int32)
    nr = (words[(s + id_off) // 4].astype(np.int64)) | (
        words[(s + id_off) // 4 + 1].astype(np.int64) << 32
    )
    a0 = (s + arg_off) // 4
    lo = words[a0[:, None] + 2 * np.arange(6)[None, :]].astype(np.uint64)
    hi = words[a0[:, None] + 2 * np.arange(6)[None, :] + 1].astype(np.uint64)
    return ts_all, tid, nr, lo | (hi << np.uint64(32)), missed


def _tgid(tid: int, cache: dict[int, int]) -> int:
    g = cache.get(tid)
    if g is None:
        try:
            text = Path(f"/proc/{tid}/status").read_text()
            g = int(text.split("\nTgid:", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            g = tid
        cache[tid] = g
    return g


class TracefsSyscallSensor:
    """``raw_syscalls:sys_enter`` of a workload through a private tracefs instance."""

    name = "tracefs"

    def __init__(
        self, target: Target, *, buffer_kb: int = 16384, trim_tid: int | None = None
    ) -> None:
        if target.kind == "all":
            raise SensorError("the tracefs backend needs a workload (pids or cgroup), not 'all'")
        self.target = target
        self.buffer_kb = buffer_kb
        self.trim_tid = trim_tid
        self._mount: _Mount | None = None
        self.inst: Path | None = None
        self._fds: list[int] = []
        self._bufs: list[list[bytes]] = []
        self._cpu0 = self._t0 = self._offset = 0.0
        self._tgids: dict[int, int] = {}
        self.result: Capture | None = None

    def __enter__(self) -> TracefsSyscallSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _w(self, rel: str, value: str) -> None:
        assert self.inst is not None
        try:
            (self.inst / rel).write_text(value)
        except OSError as e:
            raise SensorError(f"tracefs: cannot write {value!r} to {rel}: {e.strerror}") from None

    def start(self) -> None:
        probe()
        self._mount = _Mount()
        try:
            self.inst = self._mount.root / "instances" / f"bam-{os.getpid()}-{next(_counter)}"
            self.inst.mkdir()
            self._w("buffer_size_kb", str(self.buffer_kb))
            self._w("trace_clock", "mono")
            self._w("options/overwrite", "0")
            self._w("options/event-fork", "1")
            self._fmt = _layout((self.inst / "events/raw_syscalls/sys_enter/format").read_text())
            tids: list[int] = []
            pids = self.target.current_pids() or set(self.target.pids)
            for p in pids:
                with contextlib.suppress(OSError):
                    tids += [int(t) for t in os.listdir(f"/proc/{p}/task")]
            if not tids:
                raise SensorError(f"{self.target.label}: no process to watch")
            self._w("set_event_pid", " ".join(map(str, tids)))
            ncpu = len(list((self.inst / "per_cpu").glob("cpu*")))
            for c in range(ncpu):
                fd = os.open(
                    self.inst / f"per_cpu/cpu{c}/trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK
                )
                self._fds.append(fd)
                self._bufs.append([])
            self._cpu0 = _cpu_self()
            self._t0, self._offset = time.monotonic(), time.time() - time.monotonic()
            self._w("events/raw_syscalls/sys_enter/enable", "1")
        except BaseException:
            self._teardown()
            raise

    def poll(self) -> int:
        n = 0
        for fd, buf in zip(self._fds, self._bufs, strict=True):
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        break
                    raise
                if not chunk:
                    break
                if len(chunk) % 4096:
                    chunk += b"\0" * (4096 - len(chunk) % 4096)
                buf.append(chunk)
                n += len(chunk)
        return n

    def _drops(self) -> int:
        total = 0
        if self.inst is None:
            return 0
        for st in sorted((self.inst / "per_cpu").glob("cpu*/stats")):
            with contextlib.suppress(OSError, ValueError):
                for line in st.read_text().splitlines():
                    k, _, v = line.partition(":")
                    if k.strip() in ("overrun", "dropped events"):
                        total += int(v.split()[0])
        return total

    def _teardown(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if self.inst is not None and self.inst.exists():
            with contextlib.suppress(OSError):
                (self.inst / "events/raw_syscalls/sys_enter/enable").write_text("0")
            for _ in range(50):
                try:
                    self.inst.rmdir()
                    break
                except OSError:
                    time.sleep(0.01)
        self.inst = None
        if self._mount is not None:
            self._mount.close()
            self._mount = None

    def close(self) -> Capture:
        if self.result is not None:
            return self.result
        if self.inst is None:
            raise SensorError("sensor was never started")
        try:
            self._w("events/raw_syscalls/sys_enter/enable", "0")
            self.poll()
            drops = self._drops()
        finally:
            wall = time.monotonic() - self._t0
            self._teardown()
        off_pid = self._fmt["common_pid"][0]
        off_id = self._fmt["id"][0]
        off_args = self._fmt["args"][0]
        payload = max(o + s for o, s in self._fmt.values())
        parts: list[np.ndarray[Any, Any]] = []
        missed = 0
        for buf in self._bufs:
            ts, tid, nr, args, m = decode_pages(b"".join(buf), payload, off_pid, off_id, off_args)
            missed += m
            raw = np.zeros(len(ts), dtype=RAW_EVENT)
            raw["ts"], raw["tid"], raw["nr"] = ts, tid, (nr & 0xFFFFFFFF).astype(np.uint32)
            raw["arg"] = args[:, 2]
            parts.append(raw)
        raw = np.concatenate(parts) if parts else np.zeros(0, RAW_EVENT)
        uniq = np.unique(raw["tid"])
        lut = {int(t): _tgid(int(t), self._tgids) for t in uniq.tolist()}
        raw["tgid"] = (
            np.array([lut[int(t)] for t in uniq.tolist()], np.uint32)[
                np.searchsorted(uniq, raw["tid"])
            ]
            if len(raw)
            else raw["tgid"]
        )
        norm = normalise(raw, clock_offset=self._offset, returns=False, trim_tid=self.trim_tid)
        batch, entries = norm.batch, norm.entries
        dropped = max(drops, missed)
        self.result = Capture(
            backend=self.name,
            events=batch,
            nr=entries["nr"].astype(np.int32),
            seen=len(raw) + dropped,
            drops=dropped,
            sensor_cpu_s=_cpu_self() - self._cpu0,
            wall_s=wall,
            extra={"target": self.target.label, "trimmed": norm.trimmed},
        )
        self._bufs = []
        return self.result


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
