"""stide (Forrest, Hofmeyr et al. 1996; Warrender et al. 1999): a call is anomalous when the
length-``n`` window ending at it never occurred in normal behaviour.

Per-call score is 1 for an unseen window, 0 otherwise; a window's score is the fraction of
mismatches, which the Baseline turns into a locality frame count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from bam.features.ngrams import Packed, ngram_keys
from bam.features.vocabulary import Vocabulary
from bam.models._ngram_table import KeyIndex, count, encode_pack, top_grams
from bam.models.base import F64, I32, Arrays, CallDetector, Contribution


class Stide(CallDetector):
    """Fraction of length-``n`` call windows never seen in training."""

    kind = "stide"

    def __init__(self, n: int = 6) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.n}"

    def get_params(self) -> dict[str, Any]:
        return {"n": self.n}

    def fit(self, seqs: Sequence[I32]) -> Self:
        if not any(len(s) for s in seqs):
            raise ValueError(f"cannot fit {self.name} on no calls")
        self.vocab_ = Vocabulary.fit(seqs)
        self.order_ = self.vocab_.max_order(self.n)
        p = encode_pack(self.vocab_, seqs, self.order_)
        self.keys_, self.counts_ = count(ngram_keys(p, self.order_, self.vocab_.bits))
        self.total_ = int(self.counts_.sum())
        self._after_fit()
        self.fitted_ = True
        return self

    def _after_fit(self) -> None:
        self.index_ = KeyIndex(self.keys_)

    def _per_call(self, idx: np.ndarray, found: np.ndarray) -> F64:
        return (~found).astype(np.float64)

    def _packed(self, seqs: Sequence[I32]) -> tuple[Packed, F64]:
        self.check_fitted()
        p = encode_pack(self.vocab_, seqs, self.order_)
        idx, found = self.index_.find(ngram_keys(p, self.order_, self.vocab_.bits))
        return p, self._per_call(idx, found)

    def call_scores(self, seqs: Sequence[I32]) -> list[F64]:
        if not seqs:
            return []
        p, v = self._packed(seqs)
        return p.split(v)

    def score(self, seqs: Sequence[I32]) -> F64:
        if not seqs:
            return np.empty(0)
        p, v = self._packed(seqs)
        return p.means(v)

    def explain(self, seq: I32, top: int = 5, context: int = 0) -> list[Contribution]:
        scores = self.call_scores([seq])[0]
        out = top_grams(self.vocab_, seq, self.order_, scores, top, context)
        return [Contribution(f, s, c) for f, s, c in out if s > 0]

    def _get_state(self) -> tuple[dict[str, Any], Arrays]:
        return {"vocab": self.vocab_.names(), "total": self.total_, "order": self.order_}, {
            "keys": self.keys_,
            "counts": self.counts_,
        }

    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        self.vocab_ = Vocabulary.from_names(meta["vocab"])
        self.total_ = int(meta["total"])
        self.order_ = int(meta.get("order", self.n))
        if self.order_ != self.vocab_.max_order(self.n):
            raise ValueError(f"saved order {self.order_} does not match n={self.n}")
        self.keys_ = arrays["keys"]
        self.counts_ = arrays["counts"]
        self._after_fit()
