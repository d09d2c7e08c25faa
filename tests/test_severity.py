"""Severity = magnitude (how far past threshold) x decayed frequency of anomalous windows."""

from __future__ import annotations

import numpy as np
import pytest

from bam.detect import Baseline
from bam.detect.severity import LEVELS, SeverityTracker, level_of, rank, severity_of_windows
from bam.models import NgramLM
from test_baseline import ATTACK, trace, traces
from test_models import inject, walk


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (0.0, "none"),
        (0.99, "none"),
        (1.0, "info"),
        (1.24, "info"),
        (1.25, "low"),
        (1.99, "low"),
        (2.0, "medium"),
        (3.99, "medium"),
        (4.0, "high"),
        (7.99, "high"),
        (8.0, "critical"),
        (1e9, "critical"),
    ],
)
def test_levels_by_value(value: float, level: str) -> None:
    assert level_of(value) == level


def test_levels_are_ordered() -> None:
    assert LEVELS == ("none", "info", "low", "medium", "high", "critical")
    assert [rank(x) for x in LEVELS] == list(range(6))
    values = np.linspace(0, 20, 401)
    ranks = [rank(level_of(float(v))) for v in values]
    assert ranks == sorted(ranks)  # monotone in magnitude x frequency


def test_windows_at_or_below_threshold_are_not_anomalous() -> None:
    t = SeverityTracker()
    for m in (0.0, 0.5, 1.0, -3.0):
        assert t.update(m) == (0.0, "none")
    assert t.frequency == 0.0


def test_one_window_just_past_threshold_is_info_and_a_big_one_is_worse() -> None:
    assert SeverityTracker().update(1.1) == pytest.approx((1.1, "info"))
    assert SeverityTracker().update(1.5)[1] == "low"
    assert SeverityTracker().update(3.0)[1] == "medium"
    assert SeverityTracker().update(5.0)[1] == "high"
    assert SeverityTracker().update(10.0)[1] == "critical"


def test_repeated_anomalous_windows_escalate() -> None:
    t = SeverityTracker(decay=0.8)
    seen = [t.update(1.5) for _ in range(12)]
    values = [v for v, _ in seen]
    levels = [lvl for _, lvl in seen]
    assert values == sorted(values)  # every further window raises the frequency
    assert levels[0] == "low"
    assert "medium" in levels
    assert levels[-1] == "high"
    # frequency converges to 1 / (1 - decay): a steady stream cannot grow without bound
    assert t.frequency == pytest.approx((1 - 0.8**12) / (1 - 0.8))
    assert values[-1] < 1.5 / (1 - 0.8)


def test_severity_decays_back_when_windows_turn_normal() -> None:
    t = SeverityTracker(decay=0.8)
    for _ in range(10):
        burst_value, burst_level = t.update(2.0)
    f = t.frequency
    for k in range(1, 6):
        assert t.update(0.2) == (0.0, "none")
        assert t.frequency == pytest.approx(f * 0.8**k)
    for _ in range(30):
        t.update(0.0)
    assert t.frequency < 0.01
    # after a long quiet spell one more window is judged almost like the first one
    value, level = t.update(2.0)
    assert value == pytest.approx(2.0, rel=0.01)
    assert level == "medium"
    assert rank(level) < rank(burst_level)
    assert value < burst_value


def test_slower_decay_means_longer_memory() -> None:
    def after_gap(decay: float) -> float:
        t = SeverityTracker(decay=decay)
        for _ in range(5):
            t.update(2.0)
        for _ in range(5):
            t.update(0.0)
        return t.update(2.0)[0]

    assert after_gap(0.95) > after_gap(0.8) > after_gap(0.5)


def test_severity_of_windows_is_the_peak() -> None:
    assert severity_of_windows([]) == (0.0, "none")
    assert severity_of_windows([0.1, 0.9, 1.0]) == (0.0, "none")
    v, lvl = severity_of_windows([0.2, 1.1, 0.3])
    assert v == pytest.approx(1.1)
    assert lvl == "info"
    # the same excess repeated escalates; scattered far apart it does not
    together, lvl_together = severity_of_windows([1.5] * 6)
    apart, lvl_apart = severity_of_windows(([1.5] + [0.0] * 30) * 6)
    assert together > apart
    assert rank(lvl_together) > rank(lvl_apart)
    assert apart == pytest.approx(1.5, rel=0.01)


# --- through a Baseline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    return Baseline(NgramLM(), window=100).fit(traces(60, 16, 2000))


def test_a_sustained_attack_is_more_severe_than_a_brief_one(baseline: Baseline) -> None:
    rng = np.random.default_rng(61)
    base = walk(rng, 4000)
    brief = trace(inject(base, ATTACK[:2], 2000))  # two never-seen calls, once
    sustained = base.copy()
    for k in range(8):  # the same two calls in eight consecutive windows
        sustained = inject(sustained, ATTACK[:2], 2000 + 100 * k)
    vb = baseline.score_trace(brief)
    vs = baseline.score_trace(trace(sustained))
    assert vb.anomalous
    assert vs.anomalous
    assert vs.anomalous_windows > vb.anomalous_windows
    assert vs.severity_value > 2 * vb.severity_value
    assert rank(vs.severity) > rank(vb.severity)
    assert rank(vs.severity) >= rank("high")


def test_normal_traces_have_no_severity(baseline: Baseline) -> None:
    for t in traces(62, 5, 2000):
        v = baseline.score_trace(t)
        if not v.anomalous:
            assert (v.severity, v.severity_value) == ("none", 0.0)
        else:  # a (rare) false alarm is at most mildly severe
            assert rank(v.severity) <= rank("low")
