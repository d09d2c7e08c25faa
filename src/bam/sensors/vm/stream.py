"""The guest's system calls, read from the stream its ``/init`` writes to the trace port.

Stream layout (see :mod:`bam.sensors.vm.image`): text header lines ``BAMVM 1``, ``FORMAT
<n>`` + the ``raw_syscalls/sys_enter/format`` file, ``SYNC <guest uptime>``, ``PAGES 4096``;
then the guest kernel's ring-buffer pages of cpu0, 4096 bytes each, exactly as
``trace_pipe_raw`` hands them out; then a trailer page starting ``BAMEND\\0\\0`` with the
guest's per-CPU ``stats`` (written after the workload, before power-off).

Why binary pages: a page carries ~60 events of 68 bytes, decoded by the numpy decoder
the host tracefs backend uses (:func:`bam.sensors.tracefs.decode_pages`) - no per-event
Python, no text formatting in a TCG guest that runs ~7x slower than the host.

Nothing is lost silently. Counted separately and all reported as drops:

* ``missed``: the guest kernel's own losses (page "missed events" flags; the trailer's
  ``dropped events`` / ``overrun``, when the stream ends);
* ``bad_pages``: pages that cannot be a ring-buffer page (commit size past the page, time
  running backwards); their events are unknown, so each counts as at least one drop;
* ``transport``: events the guest read out (trailer ``read events``) but that did not arrive.

Guest thread ids are the guest's; the stream has no thread-group ids, so ``pid`` is 0.
"""

from __future__ import annotations

import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from bam.events import SyscallBatch
from bam.sensors.capture import RAW_EVENT, Capture, normalise, nr_to_ids
from bam.sensors.errors import SensorError
from bam.sensors.tracefs import decode_pages
from bam.sensors.vm.launch import HEADER_END, VmInfo

PAGE: Final = 4096
TRAILER: Final = b"BAMEND\0\0"
_PAGE_DATA: Final = PAGE - 16
_SIZE_MASK: Final = (1 << 27) - 1
_MISSED: Final = (1 << 31) | (1 << 30)


@dataclass
class StreamHeader:
    """What the guest said before its pages: event layout and its clock at that moment."""

    version: int
    fields: dict[str, tuple[int, int]]
    sync_uptime: float
    length: int

    @property
    def payload(self) -> int:
        return max(o + s for o, s in self.fields.values())


def parse_header(data: bytes) -> StreamHeader | None:
    """The header at the start of ``data``, or None if it has not fully arrived yet."""
    end = data.find(HEADER_END)
    if end < 0:
        if len(data) > 65536 or (data and not b"BAMVM".startswith(data[:5])):
            raise SensorError("guest trace stream does not start with a BAM header")
        return None
    text = data[: end + len(HEADER_END)].decode(errors="replace")
    m = re.match(r"BAMVM (\d+)\n", text)
    if m is None:
        raise SensorError("guest trace stream does not start with a BAM header")
    fields: dict[str, tuple[int, int]] = {}
    for f in re.finditer(r"field:[^;]*?(\w+)(?:\[\d+\])?;\s*offset:(\d+);\s*size:(\d+);", text):
        fields[f.group(1)] = (int(f.group(2)), int(f.group(3)))
    for need in ("common_pid", "id", "args"):
        if need not in fields:
            raise SensorError(f"guest trace header: sys_enter format lacks field {need!r}")
    s = re.search(r"^SYNC ([0-9.]+)$", text, re.M)
    return StreamHeader(
        int(m.group(1)), fields, float(s.group(1)) if s else 0.0, end + len(HEADER_END)
    )


@dataclass
class PageStats:
    """Running totals of what the page decoder saw."""

    pages: int = 0
    events: int = 0
    missed: int = 0
    bad_pages: int = 0
    trailer: dict[str, int] = field(default_factory=dict)
    drop_ts: list[int] = field(default_factory=list)
    drop_counts: list[int] = field(default_factory=list)


