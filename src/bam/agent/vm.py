"""A QEMU VM as an agent target: its in-guest system calls and its host-side resources.

The guest runs no BAM code. Its ``/init`` streams the guest kernel's ``raw_syscalls`` ring
buffer over a virtio-serial port into a host file (:mod:`bam.sensors.vm`); :class:`VmLiveSensor`
follows that file and hands the agent the same :class:`~bam.events.SyscallBatch` as the eBPF
sensor does for a process (guest thread ids, guest times dated on the host clock), so the
same baseline, window scorer and severity trackers apply.

:class:`VmResources` samples the QEMU process from the host (``/proc`` + QMP: CPU of the
process and of its vCPU threads, RSS, block I/O) at ``vm_resource_hz``; while the target
profiles it learns the largest rates seen, and each observation then carries the interval's
rates and how far they went past the profile (``host_*`` scores, a ``host:`` top feature when
a rate is over its profile maximum). Severity stays with the syscall baseline: under TCG the
QEMU process's CPU follows guest load too loosely to alarm on alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bam.agent.resources import RateProfile
from bam.errors import BamError
from bam.events import SyscallBatch
from bam.sensors.errors import SensorError, TargetGoneError
from bam.sensors.vm.launch import VmInfo
from bam.sensors.vm.qmp import Qmp, QmpError
from bam.sensors.vm.resources import VmResourceSample, VmResourceSampler
from bam.sensors.vm.stream import GuestSyscallSensor

log = logging.getLogger("bam.agent")

METRICS = ("cpu", "vcpu", "rss_mb", "block_bps")
"""Host-side rates: QEMU CPU (cores), vCPU threads' CPU (cores), RSS (MiB), block bytes/s."""
FLOORS = {"cpu": 0.05, "vcpu": 0.05, "rss_mb": 1.0, "block_bps": 65536.0}
"""A rate is compared with max(profile maximum, floor): an idle profile does not make any
activity look like a huge excursion."""


def vm_info(qmp: Path, trace: Path | None) -> VmInfo:
    """What the agent needs about the VM behind ``qmp`` (``vm.json`` beside it, or bare)."""
    if not qmp.exists():
        raise BamError(
            f"VM target: QMP socket {qmp} does not exist (is the VM running? QEMU needs "
            f"-qmp unix:{qmp},server=on,wait=off)"
        )
    if not qmp.is_socket():
        raise BamError(f"VM target: {qmp} is not a socket")
    try:
        info = VmInfo.load(qmp)
        info.qmp = qmp
    except SensorError:
        if trace is None:
            raise BamError(
                f"VM target: no vm.json beside {qmp} to find the guest's syscall stream; "
                "give vm_trace (the file QEMU writes the guest's trace port to) or start the "
                "VM with `bam vm start`"
            ) from None
        info = VmInfo(
            run_dir=qmp.parent,
            pid=0,
            qmp=qmp,
            trace=trace,
            console=qmp.parent / "console.log",
            accel="?",
            transport="?",
            kernel_package="?",
            started=time.time(),
        )
    if trace is not None:
        info.trace = trace
    if not info.trace.is_file():
        raise BamError(f"VM target: guest syscall stream {info.trace} does not exist")
    return info


class VmLiveSensor:
    """Follows the guest's syscall stream; same calls as :class:`~bam.agent.stream.LiveSensor`."""

    def __init__(self, info: VmInfo) -> None:
        self.info = info
        self.sensor = GuestSyscallSensor(info, from_start=False, keep=False)
        self._batches: list[SyscallBatch] = []
        self._dropped_seen = 0
        self.events = 0

    def describe(self) -> str:
        return (
            f"vm-tracefs (guest raw_syscalls over {self.info.transport} from {self.info.trace}, "
            f"{self.info.accel})"
        )

    def start(self) -> None:
        self.sensor.start()

    def poll(self) -> None:
        b = self.sensor.poll()
        if len(b):
            self._batches.append(b)

    def take(self) -> SyscallBatch:
        self.poll()
        if not self._batches:
            return SyscallBatch.from_ids(np.empty(0, np.int32))
        out = SyscallBatch.concat(self._batches) if len(self._batches) > 1 else self._batches[0]
        self._batches = []
        self.events += len(out)
        return out

    @property
    def drops(self) -> int:
        return self.sensor.drops

    def take_dropped(self) -> int:
        """Events the guest lost since the last call (same contract as the eBPF stream's)."""
        n = self.sensor.drops - self._dropped_seen
        self._dropped_seen = self.sensor.drops
        return n

    def close(self) -> Any:
        with contextlib.suppress(SensorError):
            return self.sensor.close()
        return None


class VmResources(RateProfile):
    """Host-side resources of one VM: the QEMU process and its vCPU threads (procfs + QMP)."""

    METRICS: ClassVar[tuple[str, ...]] = METRICS
    FLOORS: ClassVar[dict[str, float]] = FLOORS
    PREFIX: ClassVar[str] = "host_"

    def __init__(self, qmp: Qmp, pid: int, hz: float = 1.0) -> None:
        super().__init__(hz)
        self.qmp = qmp
        self.pid = pid
        self.sampler = VmResourceSampler(qmp, pid)
        self._prev: VmResourceSample | None = None
        self.last: VmResourceSample | None = None

    def _rates(self) -> dict[str, float] | None:
        try:
            s = self.sampler.sample()
        except (QmpError, TargetGoneError):
            self.gone = True
            return None
        prev, self._prev, self.last = self._prev, s, s
        if prev is None or s.ts <= prev.ts:
            return None
        dt = s.ts - prev.ts
        blk = sum(d.get("rd_bytes", 0) + d.get("wr_bytes", 0) for d in s.block.values())
        blk0 = sum(d.get("rd_bytes", 0) + d.get("wr_bytes", 0) for d in prev.block.values())
        return {
            "cpu": max(0.0, s.cpu_s - prev.cpu_s) / dt,
            "vcpu": max(0.0, sum(v.cpu_s for v in s.vcpus) - sum(v.cpu_s for v in prev.vcpus)) / dt,
            "rss_mb": s.rss_bytes / 2**20,
            "block_bps": max(0, blk - blk0) / dt,
        }

    def _extra_scores(self) -> dict[str, float]:
        if self.last is None:
            return {}
        return {"host_running": 1.0 if self.last.status == "running" else 0.0}
