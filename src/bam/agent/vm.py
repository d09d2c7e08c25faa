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
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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

    def close(self) -> Any:
        with contextlib.suppress(SensorError):
            return self.sensor.close()
        return None


@dataclass
class VmResources:
    """Host-side resources of one VM: sampled, learnt during profiling, summarised per interval."""

    qmp: Qmp
    pid: int
    hz: float = 1.0
    profile: dict[str, float] = field(default_factory=dict)
    learning: bool = False
    _learnt: list[dict[str, float]] = field(default_factory=list)
    _interval: list[dict[str, float]] = field(default_factory=list)
    _prev: VmResourceSample | None = None
    _next: float = 0.0
    last: VmResourceSample | None = None
    gone: bool = False

    def __post_init__(self) -> None:
        self.sampler = VmResourceSampler(self.qmp, self.pid)

    def maybe_sample(self) -> None:
        now = time.monotonic()
        if self.gone or now < self._next:
            return
        self._next = now + 1.0 / self.hz
        try:
            s = self.sampler.sample()
        except (QmpError, TargetGoneError):
            self.gone = True
            return
        prev, self._prev, self.last = self._prev, s, s
        if prev is None or s.ts <= prev.ts:
            return
        dt = s.ts - prev.ts
        blk = sum(d.get("rd_bytes", 0) + d.get("wr_bytes", 0) for d in s.block.values())
        blk0 = sum(d.get("rd_bytes", 0) + d.get("wr_bytes", 0) for d in prev.block.values())
        rates = {
            "cpu": max(0.0, s.cpu_s - prev.cpu_s) / dt,
            "vcpu": max(0.0, sum(v.cpu_s for v in s.vcpus) - sum(v.cpu_s for v in prev.vcpus)) / dt,
            "rss_mb": s.rss_bytes / 2**20,
            "block_bps": max(0, blk - blk0) / dt,
        }
        self._interval.append(rates)
        if self.learning:
            self._learnt.append(rates)

    def learn(self) -> dict[str, float]:
        """The profile: the largest rate of each metric seen while learning."""
        self.learning = False
        if self._learnt:
            self.profile = {m: max(r[m] for r in self._learnt) for m in METRICS}
        self._learnt = []
        return self.profile

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "max": self.profile}, indent=2))
        os.replace(tmp, path)

    def load(self, path: Path) -> bool:
        try:
            d = json.loads(path.read_text())
            self.profile = {m: float(d["max"][m]) for m in METRICS}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def summary(self) -> tuple[dict[str, float], list[str]]:
        """This interval's peak rates, their ratio to the profile, features past it; resets."""
        rows, self._interval = self._interval, []
        if not rows:
            return {}, []
        scores: dict[str, float] = {"host_samples": float(len(rows))}
        top: list[str] = []
        for m in METRICS:
            peak = max(r[m] for r in rows)
            scores[f"host_{m}"] = round(peak, 4)
            if m in self.profile:
                ratio = peak / max(self.profile[m], FLOORS[m])
                scores[f"host_{m}_vs_profile"] = round(ratio, 4)
                if ratio > 1.0:
                    top.append(f"host: {m} {peak:.3g} = {ratio:.2f}x profile max")
        if self.last is not None:
            scores["host_running"] = 1.0 if self.last.status == "running" else 0.0
        return scores, top
