"""Smoothed n-gram language model: per-call negative log-likelihood of each call given its past.

Interpolated absolute discounting (the core of Kneser-Ney without continuation counts):
``P(w|h) = max(c(h,w) - D, 0)/c(h) + γ(h) P(w|h')``, ``γ(h) = D·types(h)/c(h)``, down to an add-α
unigram that leaves probability for calls never seen (so an unseen call is very surprising but
not infinite). For speed, fitting precomputes the interpolated probability of every stored
n-gram; scoring then needs one lookup per call for a seen n-gram and walks down the orders only
for the (rare, anomalous) misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from bam.features.ngrams import Packed, ngram_keys
from bam.features.vocabulary import Vocabulary
from bam.models._ngram_table import KeyIndex, count, encode_pack, lookup, top_grams
from bam.models.base import F64, I32, Arrays, CallDetector, Contribution


class NgramLM(CallDetector):
    """Per-call surprise under a smoothed n-gram model of each thread's calls."""

    kind = "ngram-lm"

    def __init__(self, n: int = 8, discount: float = 0.5, alpha: float = 0.1) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        if not 0.0 < discount < 1.0:
            raise ValueError("discount must be in (0, 1)")
        self.n = n
        self.discount = discount
        self.alpha = alpha

    @property
    def name(self) -> str:
        return f"lm-{self.n}gram"

    def get_params(self) -> dict[str, Any]:
        return {"n": self.n, "discount": self.discount, "alpha": self.alpha}

    def fit(self, seqs: Sequence[I32]) -> Self:
        if not any(len(s) for s in seqs):
            raise ValueError(f"cannot fit {self.name} on no calls")
        self.vocab_ = Vocabulary.fit(seqs)
        self.order_ = self.vocab_.max_order(self.n)
        bits = self.vocab_.bits
        p = encode_pack(self.vocab_, seqs, self.order_)
        uni = np.bincount(p.codes[p.pos], minlength=self.vocab_.size).astype(np.float64)
        uni[0] = 0.0  # the pad code is never predicted
        self.log_unigram_ = np.log((uni + self.alpha) / (uni.sum() + self.alpha * (len(uni) - 1)))
        self.keys_: list[npt.NDArray[np.uint64]] = []
        self.logp_: list[F64] = []
        self.hist_keys_: list[npt.NDArray[np.uint64]] = []
        self.log_gamma_: list[F64] = []
        prev_keys: npt.NDArray[np.uint64] | None = None
        prev_logp: F64 | None = None
        d = self.discount
        for k in range(1, self.order_ + 1):
            keys, c = count(ngram_keys(p, k, bits))
            if k == 1:
                logp = self.log_unigram_[keys.astype(np.int64)]
                hk = np.empty(0, np.uint64)
                lg = np.empty(0, np.float64)
            else:
                assert prev_keys is not None
                assert prev_logp is not None
                hist = keys >> np.uint64(bits)
                hk, hinv, htypes = np.unique(hist, return_inverse=True, return_counts=True)
                htot = np.bincount(hinv, weights=c).astype(np.float64)
                gamma = d * htypes / htot
                mask = np.uint64((1 << (bits * (k - 1))) - 1)
                j, found = lookup(prev_keys, keys & mask)
                assert found.all(), "suffix of a seen n-gram must be seen"
                p_lower = np.exp(prev_logp[j])
                logp = np.log(np.maximum(c - d, 0.0) / htot[hinv] + gamma[hinv] * p_lower)
                lg = np.log(gamma)
            self.keys_.append(keys)
            self.logp_.append(logp)
            self.hist_keys_.append(hk)
            self.log_gamma_.append(lg)
            prev_keys, prev_logp = keys, logp
        self._build_index()
        self.fitted_ = True
        return self

    def _build_index(self) -> None:
        self.index_ = [KeyIndex(k) for k in self.keys_]
        self.hist_index_ = [KeyIndex(h) for h in self.hist_keys_]

    def call_scores(self, seqs: Sequence[I32]) -> list[F64]:
        if not seqs:
            return []
        p, nll = self._packed_nll(seqs)
        return p.split(nll)

    def score(self, seqs: Sequence[I32]) -> F64:
        if not seqs:
            return np.empty(0)
        p, nll = self._packed_nll(seqs)
        return p.means(nll)

    def _packed_nll(self, seqs: Sequence[I32]) -> tuple[Packed, F64]:
        self.check_fitted()
        p = encode_pack(self.vocab_, seqs, self.order_)
        bits = self.vocab_.bits
        full = ngram_keys(p, self.order_, bits)
        k = self.order_
        if k == 1:
            return p, -self.log_unigram_[full.astype(np.int64)]
        # The longest order settles most calls: done over the whole batch, no index arrays.
        j, found = lookup(self.index_[k - 1], full)
        nll = np.where(found, -self.logp_[k - 1][j], 0.0)
        todo = np.flatnonzero(~found)  # calls whose longest matching order is not found yet
        acc = np.zeros(len(todo), dtype=np.float64)  # sum of log γ of seen histories, per todo
        key = full[todo]
        while len(todo):
            hj, hfound = lookup(self.hist_index_[k - 1], key >> np.uint64(bits))
            acc[hfound] += self.log_gamma_[k - 1][hj[hfound]]
            k -= 1
            key &= np.uint64((1 << (bits * k)) - 1)  # the last k calls
            if k == 1:
                nll[todo] = -(acc + self.log_unigram_[key.astype(np.int64)])
                break
            j, found = lookup(self.index_[k - 1], key)
            nll[todo[found]] = -(acc[found] + self.logp_[k - 1][j[found]])
            todo, acc, key = todo[~found], acc[~found], key[~found]
        return p, nll

    def explain(self, seq: I32, top: int = 5, context: int = 0) -> list[Contribution]:
        scores = self.call_scores([seq])[0]
        return [
            Contribution(f, s, c)
            for f, s, c in top_grams(self.vocab_, seq, self.order_, scores, top, context)
        ]

    def _get_state(self) -> tuple[dict[str, Any], Arrays]:
        arrays: Arrays = {"log_unigram": self.log_unigram_}
        for k in range(self.order_):
            arrays[f"keys{k}"] = self.keys_[k]
            arrays[f"logp{k}"] = self.logp_[k]
            arrays[f"hist{k}"] = self.hist_keys_[k]
            arrays[f"lgamma{k}"] = self.log_gamma_[k]
        return {"vocab": self.vocab_.names(), "order": self.order_}, arrays

    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        self.vocab_ = Vocabulary.from_names(meta["vocab"])
        self.order_ = int(meta.get("order", self.n))
        if self.order_ != self.vocab_.max_order(self.n):
            raise ValueError(f"saved order {self.order_} does not match n={self.n}")
        self.log_unigram_ = arrays["log_unigram"]
        self.keys_ = [arrays[f"keys{k}"] for k in range(self.order_)]
        self.logp_ = [arrays[f"logp{k}"] for k in range(self.order_)]
        self.hist_keys_ = [arrays[f"hist{k}"] for k in range(self.order_)]
        self.log_gamma_ = [arrays[f"lgamma{k}"] for k in range(self.order_)]
        self._build_index()
