"""Detectors on synthetic behaviour: a seeded Markov chain over ten common system calls.

Normal sequences are walks of a fixed sparse Markov chain, so "unseen call" (a call the chain
never emits) and "unseen order" (known calls along transitions of probability zero) are exact
notions, and every assertion below is one that a broken detector fails. The helpers at the top
are shared with ``test_baseline.py`` and ``test_persistence.py``.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from bam.models import (
    DETECTORS,
    HMM,
    CallDetector,
    Detector,
    Ensemble,
    HistogramGMM,
    NgramLM,
    Stide,
    TStide,
    make_detector,
)
from bam.syscalls import id_of

I32 = npt.NDArray[np.int32]

# --- the synthetic workload ---------------------------------------------------------------------

CALLS = ("openat", "fstat", "read", "mmap", "close", "write", "lseek", "brk", "futex", "poll")
IDS = np.array([id_of(n) for n in CALLS], dtype=np.int32)
_NEXT: dict[str, list[tuple[str, float]]] = {
    "openat": [("fstat", 0.7), ("read", 0.3)],
    "fstat": [("mmap", 0.6), ("read", 0.4)],
    "read": [("read", 0.5), ("close", 0.3), ("write", 0.2)],
    "mmap": [("read", 1.0)],
    "close": [("openat", 0.6), ("poll", 0.4)],
    "write": [("write", 0.4), ("lseek", 0.3), ("futex", 0.3)],
    "lseek": [("read", 1.0)],
    "brk": [("mmap", 0.5), ("openat", 0.5)],
    "futex": [("poll", 0.5), ("write", 0.5)],
    "poll": [("read", 0.5), ("brk", 0.3), ("openat", 0.2)],
}
TRANS = np.zeros((len(CALLS), len(CALLS)))
for _a, _succ in _NEXT.items():
    for _b, _p in _succ:
        TRANS[CALLS.index(_a), CALLS.index(_b)] = _p
_CUM = np.cumsum(TRANS, axis=1)

# Calls the chain never emits (what an exploit does), and known calls along transitions the
# chain never takes (brk->brk, brk->futex, futex->futex, futex->lseek, lseek->lseek).
UNSEEN_PHRASE = ("socket", "connect", "dup2", "dup2", "dup2", "execve")
ORDER_PHRASE = ("brk", "brk", "futex", "futex", "lseek", "lseek")
ORDER_BIGRAMS = ("brk brk", "brk futex", "futex futex", "futex lseek", "lseek lseek")


def ids(names: Sequence[str]) -> I32:
    return np.array([id_of(n) for n in names], dtype=np.int32)


_CUM_LISTS = [row.tolist() for row in _CUM]


def walk(rng: np.random.Generator, length: int) -> I32:
    """One normal sequence: a walk of the chain from ``openat``."""
    last = len(CALLS) - 1
    out = [0] * length
    state = 0
    for i, u in enumerate(rng.random(length).tolist()):
        out[i] = state
        state = min(bisect.bisect_right(_CUM_LISTS[state], u), last)
    return IDS[np.array(out, dtype=np.int64)]


def normal_seqs(seed: int, count: int, length: int) -> list[I32]:
    rng = np.random.default_rng(seed)
    return [walk(rng, length) for _ in range(count)]


def inject(seq: I32, phrase: Sequence[str], at: int, repeat: int = 1) -> I32:
    """``seq`` with ``phrase`` (repeated) written over it from position ``at``."""
    out = seq.copy()
    p = np.tile(ids(phrase), repeat)
    out[at : at + len(p)] = p
    return out


def tokens(features: Sequence[str]) -> set[str]:
    """Syscall-name tokens of explanation features (``+read``, ``<unseen>`` -> ``unseen``...)."""
    return {t for f in features for t in re.findall(r"[a-z0-9_]+", f)}


def small(name: str) -> Detector:
    """``make_detector(name)``, with an HMM small enough for a unit test."""
    if name == "hmm":
        return HMM(n_states=12, n_iter=10)
    return make_detector(name)


# --- fixtures -------------------------------------------------------------------------------------

TRAIN = normal_seqs(1, 40, 400)
HELD_OUT = normal_seqs(2, 30, 200)
E = np.empty(0, dtype=np.int32)


@pytest.fixture(scope="module")
def fitted() -> dict[str, Detector]:
    return {name: small(name).fit(TRAIN) for name in DETECTORS}


def test_the_synthetic_chain_is_what_the_tests_assume() -> None:
    np.testing.assert_allclose(TRANS.sum(1), 1.0)
    seen = set(np.concatenate(TRAIN).tolist())
    assert seen == set(IDS.tolist())
    assert not seen & set(ids(UNSEEN_PHRASE).tolist())
    flat = np.concatenate(TRAIN)
    bigrams = {(int(a), int(b)) for a, b in itertools.pairwise(flat)}
    for bg in ORDER_BIGRAMS:
        a, b = ids(bg.split())
        assert (int(a), int(b)) not in bigrams, bg


# --- anomalies score higher than held-out normal behaviour ----------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_unseen_calls_score_higher_than_held_out_normal(
    fitted: dict[str, Detector], name: str
) -> None:
    det = fitted[name]
    normal = det.score(HELD_OUT)
    # 18 calls the chain never emits, inside 200 normal ones
    attacked = det.score([inject(s, UNSEEN_PHRASE, 80, repeat=3) for s in HELD_OUT])
    assert np.all(np.isfinite(normal))
    assert np.all(np.isfinite(attacked))
    assert np.all(attacked > normal), name  # each sequence scores higher once attacked
    assert attacked.min() > normal.max(), (name, attacked.min(), normal.max())


# The GMM is order-blind by design (it models the mix of calls, not their order).
@pytest.mark.parametrize("name", [n for n in DETECTORS if n != "gmm"])
def test_unseen_orders_of_known_calls_score_higher(fitted: dict[str, Detector], name: str) -> None:
    det = fitted[name]
    normal = det.score(HELD_OUT)
    attacked = det.score([inject(s, ORDER_PHRASE, 80, repeat=3) for s in HELD_OUT])
    assert np.all(attacked > normal), name
    assert attacked.min() > normal.max(), (name, attacked.min(), normal.max())


@pytest.mark.parametrize("name", [n for n in DETECTORS if n != "gmm"])
def test_explain_names_the_injected_phrase_by_syscall_names(
    fitted: dict[str, Detector], name: str
) -> None:
    det = fitted[name]
    for s in HELD_OUT[:5]:
        top = [c.feature for c in det.explain(inject(s, ORDER_PHRASE, 80, repeat=2), top=3)]
        assert top, name
        # the strongest features are the phrase's never-seen transitions, spelled out
        assert any(bg in f for f in top for bg in ORDER_BIGRAMS), (name, top)


def test_gmm_explain_names_the_calls_whose_share_changed(fitted: dict[str, Detector]) -> None:
    det = fitted["gmm"]
    s = HELD_OUT[0].copy()
    s[50:110] = ids(["futex"] * 60)  # far more futex than any normal window
    top = det.explain(s, top=3)
    assert top[0].feature == "+futex"
    assert top[0].count == int((s == id_of("futex")).sum())


@pytest.mark.parametrize("name", DETECTORS)
def test_explain_names_unseen_calls(fitted: dict[str, Detector], name: str) -> None:
    """Calls the model never saw are named (``execve!``), not collapsed into one symbol."""
    det = fitted[name]
    top = [c.feature for c in det.explain(inject(HELD_OUT[0], UNSEEN_PHRASE, 80), top=5)]
    assert tokens(top) & {"socket", "connect", "dup2", "execve"}, (name, top)
    assert not any("<unseen>" in f for f in top), (name, top)


# --- the interface: determinism, lengths, empty input ---------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_fitting_and_scoring_are_deterministic(fitted: dict[str, Detector], name: str) -> None:
    again = small(name).fit(TRAIN)
    probe = [*HELD_OUT[:5], inject(HELD_OUT[5], UNSEEN_PHRASE, 10)]
    np.testing.assert_array_equal(fitted[name].score(probe), again.score(probe))
    np.testing.assert_array_equal(fitted[name].score(probe), fitted[name].score(probe))
    assert fitted[name].explain(probe[-1]) == again.explain(probe[-1])


@pytest.mark.parametrize("name", DETECTORS)
def test_score_has_one_finite_value_per_sequence(fitted: dict[str, Detector], name: str) -> None:
    det = fitted[name]
    seqs = [HELD_OUT[0], HELD_OUT[1][:1], HELD_OUT[2][:7], inject(HELD_OUT[3], UNSEEN_PHRASE, 0)]
    s = det.score(seqs)
    assert s.shape == (4,)
    assert s.dtype == np.float64
    assert np.all(np.isfinite(s))
    # scoring a batch is the same as scoring one at a time
    np.testing.assert_allclose(s, np.concatenate([det.score([q]) for q in seqs]), rtol=1e-12)
    if isinstance(det, CallDetector):
        cs = det.call_scores(seqs)
        assert [len(c) for c in cs] == [len(q) for q in seqs]
        assert all(np.all(np.isfinite(c)) for c in cs)
        np.testing.assert_allclose(s, [c.mean() for c in cs], rtol=1e-12)


@pytest.mark.parametrize("name", DETECTORS)
def test_empty_inputs_are_handled(fitted: dict[str, Detector], name: str) -> None:
    det = fitted[name]
    assert det.score([]).shape == (0,)
    assert det.score([E]).shape == (1,)
    assert np.isfinite(det.score([E, HELD_OUT[0]])).all()
    assert isinstance(det.explain(E), list)
    if isinstance(det, CallDetector):
        assert det.call_scores([]) == []
        assert [len(c) for c in det.call_scores([E, HELD_OUT[0][:3]])] == [0, 3]


@pytest.mark.parametrize("name", DETECTORS)
def test_fitting_on_no_calls_is_refused_with_a_clear_error(name: str) -> None:
    """Fail closed: a model that has seen nothing must not call everything normal."""
    with pytest.raises(ValueError, match=r"(?i)no calls|at least|needs"):
        small(name).fit([])
    with pytest.raises(ValueError, match=r"(?i)no calls|at least|needs"):
        small(name).fit([E, E, E])


def test_unfitted_detectors_say_so() -> None:
    from bam.errors import ModelError

    for name in DETECTORS:
        det = small(name)
        with pytest.raises(ModelError, match="not fitted"):
            det.state()


# --- the n-gram language model --------------------------------------------------------------------

OOV_ID = id_of("execve")


def _next_call_probabilities(lm: NgramLM, context: I32) -> npt.NDArray[np.float64]:
    """P(w | context) for every known call w, then for the out-of-vocabulary class."""
    known = [int(i) for i in lm.vocab_.ids_]
    oov = OOV_ID if OOV_ID not in known else max(known) + 1  # any call the model never saw
    cands = [np.r_[context, [w]].astype(np.int32) for w in [*known, oov]]
    last = np.array([cs[-1] for cs in lm.call_scores(cands)])
    p: npt.NDArray[np.float64] = np.exp(-last)
    return p


@pytest.mark.parametrize(
    "params",
    [{}, {"n": 3}, {"n": 1}, {"n": 5, "discount": 0.9, "alpha": 1.0}, {"n": 8, "alpha": 1e-4}],
)
@pytest.mark.parametrize(
    "context",
    [
        pytest.param(TRAIN[0][:20], id="seen-context"),
        pytest.param(TRAIN[1][:3], id="short-context"),
        pytest.param(E, id="sequence-start"),
        pytest.param(ids(["poll"] * 10), id="unseen-context"),
        pytest.param(np.r_[TRAIN[2][:10], [OOV_ID]].astype(np.int32), id="context-with-oov"),
        pytest.param(ids(ORDER_PHRASE), id="unseen-orders"),
    ],
)
def test_lm_next_call_probabilities_sum_to_one(params: dict[str, float], context: I32) -> None:
    """The smoothing is a proper distribution over known calls + the unseen-call class."""
    lm = NgramLM(**params).fit(TRAIN)  # type: ignore[arg-type]
    p = _next_call_probabilities(lm, context)
    assert np.all(p > 0)  # smoothing: nothing is impossible, not even an unseen call
    assert p.sum() == pytest.approx(1.0, abs=1e-9)


def test_lm_follows_the_chain() -> None:
    """With plenty of data the LM's next-call distribution approaches the chain's."""
    lm = NgramLM(n=2).fit(normal_seqs(3, 200, 500))
    for a in ("read", "write", "poll"):
        p = _next_call_probabilities(lm, ids(["openat", a]))[:-1]
        order = np.argsort(IDS)  # vocabulary ids are sorted
        expected = TRANS[CALLS.index(a)][order]
        np.testing.assert_allclose(p, expected, atol=0.03)


def test_lm_unseen_call_costs_more_than_any_seen_continuation() -> None:
    lm = NgramLM().fit(TRAIN)
    p = _next_call_probabilities(lm, TRAIN[0][:30])
    assert p[-1] < p[:-1].min()


def test_lm_fits_a_vocabulary_too_large_for_64_bit_8_gram_keys() -> None:
    """300 distinct calls need 9 bits each: 8-grams no longer fit in one 64-bit key."""
    rng = np.random.default_rng(0)
    many = np.arange(300, dtype=np.int32)
    train = [rng.permutation(many) for _ in range(4)]
    lm = NgramLM().fit(train)
    assert np.isfinite(lm.score([many])).all()
    assert lm.score(train[:1])[0] < lm.score([many])[0]  # seen order beats a new one
    p = _next_call_probabilities(lm, train[0][:20])
    assert p.sum() == pytest.approx(1.0, abs=1e-9)


# --- stide / t-stide: exact semantics -------------------------------------------------------------


def test_stide_flags_exactly_the_windows_never_seen() -> None:
    train = ids(["openat", "read", "read", "close"] * 10)
    det = Stide(n=3).fit([train])
    probe = ids(["openat", "read", "read", "close", "openat", "read", "close", "openat"])
    cs = det.call_scores([probe])[0]
    # the 3-grams ending at each call: (^ ^ openat) (^ openat read) (openat read read)
    # (read read close) (read close openat) (close openat read) (openat read close)! (read close
    # openat)
    np.testing.assert_array_equal(cs, [0, 0, 0, 0, 0, 0, 1, 0])
    assert det.score([probe])[0] == pytest.approx(1 / 8)
    assert [c.feature for c in det.explain(probe)] == ["openat read close"]


def test_t_stide_also_distrusts_rare_windows_but_stide_does_not() -> None:
    common = ids(["openat", "read", "close"] * 2000)
    rare = ids(["openat", "write", "close"])
    once = np.r_[common[:30], rare, common[:30]].astype(np.int32)
    train = [common, once]  # the rare phrase occurs exactly once in 6,063 windows
    probe = [once]
    assert Stide(n=3).fit(train).score(probe)[0] == 0.0
    t = TStide(n=3, rare=0.01).fit(train)
    assert t.score(probe)[0] > 0.0
    assert "openat write close" in [c.feature for c in t.explain(probe[0])]


# --- HMM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"n_states": 12, "order": 3}, id="clustered-init"),  # fewer states than tokens
        pytest.param({"n_states": 14, "order": 1}, id="one-state-per-call"),
    ],
)
def test_hmm_em_log_likelihood_never_decreases(params: dict[str, int]) -> None:
    hmm = HMM(n_iter=15, tol=-np.inf, **params).fit(TRAIN[:20])
    h = np.array(hmm.history_)
    assert len(h) == 15
    assert np.all(np.isfinite(h))
    assert np.all(np.diff(h) >= -1e-9), np.diff(h)
    assert h[-1] > h[0]


def test_hmm_stops_when_converged() -> None:
    hmm = HMM(n_states=12, n_iter=200, tol=1e-3).fit(TRAIN[:20])
    assert 2 <= len(hmm.history_) < 200


def test_hmm_unseen_calls_get_finite_high_scores(fitted: dict[str, Detector]) -> None:
    hmm = fitted["hmm"]
    assert isinstance(hmm, HMM)
    probe = inject(HELD_OUT[0], UNSEEN_PHRASE, 50)
    cs = hmm.call_scores([probe, ids(UNSEEN_PHRASE)])
    assert all(np.all(np.isfinite(c)) for c in cs)
    normal = hmm.call_scores([HELD_OUT[0]])[0]
    assert cs[0][50:56].min() > np.quantile(normal, 0.99)
    assert np.all(cs[1] > np.quantile(normal, 0.99))


def test_hmm_per_call_scores_are_conditional_surprise() -> None:
    """-log P(o_t | o_<t) summed over a sequence is its total -log-likelihood: check with a
    brute-force forward pass over a tiny HMM."""
    hmm = HMM(n_states=3, order=1, n_iter=5).fit(TRAIN[:5])
    seq = TRAIN[6][:12]
    toks = hmm._tokens([seq])[0]
    alpha = hmm.startprob_ * hmm.emis_[:, toks[0]]
    for o in toks[1:]:
        alpha = (alpha @ hmm.transmat_) * hmm.emis_[:, o]
    assert hmm.call_scores([seq])[0].sum() == pytest.approx(-np.log(alpha.sum()), rel=1e-9)


# --- GMM and ensemble -----------------------------------------------------------------------------


def test_gmm_is_order_blind() -> None:
    det = HistogramGMM().fit(TRAIN)
    s = HELD_OUT[0]
    rng = np.random.default_rng(0)
    assert det.score([rng.permutation(s)])[0] == pytest.approx(det.score([s])[0], rel=1e-9)


def test_ensemble_normalises_members_onto_one_scale(fitted: dict[str, Detector]) -> None:
    ens = fitted["ensemble"]
    assert isinstance(ens, Ensemble)
    z = ens.member_scores(HELD_OUT)
    assert z.shape == (len(HELD_OUT), 2)
    # normal data sits near 0 on every member's normalised scale; the ensemble is the mean
    assert np.all(np.abs(np.median(z, axis=0)) < 1.5)
    np.testing.assert_allclose(ens.score(HELD_OUT), z.mean(1))


def test_ensemble_needs_members_and_data() -> None:
    with pytest.raises(ValueError, match="member"):
        Ensemble([]).fit(TRAIN)
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([NgramLM()]).fit(TRAIN[:1])


def test_make_detector_knows_every_cli_name() -> None:
    for name in DETECTORS:
        assert isinstance(make_detector(name), Detector)
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("nope")
