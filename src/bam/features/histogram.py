"""Per-window syscall-frequency vectors: the "what does it do" view, blind to order.

A window's vector is the relative frequency of each known call (plus one column for calls never
seen in training), square-rooted (the Hellinger embedding: frequent calls stop dominating and
Euclidean distance between vectors becomes meaningful for a Gaussian model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from bam.features.ngrams import pack
from bam.features.vocabulary import Vocabulary


def frequency_vectors(
    vocab: Vocabulary, seqs: Sequence[npt.NDArray[np.int32]]
) -> npt.NDArray[np.float64]:
    """``(len(seqs), vocab.size - 1)`` square-rooted relative frequencies (column 0 = unseen)."""
    if not seqs:
        return np.empty((0, vocab.size - 1))
    p = pack(seqs, pad=0)
    codes = vocab.encode(p.codes) - 1  # drop the pad code: column 0 is OOV
    width = vocab.size - 1
    row = np.repeat(np.arange(len(seqs)), np.diff(p.offsets))
    counts = np.bincount(row * width + codes, minlength=len(seqs) * width).reshape(len(seqs), width)
    totals = np.maximum(counts.sum(1, keepdims=True), 1)
    out: npt.NDArray[np.float64] = np.sqrt(counts / totals)
    return out


def column_names(vocab: Vocabulary) -> list[str]:
    """Names of :func:`frequency_vectors` columns."""
    return ["<unseen>", *vocab.names()]
