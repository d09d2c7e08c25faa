"""Streaming drift detection over window scores: the Page-Hinkley test.

The adaptive baseline learns from windows it judges normal. Two very different things look the
same from inside that loop: the workload's normal behaviour changed (an upgrade, a new job mix),
or an attacker is slowly poisoning the baseline with windows each just normal enough to be
learned. Neither should be absorbed silently, so the adaptive baseline watches the *stream* of
window magnitudes and, on a sustained shift of their mean, stops learning and asks an operator.

Page-Hinkley (Page 1954; Hinkley 1971) is the CUSUM of deviations from the running mean:
``m_t = sum_{i<=t} (x_i - mean_i - delta)``; a rise is declared when ``m_t - min_{s<=t} m_s``
exceeds ``threshold``. ``delta`` is the change in mean that is tolerated (noise), ``threshold``
the evidence needed, in the same units as ``x``: with BAM's window magnitudes (0 = typical normal
window, 1 = at the alarm threshold) both mean the same thing for every detector. The defaults
(``delta`` 0.15, ``threshold`` 15) ignore a shift of the mean magnitude below 0.15 (e.g. a benign
new phrase in a fifth of the windows, at half the threshold), flag a rise of +0.45 within
40-75 windows, a rise of +0.25 usually within 150-300 (the running mean slowly absorbs a small
shift, so not always), and stay silent on stationary noise. The time of the minimum
estimates when the change began; on a slow ramp it lags (the first steps are below ``delta``),
which is why the adaptive baseline also holds new data on probation.

The recursion is evaluated with numpy accumulations over whole batches (``update_many``), and
``update(x)`` is the batch of one: feeding a stream one value at a time or in batches of any size
gives bit-identical statistics and detections.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Direction = Literal["up", "down", "both"]
B = npt.NDArray[np.bool_]


class PageHinkley:
    """Page-Hinkley test for a sustained shift of the mean of a stream.

    Parameters live here; state ends with ``_``. After a detection the test restarts from the
    next value, so a shift that persists becomes the new reference rather than alarming forever
    (the caller decides what a detection means; see :class:`bam.detect.AdaptiveBaseline`).
    """

    def __init__(
        self,
        delta: float = 0.15,
        threshold: float = 15.0,
        min_instances: int = 30,
        direction: Direction = "up",
    ) -> None:
        if delta < 0 or not np.isfinite(delta):
            raise ValueError("delta must be a finite value >= 0")
        if threshold <= 0 or not np.isfinite(threshold):
            raise ValueError("threshold must be a finite value > 0")
        if min_instances < 1:
            raise ValueError("min_instances must be >= 1")
        if direction not in ("up", "down", "both"):
            raise ValueError("direction must be 'up', 'down' or 'both'")
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.min_instances = int(min_instances)
        self.direction: Direction = direction
        self.reset()

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-serialisable)."""
        return {
            "delta": self.delta,
            "threshold": self.threshold,
            "min_instances": self.min_instances,
            "direction": self.direction,
        }

    def reset(self) -> None:
        """Forget everything: the stream, its clock and past detections."""
        self.total_ = 0  # values ever seen (detections are reported on this clock)
        self.detections_ = 0
        self.last_detection_: dict[str, Any] | None = None
        self._restart()

    def _restart(self) -> None:
        """Start a new reference period at the next value (after a detection)."""
        self.n_ = 0  # values since the restart
        self.sum_ = 0.0  # sum of values since the reset (running mean = sum_ / n_)
        self.up_ = 0.0  # cumulative deviation for a rise, and its running minimum
        self.up_min_ = 0.0
        self.up_min_at_ = 0  # n_ at which up_min_ was reached (the rise began after it)
        self.down_ = 0.0  # cumulative deviation for a fall, and its running maximum
        self.down_max_ = 0.0
        self.down_max_at_ = 0

    @property
    def mean_(self) -> float:
        """Running mean since the last reset (0 before any value)."""
        return self.sum_ / self.n_ if self.n_ else 0.0

    @property
    def statistic_(self) -> float:
        """Current evidence of a shift in the watched direction(s); drift when > threshold."""
        up = self.up_ - self.up_min_
        down = self.down_max_ - self.down_
        if self.direction == "up":
            return up
        if self.direction == "down":
            return down
        return max(up, down)

    def update(self, x: float) -> bool:
        """Feed one value; True if a drift is detected at this value."""
        return bool(self.update_many(np.array([x], dtype=np.float64))[0])

    def update_many(self, xs: npt.ArrayLike) -> B:
        """Feed values in order; a boolean per value, True where a drift was detected.

        Loops only over detections (rare), never over values.
        """
        x = np.asarray(xs, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("drift detector values must be finite")
        out = np.zeros(len(x), dtype=np.bool_)
        pos = 0
        while pos < len(x):
            hit = self._advance(x[pos:])
            if hit < 0:
                break
            out[pos + hit] = True
            pos += hit + 1
        return out

    def _advance(self, x: npt.NDArray[np.float64]) -> int:
        """Consume ``x`` up to and including its first detection; its index, or -1."""
        k = len(x)
        # Accumulations seeded with the carried state, so batching does not change rounding.
        n = self.n_ + np.arange(1, k + 1, dtype=np.float64)
        s = _acc(np.add, self.sum_, x)
        dev = x - s / n
        up = _acc(np.add, self.up_, dev - self.delta)
        down = _acc(np.add, self.down_, dev + self.delta)
        up_min = _acc(np.minimum, self.up_min_, up)
        down_max = _acc(np.maximum, self.down_max_, down)
        stat_up = up - up_min
        stat_down = down_max - down
        if self.direction == "up":
            stat = stat_up
        elif self.direction == "down":
            stat = stat_down
        else:
            stat = np.maximum(stat_up, stat_down)
        hits = np.flatnonzero((stat > self.threshold) & (n >= self.min_instances))
        end = int(hits[0]) + 1 if len(hits) else k
        i = end - 1
        base = self.n_
        # where each running extreme was last reached: n_ just after that value
        self.up_min_at_ = _last_at(up <= up_min, end, base, self.up_min_at_)
        self.down_max_at_ = _last_at(down >= down_max, end, base, self.down_max_at_)
        self.n_ += end
        self.total_ += end
        self.sum_ = float(s[i])
        self.up_, self.up_min_ = float(up[i]), float(up_min[i])
        self.down_, self.down_max_ = float(down[i]), float(down_max[i])
        if not len(hits):
            return -1
        is_up = self.direction == "up" or (
            self.direction == "both" and bool(stat_up[i] >= stat_down[i])
        )
        began = self.up_min_at_ if is_up else self.down_max_at_
        self.detections_ += 1
        self.last_detection_ = {
            "at": self.total_ - 1,  # index of the value that crossed the threshold
            # first value after the estimated change point (where the CUSUM was at its extreme)
            "began": self.total_ - self.n_ + began,
            "direction": "up" if is_up else "down",
            "statistic": float(stat[i]),
            "mean": self.mean_,
        }
        self._restart()
        return i

    # ---- persistence (plain JSON) ----
    def state(self) -> dict[str, Any]:
        """Parameters and running state as JSON (so a restart cannot wipe drift evidence)."""
        return {
            "params": self.get_params(),
            "state": {
                "n": self.n_,
                "total": self.total_,
                "sum": self.sum_,
                "up": self.up_,
                "up_min": self.up_min_,
                "up_min_at": self.up_min_at_,
                "down": self.down_,
                "down_max": self.down_max_,
                "down_max_at": self.down_max_at_,
                "detections": self.detections_,
                "last_detection": self.last_detection_,
            },
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> PageHinkley:
        """Rebuild from :meth:`state` output."""
        obj = cls(**data["params"])
        st = data["state"]
        obj.n_ = int(st["n"])
        obj.total_ = int(st["total"])
        obj.sum_ = float(st["sum"])
        obj.up_, obj.up_min_ = float(st["up"]), float(st["up_min"])
        obj.up_min_at_ = int(st["up_min_at"])
        obj.down_, obj.down_max_ = float(st["down"]), float(st["down_max"])
        obj.down_max_at_ = int(st["down_max_at"])
        obj.detections_ = int(st["detections"])
        last = st.get("last_detection")
        obj.last_detection_ = dict(last) if last is not None else None
        return obj


def _acc(op: np.ufunc, seed: float, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Running ``op`` over ``x`` starting from ``seed`` (sequential, like a Python loop)."""
    out: npt.NDArray[np.float64] = op.accumulate(np.concatenate(([seed], x)))[1:]
    return out


def _last_at(mask: B, end: int, base: int, previous: int) -> int:
    """``base + 1 + i`` for the last True ``i`` in ``mask[:end]``; ``previous`` if none."""
    idx = np.flatnonzero(mask[:end])
    return base + 1 + int(idx[-1]) if len(idx) else previous
