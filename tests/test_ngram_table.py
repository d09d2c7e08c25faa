"""The n-gram key machinery against plain reference implementations (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bam.features.ngrams import ngram_keys as fast_keys
from bam.features.ngrams import pack, render
from bam.models._ngram_table import KeyIndex, lookup

keys_st = st.lists(st.integers(0, 2**64 - 1), max_size=300, unique=True)


@settings(max_examples=150, deadline=None)
@given(keys=keys_st, extra=st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_key_index_agrees_with_sorted_search(keys: list[int], extra: list[int]) -> None:
    table = np.array(sorted(keys), dtype=np.uint64)
    # queries: every key (some twice) plus arbitrary others; a small table keeps probe chains
    # long enough to exercise wrap-around and collisions
    query = np.array(keys + keys[: len(keys) // 2] + extra, dtype=np.uint64)
    idx, found = KeyIndex(table).find(query)
    ref_idx, ref_found = lookup(table, query)
    assert (found == ref_found).all()
    assert (idx[found] == ref_idx[ref_found]).all()
    assert (table[idx[found]] == query[found]).all()


def test_key_index_with_colliding_hashes() -> None:
    # a run of consecutive keys, queried with neighbours on both sides that are absent
    table = np.arange(1000, 1400, dtype=np.uint64)
    query = np.arange(900, 1500, dtype=np.uint64)
    idx, found = KeyIndex(table).find(query)
    assert found.sum() == 400
    assert (table[idx[found]] == query[found]).all()


@settings(max_examples=100, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 30), max_size=40), min_size=1, max_size=8),
    n=st.integers(1, 6),
)
def test_ngram_keys_match_a_reference_loop(seqs: list[list[int]], n: int) -> None:
    bits = 6
    p = pack([np.array(s, dtype=np.int64) for s in seqs], pad=n - 1, fill=0)
    got = fast_keys(p, n, bits)
    ref = []
    for s in seqs:
        padded = [0] * (n - 1) + s
        for i in range(len(s)):
            ref.append(padded[i : i + n])
    assert [render(int(k), n, bits) for k in got] == ref
