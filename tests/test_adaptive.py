"""Adaptive baseline: learns benign change, refuses poisoning, bounded, recorded; drift detector.

The workload is a synthetic Markov chain over a few common syscalls (fixed transition matrix), so
each test takes about a second while still exercising the real n-gram LM, Baseline calibration
and persistence. Windows are ``WINDOW`` calls, as the live monitor cuts them. Everything is
seeded: the magnitudes asserted on were checked with margin across several seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bam.detect import Baseline
from bam.detect.adaptive import DRIFT, AdaptiveBaseline, Observation
from bam.detect.drift import PageHinkley
from bam.errors import ModelError, ModelIntegrityError
from bam.events import SyscallBatch, Trace
from bam.models import make_detector
from bam.models.persistence import load_artifact
from bam.syscalls import id_of

I32 = npt.NDArray[np.int32]
WINDOW = 100
RARE = 0.001  # probability of each unusual transition
CALLS = ("read", "write", "openat", "close", "fstat", "mmap", "lseek", "poll", "futex", "brk")
IDS = np.array([id_of(n) for n in CALLS], dtype=np.int32)
BENIGN = np.array([id_of("getrandom")], dtype=np.int32)
REVERSE_SHELL = np.array(
    [id_of(n) for n in ("socket", "connect", "dup2", "dup2", "execve")], dtype=np.int32
)


def _transitions() -> npt.NDArray[np.float64]:
    """Cumulative transition matrix: each call has three likely successors, the rest rare."""
    rng = np.random.default_rng(123)
    k = len(IDS)
    p = np.full((k, k), RARE)
    for i in range(k):
        p[i, rng.choice(k, 3, replace=False)] += rng.dirichlet(np.ones(3)) * 5
    return np.cumsum(p / p.sum(1, keepdims=True), axis=1)


CUM = _transitions()


def chains(rng: np.random.Generator, n: int, length: int = WINDOW) -> list[I32]:
    """``n`` independent runs of the workload's Markov chain (vectorised across runs)."""
    state = rng.integers(0, len(IDS), n)
    u = rng.random((length, n))
    out = np.empty((length, n), dtype=np.int64)
    for t in range(length):
        out[t] = state
        state = np.minimum((u[t, :, None] > CUM[state]).sum(1), len(IDS) - 1)
    return list(IDS[out.T])


def with_phrase(
    rng: np.random.Generator, windows: list[I32], phrase: I32, times: int = 1
) -> list[I32]:
    """Copies of ``windows`` with ``phrase`` written over ``times`` random positions each."""
    out = []
    for w in windows:
        w = w.copy()
        for p in rng.integers(0, len(w) - len(phrase), times):
            w[p : p + len(phrase)] = phrase
        out.append(w)
    return out


def magnitudes(b: Baseline, windows: list[I32]) -> npt.NDArray[np.float64]:
    scores = np.array([t.scores.max() for t in b.score_windows(windows)])
    return np.asarray(b.window_magnitude(scores), dtype=np.float64)


@pytest.fixture(scope="module")
def profile() -> tuple[Baseline, list[Trace]]:
    """A baseline profiled on 40 normal runs of 600 calls."""
    rng = np.random.default_rng(0)
    traces = [
        Trace(f"run{i}", SyscallBatch.from_ids(s)) for i, s in enumerate(chains(rng, 40, 600))
    ]
    return Baseline(make_detector("lm"), window=WINDOW, target_far=0.01).fit(traces), traces


def adaptive(profile: tuple[Baseline, list[Trace]], **kw: object) -> AdaptiveBaseline:
    base, traces = profile
    params: dict[str, object] = {"min_interval": 100, "cooldown": 20, "min_update_windows": 5}
    params.update(kw)
    return AdaptiveBaseline.from_traces(base, traces, **params)


def adapted_windows(ab: AdaptiveBaseline) -> list[bytes]:
    c = ab.corpus_
    return [c.seqs[i].tobytes() for i in np.flatnonzero(c.origin > 0)]


