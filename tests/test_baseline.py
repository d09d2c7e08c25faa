"""Baselines: calibrated false-alarm rate, local scoring of long traces, few traces, threads.

Normal traces are walks of the seeded Markov chain of ``test_models.py``; attacks are phrases of
calls the chain never emits (or never in that order) written over a short span.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from bam.detect import Baseline, Verdict
from bam.detect.severity import rank
from bam.errors import ModelError
from bam.events import SyscallBatch, Trace
from bam.models import DETECTORS, NgramLM, Stide, make_detector
from bam.syscalls import id_of
from test_models import ORDER_PHRASE, UNSEEN_PHRASE, inject, normal_seqs, small, tokens, walk

I32 = npt.NDArray[np.int32]
T0 = 1_700_000_000.0
DT = 0.001  # one call per millisecond


def times(n: int) -> npt.NDArray[np.float64]:
    """Epoch timestamps, one call per millisecond."""
    out: npt.NDArray[np.float64] = T0 + np.arange(n, dtype=np.float64) * DT
    return out


def trace(seq: I32, name: str = "t", tid: int = 100) -> Trace:
    n = len(seq)
    tids = np.full(n, tid, dtype=np.int32)
    ev = SyscallBatch(ts=times(n), pid=tids, tid=tids.copy(), sid=seq)
    return Trace(name, ev)


def traces(seed: int, count: int, length: int) -> list[Trace]:
    return [trace(s, f"n{seed}-{i}") for i, s in enumerate(normal_seqs(seed, count, length))]


def far(b: Baseline, ts: Sequence[Trace]) -> float:
    """Fraction of ``ts`` flagged (batched; agrees with score_trace, see the test below)."""
    return float(np.mean(b.trace_scores([t.sequences() for t in ts]) > b.trace_threshold_))


# --- calibration ----------------------------------------------------------------------------------

FIT_100 = traces(10, 100, 400)
FRESH_200 = traces(11, 200, 400)


@pytest.mark.parametrize("name", DETECTORS)
def test_false_alarm_rate_on_fresh_normal_traces_is_near_the_target(name: str) -> None:
    b = Baseline(small(name), target_far=0.05).fit(FIT_100)
    assert b.calibration_["traces"] == 25  # a quarter of the runs held out for calibration
    observed = far(b, FRESH_200)
    assert observed < 0.15, (name, observed)
    # and the baseline is not simply deaf: the same traces with an attack are all caught
    attacked = [
        trace(inject(walk(np.random.default_rng(i), 400), UNSEEN_PHRASE, 200, 2)) for i in range(10)
    ]
    assert all(b.score_trace(t).anomalous for t in attacked), name


def test_a_lower_target_gives_a_higher_threshold() -> None:
    lo = Baseline(NgramLM(), target_far=0.2).fit(FIT_100)
    hi = Baseline(NgramLM(), target_far=0.01).fit(FIT_100)
    assert hi.window_threshold_ > lo.window_threshold_
    assert far(hi, FRESH_200) <= far(lo, FRESH_200)


@pytest.mark.parametrize("name", ["lm", "t-stide"])
def test_false_alarm_rate_holds_for_traces_longer_than_the_profiling_runs(name: str) -> None:
    # Averaged over four independently calibrated baselines: one calibration set of 20 runs
    # gives a noisy conditional rate, the average does not.
    rates = []
    for seed in (20, 22, 24, 26):
        b = Baseline(make_detector(name), target_far=0.05).fit(traces(seed, 80, 300))
        rates.append(far(b, traces(seed + 1, 30, 6000)))
    assert np.mean(rates) < 0.15, rates


# --- a short attack inside a long trace -----------------------------------------------------------

ATTACK_AT, ATTACK_LEN = 3000, 30
ATTACK_NAMES = ("execve", "connect", "dup2")
ATTACK = [ATTACK_NAMES[i % 3] for i in range(ATTACK_LEN)]


@pytest.fixture(scope="module")
def long_fit() -> list[Trace]:
    return traces(30, 12, 2000)


def attacked_long(seed: int) -> Trace:
    base = walk(np.random.default_rng(seed), 5000)
    return trace(inject(base, ATTACK, ATTACK_AT), f"attack-{seed}")


ATTACK_T0 = T0 + ATTACK_AT * DT
ATTACK_T1 = T0 + (ATTACK_AT + ATTACK_LEN - 1) * DT


@pytest.fixture(scope="module")
def lm_5000() -> Baseline:
    """An LM baseline profiled on 40 runs as long as the attacked ones (10 calibration runs)."""
    return Baseline(NgramLM()).fit(traces(70, 40, 5000))


@pytest.mark.parametrize("name", DETECTORS)
def test_short_attack_in_a_long_trace_is_flagged(long_fit: list[Trace], name: str) -> None:
    b = Baseline(small(name)).fit(long_fit)
    for seed in (31, 32):
        v = b.score_trace(attacked_long(seed))
        assert v.anomalous, (name, v.score, v.threshold)
        assert v.score > v.threshold
        assert rank(v.severity) >= rank("low"), (name, v.severity)
        assert v.first_anomaly_ts is not None
        assert v.calls == 5000
        assert v.top
        # the same trace without the attack scores lower
        clean = trace(walk(np.random.default_rng(seed), 5000))
        assert b.score_trace(clean).score < v.score, name


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_first_anomaly_time_is_inside_the_attack(lm_5000: Baseline, seed: int) -> None:
    v = lm_5000.score_trace(attacked_long(seed))
    assert v.first_anomaly_ts is not None
    assert ATTACK_T0 <= v.first_anomaly_ts <= ATTACK_T1, (v.first_anomaly_ts - T0) / DT


def test_normal_verdicts_have_no_first_anomaly_time(lm_5000: Baseline) -> None:
    verdicts = [lm_5000.score_trace(t) for t in traces(34, 10, 5000)]
    normal = [v for v in verdicts if not v.anomalous]
    assert len(normal) >= 5
    assert [v.first_anomaly_ts for v in normal] == [None] * len(normal)


@pytest.mark.parametrize(
    "name",
    ["lm", "hmm", "stide"],
)
def test_top_features_name_the_injected_calls(long_fit: list[Trace], name: str) -> None:
    b = Baseline(small(name)).fit(long_fit)
    v = b.score_trace(attacked_long(31))
    assert tokens([c["feature"] for c in v.top]) & set(ATTACK_NAMES), v.top


def test_top_features_of_a_mid_trace_frame_are_whole_ngrams(long_fit: list[Trace]) -> None:
    b = Baseline(Stide(n=6)).fit(long_fit)
    base = walk(np.random.default_rng(35), 5000)
    v = b.score_trace(trace(inject(base, ORDER_PHRASE, ATTACK_AT, repeat=3)))
    assert v.anomalous
    # the frame is 3,000 calls into the thread: every 6-gram there has six real calls
    assert all(len(c["feature"].split()) == 6 for c in v.top), v.top


def test_an_attack_at_the_very_end_counts_as_an_anomalous_window(long_fit: list[Trace]) -> None:
    b = Baseline(NgramLM()).fit(long_fit)
    base = walk(np.random.default_rng(36), 5050)
    v = b.score_trace(trace(inject(base, ATTACK, 5050 - ATTACK_LEN)))
    assert v.anomalous
    assert v.anomalous_windows >= 1, v


# --- few traces -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n"),
    [(name, n) for name in DETECTORS for n in (1, 2, 3)],
)
def test_fitting_on_one_to_three_traces_works(name: str, n: int) -> None:
    b = Baseline(small(name)).fit(traces(40 + n, n, 3000))
    assert b.calibration_["traces"] >= 1
    assert all(math.isfinite(v) for v in b.thresholds().values())
    attack = trace(inject(walk(np.random.default_rng(49), 3000), ATTACK, 1500))
    v = b.score_trace(attack)
    assert v.anomalous, (name, n, v.score, v.threshold)


def test_few_trace_baseline_does_not_alarm_on_every_normal_run() -> None:
    b = Baseline(NgramLM(), target_far=0.05).fit(traces(43, 3, 3000))
    assert far(b, traces(44, 20, 3000)) <= 0.3


# --- threads ------------------------------------------------------------------------------------


def interleave(a: I32, b: I32, seed: int) -> tuple[I32, npt.NDArray[np.int32]]:
    """Merge two threads' calls in a random (order-preserving) schedule of short bursts."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    tid: list[int] = []
    i = j = 0
    while i < len(a) or j < len(b):
        take_a = j >= len(b) or (i < len(a) and rng.random() < 0.5)
        k = int(rng.integers(1, 4))
        if take_a:
            out += a[i : i + k].tolist()
            tid += [101] * len(a[i : i + k])
            i += k
        else:
            out += b[j : j + k].tolist()
            tid += [202] * len(b[j : j + k])
            j += k
    return np.array(out, dtype=np.int32), np.array(tid, dtype=np.int32)


