"""Record a QEMU guest: its in-guest system calls plus host-side resource samples.

The library side of ``bam record --vm QMP_SOCKET``. The syscall stream comes from the guest's
trace file (found through ``vm.json`` beside the socket), the resources from QMP and
``/proc/<qemu pid>`` at ``resource_hz``. Both go into one recording: the events as usual, the
resource series as numeric arrays in ``meta["vm_resources"]``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bam.events import Trace
from bam.sensors.capture import Capture
from bam.sensors.errors import TargetGoneError
from bam.sensors.vm.launch import VmInfo
from bam.sensors.vm.qmp import Qmp, QmpError
from bam.sensors.vm.resources import VmResourceSample, VmResourceSampler
from bam.sensors.vm.stream import GuestSyscallSensor


@dataclass
class VmRecorded:
    """A finished VM recording: guest syscalls, host-side samples, why it ended."""

    capture: Capture
    info: VmInfo
    samples: list[VmResourceSample] = field(default_factory=list)
    reason: str = ""

    def resources(self) -> dict[str, Any]:
        """The samples as numeric series (what the recording stores)."""
        s = self.samples
        out: dict[str, Any] = {
            "ts": np.array([x.ts for x in s], np.float64),
            "cpu_s": np.array([x.cpu_s for x in s], np.float64),
            "rss_bytes": np.array([x.rss_bytes for x in s], np.int64),
            "read_bytes": np.array([x.read_bytes for x in s], np.int64),
            "write_bytes": np.array([x.write_bytes for x in s], np.int64),
            "threads": np.array([x.threads for x in s], np.int64),
            "running": np.array([x.status == "running" for x in s], np.bool_),
        }
        nv = max((len(x.vcpus) for x in s), default=0)
        vc = np.zeros((len(s), nv), np.float64)
        for i, x in enumerate(s):
            for v in x.vcpus:
                if v.index < nv:
                    vc[i, v.index] = v.cpu_s
        out["vcpu_cpu_s"] = vc
        devs = sorted({d for x in s for d in x.block})
        for key in ("rd_bytes", "wr_bytes"):
            out[f"block_{key}"] = np.array(
                [[x.block.get(d, {}).get(key, 0) for d in devs] for x in s], np.int64
            ).reshape(len(s), len(devs))
        out["block_devices"] = devs
        if s and s[-1].unsupported:
            out["unsupported"] = dict(s[-1].unsupported)
        return out

    def to_trace(self, name: str, label: str | None = None) -> Trace:
        tr = self.capture.to_trace(name, label=label)
        meta = dict(tr.meta)
        meta["target"] = f"vm:{self.info.qmp}"
        meta["end_reason"] = self.reason
        meta["vm_resources"] = self.resources()
        tr.meta = meta
        return tr

    def summary(self) -> dict[str, Any]:
        c = self.capture
        last = self.samples[-1] if self.samples else None
        return {
            "backend": c.backend,
            "target": f"vm:{self.info.qmp}",
            "events": len(c),
            "drops": c.drops,
            "complete": c.complete,
            "threads": len(set(c.events.tid.tolist())),
            "wall_s": round(c.wall_s, 3),
            "sensor_cpu_s": round(c.sensor_cpu_s, 4),
            "end_reason": self.reason,
            "samples": len(self.samples),
            "qemu_cpu_s": last.cpu_s if last else None,
            "vcpus": len(last.vcpus) if last else None,
            "accel": self.info.accel,
        }


def record_vm(
    qmp_path: str | Path,
    *,
    duration: float | None = None,
    from_start: bool = False,
    resource_hz: float = 2.0,
    stop: Callable[[], bool] | None = None,
) -> VmRecorded:
    """Record the guest behind ``qmp_path`` until ``duration`` s pass, the guest finishes its
    workload (its trailer arrives), QEMU exits, ``stop()`` is true, or Ctrl-C."""
    info = VmInfo.load(qmp_path)
    given = Path(qmp_path)
    if given.is_socket():
        info.qmp = given  # the socket as the caller named it (e.g. through a symlinked dir)
    qmp = Qmp(info.qmp)
    samples: list[VmResourceSample] = []
    reason = "interrupted"
    try:
        sampler = VmResourceSampler(qmp)
        sensor = GuestSyscallSensor(info, from_start=from_start)
        sensor.start()
        deadline = None if duration is None else time.monotonic() + duration
        period = 1.0 / resource_hz if resource_hz > 0 else float("inf")
        next_sample = time.monotonic()
        try:
            while True:
                sensor.poll()
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + period
                    try:
                        samples.append(sampler.sample())
                    except (QmpError, TargetGoneError):
                        reason = "qemu exited"
                        break
                if sensor.ended:
                    reason = "guest workload finished"
                    break
                if deadline is not None and now >= deadline:
                    reason = "duration"
                    break
                if stop is not None and stop():
                    reason = "stopped"
                    break
                time.sleep(0.02)
        except KeyboardInterrupt:
            pass
        finally:
            cap = sensor.close()
        if reason != "qemu exited":
            with contextlib.suppress(QmpError, TargetGoneError):
                samples.append(sampler.sample())
    finally:
        qmp.close()
    return VmRecorded(cap, info, samples, reason)
