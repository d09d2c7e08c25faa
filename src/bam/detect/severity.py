"""Severity of an anomaly = magnitude x frequency, mapped to info/low/medium/high/critical.

Magnitude is how far past its threshold a window scored (``score / threshold``); frequency is a
decayed count of anomalous windows in the recent horizon, so one borderline window is ``info``
while the same excess repeated window after window escalates. The stateful :class:`SeverityTracker`
serves the live monitor; :func:`severity_of_windows` scores a recorded sequence of windows.
"""

from __future__ import annotations

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


def severity_of_windows(magnitudes: npt.ArrayLike, decay: float = 0.8) -> tuple[float, str]:
    """Peak severity over consecutive, non-overlapping windows' magnitudes."""
    tracker = SeverityTracker(decay)
    best = 0.0
    for m in np.asarray(magnitudes, dtype=np.float64):
        v, _ = tracker.update(float(m))
        best = max(best, v)
    return best, level_of(best) if best > 0 else "none"
