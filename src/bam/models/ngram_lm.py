"""Smoothed n-gram language model: per-call negative log-likelihood of each call given its past.

Two interpolated smoothings, both ``P(w|h) = max(c(h,w) - D, 0)/c(h) + γ(h) P(w|h')`` with
``γ(h) = ΣD/c(h)`` (the mass taken by the discounts), down to a unigram that leaves probability
for calls never seen (so an unseen call is very surprising but not infinite):

* ``"ad"`` (default for ``lm``): absolute discounting, one fixed ``D``, raw counts at every
  order, add-α unigram.
* ``"mkn"``: interpolated modified Kneser-Ney (Chen & Goodman 1998). Three discounts per order
  (for counts 1, 2, 3+) estimated from that order's count-of-counts, and below the top order the
  counts are *continuation* counts (how many distinct calls precede the lower-order n-gram), so a
  lower order predicts how likely a call is to start a new context rather than how frequent it
  is. It pays off where a long context is often unseen and the back-off distribution matters,
  which is the case of the 16-gram category model (:mod:`bam.models.category_lm`).

For speed, fitting precomputes the interpolated probability of every stored n-gram; scoring then
needs one lookup per call for a seen n-gram, and for the misses a binary search for the longest
seen context plus a short walk down to the longest seen n-gram (``_backoff_logp``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt

from bam.features.ngrams import Packed, ngram_keys
from bam.features.vocabulary import Vocabulary
from bam.models._ngram_table import KeyIndex, count, encode_pack, lookup, top_grams
from bam.models.base import F64, I32, Arrays, CallDetector, Contribution

Smoothing = Literal["ad", "mkn"]
SMOOTHINGS: tuple[Smoothing, ...] = ("ad", "mkn")

# Modified Kneser-Ney discounts when an order has too few n-gram types for count-of-counts
# (n1..n4 must all be non-zero), and the floor that keeps every discount, hence every back-off
# weight γ(h), positive: a zero γ would make a call unseen after h impossible (infinite NLL).
_MKN_FALLBACK = np.array([0.0, 0.5, 0.75, 0.9])
_MKN_MIN_DISCOUNT = 0.05


def mkn_discounts(counts: npt.NDArray[np.float64]) -> F64:
    """``[0, D1, D2, D3+]`` of one order from its count-of-counts (Chen & Goodman 1998)."""
    n1, n2, n3, n4 = (float(np.count_nonzero(counts == i)) for i in range(1, 5))
    if min(n1, n2, n3, n4) == 0:
        return _MKN_FALLBACK.copy()
    y = n1 / (n1 + 2 * n2)
    d = np.array([0.0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3])
    d[1:] = np.maximum(d[1:], _MKN_MIN_DISCOUNT)
    return d


def continuation_counts(
    higher_keys: npt.NDArray[np.uint64], k: int, bits: int
) -> tuple[npt.NDArray[np.uint64], F64]:
    """Distinct left extensions of each k-gram: its Kneser-Ney count below the top order.

    Every k-gram ending at a real call is the suffix of the (k+1)-gram ending there (start pads
    count as a left context), so the keys returned are exactly the k-grams seen.
    """
    keys, c = np.unique(higher_keys & _mask(bits, k), return_counts=True)
    return keys, c.astype(np.float64)


def _mask(bits: int, k: int) -> np.uint64:
    """Mask keeping the last ``k`` codes of a key."""
    return np.uint64((1 << (bits * k)) - 1)


class NgramLM(CallDetector):
    """Per-call surprise under a smoothed n-gram model of each thread's calls."""

    kind = "ngram-lm"

    def __init__(
        self,
        n: int = 8,
        discount: float = 0.5,
        alpha: float = 0.1,
        smoothing: Smoothing = "ad",
    ) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        if not 0.0 < discount < 1.0:
            raise ValueError("discount must be in (0, 1)")
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {', '.join(SMOOTHINGS)}")
        self.n = n
        self.discount = discount  # "ad" only: "mkn" estimates its discounts from the data
        self.alpha = alpha  # "ad" only: "mkn" smooths the unigram by interpolation instead
        self.smoothing = smoothing

    @property
    def name(self) -> str:
        return f"lm-{self.n}gram"

    def get_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"n": self.n, "discount": self.discount, "alpha": self.alpha}
        if self.smoothing != "ad":
            # Only when not the default, so that `lm` models keep the model_id they always had.
            params["smoothing"] = self.smoothing
        return params

    # ---- the alphabet: hooks a model over another alphabet (categories) overrides ----
    def _fit_vocab(self, seqs: Sequence[I32]) -> Vocabulary:
        """The symbols this model predicts, learnt from the training sequences."""
        return Vocabulary.fit(seqs)

    def _pack(self, seqs: Sequence[I32], n: int) -> Packed:
        """Sequences of canonical syscall ids as dense codes with ``n - 1`` start pads."""
        return encode_pack(self.vocab_, seqs, n)

    def _vocab_state(self) -> list[str]:
        return self.vocab_.names()

    def _vocab_from_state(self, names: list[str]) -> Vocabulary:
        return Vocabulary.from_names(names)

    def fit(self, seqs: Sequence[I32]) -> Self:
        if not any(len(s) for s in seqs):
            raise ValueError(f"cannot fit {self.name} on no calls")
        self.vocab_ = self._fit_vocab(seqs)
        self.order_ = self.vocab_.max_order(self.n)
        bits = self.vocab_.bits
        p = self._pack(seqs, self.order_)
        grams = [count(ngram_keys(p, k, bits)) for k in range(1, self.order_ + 1)]
        if self.smoothing == "mkn":
            self._fit_mkn(grams, bits)
        else:
            self._fit_ad(p, grams, bits)
        self._build_index()
        self.fitted_ = True
        return self

    def _fit_ad(
        self,
        p: Packed,
        grams: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]],
        bits: int,
    ) -> None:
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
            keys, c = grams[k - 1]
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

    def _fit_mkn(
        self, grams: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]], bits: int
    ) -> None:
        top = self.order_
        # counts used at each order: raw at the top, continuation counts below it
        used: list[tuple[npt.NDArray[np.uint64], F64]] = []
        for k in range(1, top + 1):
            if k == top:
                used.append((grams[k - 1][0], grams[k - 1][1].astype(np.float64)))
            else:
                keys, c = continuation_counts(grams[k][0], k, bits)
                assert np.array_equal(keys, grams[k - 1][0]), "k-grams = suffixes of (k+1)-grams"
                used.append((keys, c))
        # unigram: discounted counts interpolated with the uniform over known calls + OOV
        keys, c = used[0]
        dis = mkn_discounts(c)[np.minimum(c, 3).astype(np.int64)]
        tot = float(c.sum())
        n_symbols = self.vocab_.size - 1  # known calls and the OOV class; never the pad
        floor = dis.sum() / tot / n_symbols
        uni = np.full(self.vocab_.size, floor)
        uni[keys.astype(np.int64)] += np.maximum(c - dis, 0.0) / tot
        self.log_unigram_ = np.log(uni)
        self.keys_ = [keys]
        self.logp_ = [self.log_unigram_[keys.astype(np.int64)]]
        self.hist_keys_ = [np.empty(0, np.uint64)]
        self.log_gamma_ = [np.empty(0, np.float64)]
        for k in range(2, top + 1):
            keys, c = used[k - 1]
            dis = mkn_discounts(c)[np.minimum(c, 3).astype(np.int64)]
            hk, hinv = np.unique(keys >> np.uint64(bits), return_inverse=True)
            htot = np.bincount(hinv, weights=c)
            gamma = np.bincount(hinv, weights=dis) / htot
            mask = np.uint64((1 << (bits * (k - 1))) - 1)
            j, found = lookup(self.keys_[-1], keys & mask)
            assert found.all(), "suffix of a seen n-gram must be seen"
            p_lower = np.exp(self.logp_[-1][j])
            self.keys_.append(keys)
            self.logp_.append(np.log(np.maximum(c - dis, 0.0) / htot[hinv] + gamma[hinv] * p_lower))
            self.hist_keys_.append(hk)
            self.log_gamma_.append(np.log(gamma))

    def _build_index(self) -> None:
        self.index_ = [KeyIndex(k) for k in self.keys_]
        self.hist_index_ = [KeyIndex(h) for h in self.hist_keys_]
        # Derived (not persisted): for each seen history, the sum of log γ along its chain of
        # suffixes (all seen too: a seen history's suffix is a history one order down); for
        # each n-gram, its log-probability net of its own history's sum. A call whose longest
        # seen n-gram has order m and longest seen history order H then scores
        # ``cum_H(h_H) + adj_m(gram)`` = ``log Π_{m<j<=H} γ_j(h_j) + log P_m``, exactly the
        # back-off walk, with one history search and one n-gram search instead of a history
        # and an n-gram lookup at every order in between.
        bits = self.vocab_.bits
        self.cum_gamma_: list[F64] = [np.zeros(0)]
        self.adj_logp_: list[F64] = [self.logp_[0]]
        for k in range(2, self.order_ + 1):
            lg = self.log_gamma_[k - 1]
            if k == 2:
                cum = lg.copy()
            else:
                mask = np.uint64((1 << (bits * (k - 2))) - 1)
                j, found = lookup(self.hist_index_[k - 2], self.hist_keys_[k - 1] & mask)
                assert found.all(), "suffix of a seen history must be a seen history"
                cum = lg + self.cum_gamma_[k - 2][j]
            self.cum_gamma_.append(cum)
            j, found = lookup(self.hist_index_[k - 1], self.keys_[k - 1] >> np.uint64(bits))
            assert found.all(), "history of a seen n-gram must be seen"
            self.adj_logp_.append(self.logp_[k - 1] - cum[j])

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
        p = self._pack(seqs, self.order_)
        bits = self.vocab_.bits
        full = ngram_keys(p, self.order_, bits)
        k = self.order_
        if k == 1:
            return p, -self.log_unigram_[full.astype(np.int64)]
        # The longest order settles most calls: done over the whole batch, no index arrays.
        j, found = lookup(self.index_[k - 1], full)
        nll = np.where(found, -self.logp_[k - 1][j], 0.0)
        todo = np.flatnonzero(~found)  # the calls that back off
        if len(todo):
            nll[todo] = -self._backoff_logp(full[todo], bits)
        return p, nll

    def _backoff_logp(self, key: npt.NDArray[np.uint64], bits: int) -> F64:
        """log P of calls whose top-order n-gram (``key``) was never seen (see ``_build_index``).

        The history is found by binary search over the orders, valid because being seen is
        monotone (a seen history's suffixes are seen): 4 lookups for a 16-gram model instead
        of a walk down every order, then the n-gram usually at the first or second order
        tried. That keeps a long-context model with many back-offs fast (the category LM
        misses its 16-gram on ~40% of ADFA-LD's calls, mostly matching only 6 to 10 calls).
        """
        top = self.order_
        hist = key >> np.uint64(bits)
        cum = np.zeros(len(key), dtype=np.float64)
        out = np.empty(len(key), dtype=np.float64)
        # 1. H, the longest order whose history is seen (1: none); cum = its back-off sum
        leaves: list[tuple[npt.NDArray[np.int64], int]] = []
        stack = [(np.arange(len(key), dtype=np.int64), 1, top)]
        while stack:
            idx, lo, hi = stack.pop()
            if lo == hi:
                leaves.append((idx, lo))
                continue
            mid = (lo + hi + 1) // 2
            hj, hf = lookup(self.hist_index_[mid - 1], hist[idx] & _mask(bits, mid - 1))
            cum[idx[hf]] = self.cum_gamma_[mid - 1][hj[hf]]
            stack += [(idx[~hf], lo, mid - 1), (idx[hf], mid, hi)]
        # 2. m, the longest seen n-gram: at most min(H, top - 1), as no longer one can be seen,
        # and usually just that (m = H - 1 for most calls), so walked down from there.
        for idx, h in leaves:
            k = min(h, top - 1)
            while len(idx) and k > 1:
                j, f = lookup(self.index_[k - 1], key[idx] & _mask(bits, k))
                yes = idx[f]
                out[yes] = cum[yes] + self.adj_logp_[k - 1][j[f]]
                idx, k = idx[~f], k - 1
            if len(idx):
                uni = (key[idx] & _mask(bits, 1)).astype(np.int64)
                out[idx] = cum[idx] + self.log_unigram_[uni]
        return out

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
        return {"vocab": self._vocab_state(), "order": self.order_}, arrays

    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        self.vocab_ = self._vocab_from_state(meta["vocab"])
        self.order_ = int(meta.get("order", self.n))
        if self.order_ != self.vocab_.max_order(self.n):
            raise ValueError(f"saved order {self.order_} does not match n={self.n}")
        self.log_unigram_ = arrays["log_unigram"]
        self.keys_ = [arrays[f"keys{k}"] for k in range(self.order_)]
        self.logp_ = [arrays[f"logp{k}"] for k in range(self.order_)]
        self.hist_keys_ = [arrays[f"hist{k}"] for k in range(self.order_)]
        self.log_gamma_ = [arrays[f"lgamma{k}"] for k in range(self.order_)]
        self._build_index()
