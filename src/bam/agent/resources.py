"""Resource rates of a watched workload: sampled, learnt while profiling, judged per interval.

The system-call baseline says whether the workload *does* something new; resource rates say
whether it does *more* of it: a process that suddenly sends ten times the bytes it ever sent,
or a VM whose vCPUs burn while its service idles. :class:`RateProfile` is the shared part:
sample a few rates at ``hz``, keep the largest of each seen while profiling (saved beside the
baseline as JSON), and summarise every reporting interval as its peaks, their ratio to the
profile, and a top feature for each rate past it. Subclasses say what they sample:
:class:`ProcessResources` a process tree or cgroup (procfs, and per-workload network bytes
from the eBPF socket tracepoints); :class:`bam.agent.vm.VmResources` a QEMU VM over QMP.

A maximum per rate misses a *mix* that is new although every rate stays under its maximum:
CPU busy while the network is silent, a VM whose vCPUs burn while its disk idles. So the
profile also fits a joint model, :class:`RateMixture` (a Gaussian mixture over the learnt
sample vectors), and each interval reports ``<prefix>mix``: how unusual its mix was, as a
ratio to a threshold calibrated on the profiling samples alone (1.0 = at the threshold), and,
past it, one top feature naming the rates that disagree with the others.

The rates and the mix score go into the evidence (``scores``) and name themselves in
``top_features``; they do not raise severity on their own (a busier normal day would page
someone), and policy can use them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from bam.agent.resource_mix import RateMixture
from bam.sensors.errors import SensorError, TargetGoneError
from bam.sensors.resources import ResourceSample, ResourceSampler
from bam.sensors.workload import Target

log = logging.getLogger("bam.agent")

F2 = npt.NDArray[np.float64]


class RateProfile:
    """Sampled rates with a learnt maximum per metric and a joint :class:`RateMixture`.

    See the module docstring. Contract: :meth:`summary` only *reports* (scores and top
    features, including ``<prefix>mix``); nothing here raises severity, which stays with the
    system-call baseline; policy may act on the scores.
    """

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
        #: joint model of the learnt rates (``None``: too few samples, an older profile, or
        #: still being fitted in a child process after :meth:`learn`)
        self.mixture: RateMixture | None = None
        self._fitting: tuple[subprocess.Popen[bytes], list[Any], float] | None = None
        self._saved_to: Path | None = None

    def _rates(self) -> dict[str, float] | None:
        """One sample's rates (``None``: no rate yet, e.g. the first sample)."""
        raise NotImplementedError

    def _extra_scores(self) -> dict[str, float]:
        return {}

    def maybe_sample(self) -> None:
        """Sample if ``1 / hz`` has passed since the last sample (call every tick)."""
        if self._fitting is not None:
            self.poll_mixture()
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
        """End learning: the profile is the largest rate of each metric seen while learning.

        A :class:`RateMixture` over the learnt samples (if there are enough of them) is fitted
        in a child process meanwhile; :meth:`maybe_sample` picks it up when it is done (and
        saves it where :meth:`save` last saved the profile); :meth:`wait_mixture` blocks.
        """
        self.learning = False
        if self._learnt:
            self.profile = {m: max(r[m] for r in self._learnt) for m in self.METRICS}
        self.mixture = None
        n = len(self._learnt)
        if n < RateMixture.MIN_SAMPLES:
            log.info(
                "resource mixture: only %d sample(s) learnt (< %d): no joint model, no %smix "
                "score (profile longer or sample faster)",
                n,
                RateMixture.MIN_SAMPLES,
                self.PREFIX,
            )
        else:
            self._start_fit(self._learnt)
        self._learnt = []
        self._interval = []  # the first interval reports its own samples, not the profile's
        return self.profile

    def _start_fit(self, rows: list[dict[str, float]]) -> None:
        self._stop_fit()
        data = {
            "metrics": list(self.METRICS),
            "floors": self.FLOORS,
            "rows": [[r[m] for m in self.METRICS] for r in rows],
        }
        # files, not pipes (no deadlock whatever the sizes); they live until _stop_fit()
        src = tempfile.TemporaryFile()  # noqa: SIM115
        src.write(json.dumps(data).encode())
        src.seek(0)
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "bam.agent.resource_mix"], stdin=src, stdout=out, stderr=err
        )
        self._fitting = (proc, [src, out, err], time.monotonic() + 300.0)

    def _stop_fit(self) -> None:
        if self._fitting is None:
            return
        proc, files, _ = self._fitting
        self._fitting = None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in files:
            f.close()

    def poll_mixture(self) -> bool:
        """Collect the mixture if its child process is done; ``True`` once nothing is pending."""
        if self._fitting is None:
            return True
        proc, (_, out, err), deadline = self._fitting
        if proc.poll() is None:
            if time.monotonic() < deadline:
                return False
            log.warning("resource mixture: fit took over 300 s; no %smix score", self.PREFIX)
            self._stop_fit()
            return True
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        ok = proc.returncode == 0
        self._stop_fit()
        try:
            if not ok:
                raise ValueError((errors.strip().splitlines() or ["(no message)"])[-1])
            mix = RateMixture.from_json(json.loads(text), self.METRICS, self.FLOORS)
        except (ValueError, KeyError, TypeError, IndexError, np.linalg.LinAlgError) as e:
            log.warning("resource mixture: not fitted (%s): no %smix score", e, self.PREFIX)
            return True
        self.mixture = mix
        log.info(
            "resource mixture: %d component(s) over %d samples; %smix threshold NLL %.2f "
            "(typical %.2f)",
            len(mix.density.weights_),
            mix.samples,
            self.PREFIX,
            mix.threshold,
            mix.typical,
        )
        if self._saved_to is not None:
            self.save(self._saved_to)
        return True

    def wait_mixture(self, timeout_s: float = 120.0) -> RateMixture | None:
        """Block until the mixture fit (if any) is done; the mixture, or ``None``."""
        end = time.monotonic() + timeout_s
        while not self.poll_mixture() and time.monotonic() < end:
            time.sleep(0.02)
        return self.mixture

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        d: dict[str, Any] = {"version": 2, "max": self.profile}
        if self.mixture is not None:
            d["mixture"] = self.mixture.to_json()
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, path)
        self._saved_to = path

    def load(self, path: Path) -> bool:
        """Load a saved profile; ``False`` if absent or not one of this kind.

        A profile saved before the mixture existed (``version`` 1), or whose mixture does not
        load, still loads: its maxima apply and there is no ``mix`` score.
        """
        try:
            d = json.loads(path.read_text())
            self.profile = {m: float(d["max"][m]) for m in self.METRICS}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.mixture = None
        if "mixture" not in d:
            log.info("resource profile %s has no mixture: no %smix score", path, self.PREFIX)
            return True
        try:
            self.mixture = RateMixture.from_json(d["mixture"], self.METRICS, self.FLOORS)
        except (ValueError, KeyError, TypeError, IndexError, np.linalg.LinAlgError) as e:
            log.warning("resource profile %s: mixture not loaded (%s)", path, e)
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
        if self.mixture is not None:
            self._mix_summary(rows, scores, top)
        scores.update(self._extra_scores())
        return scores, top

    def _mix_summary(
        self, rows: list[dict[str, float]], scores: dict[str, float], top: list[str]
    ) -> None:
        """``<prefix>mix``: the interval's k-th most unusual of its n samples, ``k = 2 + n // 15``.

        k-of-n rather than the maximum: at ~1 % false alarms per sample an interval of 30
        samples (the default 30 s at 1 Hz) would trip on its maximum about a quarter of the
        time. Needing k (2 for a short interval, ~7-13 % of the samples for longer ones)
        keeps chance trips under 1 % for any n (worst ~0.8 % at n = 14, ~0.02 % at n = 30),
        while a mix that has really changed is unusual in most of its samples; a one-sample
        spike is the maximum rule's business. Fewer than k samples: the least unusual decides.
        """
        assert self.mixture is not None
        x = self.mixture.features(rows)
        s = self.mixture.score(x)
        k = min(len(s), 2 + len(s) // 15)
        kth = float(np.partition(s, len(s) - k)[len(s) - k])
        p = self.PREFIX
        scores[f"{p}mix"] = round(kth, 4)
        if kth > 1.0:
            worst = int(np.argmax(s))
            rates = ", ".join(self.mixture.explain(x[worst : worst + 1]))
            top.append(f"{p.rstrip('_')}: resource_mix_unusual({rates}) = {kth:.2f}x threshold")

    def close(self) -> None:
        """Release what sampling holds (kernel programs, perf events)."""
        self._stop_fit()


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
        super().close()
        self.sampler.close()


__all__ = ["ProcessResources", "RateMixture", "RateProfile"]