@pytest.mark.parametrize("name", ["lm", "stide", "t-stide", "hmm"])
def test_interleaved_normal_threads_are_scored_per_thread(name: str) -> None:
    b = Baseline(small(name)).fit(traces(50, 12, 1500))
    rng = np.random.default_rng(51)
    for k in range(3):
        sid, tid = interleave(walk(rng, 1500), walk(rng, 1500), seed=k)
        ev = SyscallBatch(ts=times(len(sid)), pid=tid, tid=tid.copy(), sid=sid)
        v = b.score_trace(Trace(f"mt{k}", ev))
        assert not v.anomalous, (name, v.score, v.threshold)
        assert v.calls == 3000
        # the very same calls as one thread form orders no program executed: that is anomalous
        one = SyscallBatch(ts=ev.ts, pid=ev.pid, tid=np.zeros_like(tid), sid=sid)
        assert b.score_trace(Trace("collapsed", one)).anomalous, name


def test_an_attack_in_one_thread_of_two_is_caught_and_timed() -> None:
    b = Baseline(NgramLM()).fit(traces(50, 12, 1500))
    rng = np.random.default_rng(52)
    evil = inject(walk(rng, 1500), ATTACK, 700)
    sid, tid = interleave(walk(rng, 1500), evil, seed=9)
    ev = SyscallBatch(ts=times(len(sid)), pid=tid, tid=tid.copy(), sid=sid)
    v = b.score_trace(Trace("mt", ev))
    assert v.anomalous
    first_evil = T0 + DT * int(np.flatnonzero((tid == 202) & np.isin(sid, [id_of("execve")]))[0])
    assert v.first_anomaly_ts is not None
    assert v.first_anomaly_ts <= first_evil


