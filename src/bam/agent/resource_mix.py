"""The joint model of a workload's resource rates: a Gaussian mixture with its own threshold.

A maximum per rate (:class:`bam.agent.resources.RateProfile`) misses a *mix* that is new
although every rate stays under its maximum: CPU busy while the network is silent, a VM whose
vCPUs burn while its disk idles. :class:`RateMixture` is the density of the profiling samples'
rate vectors and a threshold calibrated on those samples alone. It is fitted in a child process
(``python -m bam.agent.resource_mix``: JSON rows in on stdin, the mixture out as JSON), so the
agent never imports scikit-learn; scoring uses numpy only.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

F2 = npt.NDArray[np.float64]


class RateMixture:
    """Joint density of a workload's rate vectors, with a threshold calibrated on them alone.

    **Features.** Each rate becomes ``log1p(rate / floor)`` (the floor is the metric's
    :attr:`RateProfile.FLOORS` value): rates spanning decades become comparable, and activity
    well under a floor stays near 0, as it does for the maximum rule. The vectors are *not*
    standardised by their learnt spread: a rate that was constant while profiling (threads,
    fds, an idle network) would then make the slightest change look infinitely unusual.
    Instead every component's covariance gets ``SIGMA0**2`` added (``reg_covar`` of
    :class:`~bam.models.gmm.GaussianMixtureDensity`, fitted unstandardised, PCA keeping every
    dimension): a noise floor of 0.25 in those units, i.e. ~25 % of a rate above its floor, or
    a quarter of the floor near zero, is never a surprise on its own.

    **Calibration** (per sample, aiming at ~1 % false alarms on normal behaviour): 5 folds of
    interleaved samples (every 5th sample held out in turn) give every learnt sample an
    out-of-fold NLL from a mixture that did not see it. The threshold is the 99th percentile
    of those plus a margin of ``1 + ln(100 / (n + 1))`` nats for ``n < 99`` samples (else 1):
    with fewer than 100 samples the "99th percentile" is really the maximum, which a new
    sample exceeds ~``1/(n+1)`` of the time; NLL tails fall off roughly like ``e^-Δ`` (the
    ½χ² tail of a Gaussian), so ``ln(100/(n+1))`` more nats bring that to ~1 %, and the last
    nat is for what folds cannot see (neighbouring samples are correlated, so out-of-fold
    NLLs are a little optimistic; rates drift after profiling). Interleaved rather than
    contiguous folds: a contiguous fold that holds the whole of one phase (start-up, a
    nightly job) makes the threshold blind to everything. The mixture then used for scoring
    is refitted on all samples (every normal phase counts; it fits new normal data at least
    as well as the fold mixtures did, so the threshold errs on the quiet side). The noise
    floor errs the same way: on the synthetic rate clouds of ``tests/test_resource_gmm.py``
    normal samples pass the threshold well under 1 % of the time.

    **Score** of a sample: ``(NLL - typical) / (threshold - typical)``, ``typical`` the median
    out-of-fold NLL, floored at 0: 0 is an ordinary sample, 1.0 is at the threshold.

    **Cost.** The agent fits it in a child process (``python -m bam.agent.resource_mix``, like
    :mod:`bam.agent.fit` for the baseline): scikit-learn alone would add ~80 MB to the agent's
    resident memory for good. Scoring is numpy only (no scipy, no sklearn): a few small
    matrix products per interval.
    """

    SIGMA0: ClassVar[float] = 0.25
    FOLDS: ClassVar[int] = 5
    QUANTILE: ClassVar[float] = 0.99
    #: fewer learnt samples than this: no mixture (and no ``mix`` score)
    MIN_SAMPLES: ClassVar[int] = 10
    MAX_COMPONENTS: ClassVar[int] = 4

    def __init__(self, metrics: tuple[str, ...], floors: dict[str, float]) -> None:
        self.metrics = metrics
        self.floors = np.array([max(floors.get(m, 1.0), 1e-9) for m in metrics])
        self.threshold = math.inf
        self.typical = 0.0
        self.samples = 0

    def features(self, rows: list[dict[str, float]]) -> F2:
        x = np.array([[r[m] for m in self.metrics] for r in rows], dtype=np.float64)
        out: F2 = np.log1p(np.maximum(x, 0.0) / self.floors)
        return out

    def _density(self) -> Any:
        from bam.models.gmm import GaussianMixtureDensity

        return GaussianMixtureDensity(
            self.MAX_COMPONENTS,
            pca_dims=len(self.metrics),
            reg_covar=self.SIGMA0**2,
            standardize=False,
        )

    def fit(self, rows: list[dict[str, float]]) -> RateMixture:
        x = self.features(rows)
        n = len(x)
        if n < self.MIN_SAMPLES:
            raise ValueError(f"{n} samples (< {self.MIN_SAMPLES})")
        fold = np.arange(n) % self.FOLDS
        oof = np.empty(n)
        for f in range(self.FOLDS):
            held = fold == f
            oof[held] = self._density().fit(x[~held]).nll(x[held])
        margin = 1.0 + max(0.0, math.log(100.0 / (n + 1)))
        self.typical = float(np.median(oof))
        self.threshold = max(float(np.quantile(oof, self.QUANTILE)) + margin, self.typical + 1.0)
        self.density = self._density().fit(x)
        self.samples = n
        return self

    def score(self, x: F2) -> F2:
        """Each row's NLL as a ratio to the threshold (0 = typical, 1.0 = at the threshold)."""
        nll = self.density.nll(x)
        out: F2 = np.maximum(0.0, (nll - self.typical) / (self.threshold - self.typical))
        return out

    def explain(self, x: F2, top: int = 3) -> list[str]:
        """The rates of one row (``x``: shape ``(1, metrics)``) that disagree most with the rest,
        as ``name↑`` / ``name↓`` (higher / lower than the other rates imply)."""
        r = self.density.conditional_residuals(x)[0]
        order = np.argsort(-np.abs(r), kind="stable")
        keep = [i for i in order[:top] if abs(r[i]) >= 0.5 * abs(r[order[0]])]
        return [f"{self.metrics[i]}{'↑' if r[i] > 0 else '↓'}" for i in keep]

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": list(self.metrics),
            "features": "log1p(rate / floor)",
            "floors": self.floors.tolist(),
            "threshold": self.threshold,
            "typical": self.typical,
            "samples": self.samples,
            "arrays": {k: np.asarray(v).tolist() for k, v in self.density.arrays().items()},
        }

    @classmethod
    def from_json(
        cls, d: dict[str, Any], metrics: tuple[str, ...], floors: dict[str, float]
    ) -> RateMixture:
        """Rebuild a saved mixture; ``ValueError`` if it is not one for these metrics."""
        if tuple(d["metrics"]) != metrics:
            raise ValueError(f"mixture over {d['metrics']}, not {list(metrics)}")
        m = cls(metrics, floors)
        m.floors = np.array(d["floors"], dtype=np.float64)
        m.threshold, m.typical = float(d["threshold"]), float(d["typical"])
        m.samples = int(d["samples"])
        arrays = {
            k: np.array(v, dtype=np.int64 if k == "resid_dims" else np.float64)
            for k, v in d["arrays"].items()
        }
        m.density = m._density()
        m.density.set_arrays(arrays)
        if m.floors.shape != (len(metrics),) or not math.isfinite(m.threshold):
            raise ValueError("malformed mixture")
        if m.density.mean_.shape != (len(metrics),) or m.threshold <= m.typical:
            raise ValueError("malformed mixture")
        return m


def main() -> int:
    """Child process of :meth:`RateProfile.learn`: rows in (JSON on stdin), mixture out."""
    try:
        d = json.load(sys.stdin)
        metrics = tuple(str(m) for m in d["metrics"])
        floors = {str(k): float(v) for k, v in d["floors"].items()}
        rows = [dict(zip(metrics, map(float, r), strict=True)) for r in d["rows"]]
        mix = RateMixture(metrics, floors).fit(rows)
    except (ValueError, KeyError, TypeError, np.linalg.LinAlgError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    json.dump(mix.to_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