class PageDecoder:
    """Turns complete pages into raw events (``RAW_EVENT``, guest ns), validating each page."""

    def __init__(self, header: StreamHeader) -> None:
        self.header = header
        self.stats = PageStats()
        self._last_ts = 0
        self.ended = False

    def decode(self, data: bytes) -> np.ndarray[Any, Any]:
        """Decode whole pages (``len(data)`` a multiple of 4096); stops at the trailer."""
        n = len(data) // PAGE
        if n == 0 or self.ended:
            return np.zeros(0, RAW_EVENT)
        buf = np.frombuffer(data, np.uint8, n * PAGE).reshape(n, PAGE)
        heads = buf[:, :16].copy().view("<u8")  # (n, 2): timestamp, commit
        stamp, commit = heads[:, 0], heads[:, 1]
        trailer = np.flatnonzero(np.all(buf[:, :8] == np.frombuffer(TRAILER, np.uint8), axis=1))
        if len(trailer):
            t = int(trailer[0])
            self._trailer(bytes(buf[t, 8:]))
            n = t
            self.ended = True
        size = (commit[:n] & np.uint64(_SIZE_MASK)).astype(np.int64)
        ok = (size <= _PAGE_DATA) & (stamp[:n] >= np.uint64(self._last_ts))
        # a page is also bad if it goes back in time relative to the previous good page
        good = np.flatnonzero(ok)
        if len(good) > 1:
            back = np.flatnonzero(np.diff(stamp[good].astype(np.int64)) < 0) + 1
            ok[good[back]] = False
        bad = np.flatnonzero(~ok)
        st = self.stats
        st.pages += n
        st.bad_pages += len(bad)
        for b in bad.tolist():
            st.drop_ts.append(int(stamp[b - 1]) if b > 0 else self._last_ts)
            st.drop_counts.append(1)
        keep = np.flatnonzero(ok)
        if len(keep) == 0:
            return np.zeros(0, RAW_EVENT)
        missed_pages = keep[(commit[keep] & np.uint64(_MISSED)) != 0]
        for p in missed_pages.tolist():
            st.drop_ts.append(int(stamp[p]))
            st.drop_counts.append(1)
        self._last_ts = int(stamp[keep[-1]])
        f = self.header.fields
        ts, tid, nr, args, missed = decode_pages(
            buf[keep].tobytes(), self.header.payload, f["common_pid"][0], f["id"][0], f["args"][0]
        )
        st.missed += missed
        raw = np.zeros(len(ts), RAW_EVENT)
        raw["ts"], raw["tid"] = ts, tid
        raw["nr"] = (nr & 0xFFFFFFFF).astype(np.uint32)
        raw["arg"] = args[:, 2] if len(args) else raw["arg"]
        st.events += len(raw)
        return raw

    def _trailer(self, body: bytes) -> None:
        text = body.split(b"\0", 1)[0].decode(errors="replace")
        for line in text.splitlines():
            k, _, v = line.partition(":")
            with_num = v.strip().split()
            if with_num and with_num[0].isdigit():
                self.stats.trailer[k.strip()] = int(with_num[0])

    @property
    def drops(self) -> int:
        """Every loss known so far (guest ring buffer, bad pages, transport)."""
        st = self.stats
        guest = st.trailer.get("dropped events", 0) + st.trailer.get("overrun", 0)
        transport = max(0, st.trailer.get("read events", 0) - st.events) if st.trailer else 0
        return max(st.missed, guest) + st.bad_pages + transport


