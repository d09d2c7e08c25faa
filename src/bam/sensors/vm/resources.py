"""Host-side view of a QEMU guest: what the VM costs the host, and its devices' traffic.

The guest is opaque from here, but its QEMU process is not: CPU time, RSS, I/O and thread
count from ``/proc/<qemu pid>``; per-vCPU CPU time from the vCPU threads QMP names
(``query-cpus-fast``: a spinning or mining guest shows up here before anywhere else);
block-device traffic from ``query-blockstats``; NICs from ``query-rx-filter`` with byte
counters where the backend is a host tap device (found through ``/proc/<pid>/fdinfo``'s
``iff:`` line of the ``/dev/net/tun`` descriptor). ``-netdev user`` (slirp) has no byte
counters anywhere on the host; the sample says so in ``unsupported`` rather than
inventing zeros.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bam.sensors.errors import TargetGoneError
from bam.sensors.vm.qmp import Qmp, QmpError

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class VcpuSample:
    index: int
    thread_id: int
    cpu_s: float


@dataclass
class VmResourceSample:
    """One look at a VM from the host. Counters are totals since QEMU started."""

    ts: float
    status: str
    cpu_s: float
    rss_bytes: int
    threads: int
    read_bytes: int
    write_bytes: int
    rchar: int
    wchar: int
    ctx_switches: int
    vcpus: list[VcpuSample] = field(default_factory=list)
    block: dict[str, dict[str, int]] = field(default_factory=dict)
    net: dict[str, dict[str, Any]] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kv(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
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


def thread_cpu_s(pid: int, tid: int) -> float:
    """User + system CPU seconds of one thread of ``pid`` (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat[stat.rfind(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / _TICK


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the whole process (all threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        raise TargetGoneError(f"QEMU process {pid} is gone") from None
    f = stat[stat.rfind(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / _TICK


def tap_interfaces(pid: int) -> list[str]:
    """Host tap/tun interfaces QEMU holds open (from ``fdinfo``'s ``iff:`` line)."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                    continue
                iff = _kv(f"/proc/{pid}/fdinfo/{fd}").get("iff")
                if iff:
                    out.append(iff)
    return out


class VmResourceSampler:
    """Samples one QEMU VM over its QMP socket and ``/proc``. 1-10 Hz is cheap (a few QMP
    round trips, ~1 ms)."""

    def __init__(self, qmp: Qmp, pid: int | None = None) -> None:
        self.qmp = qmp
        found = pid if pid is not None else qmp.qemu_pid()
        if found is None:
            raise TargetGoneError(f"cannot tell the QEMU pid behind {qmp.path}")
        self.pid = found

    def sample(self) -> VmResourceSample:
        pid = self.pid
        cpu = process_cpu_s(pid)
        st = _kv(f"/proc/{pid}/status")
        io = _kv(f"/proc/{pid}/io")
        s = VmResourceSample(
            ts=time.time(),
            status=self.qmp.status(),
            cpu_s=cpu,
            rss_bytes=_int(st.get("VmRSS")) * 1024,
            threads=_int(st.get("Threads")),
            read_bytes=_int(io.get("read_bytes")),
            write_bytes=_int(io.get("write_bytes")),
            rchar=_int(io.get("rchar")),
            wchar=_int(io.get("wchar")),
            ctx_switches=_int(st.get("voluntary_ctxt_switches"))
            + _int(st.get("nonvoluntary_ctxt_switches")),
        )
        for idx, tid in sorted(self.qmp.vcpu_threads().items()):
            s.vcpus.append(VcpuSample(idx, tid, thread_cpu_s(pid, tid)))
        for dev in self.qmp.execute("query-blockstats"):
            name = dev.get("device") or dev.get("qdev") or dev.get("node-name") or "?"
            stats = dev.get("stats", {})
            s.block[str(name)] = {
                k: int(stats.get(k, 0))
                for k in (
                    "rd_bytes",
                    "wr_bytes",
                    "rd_operations",
                    "wr_operations",
                    "flush_operations",
                    "failed_rd_operations",
                    "failed_wr_operations",
                )
            }
        taps = tap_interfaces(pid)
        try:
            nics = self.qmp.execute("query-rx-filter")
        except QmpError:
            nics = []
        for nic in nics:
            s.net[str(nic.get("name"))] = {
                "mac": nic.get("main-mac"),
                "promiscuous": nic.get("promiscuous"),
            }
        for tap in taps:
            base = Path(f"/sys/class/net/{tap}/statistics")
            counters: dict[str, Any] = {}
            for k in (
                "rx_bytes",
                "tx_bytes",
                "rx_packets",
                "tx_packets",
                "rx_dropped",
                "tx_dropped",
            ):
                with contextlib.suppress(OSError, ValueError):
                    counters[k] = int((base / k).read_text())
            # a tap's rx is what the guest sent: name them from the guest's side
            s.net[f"tap:{tap}"] = {
                "guest_tx_bytes": counters.get("rx_bytes", 0),
                "guest_rx_bytes": counters.get("tx_bytes", 0),
                **counters,
            }
        if nics and not taps:
            s.unsupported["net_bytes"] = (
                "no host tap device: -netdev user (slirp) keeps no byte counters"
            )
        return s
