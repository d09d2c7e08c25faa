"""The joint model of resource rates (:class:`RateMixture`): a mix that is new although every
rate stays under its learnt maximum is flagged; normal mixes are not; it persists as JSON."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from bam.agent.resources import RateMixture, RateProfile

MIB = float(1 << 20)


class Synthetic(RateProfile):
    """A rate source fed from a list (stands in for a sensor; the sampling logic is real)."""

    METRICS: ClassVar[tuple[str, ...]] = ("cpu", "disk_bps", "net_tx_bps", "threads")
    FLOORS: ClassVar[dict[str, float]] = {
        "cpu": 0.05,
        "disk_bps": MIB,
        "net_tx_bps": 65536.0,
        "threads": 4.0,
    }
    PREFIX: ClassVar[str] = "syn_"

    def __init__(self) -> None:
        super().__init__(hz=1e9)  # every maybe_sample() samples
        self.feed: Iterator[dict[str, float]] = iter(())

    def _rates(self) -> dict[str, float] | None:
        return next(self.feed, None)

    def run(self, rows: list[dict[str, float]]) -> None:
        self.feed = iter(rows)
        for _ in rows:
            self.maybe_sample()


def normal(rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    """A correlated cloud: one 'load' drives CPU, disk and network together; threads fixed."""
    load = rng.uniform(0.2, 1.0, n)
    noise = rng.normal(size=(n, 3))
    return [
        {
            "cpu": float(ld * (1 + 0.05 * e[0])),
            "disk_bps": float(ld * 8 * MIB * (1 + 0.1 * e[1])),
            "net_tx_bps": float(ld * 4 * MIB * (1 + 0.1 * e[2])),
            "threads": 3.0,
        }
        for ld, e in zip(load, noise, strict=True)
    ]


def profiled(rng: np.random.Generator, n: int = 60) -> Synthetic:
    res = Synthetic()
    res.learning = True
    res.run(normal(rng, n))
    res.learn()
    res.wait_mixture()
    return res


#: every rate within the profile's maxima (load <= 1.0), but not together
ODD = [
    {"cpu": 0.9, "disk_bps": 0.0, "net_tx_bps": 3.6 * MIB, "threads": 3.0},  # busy, no disk
    {"cpu": 0.9, "disk_bps": 7.0 * MIB, "net_tx_bps": 0.0, "threads": 3.0},  # network silent
    {"cpu": 0.05, "disk_bps": 7.0 * MIB, "net_tx_bps": 3.5 * MIB, "threads": 3.0},  # no CPU
]


def test_unusual_mix_within_maxima_is_flagged_and_named() -> None:
    rng = np.random.default_rng(1)
    res = profiled(rng)
    assert res.mixture is not None
    assert res.mixture.samples == 60
    for row, culprit in zip(ODD, ["disk_bps↓", "net_tx_bps↓", "cpu↓"], strict=True):
        assert all(row[m] <= res.profile[m] for m in res.METRICS)
        res.run([row] * 5)
        scores, top = res.summary()
        assert scores["syn_mix"] > 1.0, (row, scores)
        assert not any("profile max" in t for t in top)  # the maximum rule sees nothing
        [mix] = [t for t in top if "resource_mix_unusual" in t]
        assert mix.startswith("syn: resource_mix_unusual("), mix
        assert culprit in mix, mix


def test_normal_mixes_stay_under_the_threshold_at_about_the_calibrated_rate() -> None:
    rng = np.random.default_rng(2)
    rates, flagged = [], 0
    for _ in range(2):
        res = profiled(rng)
        assert res.mixture is not None
        x = res.mixture.features(normal(rng, 3000))
        rates.append(float((res.mixture.score(x) > 1.0).mean()))
        for _ in range(30):  # intervals of 30 samples: k-of-n keeps them quiet
            res.run(normal(rng, 30))
            scores, top = res.summary()
            flagged += scores["syn_mix"] > 1.0
            assert any("resource_mix_unusual" in t for t in top) == (scores["syn_mix"] > 1.0)
    assert max(rates) <= 0.02, rates  # aimed at ~1 % per sample; the noise floor errs quieter
    assert flagged <= 1, flagged


def test_round_trip_and_old_profiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    res = profiled(rng)
    assert res.mixture is not None
    path = tmp_path / "p.host.json"
    res.save(path)
    saved = json.loads(path.read_text())
    assert saved["version"] == 2
    assert saved["mixture"]["metrics"] == list(Synthetic.METRICS)

    other = Synthetic()
    assert other.load(path)
    assert other.profile == res.profile
    assert other.mixture is not None
    rows = normal(rng, 50) + ODD
    x = res.mixture.features(rows)
    np.testing.assert_array_equal(other.mixture.score(x), res.mixture.score(x))
    assert other.mixture.threshold == res.mixture.threshold
    other.run(ODD[:1] * 3)
    assert other.summary()[0]["syn_mix"] > 1.0

    # a profile saved before the mixture existed: maxima only, no mix score, no error
    old = tmp_path / "old.host.json"
    old.write_text(json.dumps({"version": 1, "max": res.profile}))
    legacy = Synthetic()
    assert legacy.load(old)
    assert legacy.profile == res.profile
    assert legacy.mixture is None
    legacy.run(ODD)
    scores, _ = legacy.summary()
    assert "syn_mix" not in scores
    assert "syn_cpu_vs_profile" in scores

    # a mixture for other metrics (or damaged) is dropped; the maxima still load
    saved["mixture"]["metrics"] = ["cpu"]
    bad = tmp_path / "bad.host.json"
    bad.write_text(json.dumps(saved))
    assert legacy.load(bad)
    assert legacy.mixture is None


def test_too_few_samples_means_no_mixture(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    caplog.set_level(logging.INFO, logger="bam.agent")
    res = profiled(rng, n=RateMixture.MIN_SAMPLES - 1)
    assert res.mixture is None
    assert res.profile
    assert any("no joint model" in r.getMessage() for r in caplog.records)
    res.run(ODD)
    scores, _ = res.summary()
    assert "syn_mix" not in scores
    assert scores["syn_samples"] == 3
    with pytest.raises(ValueError, match="samples"):
        RateMixture(Synthetic.METRICS, Synthetic.FLOORS).fit(normal(rng, 3))
    # the minimum is enough to fit and score
    res = profiled(rng, n=RateMixture.MIN_SAMPLES)
    assert res.mixture is not None
    res.run(normal(rng, 3))
    assert "syn_mix" in res.summary()[0]