class GuestSyscallSensor:
    """Reads a running (or finished) guest's syscall stream from its trace file.

    Same shape as the host backends: :meth:`start`, :meth:`poll` (new events as a
    :class:`SyscallBatch`, canonical x86-64 ids, epoch seconds), :meth:`close` (a
    :class:`Capture` with drops). ``from_start`` includes everything since boot; otherwise
    the capture begins at the page being written when the sensor starts. ``keep=False``
    (a live monitor that consumes every :meth:`poll`): events are not kept for
    :meth:`close`, whose capture then has the counts and drops but no events, so memory
    does not grow with the guest's lifetime.
    """

    name = "vm-tracefs"

    def __init__(self, info: VmInfo, *, from_start: bool = False, keep: bool = True) -> None:
        self.info = info
        self.from_start = from_start
        self.keep = keep
        self.events = 0
        self._fd: int | None = None
        self._pending = b""
        self._header: StreamHeader | None = None
        self._decoder: PageDecoder | None = None
        self._parts: list[np.ndarray[Any, Any]] = []
        self._offset = 0.0
        self._t0 = self._cpu0 = 0.0
        self.result: Capture | None = None

    @property
    def drops(self) -> int:
        """Every loss counted so far (see :attr:`PageDecoder.drops`)."""
        return self._decoder.drops if self._decoder is not None else 0

    @property
    def ended(self) -> bool:
        """True once the guest's trailer arrived (the guest finished its workload)."""
        return self._decoder is not None and self._decoder.ended

    def start(self) -> None:
        try:
            self._fd = os.open(self.info.trace, os.O_RDONLY)
        except OSError as e:
            raise SensorError(f"guest trace stream {self.info.trace}: {e.strerror}") from None
        self._t0, self._cpu0 = time.monotonic(), _cpu_self()
        self._read_header(wait=10.0)

    def _read_header(self, wait: float) -> None:
        assert self._fd is not None
        deadline = time.monotonic() + wait
        head = b""
        while True:
            head += os.read(self._fd, 65536)
            h = parse_header(head)
            if h is not None:
                break
            if time.monotonic() > deadline:
                raise SensorError(f"{self.info.trace}: no guest trace header after {wait:.0f} s")
            time.sleep(0.02)
        self._header = h
        self._decoder = PageDecoder(h)
        # guest monotonic ns -> epoch seconds, anchored where the launcher saw the header
        if self.info.sync_epoch is not None:
            self._offset = self.info.sync_epoch - h.sync_uptime
        else:
            self._offset = self.info.started  # rough: guest uptime counted from QEMU start
        rest = head[h.length :]
        if self.from_start:
            self._pending = rest
        else:
            size = os.fstat(self._fd).st_size - h.length
            skip = (size // PAGE) * PAGE
            os.lseek(self._fd, h.length + skip, os.SEEK_SET)
            self._pending = b""

    def poll(self) -> SyscallBatch:
        """New complete pages since the last call, decoded (an empty batch if none)."""
        if self._fd is None or self._decoder is None:
            raise SensorError("guest syscall sensor was not started")
        while True:
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                break
            self._pending += chunk
        whole = len(self._pending) // PAGE * PAGE
        raw = self._decoder.decode(self._pending[:whole])
        self._pending = self._pending[whole:]
        if len(raw) == 0:
            return SyscallBatch.from_ids(np.empty(0, np.int32))
        self.events += len(raw)
        if self.keep:
            self._parts.append(raw)
        return SyscallBatch(
            ts=raw["ts"].astype(np.float64) * 1e-9 + self._offset,
            pid=np.zeros(len(raw), np.int32),
            tid=raw["tid"].astype(np.int32),
            sid=nr_to_ids(raw["nr"]),
        )

    def close(self) -> Capture:
        """Read what is left and return the whole capture (with every loss counted)."""
        if self.result is not None:
            return self.result
        if self._fd is None or self._decoder is None:
            raise SensorError("guest syscall sensor was not started")
        try:
            self.poll()
        finally:
            os.close(self._fd)
            self._fd = None
        dec = self._decoder
        raw = np.concatenate(self._parts) if self._parts else np.zeros(0, RAW_EVENT)
        norm = normalise(raw, clock_offset=self._offset, returns=False)
        st = dec.stats
        drops = dec.drops
        dts = np.asarray(st.drop_ts, np.float64) * 1e-9 + self._offset
        dcounts = np.asarray(st.drop_counts, np.int64)
        if drops and not len(dts):
            dts, dcounts = (
                np.array([norm.batch.ts[-1] if len(norm.batch) else self._offset]),
                np.array([drops]),
            )
        self.result = Capture(
            backend=self.name,
            events=norm.batch,
            nr=norm.entries["nr"].astype(np.int32),
            seen=self.events + drops,
            drops=drops,
            drop_ts=dts,
            drop_counts=dcounts,
            sensor_cpu_s=_cpu_self() - self._cpu0,
            wall_s=time.monotonic() - self._t0,
            extra={
                "target": f"vm:{self.info.run_dir}",
                "vm": {
                    "kernel_package": self.info.kernel_package,
                    "accel": self.info.accel,
                    "transport": self.info.transport,
                    "pages": st.pages,
                    "bad_pages": st.bad_pages,
                    "guest_missed": st.missed,
                    "guest_stats": dict(st.trailer),
                    "ended": dec.ended,
                    "clock": "guest CLOCK_MONOTONIC anchored at the SYNC line (~20 ms)",
                    "pid_known": False,
                },
            },
        )
        self._parts = []
        return self.result


def read_stream(path: str | Path, *, offset: float = 0.0) -> Capture:
    """Decode a whole trace file after the fact (guest-relative times unless ``offset``)."""
    p = Path(path)
    info = VmInfo(
        run_dir=p.parent,
        pid=0,
        qmp=p.parent / "qmp.sock",
        trace=p,
        console=p.parent / "console.log",
        accel="?",
        transport="?",
        kernel_package="?",
        started=offset,
    )
    s = GuestSyscallSensor(info, from_start=True)
    s.start()
    return s.close()


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
