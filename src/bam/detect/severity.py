"""Severity of an anomaly = magnitude x frequency, mapped to info/low/medium/high/critical.

Magnitude is how far past its threshold a window scored (``score / threshold``); frequency is a
decayed count of anomalous windows in the recent horizon, so one borderline window is ``info``
while the same excess repeated window after window escalates. The stateful :class:`SeverityTracker`
serves the live monitor; :func:`severity_of_windows` scores a recorded sequence of windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

LEVELS = ("none", "info", "low", "medium", "high", "critical")
# lower bounds of magnitude x frequency for info, low, medium, high, critical
_BOUNDS = (1.0, 1.25, 2.0, 4.0, 8.0)


def level_of(value: float) -> str:
    """Severity level of a magnitude x frequency value (``none`` below 1)."""
    lvl = int(np.searchsorted(_BOUNDS, value, side="right"))
    return LEVELS[lvl]


def rank(level: str) -> int:
    """Order of a level (``none`` = 0 ... ``critical`` = 5)."""
    return LEVELS.index(level)


@dataclass
class SeverityTracker:
    """Decayed frequency of anomalous windows; ``decay`` is applied once per window."""

    decay: float = 0.8
    frequency: float = field(default=0.0, init=False)

    def update(self, magnitude: float) -> tuple[float, str]:
        """Feed one window's magnitude; returns ``(value, level)`` (level ``none`` if normal)."""
        self.frequency *= self.decay
        if magnitude <= 1.0:
            return 0.0, "none"
        self.frequency += 1.0
        value = magnitude * self.frequency
        return value, level_of(value)


@dataclass
class ExcessFrequency:
    """Anomalous windows of a whole workload over a time horizon, *beyond chance*.

    A threshold calibrated at a false-alarm rate ``p`` per window still passes ``p`` of normal
    windows; a busy workload scores thousands of windows a second, so counting its anomalous
    windows raw would turn calibrated noise into an alert (measured: a fixed loop at ~100k
    calls/s reached ``critical`` every second). Both anomalous and scored windows decay with
    ``horizon_s``; the frequency is the anomalous count beyond the expected ``λ = p · windows``
    plus ``z·√λ`` (the Poisson spread), so a quiet workload is unaffected (λ ≈ 0) and a busy
    one must exceed its own noise floor before it escalates.
    """

    horizon_s: float = 2.0
    far: float = 0.001
    z: float = 3.0
    anomalous: float = field(default=0.0, init=False)
    windows: float = field(default=0.0, init=False)
    _t: float | None = field(default=None, init=False, repr=False)

    def update(self, now: float, windows: int, anomalous: int) -> float:
        """Add one batch's counts at time ``now`` (s); returns the excess frequency (>= 0)."""
        if self._t is not None:
            decay = math.exp(-max(0.0, now - self._t) / self.horizon_s)
            self.anomalous *= decay
            self.windows *= decay
        self._t = now
        self.anomalous += anomalous
        self.windows += windows
        lam = self.far * self.windows
        return max(0.0, self.anomalous - lam - self.z * math.sqrt(lam))


def severity_of_windows(magnitudes: npt.ArrayLike, decay: float = 0.8) -> tuple[float, str]:
    """Peak severity over consecutive, non-overlapping windows' magnitudes."""
    tracker = SeverityTracker(decay)
    best = 0.0
    for m in np.asarray(magnitudes, dtype=np.float64):
        v, _ = tracker.update(float(m))
        best = max(best, v)
    return best, level_of(best) if best > 0 else "none"