# --------------------------------------------------------------------------- (a) benign change
def test_benign_change_is_learned_and_stops_scoring_high(
    profile: tuple[Baseline, list[Trace]],
) -> None:
    rng = np.random.default_rng(1)
    ab = adaptive(profile, probation=100)  # short probation: fewer windows for the test
    probe = with_phrase(rng, chains(rng, 300), BENIGN)
    attack = with_phrase(rng, chains(rng, 100), REVERSE_SHELL, 2)
    before = magnitudes(ab.baseline, probe)
    # new, mostly below the guard, sometimes past the threshold
    assert 0.4 < np.median(before) < ab.guard
    assert (before > 1).mean() > 0.05

    ab.observe(chains(rng, 300))  # the workload as profiled: the drift reference
    for _ in range(10):  # then an upgrade: 20% of windows now contain the new phrase
        windows = chains(rng, 100)
        idx = np.flatnonzero(rng.random(100) < 0.2)
        for i, w in zip(idx, with_phrase(rng, [windows[i] for i in idx], BENIGN), strict=True):
            windows[i] = w
        ab.observe(windows)

    assert not ab.drift_open
    assert not ab.findings_
    assert len(ab.history_) >= 5
    after = magnitudes(ab.baseline, probe)
    assert np.median(after) < 0.65 * np.median(before)
    assert (after > ab.guard).mean() < 0.6 * (before > ab.guard).mean()
    assert (after > 1).mean() < (before > 1).mean()
    assert (magnitudes(ab.baseline, chains(rng, 300)) > 1).mean() < 0.03  # still calibrated
    assert (magnitudes(ab.baseline, attack) > 1).mean() > 0.9  # and still sees the attack


# --------------------------------------------------------------------------- (b) poisoning
def poisoning(
    ab: AdaptiveBaseline, rng: np.random.Generator
) -> Iterator[tuple[int, list[I32], Observation]]:
    """A slow poisoning campaign after 300 normal windows: step by step, a growing share of the
    stream carries a growing part of a reverse shell (socket; socket, connect; ...; then the whole
    phrase more and more often). Yields ``(step, windows, observation)``."""
    ab.observe(chains(rng, 300))
    for step in range(12):
        windows = chains(rng, 100)
        n_bad = min(100, 10 + 10 * step)
        phrase = REVERSE_SHELL[: min(step + 1, len(REVERSE_SHELL))]
        times = max(1, step + 2 - len(REVERSE_SHELL))
        windows[:n_bad] = with_phrase(rng, windows[:n_bad], phrase, times)
        windows = [windows[i] for i in rng.permutation(100)]
        yield step, windows, ab.observe(windows)


def test_gradual_poisoning_is_not_learned(profile: tuple[Baseline, list[Trace]]) -> None:
    rng = np.random.default_rng(2)
    ab = adaptive(profile)
    once = with_phrase(rng, chains(rng, 200), REVERSE_SHELL)
    probe = with_phrase(rng, chains(rng, 200), REVERSE_SHELL, 2)
    before_once, before = magnitudes(ab.baseline, once), magnitudes(ab.baseline, probe)
    assert (before > 1).mean() > 0.98
    above_guard: set[bytes] = set()
    drift_seen_at: int | None = None
    n_updates = len(ab.history_)
    for step, windows, obs in poisoning(ab, rng):
        mags = obs.magnitudes
        # structural guard: nothing at or past the guard level is ever a candidate
        assert not (obs.accepted & (mags > ab.guard)).any()
        above_guard |= {w.tobytes() for w, m in zip(windows, mags, strict=True) if m > ab.guard}
        if obs.update is not None:
            assert not ab.drift_open
            assert not ab.alert_open
        if drift_seen_at is not None:
            assert len(ab.history_) == n_updates  # no learning after drift
            learnable = ~obs.anomalous & (obs.magnitudes <= ab.guard)
            assert (obs.reasons[learnable] == DRIFT).all()
            assert not obs.accepted.any()
        n_updates = len(ab.history_)
        if obs.drift and drift_seen_at is None:
            drift_seen_at = step
            assert len(obs.findings) == 1
            assert ab.drift_open
            assert ab.update() is None
            assert ab.last_blocked_ == "drift"
            finding = ab.findings_[-1]
            assert finding["kind"] == "baseline-drift"
            assert finding["change_began"] <= finding["window"]
    assert drift_seen_at is not None
    assert drift_seen_at < 8
    assert not above_guard & set(adapted_windows(ab))  # windows above the guard never learned
    assert len(ab.findings_) == 1
    assert ab.findings_[0]["escalations"] > 0
    # after the episode the reverse shell still alarms, as much as before
    after = magnitudes(ab.baseline, probe)
    assert (after > 1).mean() >= (before > 1).mean()
    assert np.median(after) > 0.9 * np.median(before)
    assert np.median(magnitudes(ab.baseline, once)) > 0.9 * np.median(before_once)

    # probation outlasted the detection delay: not one call of the attack was learned
    assert not any(np.isin(REVERSE_SHELL, s).any() for s in ab.corpus_.seqs)

    # the operator rolls back what was learned since the change began, and resumes
    finding = ab.findings_[0]
    assert finding["rollback_to"] <= ab.version_
    entry = ab.rollback(finding["rollback_to"], now=0.0)
    assert entry["reason"] == "rollback"
    assert (ab.corpus_.origin <= finding["rollback_to"]).all()
    assert ab.drift_open  # rolling back does not close the finding; the operator does
    ab.acknowledge_drift("reviewed: poisoning attempt, rolled back", now=0.0)
    assert not ab.drift_open
    # an alert blocks updates by itself, drift or not
    ab.observe(chains(rng, 200) + probe[:1])
    assert ab.alert_open
    assert ab.update() is None
    assert ab.last_blocked_ == "alert-open"


