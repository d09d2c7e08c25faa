"""Resource sampling of a workload (process tree or cgroup): procfs, cgroups v1+v2, perf.

Sampled, not traced: each :meth:`ResourceSampler.sample` costs tens of microseconds per
process, so 1-100 Hz is free. Totals are per process *tree*: CPU time includes reaped
children (``cutime``/``cstime``), so a workload that forks short-lived helpers is not
under-counted. Cgroup counters are read where the workload is a cgroup: v1 hierarchies for
memory (this host has memory/pids/blkio only in v1) and v2 ``cpu.stat``/``memory.current``
where present. perf software counters (page faults, context switches, migrations) come from
:mod:`bam.sensors.perf`; hardware counters are reported as unsupported where the host has none.

Network bytes per process tree are not in procfs (``/proc/PID/net/dev`` is the whole network
namespace): ``net_tx_bytes``/``net_rx_bytes`` (IPv4 + IPv6, loopback included) and
``unix_tx_bytes``/``unix_rx_bytes`` come from :class:`~bam.sensors.netbytes.NetCounter`, two
BPF programs on the socket layer's send/receive tracepoints filtered to the workload in the
kernel (exact payload bytes, per process tree or cgroup). Where eBPF cannot run they are
``None`` and ``unsupported["net_bytes"]`` says why. ``net_ns_*`` are namespace totals.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bam.sensors.errors import SensorError
from bam.sensors.memory import Mapping, MapsWatcher
from bam.sensors.netbytes import NetCounter
from bam.sensors.perf import PerfCounters
from bam.sensors.sockets import listening_ports
from bam.sensors.workload import Target, cgroup_mounts

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ResourceSample:
    """One look at the workload. Byte and count fields are totals since the process started
    (``net_*``/``unix_*``: since the sampler started)."""

    ts: float
    processes: int
    threads: int
    fds: int
    cpu_s: float
    rss_bytes: int
    pss_bytes: int
    minor_faults: int
    major_faults: int
    ctx_switches: int
    read_bytes: int
    write_bytes: int
    rchar: int
    wchar: int
    net_ns_rx_bytes: int
    net_ns_tx_bytes: int
    net_tx_bytes: int | None = None
    """Bytes the workload sent through IPv4/IPv6 sockets (payload; None: not measurable here)."""
    net_rx_bytes: int | None = None
    unix_tx_bytes: int | None = None
    unix_rx_bytes: int | None = None
    listening_ports: list[int] = field(default_factory=list)
    new_processes: list[int] = field(default_factory=list)
    new_exec_mappings: list[dict[str, Any]] = field(default_factory=list)
    perf: dict[str, int] = field(default_factory=dict)
    cgroup: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kv(path: str) -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def _int(s: str | None) -> int:
    try:
        return int((s or "0").split()[0])
    except (ValueError, IndexError):
        return 0


class ResourceSampler:
    """Samples a :class:`Target`; call :meth:`sample` at the rate you want, :meth:`close` after."""

    def __init__(
        self, target: Target, *, perf: bool = True, listening: bool = True, net: bool = True
    ) -> None:
        self.target = target
        self.listening = listening
        self._known: set[int] = set()
        self._maps = MapsWatcher()
        self.perf: list[PerfCounters] = []
        self.unsupported: dict[str, str] = {}
        self.net: NetCounter | None = None
        if perf:
            for pid in target.pids or sorted(target.current_pids()):
                pc = PerfCounters(pid)
                self.perf.append(pc)
                self.unsupported.update(pc.unsupported)
        self._maps.check(target.current_pids())
        self._known = target.current_pids()
        if net:  # last: nothing after it can fail and leave the programs attached
            nc = NetCounter(target)
            try:
                nc.start()
                self.net = nc
            except SensorError as e:  # includes SensorUnavailableError
                self.unsupported["net_bytes"] = str(e).splitlines()[0]

    def close(self) -> None:
        for pc in self.perf:
            pc.close()
        self.perf = []
        if self.net is not None:
            self.net.close()
            self.net = None

    def __enter__(self) -> ResourceSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sample(self) -> ResourceSample:
        pids = self.target.current_pids()
        s = ResourceSample(time.time(), len(pids), 0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rfind(")") + 2 :].split()
            # fields (1-based in proc(5)): 10 minflt 11 cminflt 12 majflt 13 cmajflt 14-17 times
            s.minor_faults += int(f[7]) + int(f[8])
            s.major_faults += int(f[9]) + int(f[10])
            s.cpu_s += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / _TICK
            st = _kv(f"/proc/{pid}/status")
            s.threads += _int(st.get("Threads"))
            s.rss_bytes += _int(st.get("VmRSS")) * 1024
            s.ctx_switches += _int(st.get("voluntary_ctxt_switches")) + _int(
                st.get("nonvoluntary_ctxt_switches")
            )
            s.pss_bytes += _int(_kv(f"/proc/{pid}/smaps_rollup").get("Pss")) * 1024
            io = _kv(f"/proc/{pid}/io")
            s.read_bytes += _int(io.get("read_bytes"))
            s.write_bytes += _int(io.get("write_bytes"))
            s.rchar += _int(io.get("rchar"))
            s.wchar += _int(io.get("wchar"))
            with contextlib.suppress(OSError):
                s.fds += len(os.listdir(f"/proc/{pid}/fd"))
        if pids:
            rx, tx = _netdev(min(pids))
            s.net_ns_rx_bytes, s.net_ns_tx_bytes = rx, tx
        if self.net is not None:
            nb = self.net.read()
            s.net_tx_bytes, s.net_rx_bytes = nb.tx("inet"), nb.rx("inet")
            s.unix_tx_bytes, s.unix_rx_bytes = nb.tx("unix"), nb.rx("unix")
        s.new_processes = sorted(pids - self._known)
        self._known = pids
        s.new_exec_mappings = [
            {
                "pid": p,
                "start": m.start,
                "size": m.size,
                "perms": m.perms,
                "path": m.path,
                "wx": m.wx,
                "anonymous": m.anonymous,
            }
            for p, ms in self._maps.check(pids).items()
            for m in ms
        ]
        if self.listening:
            s.listening_ports = listening_ports(pids)
        for pc in self.perf:
            for k, v in pc.read().items():
                s.perf[k] = s.perf.get(k, 0) + v
        s.cgroup = self._cgroup()
        return s

    def _cgroup(self) -> dict[str, int]:
        cg = self.target.cgroup
        if cg is None:
            return {}
        out: dict[str, int] = {}
        _, v1 = cgroup_mounts()
        if self.target.cgroup_v2:
            out["cpu_usage_usec"] = _cpu_stat(cg)
            with contextlib.suppress(OSError, ValueError):
                out["memory_current"] = int((cg / "memory.current").read_text())
        else:
            for ctrl, mnt in v1:
                if "memory" in ctrl.split(","):
                    rel = _relative(cg, v1)
                    with contextlib.suppress(OSError, ValueError):
                        out["memory_usage_bytes"] = int(
                            (mnt / rel / "memory.usage_in_bytes").read_text()
                        )
        return out


def _cpu_stat(cg: Path) -> int:
    with contextlib.suppress(OSError):
        for line in (cg / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1])
    return 0


def _relative(cg: Path, v1: tuple[tuple[str, Path], ...]) -> Path:
    for _, mnt in v1:
        if cg.is_relative_to(mnt):
            return cg.relative_to(mnt)
    return Path(cg.name)


def _netdev(pid: int) -> tuple[int, int]:
    rx = tx = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            f = rest.split()
            rx, tx = rx + int(f[0]), tx + int(f[8])
    return rx, tx


__all__ = ["Mapping", "ResourceSample", "ResourceSampler"]
