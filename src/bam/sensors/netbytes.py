"""Per-workload network bytes, counted in the kernel at the socket layer.

procfs has no per-process network counters (``/proc/PID/net/dev`` is the whole network
namespace). This counter attaches two BPF programs to the ``sock:sock_send_length`` and
``sock:sock_recv_length`` tracepoints (BTF raw tracepoints). They fire in the context of the
process that called into the socket layer, with the byte count the socket actually moved, for
every way in: ``write``/``read``, ``send*``/``recv*``, ``sendmsg``/``recvmsg``, ``splice``,
io_uring. The workload filter is the syscall sensor's (pid bitmap that follows ``fork``, or a
cgroup v2 subtree), so a process tree and a cgroup are counted the same way, and every other
process on the host costs only the (socket-only, not per-syscall) tracepoint.

What is counted: payload bytes the workload handed to / took from sockets (not headers,
retransmissions or bytes still queued), per family class: ``inet`` (IPv4 + IPv6, loopback
included), ``unix``, ``other``. ``MSG_PEEK`` receives are not counted (the data is read again).
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Final

import numpy as np

from bam.sensors import libbpf
from bam.sensors.ebpf import _Loaded
from bam.sensors.errors import SensorError
from bam.sensors.workload import Target

CLASSES: Final = ("inet", "unix", "other")
_N = len(CLASSES)
NETBYTES: Final = np.dtype(
    [
        ("tx_bytes", "<u8", (_N,)),
        ("rx_bytes", "<u8", (_N,)),
        ("tx_calls", "<u8", (_N,)),
        ("rx_calls", "<u8", (_N,)),
    ]
)
"""``struct netbytes`` of the BPF program (one per CPU)."""


@dataclass(frozen=True)
class NetBytes:
    """Totals since the counter started, per family class (``CLASSES`` order)."""

    tx_bytes: tuple[int, ...]
    rx_bytes: tuple[int, ...]
    tx_calls: tuple[int, ...]
    rx_calls: tuple[int, ...]

    def tx(self, cls: str = "inet") -> int:
        return self.tx_bytes[CLASSES.index(cls)]

    def rx(self, cls: str = "inet") -> int:
        return self.rx_bytes[CLASSES.index(cls)]


class NetCounter:
    """Count a workload's socket bytes in the kernel; :meth:`read` whenever you like.

    :meth:`start` raises :class:`~bam.sensors.errors.SensorUnavailableError` where eBPF cannot
    run (not root, no BTF, no libbpf) and :class:`~bam.sensors.errors.SensorError` where the
    kernel lacks the tracepoints (before 6.3). :meth:`close` detaches and unloads everything.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self._bpf: _Loaded | None = None
        self._buf: ctypes.Array[ctypes.c_char] | None = None

    def __enter__(self) -> NetCounter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._bpf is not None

    def start(self) -> None:
        if self._bpf is not None:
            raise SensorError("network counter already started")
        bpf = _Loaded(
            self.target,
            progs=("bam_fork", "bam_pexit", "bam_net_send", "bam_net_recv"),
            want_args=False,
            ring_bytes=mmap.PAGESIZE,
            flush_age_ns=0,
            aggregate=False,
        )
        try:
            size = bpf.obj.value_size("net")
            if size != NETBYTES.itemsize:
                raise SensorError(
                    f"BPF netbytes is {size} bytes, BAM expects {NETBYTES.itemsize}: rebuild"
                )
            self._buf = ctypes.create_string_buffer(size * libbpf.possible_cpus())
            bpf.seed()
            bpf.obj.attach("bam_fork")
            bpf.obj.attach("bam_pexit")
            bpf.seed()  # children forked between the first scan and the fork hook
            bpf.obj.attach("bam_net_send")
            bpf.obj.attach("bam_net_recv")
        except BaseException:
            bpf.close()
            raise
        self._bpf = bpf

    def read(self) -> NetBytes:
        """Current totals (one map lookup: ~10 µs)."""
        if self._bpf is None or self._buf is None:
            raise SensorError("network counter not running")
        self._bpf.obj.lookup("net", 0, self._buf)
        per_cpu = np.frombuffer(self._buf.raw, dtype=NETBYTES)

        def tot(f: str) -> tuple[int, ...]:
            return tuple(int(x) for x in per_cpu[f].sum(axis=0, dtype=np.uint64))

        return NetBytes(tot("tx_bytes"), tot("rx_bytes"), tot("tx_calls"), tot("rx_calls"))

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.close()
            self._bpf = None


__all__ = ["CLASSES", "NetBytes", "NetCounter"]
