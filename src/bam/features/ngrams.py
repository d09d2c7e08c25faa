"""Vectorised n-gram keys: each position's last ``n`` dense codes packed into one uint64.

Sequences are processed as one concatenation with ``n - 1`` pad codes before each, so that one
numpy pass handles thousands of sequences without a per-event Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class Packed:
    """Padded concatenation of code sequences.

    ``codes`` holds each sequence preceded by ``pad`` pad codes; ``pos`` the indices in ``codes`` of
    the real calls (in order); ``offsets`` where each sequence's calls start within ``pos``.
    """

    codes: npt.NDArray[np.int64]
    pos: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    pad: int

    @property
    def n_calls(self) -> int:
        return len(self.pos)

    def split(self, values: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
        """Split a per-call array back into per-sequence arrays."""
        return np.split(values, self.offsets[1:-1])

    def means(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per-sequence mean of a per-call array (0 for empty sequences)."""
        sums = (
            np.add.reduceat(np.r_[values, 0.0], self.offsets[:-1])
            if len(self.offsets) > 1
            else np.empty(0)
        )
        lens = np.diff(self.offsets)
        return np.where(lens > 0, sums / np.maximum(lens, 1), 0.0)


PAD_ID = -1  # the pad value in packs of raw (not yet dense-coded) ids


def pack(seqs: Sequence[npt.ArrayLike], pad: int, fill: int = PAD_ID) -> Packed:
    """Concatenate sequences, each preceded by ``pad`` copies of ``fill``."""
    arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
    lens = np.array([len(s) for s in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    # position of call j of sequence i in the padded array: offsets[i] + (i + 1) * pad + j
    seq_of_call = np.repeat(np.arange(len(arrays), dtype=np.int64), lens)
    pos = np.arange(int(offsets[-1]), dtype=np.int64) + (seq_of_call + 1) * pad
    codes = np.full(int(offsets[-1]) + pad * len(arrays), fill, dtype=np.int64)
    if arrays:
        codes[pos] = np.concatenate(arrays)
    return Packed(codes=codes, pos=pos, offsets=offsets, pad=pad)


def ngram_keys(p: Packed, n: int, bits: int) -> U64:
    """Key of the n-gram ending at each real call (``n <= p.pad + 1``, ``n * bits <= 64``)."""
    if n < 1 or n > p.pad + 1:
        raise ValueError(f"n-gram length {n} needs pad >= {n - 1}, have {p.pad}")
    if n * bits > 64:
        raise ValueError(f"{n}-grams of a {bits}-bit vocabulary do not fit in 64-bit keys")
    codes = p.codes.astype(np.uint64)
    if len(p.pos) == 0:
        return np.zeros(0, dtype=np.uint64)
    # Build the key at every position of the padded array from contiguous slices (cheaper
    # than n gathers), then keep the real calls: position i's key covers codes[i-n+1 .. i].
    first = int(p.pos[0])
    span = len(codes) - first
    key = np.zeros(span, dtype=np.uint64)
    shift = np.uint64(bits)
    for back in range(n - 1, -1, -1):
        key <<= shift
        key |= codes[first - back : first - back + span]
    return key[p.pos - first]


def render(key: int, n: int, bits: int) -> list[int]:
    """Codes of an n-gram key, oldest first."""
    mask = (1 << bits) - 1
    return [(int(key) >> (bits * (n - 1 - i))) & mask for i in range(n)]