def test_the_same_campaign_poisons_a_learner_without_guards(
    profile: tuple[Baseline, list[Trace]],
) -> None:
    """Control: the campaign above is a real threat. Learning from every non-alarming window,
    at once, with no drift test, teaches the model the reverse shell."""
    rng = np.random.default_rng(2)
    naive = adaptive(profile, guard=1.0, cooldown=0, probation=0, drift=PageHinkley(threshold=1e9))
    once = with_phrase(rng, chains(rng, 200), REVERSE_SHELL)
    probe = with_phrase(rng, chains(rng, 200), REVERSE_SHELL, 2)
    for _ in poisoning(naive, rng):
        pass
    assert (magnitudes(naive.baseline, probe) > 1).mean() < 0.2
    assert (magnitudes(naive.baseline, once) > 1).mean() < 0.2


def test_window_near_an_alert_is_quarantined_both_ways(
    profile: tuple[Baseline, list[Trace]],
) -> None:
    rng = np.random.default_rng(3)
    ab = adaptive(profile, auto_update=False, cooldown=5)
    windows = chains(rng, 40)
    windows[20] = with_phrase(rng, [windows[20]], REVERSE_SHELL, 3)[0]
    obs = ab.observe(windows, now=0.0)
    names = obs.reason_names()
    assert names[20] == "anomalous"
    assert set(names[15:20]) | set(names[21:26]) <= {"alert-open", "above-guard", "anomalous"}
    # a later anomaly also discards pending candidates from the windows just before it
    pending = ab.pending_windows
    ab.observe([with_phrase(rng, chains(rng, 1), REVERSE_SHELL, 3)[0]])
    assert ab.pending_windows < pending
    assert (ab._p_idx < ab.n_seen_ - 1 - ab.cooldown).all()


# --------------------------------------------------------------------------- (c) rate bound
def test_update_rate_and_corpus_cap(profile: tuple[Baseline, list[Trace]]) -> None:
    rng = np.random.default_rng(4)
    traces = profile[1]
    original = sum(len(s) for t in traces for s in t.sequences())
    cap = int(original * 1.12)
    ab = adaptive(profile, min_interval=60, max_update_fraction=0.05, max_corpus_calls=cap)
    for _ in range(6):
        ab.observe(chains(rng, 100))
    ab.observe(chains(rng, 1000))  # a flood of candidates in one interval
    hist = ab.history_
    assert len(hist) >= 5
    for h in hist:
        assert h["calls_added"] <= int(0.05 * h["corpus_calls_before"])
        assert h["corpus_calls_after"] <= cap
        assert h["corpus_calls_after"] <= h["corpus_calls_before"] + h["calls_added"]
    windows = [h["window"] for h in hist]
    assert min(np.diff(windows)) >= 60
    assert any(h["windows_evicted"] for h in hist)
    assert ab.corpus_.original_calls == original  # the profile is never evicted
    # eviction is oldest-first: every version newer than the oldest survivor is complete
    origin = ab.corpus_.origin[ab.corpus_.origin > 0]
    oldest = int(origin.min())
    for h in hist:
        if h["version"] > oldest:
            assert int((origin == h["version"]).sum()) == h["windows_added"]


