"""Syscall-set novelty: the set distance itself, and Baseline's combination with it.

Normal traces are walks of the seeded Markov chain of ``test_models.py`` of varied length, so
their call sets differ (short walks miss some of the ten calls); attacks add calls the chain
never emits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy.stats import norm

from bam.detect import Baseline, conformal_threshold
from bam.detect.baseline import make_baseline
from bam.detect.set_novelty import SetMemory
from bam.detect.tail import TailModel
from bam.evaluation.adfa import DEFAULT_DETECTORS
from bam.events import SyscallBatch, Trace
from bam.models import CategoryLM, NgramLM
from bam.models.ensemble import split_holdout
from bam.models.persistence import load_artifact, save_artifact
from bam.syscalls import name_of, number_of
from test_models import UNSEEN_PHRASE, ids, inject, walk

I32 = npt.NDArray[np.int32]
T0 = 1_700_000_000.0  # one call per millisecond from here


def trace(seq: I32, name: str = "t", tid: int = 100) -> Trace:
    tids = np.full(len(seq), tid, dtype=np.int32)
    ts = T0 + np.arange(len(seq), dtype=np.float64) * 0.001
    return Trace(name, SyscallBatch(ts=ts, pid=tids, tid=tids.copy(), sid=seq))


def varied(seed: int, count: int) -> list[Trace]:
    rng = np.random.default_rng(seed)
    return [trace(walk(rng, int(rng.integers(15, 120))), f"n{seed}-{i}") for i in range(count)]


NORMAL = varied(5, 200)


@pytest.fixture(scope="module")
def fused() -> Baseline:
    return Baseline(NgramLM(), target_far=0.1, set_novelty=True).fit(NORMAL)


# --- the set distance ---------------------------------------------------------------------------


def test_the_same_call_set_is_at_distance_zero_whatever_the_order_and_counts() -> None:
    mem = SetMemory.fit([ids(["read", "write", "close"]), ids(["openat", "read"])])
    seqs = [
        ids(["read", "write", "close"]),
        ids(["close", "close", "write", "read", "read"]),  # same set, other order and counts
        ids(["read", "openat"]),
    ]
    assert mem.distances(seqs).tolist() == [0.0, 0.0, 0.0]
    assert len(mem.sets) == 2


def test_a_new_call_gives_the_cosine_distance_to_the_nearest_set() -> None:
    mem = SetMemory.fit([ids(["read", "write", "close", "openat"]), ids(["read"])])
    seq = ids(["read", "write", "close", "openat", "execve", "read"])
    d, near = mem.nearest([seq])
    assert d[0] == pytest.approx(1 - 4 / np.sqrt(4 * 5))
    assert d[0] > 0
    assert mem.vocab[mem.sets[near[0]] > 0].tolist() == sorted(
        ids(["read", "write", "close", "openat"]).tolist()
    )
    assert mem.novel_calls(seq, int(near[0])).tolist() == ids(["execve"]).tolist()
    # the order of calls never matters: a permutation is at the same distance
    perm = np.random.default_rng(0).permutation(seq)
    assert mem.distances([perm])[0] == d[0]


def test_missing_calls_and_unknown_ids_also_count() -> None:
    mem = SetMemory.fit([ids(["read", "write", "close", "openat"])])
    d = mem.distances([ids(["read"]), np.array([5000, 5001], dtype=np.int32), ids([])])
    assert d[0] == pytest.approx(1 - 1 / np.sqrt(4))
    assert d[1] == 1.0  # no call in common (ids beyond the normal vocabulary are fine)
    assert d[2] == 0.0  # an empty sequence shows nothing new
    with pytest.raises(ValueError, match="outside"):
        mem.distances([np.array([-1], dtype=np.int32)])
    with pytest.raises(ValueError, match="no non-empty"):
        SetMemory.fit([ids([])])


def test_results_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    import bam.detect.set_novelty as sn

    rng = np.random.default_rng(1)
    normal = [walk(rng, int(rng.integers(5, 60))) for _ in range(50)]
    seqs = [walk(rng, int(rng.integers(1, 60))) for _ in range(40)]
    mem = SetMemory.fit(normal)
    whole = mem.nearest(seqs)
    monkeypatch.setattr(sn, "_CELLS", 1)  # one sequence per chunk
    chunked = SetMemory.fit(normal)
    np.testing.assert_array_equal(chunked.vocab, mem.vocab)
    np.testing.assert_array_equal(chunked.sets, mem.sets)
    one_by_one = mem.nearest(seqs)
    np.testing.assert_array_equal(whole[0], one_by_one[0])
    np.testing.assert_array_equal(whole[1], one_by_one[1])


# --- Baseline with set novelty ------------------------------------------------------------------


def test_fused_score_is_stouffers_combination_of_calibrated_tail_probabilities(
    fused: Baseline,
) -> None:
    plain = Baseline(NgramLM(), target_far=0.1).fit(NORMAL)
    fit_i, cal_i = split_holdout(len(NORMAL), 0.25, 0)
    mem = SetMemory.fit([s for i in fit_i for s in NORMAL[i].sequences()])
    cal = [NORMAL[i].sequences() for i in cal_i]
    cal_stat, cal_dist = plain.trace_scores(cal), np.array([mem.distances(c).max() for c in cal])
    t_stat, t_set = TailModel().fit(cal_stat), TailModel().fit(cal_dist)

    n = len(cal)

    def z(log10_p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # a conformal p-value is never above n / (n + 1): "typical" cannot cancel the other term
        out: npt.NDArray[np.float64] = norm.isf(np.minimum(10.0**log10_p, n / (n + 1)))
        return out

    fresh = [t.sequences() for t in varied(6, 60)]
    stat, dist = plain.trace_scores(fresh), np.array([mem.distances(s).max() for s in fresh])
    expect = (z(t_stat.log10_sf(stat)) + z(t_set.log10_sf(dist))) / np.sqrt(2.0)
    np.testing.assert_allclose(fused.trace_scores(fresh), expect, rtol=1e-9, atol=1e-9)
    cal_fused = (z(t_stat.log10_sf(cal_stat)) + z(t_set.log10_sf(cal_dist))) / np.sqrt(2.0)
    assert fused.trace_threshold_ == pytest.approx(conformal_threshold(cal_fused, 0.1))
    assert fused.statistic_threshold_ == plain.trace_threshold_
    # score_trace agrees with the batched scores
    for t, s in zip(varied(6, 10), fused.trace_scores(fresh[:10]), strict=True):
        assert fused.score_trace(t).score == round(float(s), 6)


def test_one_overwhelming_term_is_enough_and_nothing_saturates() -> None:
    """A profile with few calibration traces (one workload's) must still flag a trace that is
    far out on one term only, and rank traces beyond everything calibrated by how far."""
    few = Baseline(NgramLM(), target_far=0.1, set_novelty=True).fit(NORMAL[:24])
    assert few.calibration_["traces"] == 6
    # a normal thread's very calls, backwards: an exactly known call set (the set term is at
    # its most typical), in an order the chain never produces
    fit_i, _ = split_holdout(24, 0.25, 0)
    backwards = NORMAL[int(fit_i[0])].events.sid[::-1].copy()
    assert few._set_distances([[backwards]])[0] == 0.0
    stat = few._statistic(few._thread_scores([backwards]))
    z_stat, z_set = few._z_scores([stat], [0.0])
    assert z_set[0] < 0 < z_stat[0]
    assert few.score_trace(trace(backwards, "reordered")).anomalous
    rng = np.random.default_rng(3)
    # traces past everything in calibration still rank by how far
    wild = inject(walk(rng, 80), UNSEEN_PHRASE, 40)
    wilder = inject(wild, ["ptrace", "kill", "setuid", "mount"], 60)
    s_wild, s_wilder = few.trace_scores([[wild], [wilder]])
    assert s_wilder > s_wild > few.trace_threshold_


def test_a_trace_with_a_never_seen_call_is_flagged_and_the_call_named(fused: Baseline) -> None:
    seq = inject(walk(np.random.default_rng(7), 80), UNSEEN_PHRASE, 40)
    v = fused.score_trace(trace(seq, "attack"))
    assert v.anomalous
    lines = [t for t in v.top if t["feature"].startswith("calls its nearest normal thread")]
    assert len(lines) == 1, v.top
    assert set(lines[0]["feature"].split(":")[1].split()) == {"socket", "connect", "dup2", "execve"}
    assert lines[0]["count"] == 4
    assert v.first_anomaly_ts == pytest.approx(T0 + 40 * 0.001)  # dated from the first new call


def test_the_most_unusual_thread_decides_the_set_distance(fused: Baseline) -> None:
    rng = np.random.default_rng(8)
    a, b = walk(rng, 60), inject(walk(rng, 60), ["ptrace"], 30)
    ev = SyscallBatch.concat([trace(a, tid=1).events, trace(b, tid=2).events])
    t = Trace("two-threads", ev)
    alone = fused.set_memory_.distances([b])[0]
    assert alone > 0
    assert fused._set_distances([t.sequences()])[0] == alone
    assert "ptrace" in fused.score_trace(t).top[0]["feature"]


def test_normal_traces_are_rarely_flagged(fused: Baseline) -> None:
    scores = fused.trace_scores([t.sequences() for t in varied(9, 200)])
    assert (scores > fused.trace_threshold_).mean() < 0.25


def test_save_and_load_round_trip_bit_identically(fused: Baseline, tmp_path: Path) -> None:
    mid = fused.save(tmp_path / "b.npz")
    b = Baseline.load(tmp_path / "b.npz", expect_model_id=mid)
    assert b.set_novelty
    assert b.save(tmp_path / "again.npz") == mid
    for name in ("statistic_tail_", "set_tail_"):
        assert getattr(fused, name).state() == getattr(b, name).state()
    assert b.set_memory_.sets.tobytes() == fused.set_memory_.sets.tobytes()
    assert b.trace_threshold_ == fused.trace_threshold_
    assert b.statistic_threshold_ == fused.statistic_threshold_
    fresh = [t.sequences() for t in varied(10, 30)]
    assert fused.trace_scores(fresh).tobytes() == b.trace_scores(fresh).tobytes()
    t = trace(inject(walk(np.random.default_rng(7), 80), UNSEEN_PHRASE, 40))
    assert fused.score_trace(t) == b.score_trace(t)


def test_baselines_without_set_novelty_save_as_before_and_old_files_load(tmp_path: Path) -> None:
    plain = Baseline(NgramLM(), target_far=0.1).fit(NORMAL[:40])
    mid = plain.save(tmp_path / "plain.npz")
    meta, arrays, _ = load_artifact(tmp_path / "plain.npz", "baseline")
    assert "set_novelty" not in meta
    assert "set_novelty" not in meta["params"]
    assert not any(k.startswith("baseline_set_") for k in arrays)
    # a file written before the option existed has exactly this content: it loads with it off
    save_artifact(tmp_path / "old.npz", "baseline", meta, arrays)
    old = Baseline.load(tmp_path / "old.npz", expect_model_id=mid)
    assert not old.set_novelty
    assert old.statistic_threshold_ == old.trace_threshold_ == plain.trace_threshold_
    fresh = [t.sequences() for t in varied(11, 20)]
    np.testing.assert_array_equal(old.trace_scores(fresh), plain.trace_scores(fresh))


def test_detector_names_with_set_suffix() -> None:
    b = make_baseline("catlm+set", window=1000)
    assert b.set_novelty
    assert isinstance(b.detector, CategoryLM)
    assert b.window == 1000
    assert not make_baseline("catlm").set_novelty
    with pytest.raises(ValueError, match="unknown detector"):
        make_baseline("nope+set")
    assert "catlm+set" in DEFAULT_DETECTORS


def test_baseline_fit_cli_accepts_a_set_detector(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bam.cli import app

    def write(name: str, seq: I32) -> Path:
        p = tmp_path / name
        p.write_text(" ".join(str(number_of(name_of(int(c)), "i386")) for c in seq))
        return p

    normal = [write(f"n{i}.txt", t.events.sid) for i, t in enumerate(NORMAL[:60])]
    out = tmp_path / "m.bam"
    args = ["baseline", "fit", "--format", "adfa", *map(str, normal), "-o", str(out)]
    res = CliRunner().invoke(app, [*args, "--detector", "lm+set", "--target-far", "0.1", "--json"])
    assert res.exit_code == 0, res.output
    b = Baseline.load(out, json.loads(res.output)["model_id"])
    assert b.set_novelty
    assert isinstance(b.detector, NgramLM)
