"""perf software counters (page faults, context switches, CPU migrations) via perf_event_open.

Called through ``syscall(2)`` with ctypes: no perf tool, no library. Counters follow the
workload's future children (``inherit``). Hardware counters (instructions, cycles, cache misses)
are tried too and reported as *unsupported* where the host has none (this VM: none), instead of
failing the sensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)
_NR_PERF_EVENT_OPEN: Final = 298  # x86_64
PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
SOFTWARE: Final = {
    "page_faults": 2,
    "context_switches": 3,
    "cpu_migrations": 4,
    "minor_faults": 5,
    "major_faults": 6,
}
HARDWARE: Final = {"instructions": 1, "cycles": 0, "cache_misses": 3}
_INHERIT, _EXCLUDE_KERNEL_HV = 1 << 1, (1 << 5) | (1 << 6)


class _Attr(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("pad", ctypes.c_uint64 * 8),
    ]


def _open(kind: int, config: int, pid: int, flags: int) -> int:
    attr = _Attr(type=kind, size=ctypes.sizeof(_Attr), config=config, flags=flags)
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), pid, -1, -1, 0)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


class PerfCounters:
    """Software (and, where present, hardware) counters of one process and its later children.

    ``unsupported`` maps each counter that could not be opened to the reason (e.g. hardware
    counters in a VM without a PMU)."""

    def __init__(self, pid: int, *, hardware: bool = True) -> None:
        self.fds: dict[str, int] = {}
        self.unsupported: dict[str, str] = {}
        for name, cfg in SOFTWARE.items():
            try:
                self.fds[name] = _open(PERF_TYPE_SOFTWARE, cfg, pid, _INHERIT)
            except OSError as e:
                self.unsupported[name] = e.strerror or str(e)
        if hardware:
            for name, cfg in HARDWARE.items():
                try:
                    self.fds[name] = _open(
                        PERF_TYPE_HARDWARE, cfg, pid, _INHERIT | _EXCLUDE_KERNEL_HV
                    )
                except OSError as e:
                    self.unsupported[name] = f"hardware counters unsupported here ({e.strerror})"

    def read(self) -> dict[str, int]:
        out = {}
        for name, fd in self.fds.items():
            with contextlib.suppress(OSError):
                out[name] = struct.unpack("<Q", os.read(fd, 8))[0]
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}
