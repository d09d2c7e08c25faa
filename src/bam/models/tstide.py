"""t-stide (Warrender, Forrest & Pearlmutter 1999): stide that also distrusts *rare* windows.

A window seen in training but with relative frequency below ``rare`` scores like an unseen one
(rare paths are where exploits hide: error handlers, fallback code). Per-call score is graded:
1 for unseen, ``1 - freq/rare`` for rare, 0 for common.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bam.models.base import F64
from bam.models.stide import Stide


class TStide(Stide):
    """Fraction of length-``n`` windows unseen or rarer than ``rare`` in training."""

    kind = "t-stide"

    def __init__(self, n: int = 6, rare: float = 0.001) -> None:
        super().__init__(n)
        if not 0.0 < rare < 1.0:
            raise ValueError("rare must be in (0, 1)")
        self.rare = rare

    def get_params(self) -> dict[str, Any]:
        return {"n": self.n, "rare": self.rare}

    def _after_fit(self) -> None:
        super()._after_fit()
        freq = self.counts_ / max(1, self.total_)
        self.rarity_ = np.clip(1.0 - freq / self.rare, 0.0, 1.0)

    def _per_call(self, idx: np.ndarray, found: np.ndarray) -> F64:
        return np.where(found, self.rarity_[idx], 1.0)