# --------------------------------------------------------------------------- (d) history
def test_history_survives_save_and_load(
    profile: tuple[Baseline, list[Trace]], tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    ab = adaptive(profile, min_interval=100, probation=50)
    for _ in range(3):
        ab.observe(chains(rng, 100), now=1000.0)
    ab.observe(chains(rng, 30))  # some pending candidates
    hist = ab.history_
    assert len(hist) >= 2
    assert [h["version"] for h in hist] == list(range(1, len(hist) + 1))
    ids = [hist[0]["old_model_id"]] + [h["new_model_id"] for h in hist]
    assert len(set(ids)) == len(ids)  # every update is a new model
    assert all(a["new_model_id"] == b["old_model_id"] for a, b in itertools.pairwise(hist))
    assert hist[-1]["new_model_id"] == ab.model_id_
    for h in hist:
        assert {
            "time",
            "reason",
            "windows_added",
            "calls_added",
            "thresholds_before",
            "thresholds_after",
            "drift_state",
        } <= set(h)
        assert h["thresholds_before"] != h["thresholds_after"]

    path = tmp_path / "adaptive.bam"
    mid = ab.save(path)
    meta, _, _ = load_artifact(path, "adaptive-baseline")
    assert meta["baseline"]["history"] == hist  # the history lives with the baseline
    back = AdaptiveBaseline.load(path, expect_model_id=mid)
    assert back.history_ == hist
    assert back.baseline.thresholds() == ab.baseline.thresholds()
    assert [s.tobytes() for s in back.corpus_.seqs] == [s.tobytes() for s in ab.corpus_.seqs]
    assert back.pending_windows == ab.pending_windows > 0
    probe = chains(rng, 20)
    np.testing.assert_array_equal(magnitudes(back.baseline, probe), magnitudes(ab.baseline, probe))
    # it carries on exactly where the saved one left off
    updates = []
    for _ in range(4):
        more = chains(rng, 100)
        a, b = ab.observe(more, now=2000.0), back.observe(more, now=2000.0)
        np.testing.assert_array_equal(a.reasons, b.reasons)
        assert a.update == b.update
        updates.append(a.update)
    assert any(u is not None for u in updates)
    assert back.history_ == ab.history_

    # the baseline alone, with its history, for `bam score`
    solo = tmp_path / "baseline.bam"
    ab.export_baseline(solo)
    assert Baseline.load(solo).history_ == ab.history_

    with pytest.raises(ModelIntegrityError):
        AdaptiveBaseline.load(path, expect_model_id="sha256:" + "0" * 64)
    with pytest.raises(ModelError, match="expected a 'baseline'"):
        Baseline.load(path)
    # tamper: slip a window into the stored corpus, keep the recorded id
    with np.load(path, allow_pickle=False) as z:
        content = {k: z[k] for k in z.files}
    content["corpus.ids"] = content["corpus.ids"].copy()
    content["corpus.ids"][-5:] = id_of("execve")
    bad = tmp_path / "tampered.bam"
    with bad.open("wb") as f:
        np.savez_compressed(f, **content)
    with pytest.raises(ModelIntegrityError, match="does not match"):
        AdaptiveBaseline.load(bad)


def test_observe_with_precomputed_scores_and_empty_windows(
    profile: tuple[Baseline, list[Trace]],
) -> None:
    rng = np.random.default_rng(6)
    windows = chains(rng, 30)
    windows.insert(7, np.empty(0, dtype=np.int32))
    base = profile[0]
    live = [w for w in windows if len(w)]
    raw = np.array([t.scores.max() for t in base.score_windows(live)])
    scores = np.insert(raw, 7, np.nan)
    a = adaptive(profile, auto_update=False).observe(windows)
    b = adaptive(profile, auto_update=False).observe(windows, scores=scores)
    np.testing.assert_array_equal(a.reasons, b.reasons)
    assert a.reason_names()[7] == "empty"
    with pytest.raises(ValueError, match="scores for"):
        adaptive(profile).observe(windows, scores=raw)


def test_bad_parameters_are_refused(profile: tuple[Baseline, list[Trace]]) -> None:
    with pytest.raises(ValueError, match="guard"):
        adaptive(profile, guard=1.5)
    with pytest.raises(ValueError, match="never evicted"):
        adaptive(profile, max_corpus_calls=10)
    with pytest.raises(ModelError):
        AdaptiveBaseline(profile[0], [])


# --------------------------------------------------------------------------- (e) drift detector
def test_page_hinkley_flags_a_mean_shift_not_noise() -> None:
    rng = np.random.default_rng(7)
    for seed in range(5):
        noise = np.random.default_rng(seed).normal(0.0, 0.3, 20_000)
        assert not PageHinkley().update_many(noise).any()
    x = np.concatenate([rng.normal(0, 0.3, 1000), rng.normal(0.6, 0.3, 200)])
    ph = PageHinkley()
    hits = np.flatnonzero(ph.update_many(x))
    assert len(hits)
    assert 1000 <= hits[0] < 1100
    assert ph.last_detection_ is not None
    assert abs(ph.last_detection_["began"] - 1000) <= 20
    # one value at a time or in batches: bit-identical
    one, batch = PageHinkley(), PageHinkley()
    stream = [one.update(float(v)) for v in x]
    np.testing.assert_array_equal(stream, batch.update_many(x))
    assert one.state() == batch.state()
    # a fall is ignored by the default "up" test, seen by "down"
    fall = np.concatenate([rng.normal(0, 0.3, 1000), rng.normal(-0.6, 0.3, 200)])
    assert not PageHinkley().update_many(fall).any()
    assert PageHinkley(direction="down").update_many(fall).any()
    assert PageHinkley(direction="both").update_many(fall).any()


def test_page_hinkley_state_and_reset() -> None:
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(0, 0.3, 500), rng.normal(0.6, 0.3, 50)])
    a = PageHinkley()
    a.update_many(x[:520])
    b = PageHinkley.from_state(a.state())
    np.testing.assert_array_equal(a.update_many(x[520:]), b.update_many(x[520:]))
    assert a.state() == b.state()
    assert a.detections_ == 1
    a.reset()
    assert (a.n_, a.total_, a.detections_, a.statistic_) == (0, 0, 0, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        PageHinkley(threshold=0)
    with pytest.raises(ValueError, match="finite"):
        PageHinkley().update(float("nan"))


def test_open_drift_and_alert_survive_a_restart(
    profile: tuple[Baseline, list[Trace]], tmp_path: Path
) -> None:
    """An attacker who can restart the agent must not be able to wipe an open drift or alert."""
    rng = np.random.default_rng(9)
    ab = adaptive(profile, drift=PageHinkley(threshold=3.0, min_instances=10))
    ab.observe(chains(rng, 100))
    ab.observe(with_phrase(rng, chains(rng, 60), REVERSE_SHELL, 2))
    assert ab.drift_open
    assert ab.alert_open
    ab.save(tmp_path / "a.bam")
    back = AdaptiveBaseline.load(tmp_path / "a.bam")
    assert back.drift_open
    assert back.alert_open
    assert back.update() is None
    assert back.last_blocked_ == "drift"
    obs = back.observe(with_phrase(rng, chains(rng, 60), REVERSE_SHELL, 3))
    assert not obs.findings
    assert back.findings_[0] is back.drift_open_
    back.acknowledge_drift("operator: reviewed", now=0.0)
    assert not back.drift_open
    assert back.findings_[-1]["kind"] == "drift-acknowledged"
    with pytest.raises(ModelError, match="no drift finding"):
        back.acknowledge_drift()


def test_a_refit_keeps_the_baseline_options(profile: tuple[Baseline, list[Trace]]) -> None:
    """An update refits with the same Baseline parameters, syscall-set novelty included."""
    _, traces = profile
    base = Baseline(make_detector("lm"), window=WINDOW, target_far=0.01, set_novelty=True)
    ab = AdaptiveBaseline.from_traces(base.fit(traces), traces, min_interval=100)
    ab._refit(ab.corpus_, None, "test", 1)
    assert ab.baseline is not base
    assert ab.baseline.set_novelty
    assert ab.baseline.set_memory_.sets.size > 0
