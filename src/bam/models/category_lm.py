"""N-gram language model over coarse syscall *categories* (``catlm``): long context, small alphabet.

Why categories: an attack is mostly a different *kind* of activity in a different order (a
shell's process/IPC/file-descriptor pattern where a web server reads and writes), and the exact
calls that express it vary with libc, build and architecture. Mapping each call to one of eleven
categories (:mod:`bam.syscall_categories`) needs 4 bits per call, so one 64-bit key holds a
16-call context instead of the 8 of the per-call ``lm``; modified Kneser-Ney smoothing makes
the often-unseen long contexts back off to well-estimated shorter ones. On ADFA-LD's official
protocol, through the same :class:`~bam.detect.Baseline` as every detector, this scored AUC
0.857 / FAR at 90% detection 0.216 against ``lm``'s 0.838 / 0.243. The order (16) was chosen by
held-out negative log-likelihood on the normal Training data only (5-fold: 0.947, 0.707, 0.653,
0.641 nats/call at n = 4, 8, 12, 16), never by attack data.

The model is :class:`~bam.models.ngram_lm.NgramLM` itself, with the syscall->category map put
in front of its vocabulary; the map it was fitted with is saved with it, so a later change to
BAM's map cannot silently change what a saved model means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from bam.features.ngrams import Packed, pack
from bam.features.vocabulary import PAD, Vocabulary
from bam.models._ngram_table import top_grams
from bam.models.base import I32, Arrays, Contribution
from bam.models.ngram_lm import NgramLM, Smoothing
from bam.syscall_categories import (
    CATEGORIES,
    LUT_SIZE,
    OTHER,
    OTHER_ID,
    category_lut,
    lut_from_members,
    members,
)

# An explanation names the flagged call with the two before it: the transition into it, short
# enough to read (the 16-call context that made it surprising is not).
EXPLAIN_SPAN = 3


class CategoryLM(NgramLM):
    """Per-call surprise of each call's *category* given the categories of the calls before it."""

    kind = "category-lm"

    def __init__(
        self,
        n: int = 16,
        discount: float = 0.5,
        alpha: float = 0.1,
        smoothing: Smoothing = "mkn",
    ) -> None:
        super().__init__(n=n, discount=discount, alpha=alpha, smoothing=smoothing)

    @property
    def name(self) -> str:
        return f"catlm-{self.n}gram"

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "smoothing": self.smoothing}  # default differs from lm's

    # ---- the category alphabet (NgramLM's hooks) ----
    def _fit_vocab(self, seqs: Sequence[I32]) -> Vocabulary:
        # Fitting fixes the map (this BAM's) along with the categories seen, and remembers the
        # calls seen so that explanations can mark a call never seen in training ("execve!").
        self.members_ = members()
        self.category_lut_ = category_lut()
        self.calls_ = Vocabulary.fit(seqs)
        vocab = Vocabulary(self._categories(self.calls_.ids_))
        self._build_lut(vocab)
        return vocab

    def _categories(self, ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
        a = np.asarray(ids, dtype=np.int64)
        cats: npt.NDArray[np.int32] = np.where(
            (a >= 0) & (a < LUT_SIZE), self.category_lut_[np.clip(a, 0, LUT_SIZE - 1)], OTHER_ID
        ).astype(np.int32)
        return cats

    def _pack(self, seqs: Sequence[I32], n: int) -> Packed:
        p = pack(seqs, pad=n - 1)  # raw canonical ids, pads = -1
        codes = self._code_lut_[np.clip(p.codes + 1, 0, LUT_SIZE)]  # one gather: id -> code
        return Packed(codes=codes, pos=p.pos, offsets=p.offsets, pad=p.pad)

    def _build_index(self) -> None:
        super()._build_index()
        self._build_lut(self.vocab_)

    def _build_lut(self, vocab: Vocabulary) -> None:
        # Canonical id + 1 -> dense category code (slot 0: the start pad; ids beyond the
        # category LUT are "other"), so packing needs a single gather per call.
        cat_codes = vocab.encode(np.arange(len(CATEGORIES)))
        lut = np.empty(LUT_SIZE + 1, dtype=np.int64)
        lut[0] = PAD
        lut[1:] = cat_codes[self.category_lut_]
        lut[-1] = cat_codes[OTHER_ID]
        self._code_lut_ = lut
        self._category_of_ = {n: c for c, names in self.members_.items() for n in names}

    def _vocab_state(self) -> list[str]:
        return [CATEGORIES[int(i)] for i in self.vocab_.ids_]

    def _vocab_from_state(self, names: list[str]) -> Vocabulary:
        unknown = [n for n in names if n not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown syscall categories {unknown}")
        return Vocabulary([CATEGORIES.index(n) for n in names])

    def _get_state(self) -> tuple[dict[str, Any], Arrays]:
        meta, arrays = super()._get_state()
        meta["categories"] = self.members_
        meta["calls"] = self.calls_.names()
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        self.members_ = {str(k): [str(n) for n in v] for k, v in meta["categories"].items()}
        self.category_lut_ = lut_from_members(self.members_)
        self.calls_ = Vocabulary.from_names(meta["calls"])
        super()._set_state(meta, arrays)

    # ---- explanations ----
    def explain(self, seq: I32, top: int = 5, context: int = 0) -> list[Contribution]:
        """The most surprising category transitions, each with the calls that made them.

        E.g. ``fs_io process! net (read execve! socket)``: the flagged call and the two before
        it, as categories and then as syscalls; ``!`` marks a category (or call) never seen in
        training. Grouped by the calls, so one feature is one concrete phrase of the trace.
        """
        seq = np.asarray(seq, dtype=np.int32)
        if len(seq) == 0:
            return []
        scores = self.call_scores([seq])[0]
        seen = set(self._vocab_state())
        out = []
        for phrase, score, cnt in top_grams(self.calls_, seq, EXPLAIN_SPAN, scores, top, context):
            cats = [self._category_of_.get(c.rstrip("!"), OTHER) for c in phrase.split()]
            marked = " ".join(c + ("" if c in seen else "!") for c in cats)
            out.append(Contribution(f"{marked} ({phrase})", score, cnt))
        return out
