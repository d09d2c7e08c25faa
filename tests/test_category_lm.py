"""The syscall category map and ``catlm``, the n-gram LM over categories (Kneser-Ney smoothed).

The vectorised LM (both smoothings, with the binary-search back-off) is checked against a
brute-force dictionary implementation of the textbook recursions; the category model on the
synthetic chain of ``test_models.py`` and, when the shared copy is present, on ADFA-LD through
the ``bam eval adfa-ld`` code path.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bam.errors import ModelIntegrityError
from bam.evaluation.adfa import evaluate_detector
from bam.models import CategoryLM, Detector, NgramLM, make_detector
from bam.models.ngram_lm import mkn_discounts
from bam.models.persistence import load_artifact
from bam.syscall_categories import (
    CATEGORIES,
    OTHER,
    category_map,
    category_of,
    members,
    to_categories,
)
from bam.syscalls import UNKNOWN_BASE, canonical_ids, canonical_names, id_of, table
from bam.traces.adfa import AdfaDataset, load_adfa_dataset
from test_models import HELD_OUT, TRAIN, UNSEEN_PHRASE, ids, inject

I32 = npt.NDArray[np.int32]

# --- the category map ----------------------------------------------------------------------------


def test_every_name_of_both_tables_is_listed_in_exactly_one_category() -> None:
    m = category_map()  # raises if a name is listed twice
    assert set(m) == set(canonical_names())
    assert len(CATEGORIES) == 11
    assert CATEGORIES[-1] == OTHER
    assert set(m.values()) == set(CATEGORIES)


def test_the_map_is_stable() -> None:
    """A change of the map changes what every category model means: make it on purpose, here."""
    text = "\n".join(f"{n} {c}" for n, c in sorted(category_map().items()))
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest == "0441c5cac076480e4384fff44ad2810269b65c678e2698d4bab9956bc6e4522f", digest
    assert members() == members()
    assert to_categories(np.arange(len(canonical_names()))).tolist() == [
        CATEGORIES.index(category_of(n)) for n in canonical_names()
    ]


@pytest.mark.parametrize(
    ("names", "cat"),
    [
        (("mmap", "mmap2", "brk", "mprotect"), "memory"),
        (("socket", "socketcall", "connect", "sendto", "recvmsg", "accept4"), "net"),
        (("open", "openat", "read", "write", "_llseek", "fcntl64", "dup2"), "fs_io"),
        (
            ("stat", "stat64", "fstat", "fstatat64", "newfstatat", "getdents64", "readlink"),
            "fs_meta",
        ),
        (("unlink", "rename", "chmod", "chown32", "mkdir"), "fs_mod"),
        (("execve", "clone", "fork", "exit_group", "wait4", "arch_prctl"), "process"),
        (("getuid", "getuid32", "setresuid32", "getpid"), "ident"),
        (("futex", "poll", "_newselect", "pipe", "epoll_wait", "ipc"), "ipc"),
        (("rt_sigaction", "sigreturn", "kill"), "signal"),
        (("clock_gettime", "gettimeofday", "nanosleep", "time"), "time"),
    ],
)
def test_i386_and_x86_64_spellings_share_a_category(names: tuple[str, ...], cat: str) -> None:
    assert {category_of(n) for n in names} == {cat}


def test_unknown_calls_are_other() -> None:
    assert category_of("no_such_call") == OTHER
    unnamed = canonical_ids([1023], "i386")  # no name in the i386 table
    assert int(unnamed[0]) >= UNKNOWN_BASE
    cats = to_categories(np.r_[unnamed, [10**6, -5]])
    assert [CATEGORIES[c] for c in cats] == [OTHER] * 3


def test_the_map_is_by_name_so_both_architectures_agree() -> None:
    for name in set(table("i386")) & set(table("x86_64")):
        a = canonical_ids([table("i386")[name]], "i386")
        b = canonical_ids([table("x86_64")[name]], "x86_64")
        assert to_categories(a)[0] == to_categories(b)[0], name


# --- the LM against a brute-force reference ------------------------------------------------------


def reference_nll(
    train: Sequence[Sequence[int]], probe: Sequence[int], n: int, smoothing: str
) -> list[float]:
    """Per-call -log P by the textbook recursions over dictionaries (codes: 0 pad, 1 OOV, 2..)."""
    known = sorted({c for s in train for c in s})
    code = {c: i + 2 for i, c in enumerate(known)}
    raw: list[Counter[tuple[int, ...]]] = [Counter() for _ in range(n + 1)]
    for s in train:
        padded = [0] * (n - 1) + [code[c] for c in s]
        for t in range(n - 1, len(padded)):
            for k in range(1, n + 1):
                raw[k][tuple(padded[t - k + 1 : t + 1])] += 1
    counts = [Counter()] + [Counter(raw[k]) for k in range(1, n + 1)]
    if smoothing == "mkn":  # continuation counts below the top order
        for k in range(1, n):
            counts[k] = Counter(g[1:] for g in raw[k + 1])
    disc: list[npt.NDArray[np.float64]] = [np.zeros(4)]
    for k in range(1, n + 1):
        c = np.array(list(counts[k].values()), dtype=np.float64)
        disc.append(mkn_discounts(c) if smoothing == "mkn" else np.full(4, 0.5))
    hist_tot: list[defaultdict[tuple[int, ...], float]] = [defaultdict(float) for _ in range(n + 1)]
    hist_d: list[defaultdict[tuple[int, ...], float]] = [defaultdict(float) for _ in range(n + 1)]
    for k in range(1, n + 1):
        for g, c in counts[k].items():
            hist_tot[k][g[:-1]] += c
            hist_d[k][g[:-1]] += disc[k][min(c, 3)]
    n_symbols = len(known) + 1

    def prob(h: tuple[int, ...], w: int) -> float:
        k = len(h) + 1
        if k == 1:
            tot = hist_tot[1][()]
            c = counts[1].get((w,), 0)
            if smoothing == "ad":
                return (raw[1].get((w,), 0) + 0.1) / (tot + 0.1 * n_symbols)
            return max(c - disc[1][min(c, 3)], 0) / tot + hist_d[1][()] / tot / n_symbols
        tot = hist_tot[k].get(h, 0.0)
        lower = prob(h[1:], w)
        if tot == 0:
            return lower
        c = counts[k].get((*h, w), 0)
        return max(c - disc[k][min(c, 3)], 0) / tot + hist_d[k][h] / tot * lower

    padded = [0] * (n - 1) + [code.get(c, 1) for c in probe]
    return [
        -np.log(prob(tuple(padded[t - n + 1 : t]), padded[t])) for t in range(n - 1, len(padded))
    ]


@pytest.mark.parametrize("smoothing", ["ad", "mkn"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_lm_matches_the_brute_force_reference(smoothing: str, n: int) -> None:
    rng = np.random.default_rng(n)
    train = [rng.choice(ids(["read", "write", "close", "openat"]), size=60) for _ in range(6)]
    train.append(ids(["read", "read", "mmap", "read"] * 10))
    lm = NgramLM(n=n, smoothing=smoothing).fit(train)  # type: ignore[arg-type]
    probes = [
        train[0][:25],
        ids(["mmap", "mmap", "execve", "read", "close", "close", "mmap", "write"]),
        np.r_[train[3][10:30], ids(["socket"]), train[1][:12]].astype(np.int32),
    ]
    for probe, got in zip(probes, lm.call_scores(probes), strict=True):
        want = reference_nll([s.tolist() for s in train], probe.tolist(), n, smoothing)
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_mkn_next_call_probabilities_sum_to_one() -> None:
    lm = NgramLM(n=6, smoothing="mkn").fit(TRAIN)
    known = [int(i) for i in lm.vocab_.ids_]
    for context in (TRAIN[0][:20], ids(["poll"] * 10), ids(["brk", "brk", "futex"]), TRAIN[1][:0]):
        cands = [np.r_[context, [w]].astype(np.int32) for w in [*known, id_of("execve")]]
        p = np.exp(-np.array([cs[-1] for cs in lm.call_scores(cands)]))
        assert np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-9)


def test_mkn_discounts_follow_chen_and_goodman() -> None:
    counts = np.array([1] * 40 + [2] * 15 + [3] * 8 + [4] * 5 + [9] * 3, dtype=np.float64)
    y = 40 / (40 + 2 * 15)
    np.testing.assert_allclose(
        mkn_discounts(counts),
        [0, 1 - 2 * y * 15 / 40, 2 - 3 * y * 8 / 15, 3 - 4 * y * 5 / 8],
    )
    assert mkn_discounts(np.array([1.0, 1.0, 2.0])).min() >= 0  # too few types: the fallback


def test_lm_keeps_its_params_and_model_id_shape() -> None:
    """``lm`` models saved before the smoothing option keep their parameters (hence ids)."""
    assert NgramLM().get_params() == {"n": 8, "discount": 0.5, "alpha": 0.1}
    assert NgramLM(smoothing="mkn").get_params()["smoothing"] == "mkn"
    with pytest.raises(ValueError, match="smoothing"):
        NgramLM(smoothing="kn")  # type: ignore[arg-type]


# --- catlm ---------------------------------------------------------------------------------------

# Normal: file work (open, stat, read, close, brk...). Attack: a shell's pattern of process and
# network calls, which no normal run has in that order.
NORMAL_PHRASES = (
    ("openat", "fstat", "read", "read", "close"),
    ("openat", "read", "write", "close"),
    ("brk", "mmap", "read", "close"),
    ("stat", "openat", "read", "close", "futex"),
)
ATTACK = ("socket", "connect", "dup2", "dup2", "clone", "execve", "wait4", "read", "write")


def synthetic(seed: int, count: int, length: int) -> list[I32]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        calls: list[str] = []
        while len(calls) < length:
            calls += NORMAL_PHRASES[int(rng.integers(len(NORMAL_PHRASES)))]
        out.append(ids(calls[:length]))
    return out


@pytest.fixture(scope="module")
def catlm() -> CategoryLM:
    return CategoryLM().fit(synthetic(0, 40, 300))


def test_catlm_is_the_registered_detector(catlm: CategoryLM) -> None:
    det = make_detector("catlm")
    assert isinstance(det, CategoryLM)
    assert det.get_params() == {"n": 16, "discount": 0.5, "alpha": 0.1, "smoothing": "mkn"}
    assert catlm.order_ == 16  # 5 categories seen + pad + OOV: 4-bit codes, 16 per key
    assert catlm.name == "catlm-16gram"


def test_catlm_scores_an_attack_like_category_sequence_higher(catlm: CategoryLM) -> None:
    normal = catlm.score(synthetic(1, 30, 200))
    attacked = catlm.score([inject(s, ATTACK, 100) for s in synthetic(1, 30, 200)])
    assert np.all(np.isfinite(attacked))
    assert attacked.min() > normal.max()
    # per call: the attack's calls are the surprising ones
    cs = catlm.call_scores([inject(synthetic(2, 1, 200)[0], ATTACK, 100)])[0]
    assert int(np.argmax(cs)) in range(100, 100 + len(ATTACK))


def test_catlm_sees_categories_not_calls(catlm: CategoryLM) -> None:
    """Swapping a call for another of its category (mmap2 for mmap, fstat64 for fstat) costs
    little; swapping it for one of another category costs more."""
    base = synthetic(3, 1, 200)[0]
    same = base.copy()
    same[base == id_of("fstat")] = id_of("fstat64")
    other = base.copy()
    other[base == id_of("fstat")] = id_of("socket")
    s = catlm.score([base, same, other])
    assert s[1] == pytest.approx(s[0])
    assert s[2] > s[0] + 0.1


def test_catlm_explain_names_categories_and_calls(catlm: CategoryLM) -> None:
    seq = inject(synthetic(4, 1, 200)[0], ATTACK, 100)
    top = catlm.explain(seq, top=3)
    assert top
    first = top[0].feature
    # "<categories> (<calls>)", categories never seen in training marked "!", calls too
    cats, calls = first.split(" (")
    assert calls.endswith(")")
    assert set(c.rstrip("!") for c in cats.split()) <= set(CATEGORIES)
    assert any(c in calls for c in ("socket!", "connect!", "dup2!", "clone!", "execve!"))
    assert "net!" in first or "process!" in first
    assert all(c.score >= d.score for c, d in itertools.pairwise(top))
    # context calls (here the attack, at 100..108) are scored but not reported
    assert not any("!" in c.feature for c in catlm.explain(seq, top=50, context=150))


def test_catlm_reloads_bit_identically_with_its_map(catlm: CategoryLM, tmp_path: Path) -> None:
    path = tmp_path / "catlm.npz"
    mid = catlm.save(path)
    meta, _, stored = load_artifact(path, "detector")
    assert stored == mid
    assert meta["state"]["categories"] == members()
    assert meta["state"]["vocab"] == sorted(meta["state"]["vocab"], key=CATEGORIES.index)
    loaded = Detector.load(path, expect_model_id=mid)
    assert isinstance(loaded, CategoryLM)
    probes = [*HELD_OUT[:4], inject(HELD_OUT[4], UNSEEN_PHRASE, 20), inject(HELD_OUT[5], ATTACK, 9)]
    np.testing.assert_array_equal(loaded.score(probes), catlm.score(probes))
    for a, b in zip(loaded.call_scores(probes), catlm.call_scores(probes), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.explain(probes[-1]) == catlm.explain(probes[-1])
    assert loaded.save(tmp_path / "again.npz") == mid
    with pytest.raises(ModelIntegrityError):
        Detector.load(path, expect_model_id="sha256:" + "0" * 64)


def test_catlm_uses_the_map_it_was_saved_with(catlm: CategoryLM) -> None:
    """A saved model keeps its meaning if BAM's map changes later."""
    meta, arrays = catlm.state()
    moved = {
        c: [n for n in names if n != "fstat"] for c, names in meta["state"]["categories"].items()
    }
    moved["net"].append("fstat")  # as if fstat were a network call when the model was saved
    meta["state"]["categories"] = moved
    old = Detector.from_state(meta, arrays)
    probe = [synthetic(5, 1, 100)[0]]
    assert old.score(probe)[0] > catlm.score(probe)[0]


def test_catlm_on_the_chain_of_test_models() -> None:
    det = CategoryLM().fit(TRAIN)
    normal = det.score(HELD_OUT)
    attacked = det.score([inject(s, UNSEEN_PHRASE, 80, repeat=3) for s in HELD_OUT])
    assert attacked.min() > normal.max()


# --- ADFA-LD, through the `bam eval adfa-ld` code path --------------------------------------------


def test_catlm_through_the_adfa_eval_path(adfa_root: Path) -> None:
    data = load_adfa_dataset(adfa_root)
    small = AdfaDataset(
        training=data.training[::4], validation=data.validation[::20], attack=data.attack[::3]
    )
    r = evaluate_detector(small, "catlm")
    assert r["model"] == "catlm-16gram"
    assert set(r["per_attack"]) == {t.label for t in small.attack}
    assert r["auc"] > 0.75, r  # 0.857 on the full split
