"""Sorted n-gram count tables shared by stide, t-stide and the n-gram language model.

Keys are uint64 (see :mod:`bam.features.ngrams`); lookups are ``np.searchsorted`` over the sorted
key array, one vectorised pass per order, so scoring needs no Python loop per event.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from bam.features.ngrams import PAD_ID, Packed, ngram_keys, pack, render
from bam.features.vocabulary import OOV, PAD, Vocabulary
from bam.syscalls import name_of

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


def count(keys: U64) -> tuple[U64, I64]:
    """Sorted unique keys and their counts."""
    k, c = np.unique(keys, return_counts=True)
    return k, c.astype(np.int64)


_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing


class KeyIndex:
    """Open-addressing hash index over a sorted key array: key -> position in that array.

    ``np.searchsorted`` costs ~log2(n) dependent cache misses per query; a hash table with load
    factor <= 1/4 needs ~1.2 probes, which is what lets the n-gram detectors score millions of
    events per second in numpy. Built from the keys (not persisted: it is derived data).
    """

    def __init__(self, keys: U64) -> None:
        self.keys = keys
        n = max(1, len(keys))
        self.bits = max(4, int(4 * n - 1).bit_length())
        size = 1 << self.bits
        self.slots = np.full(size, -1, dtype=np.int64)
        self._shift = np.uint64(64 - self.bits)
        h = self._hash(keys)
        pending = np.arange(len(keys), dtype=np.int64)
        while len(pending):
            slot = h[pending]
            free = self.slots[slot] == -1
            # Several keys may want one free slot: the first of each wins this round.
            cand_slot, first = np.unique(slot[free], return_index=True)
            winners = pending[free][first]
            self.slots[cand_slot] = winners
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            pending = pending[~placed]
            h[pending] = (h[pending] + 1) & (size - 1)

        # Keys laid out by slot as well: a probe then reads one array, not slots then keys.
        self.slot_keys = np.zeros(size, dtype=np.uint64)
        used = self.slots >= 0
        self.slot_keys[used] = keys[self.slots[used]]

    def _hash(self, keys: U64) -> npt.NDArray[np.int64]:
        return ((keys * _MULT) >> self._shift).astype(np.int64)

    def find(self, query: U64) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Position of each query key in ``keys`` and whether it is present."""
        if len(self.keys) == 0 or len(query) == 0:
            return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
        mask = (1 << self.bits) - 1
        slot = self._hash(query)
        # First probe over the whole batch without index bookkeeping: at load <= 1/4 it
        # settles ~90% of queries; only the rest go round the probing loop.
        cand = self.slots[slot]
        found = (self.slot_keys[slot] == query) & (cand >= 0)
        idx = np.where(found, cand, 0)
        todo = np.flatnonzero(~found & (cand >= 0))
        slot = (slot[todo] + 1) & mask
        while len(todo):
            cand = self.slots[slot]
            hit = (self.slot_keys[slot] == query[todo]) & (cand >= 0)
            idx[todo[hit]] = cand[hit]
            found[todo[hit]] = True
            go_on = ~hit & (cand >= 0)
            todo = todo[go_on]
            slot = (slot[go_on] + 1) & mask
        return idx, found


def lookup(
    table: U64 | KeyIndex, query: U64
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Index of each query key in ``table`` (sorted keys or a :class:`KeyIndex`), and presence."""
    if isinstance(table, KeyIndex):
        return table.find(query)
    if len(table) == 0:
        z = np.zeros(len(query), dtype=np.int64)
        return z, np.zeros(len(query), dtype=bool)
    idx = np.searchsorted(table, query).astype(np.int64)
    idx[idx >= len(table)] = 0
    return idx, table[idx] == query


def encode_pack(vocab: Vocabulary, seqs: Sequence[npt.NDArray[np.int32]], n: int) -> Packed:
    """Pack sequences with ``n - 1`` pads, then dense-code them in one pass."""
    p = pack(seqs, pad=n - 1)
    codes = vocab.encode(p.codes)
    codes[p.codes == PAD_ID] = PAD
    return Packed(codes=codes, pos=p.pos, offsets=p.offsets, pad=p.pad)


def gram_name(vocab: Vocabulary, key: int, n: int) -> str:
    """An n-gram key as syscall names, e.g. ``open read mmap`` (leading pads dropped)."""
    codes = render(key, n, vocab.bits)
    while len(codes) > 1 and codes[0] == 0:
        codes = codes[1:]
    return " ".join(vocab.name(c) for c in codes)


def top_grams(
    vocab: Vocabulary,
    seq: npt.NDArray[np.int32],
    n: int,
    scores: npt.NDArray[np.float64],
    top: int,
    context: int = 0,
) -> list[tuple[str, float, int]]:
    """The ``top`` distinct n-grams of ``seq`` with the highest per-call score.

    N-grams are grouped and named by the sequence's *own* calls, not the model's codes: a call
    the model never saw (the very thing an explanation must name, e.g. an injected ``execve``)
    is spelled out, marked ``!`` (``execve!``), instead of collapsing into one "unseen" symbol.
    """
    if len(seq) == 0:
        return []
    local_ids, local = np.unique(np.asarray(seq, dtype=np.int64), return_inverse=True)
    bits = max(1, int(len(local_ids) + 1).bit_length())
    order_n = max(1, min(n, 64 // bits))
    p = pack([local + 1], pad=order_n - 1, fill=0)  # 0 = start pad, 1.. = local call ids
    keys = ngram_keys(p, order_n, bits)[context:]
    scores = scores[context:]
    if len(keys) == 0:
        return []
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    first = first + context
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, scores)
    cnt = np.bincount(inv, minlength=len(uniq))
    known = vocab.encode(local_ids) != OOV
    out = []
    for i in np.argsort(-best, kind="stable")[:top]:
        end = int(first[i]) + 1
        window = local[max(0, end - order_n) : end]
        words = [name_of(int(local_ids[c])) + ("" if known[c] else "!") for c in window]
        out.append((" ".join(words), float(best[i]), int(cnt[i])))
    return out
