"""Resource rates of a watched workload: sampled, learnt while profiling, judged per interval.

The system-call baseline says whether the workload *does* something new; resource rates say
whether it does *more* of it: a process that suddenly sends ten times the bytes it ever sent,
or a VM whose vCPUs burn while its service idles. :class:`RateProfile` is the shared part:
sample a few rates at ``hz``, keep the largest of each seen while profiling (saved beside the
baseline as JSON), and summarise every reporting interval as its peaks, their ratio to the
profile, and a top feature for each rate past it. Subclasses say what they sample:
:class:`ProcessResources` a process tree or cgroup (procfs, and per-workload network bytes
from the eBPF socket tracepoints); :class:`bam.agent.vm.VmResources` a QEMU VM over QMP.

The rates go into the evidence (``scores``) and name themselves in ``top_features``; they do
not raise severity on their own (a busier normal day would page someone), and policy can use
them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import ClassVar

from bam.sensors.errors import SensorError, TargetGoneError
from bam.sensors.resources import ResourceSample, ResourceSampler
from bam.sensors.workload import Target


class RateProfile:
    """Sampled rates with a learnt maximum per metric; see the module docstring."""

    #: the rates, in the order they are reported
    METRICS: ClassVar[tuple[str, ...]] = ()
    #: smallest profile value a ratio divides by (a metric idle while profiling is not "∞x")
    FLOORS: ClassVar[dict[str, float]] = {}
    #: prefix of the score names (``host_`` for a VM's host side, ``proc_`` for a process)
    PREFIX: ClassVar[str] = "res_"

    def __init__(self, hz: float = 1.0) -> None:
        self.hz = hz
        self.profile: dict[str, float] = {}
        self.learning = False
        self.gone = False
        self._learnt: list[dict[str, float]] = []
        self._interval: list[dict[str, float]] = []
        self._next = 0.0

    def _rates(self) -> dict[str, float] | None:
        """One sample's rates (``None``: no rate yet, e.g. the first sample)."""
        raise NotImplementedError

    def _extra_scores(self) -> dict[str, float]:
        return {}

    def maybe_sample(self) -> None:
        """Sample if ``1 / hz`` has passed since the last sample (call every tick)."""
        now = time.monotonic()
        if self.gone or now < self._next:
            return
        self._next = now + 1.0 / self.hz
        rates = self._rates()
        if rates is None:
            return
        self._interval.append(rates)
        if self.learning:
            self._learnt.append(rates)

    def learn(self) -> dict[str, float]:
        """End learning: the profile is the largest rate of each metric seen while learning."""
        self.learning = False
        if self._learnt:
            self.profile = {m: max(r[m] for r in self._learnt) for m in self.METRICS}
        self._learnt = []
        self._interval = []  # the first interval reports its own samples, not the profile's
        return self.profile

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "max": self.profile}, indent=2))
        os.replace(tmp, path)

    def load(self, path: Path) -> bool:
        """Load a saved profile; ``False`` if absent or not one of this kind."""
        try:
            d = json.loads(path.read_text())
            self.profile = {m: float(d["max"][m]) for m in self.METRICS}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def summary(self) -> tuple[dict[str, float], list[str]]:
        """This interval's peak rates, their ratio to the profile, features past it; resets."""
        rows, self._interval = self._interval, []
        if not rows:
            return {}, []
        p = self.PREFIX
        scores: dict[str, float] = {f"{p}samples": float(len(rows))}
        top: list[str] = []
        for m in self.METRICS:
            peak = max(r[m] for r in rows)
            scores[f"{p}{m}"] = round(peak, 4)
            if m in self.profile:
                ratio = peak / max(self.profile[m], self.FLOORS.get(m, 1e-9))
                scores[f"{p}{m}_vs_profile"] = round(ratio, 4)
                if ratio > 1.0:
                    top.append(f"{p.rstrip('_')}: {m} {peak:.3g} = {ratio:.2f}x profile max")
        scores.update(self._extra_scores())
        return scores, top

    def close(self) -> None:
        """Release what sampling holds (kernel programs, perf events)."""


class ProcessResources(RateProfile):
    """CPU, memory, disk and network rates of a process tree or cgroup."""

    METRICS: ClassVar[tuple[str, ...]] = (
        "cpu",
        "rss_mb",
        "disk_bps",
        "net_tx_bps",
        "net_rx_bps",
        "threads",
        "fds",
    )
    FLOORS: ClassVar[dict[str, float]] = {
        "cpu": 0.05,
        "rss_mb": 16.0,
        "disk_bps": float(1 << 20),
        "net_tx_bps": 65536.0,
        "net_rx_bps": 65536.0,
        "threads": 4.0,
        "fds": 16.0,
    }
    PREFIX: ClassVar[str] = "proc_"

    def __init__(self, target: Target, hz: float = 1.0) -> None:
        super().__init__(hz)
        # no perf counters (per-pid file descriptors for a whole tree) and no listening-port
        # scan: the syscall stream already counts listen() calls
        self.sampler = ResourceSampler(target, perf=False, listening=False, net=True)
        self._prev: ResourceSample | None = None

    @property
    def unsupported(self) -> dict[str, str]:
        return self.sampler.unsupported

    def _rates(self) -> dict[str, float] | None:
        try:
            s = self.sampler.sample()
        except (TargetGoneError, SensorError, OSError):
            self.gone = True
            return None
        prev, self._prev = self._prev, s
        if prev is None or s.ts <= prev.ts or s.processes == 0:
            return None
        dt = s.ts - prev.ts

        def rate(now: int | None, before: int | None) -> float:
            if now is None or before is None:
                return 0.0
            return max(0, now - before) / dt

        return {
            "cpu": max(0.0, s.cpu_s - prev.cpu_s) / dt,
            "rss_mb": s.rss_bytes / 2**20,
            "disk_bps": rate(s.read_bytes + s.write_bytes, prev.read_bytes + prev.write_bytes),
            "net_tx_bps": rate(s.net_tx_bytes, prev.net_tx_bytes),
            "net_rx_bps": rate(s.net_rx_bytes, prev.net_rx_bytes),
            "threads": float(s.threads),
            "fds": float(s.fds),
        }

    def close(self) -> None:
        self.sampler.close()


__all__ = ["ProcessResources", "RateProfile"]
