"""Ensemble: several detectors' scores on one scale, averaged.

Raw scores are not comparable (an NLL in nats, a fraction of unseen windows, a negative
log-density), so each member's score is normalised robustly against its own scores on held-out
normal sequences: ``(s - median) / (q90 - median)``. The ensemble score is the mean of the
normalised scores, so one confident member is not drowned by a quiet one and no member's
units dominate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from bam.models.base import F64, I32, Arrays, Contribution, Detector


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (fit, held-out) index split; at least one on each side when ``n >= 2``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    k = min(max(1, round(n * fraction)), max(n - 1, 1)) if n >= 2 else 0
    return np.sort(order[k:]), np.sort(order[:k])


class Ensemble(Detector):
    """Mean of robustly normalised member scores."""

    kind = "ensemble"

    def __init__(
        self, members: Sequence[Detector] = (), holdout: float = 0.25, seed: int = 0
    ) -> None:
        self.members = list(members)
        self.holdout = holdout
        self.seed = seed

    @property
    def name(self) -> str:
        return "ensemble(" + "+".join(m.name for m in self.members) + ")"

    def get_params(self) -> dict[str, Any]:
        return {"holdout": self.holdout, "seed": self.seed}

    def fit(self, seqs: Sequence[I32]) -> Self:
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        if len(seqs) < 2:
            raise ValueError("an ensemble needs at least 2 sequences (fit + held-out)")
        fit_i, cal_i = split_holdout(len(seqs), self.holdout, self.seed)
        fit_s = [seqs[i] for i in fit_i]
        cal_s = [seqs[i] for i in cal_i]
        centre, spread = [], []
        for m in self.members:
            m.fit(fit_s)
            c = m.score(cal_s)
            med = float(np.median(c))
            centre.append(med)
            spread.append(max(float(np.quantile(c, 0.9)) - med, 1e-6))
        self.centre_ = np.array(centre)
        self.spread_ = np.array(spread)
        self.fitted_ = True
        return self

    def member_scores(self, seqs: Sequence[I32]) -> np.ndarray:
        """Normalised scores, shape ``(len(seqs), n_members)``."""
        self.check_fitted()
        raw = np.column_stack([m.score(seqs) for m in self.members])
        out: np.ndarray = (raw - self.centre_) / self.spread_
        return out

    def score(self, seqs: Sequence[I32]) -> F64:
        if not seqs:
            return np.empty(0)
        out: F64 = self.member_scores(seqs).mean(1)
        return out

    def explain(self, seq: I32, top: int = 5, context: int = 0) -> list[Contribution]:
        """The explanations of the member that found ``seq`` most anomalous."""
        z = self.member_scores([seq[context:]])[0]
        return self.members[int(np.argmax(z))].explain(seq, top, context)

    def _get_state(self) -> tuple[dict[str, Any], Arrays]:
        metas, arrays = [], {"centre": self.centre_, "spread": self.spread_}
        for i, m in enumerate(self.members):
            meta, arr = m.state()
            metas.append(meta)
            arrays.update({f"m{i}.{k}": v for k, v in arr.items()})
        return {"members": metas}, arrays

    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        self.members = []
        for i, mm in enumerate(meta["members"]):
            prefix = f"m{i}."
            sub = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            self.members.append(Detector.from_state(mm, sub))
        self.centre_ = arrays["centre"]
        self.spread_ = arrays["spread"]