# --- verdict shape, batch scoring, errors ---------------------------------------------------------


def test_verdict_is_plain_json_with_the_cli_fields(long_fit: list[Trace]) -> None:
    b = Baseline(NgramLM()).fit(long_fit)
    v = b.score_trace(attacked_long(31))
    d = json.loads(json.dumps(v.as_dict()))  # no numpy scalars: plain json.dumps works
    for key in ("trace", "score", "anomalous", "severity", "first_anomaly_ts", "top"):
        assert key in d
    assert d["trace"] == "attack-31"
    assert isinstance(d["anomalous"], bool)
    assert all(set(c) == {"feature", "score", "count"} for c in d["top"])


@pytest.mark.parametrize("name", DETECTORS)
def test_batch_trace_scores_agree_with_score_trace(long_fit: list[Trace], name: str) -> None:
    b = Baseline(small(name)).fit(long_fit)
    ts = [attacked_long(31), *traces(53, 4, 2000)]
    batch = b.trace_scores([t.sequences() for t in ts])
    verdicts = [b.score_trace(t) for t in ts]
    np.testing.assert_allclose(batch, [v.score for v in verdicts], rtol=1e-6, atol=1e-6)
    assert [bool(x) for x in batch > b.trace_threshold_] == [v.anomalous for v in verdicts]


def test_baseline_errors_are_clear() -> None:
    with pytest.raises(ModelError, match="no non-empty normal traces"):
        Baseline(NgramLM()).fit([])
    with pytest.raises(ModelError, match="no non-empty normal traces"):
        Baseline(NgramLM()).fit([trace(np.empty(0, np.int32))])
    with pytest.raises(ModelError, match="not fitted"):
        Baseline(NgramLM()).score_trace(trace(walk(np.random.default_rng(0), 10)))
    for kw in ({"window": 1}, {"target_far": 0.0}, {"target_far": 0.5}, {"holdout": 1.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Baseline(NgramLM(), **kw)


def test_empty_trace_scores_as_normal(long_fit: list[Trace]) -> None:
    b = Baseline(NgramLM()).fit(long_fit)
    v = b.score_trace(trace(np.empty(0, np.int32), "empty"))
    assert isinstance(v, Verdict)
    assert (v.anomalous, v.severity, v.calls, v.first_anomaly_ts) == (False, "none", 0, None)
