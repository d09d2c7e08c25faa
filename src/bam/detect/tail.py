"""Tail probabilities of normal scores, so that windows of any number compare fairly.

A trace is as anomalous as its worst frame, but the worst of many frames is naturally higher than
the worst of few: a threshold on the raw maximum alarms on long normal traces and misses in short
ones. Converting the maximum into a tail probability under the calibration scores and correcting
for the number of independent frames (``1 - (1 - p)^n ≈ n·p``) gives a statistic in one unit
(``-log10`` of a probability) for traces of any length. Beyond the bulk of the calibration data
the tail is modelled as exponential (peaks over threshold), so scores far past anything seen in
calibration still rank by how far.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


class TailModel:
    """Survival function of normal scores: empirical in the bulk, exponential in the tail."""

    def fit(self, scores: npt.ArrayLike) -> TailModel:
        s = np.sort(np.asarray(scores, dtype=np.float64))
        if len(s) == 0:
            raise ValueError("no calibration scores")
        n = len(s)
        self.n_ = n
        self.phi_ = float(np.clip(10.0 / n, 0.01, 0.5))  # tail fraction modelled parametrically
        self.u_ = float(np.quantile(s, 1.0 - self.phi_))
        excess = s[s > self.u_] - self.u_
        spread = float(excess.mean()) if len(excess) else 0.0
        # Never more confident than the data allows: the tail must give the calibration maximum
        # a probability of about 1/n (a deterministic workload's near-identical frames must not
        # make a benign variant "impossible"), and a scale of at least 1% of the score level.
        reach = (float(s[-1]) - float(np.median(s))) / np.log(max(n / 2.0, 2.0))
        self.beta_ = max(spread, reach, abs(self.u_) * 1e-2, 1e-6)
        grid = np.linspace(0.0, 1.0, 513)
        self.grid_ = np.quantile(s, grid)
        return self

    def log10_sf(self, x: npt.ArrayLike) -> F64:
        """``log10 P(normal score >= x)`` (<= 0)."""
        v = np.asarray(x, dtype=np.float64)
        # bulk: fraction of the quantile grid at or above x, smoothed like a conformal p-value
        below = np.searchsorted(self.grid_, v, side="left") / (len(self.grid_) - 1)
        bulk = np.clip(1.0 - below, 1.0 / (self.n_ + 1), 1.0)
        tail = self.phi_ * np.exp(-(v - self.u_) / self.beta_)
        p = np.where(v > self.u_, np.minimum(tail, self.phi_), np.maximum(bulk, self.phi_))
        out: F64 = np.log10(np.clip(p, 1e-300, 1.0))
        return out

    def state(self) -> dict[str, Any]:
        return {
            "n": self.n_,
            "phi": self.phi_,
            "u": self.u_,
            "beta": self.beta_,
            "grid": self.grid_.tolist(),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> TailModel:
        t = cls()
        t.n_ = int(d["n"])
        t.phi_ = float(d["phi"])
        t.u_ = float(d["u"])
        t.beta_ = float(d["beta"])
        t.grid_ = np.asarray(d["grid"], dtype=np.float64)
        return t
