"""A Baseline: a fitted detector plus thresholds calibrated on held-out *normal* data.

A user gives only normal runs, so the profiling data itself is split: the detector learns from
one part and the thresholds come from its scores on the other, at a target false-alarm rate
(a conformal order statistic, so the rate holds for new normal data from the same workload).

Scoring is local: each thread's calls are scored in context, averaged over sliding frames of
``window`` calls, and a trace is as anomalous as its worst frame (relative to the frame
threshold) or its overall mean (relative to the mean threshold), whichever is further past its
threshold. A short attack inside a long, otherwise normal trace therefore still stands out,
while a trace that is mildly odd throughout is caught by its mean.

With ``set_novelty`` the trace score also weighs *which* calls a trace makes, ignoring order
(:mod:`bam.detect.set_novelty`): the distance of its most unusual thread's call set to the
nearest normal thread's. The two are combined as p-values (Stouffer):
``score = (z(p_stat) + z(p_set)) / sqrt(2)``, each ``p`` the tail probability of the value
among the calibration traces (:class:`~bam.detect.tail.TailModel`: empirical in the bulk,
exponential beyond) and ``z(p)`` the standard normal quantile above which ``p`` lies; the
trace threshold is the conformal order statistic of the calibration traces' own scores.
Why Stouffer rather than averaging ranks (which scored the same on ADFA-LD): a z-score is
unbounded, so one overwhelming term (a wild call sequence made of ordinary calls, or one
never-seen call in an ordinary sequence) still carries a trace past the threshold alone,
and a trace beyond everything seen in calibration still ranks by how far. Averaged ranks
saturate at the calibration maximum: with the few calibration traces of one workload's
profile, nothing could pass a threshold placed there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from scipy.special import ndtri

from bam.detect.set_novelty import SetMemory
from bam.detect.severity import level_of, severity_of_windows
from bam.detect.tail import TailModel
from bam.errors import ModelError
from bam.events import Trace
from bam.models import make_detector
from bam.models.base import CallDetector, Contribution, Detector
from bam.models.ensemble import split_holdout
from bam.models.persistence import load_artifact, save_artifact
from bam.syscalls import name_of

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]

SET_SUFFIX = "+set"  # ``catlm+set``: a detector name with syscall-set novelty switched on
_SET_ARRAYS = "baseline_set_"  # prefix of the set-novelty arrays in a saved baseline


@dataclass(frozen=True, slots=True)
class ThreadScores:
    """Window scores of one thread: frame ``i`` covers calls ``starts[i] : starts[i] + window``."""

    tid_index: int
    starts: npt.NDArray[np.int64]
    scores: F64
    mean: float
    length: int
    calls: F64 | None = None  # per-call scores, for detectors that have them


@dataclass
class Verdict:
    """The baseline's judgement of one trace (what ``bam score --json`` prints)."""

    trace: str
    score: float
    threshold: float
    anomalous: bool
    severity: str
    severity_value: float
    first_anomaly_ts: float | None
    top: list[dict[str, Any]] = field(default_factory=list)
    windows: int = 0
    anomalous_windows: int = 0
    calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def conformal_threshold(scores: npt.ArrayLike, far: float) -> float:
    """Score that at most ``far`` of new normal samples exceed (split-conformal order statistic).

    With too few samples for the requested rate, the maximum is used, nudged up by a small
    relative margin so that the calibration data itself does not alarm.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no calibration scores")
    k = math.ceil((len(s) + 1) * (1.0 - far))
    if k > len(s):
        top = float(s[-1])
        return top + max(abs(top) * 0.05, 1e-9)
    return float(s[k - 1])


class Baseline:
    """A detector of normal behaviour with calibrated window, mean and trace thresholds."""

    def __init__(
        self,
        detector: Detector,
        window: int = 100,
        target_far: float = 0.01,
        holdout: float = 0.25,
        seed: int = 0,
        set_novelty: bool = False,
    ) -> None:
        if window < 2:
            raise ValueError("window must be >= 2 calls")
        if not 0.0 < target_far < 0.5:
            raise ValueError("target_far must be in (0, 0.5)")
        if not 0.0 < holdout < 1.0:
            raise ValueError("holdout must be in (0, 1)")
        self.detector = detector
        self.window = window
        self.target_far = target_far
        self.holdout = holdout
        self.seed = seed
        self.set_novelty = set_novelty

    # ------------------------------------------------------------------ fitting
    def fit(self, traces: Sequence[Trace]) -> Self:
        """Fit the detector on part of ``traces`` and calibrate thresholds on the rest."""
        traces = [t for t in traces if len(t.events)]
        if not traces:
            raise ModelError("no non-empty normal traces to fit a baseline on")
        seqs_per_trace = [t.sequences() for t in traces]
        if len(traces) >= 4:
            fit_i, cal_i = split_holdout(len(traces), self.holdout, self.seed)
            fit_seqs = [s for i in fit_i for s in seqs_per_trace[i]]
            cal = [seqs_per_trace[i] for i in cal_i]
        else:
            # Too few runs to hold some out: learn from the start of every thread, calibrate
            # on its end (later behaviour of the same normal run).
            fit_seqs, cal = [], []
            for seqs in seqs_per_trace:
                cut = [max(1, int(len(s) * (1 - self.holdout))) for s in seqs]
                fit_seqs += [s[:c] for s, c in zip(seqs, cut, strict=True)]
                cal.append([s[c:] for s, c in zip(seqs, cut, strict=True) if len(s) > c])
            cal = [c for c in cal if c]
            if not cal:
                raise ModelError("normal traces are too short to hold out calibration data")
        if self.set_novelty:
            self.set_memory_ = SetMemory.fit(fit_seqs)
        if not isinstance(self.detector, CallDetector):
            # order-blind detectors score window-sized slices: learn from the same shape
            fit_seqs = self._slices(fit_seqs)[0]
        try:
            self.detector.fit(fit_seqs)
        except ValueError as e:
            raise ModelError(f"cannot fit {self.detector.name}: {e}") from None
        self.history_: list[dict[str, Any]] = []
        self.n_fit_calls_ = int(sum(len(s) for s in fit_seqs))
        self.n_traces_ = len(traces)
        per_trace = [self._thread_scores(seqs) for seqs in cal]
        # non-overlapping frames: the independent samples the thresholds and tails are fit on
        all_windows = np.concatenate(
            [ts.scores[self._independent(ts)] for tr in per_trace for ts in tr]
        )
        every_window = np.concatenate([ts.scores for tr in per_trace for ts in tr])
        all_means = np.array([ts.mean for tr in per_trace for ts in tr])
        # Scores of some detectors are negative (log-densities): magnitudes are measured from
        # the typical normal score, so "1" means "at threshold" whatever the detector's units.
        self.window_center_ = float(np.median(every_window))
        self.mean_center_ = float(np.median(all_means))
        self.window_threshold_ = _above(
            conformal_threshold(every_window, self.target_far), self.window_center_
        )
        self.mean_threshold_ = _above(
            conformal_threshold(all_means, self.target_far), self.mean_center_
        )
        self.frame_tail_ = TailModel().fit(all_windows)
        self.mean_tail_ = TailModel().fit(all_means)
        stats = np.array([self._statistic(tr) for tr in per_trace])
        self.statistic_threshold_ = conformal_threshold(stats, self.target_far)
        self.trace_threshold_ = self.statistic_threshold_
        self.calibration_ = {
            "traces": len(per_trace),
            "windows": len(all_windows),
            "window_score_median": float(np.median(all_windows)),
            "trace_statistic_median": float(np.median(stats)),
        }
        if self.set_novelty:
            dists = self._set_distances(cal)
            self.statistic_tail_ = TailModel().fit(stats)
            self.set_tail_ = TailModel().fit(dists)
            self.trace_threshold_ = conformal_threshold(self._fuse(stats, dists), self.target_far)
            self.calibration_["set_distance_median"] = float(np.median(dists))
        self.fitted_ = True
        return self

    def _set_distances(self, traces: Sequence[Sequence[I32]]) -> F64:
        """Set distance of each trace: that of its most unusual (non-empty) thread."""
        flat = [s for seqs in traces for s in seqs if len(s)]
        owner = np.repeat(
            np.arange(len(traces)), [sum(1 for s in seqs if len(s)) for seqs in traces]
        )
        out = np.zeros(len(traces), dtype=np.float64)
        np.maximum.at(out, owner, self.set_memory_.distances(flat))
        return out

    def _z_scores(self, stats: npt.ArrayLike, dists: npt.ArrayLike) -> tuple[F64, F64]:
        """Standard normal quantiles of the statistic's and set distance's tail probabilities
        among the calibration traces (higher = more unusual; unbounded)."""
        st, se = self.statistic_tail_, self.set_tail_
        return _z(st.log10_sf(stats), st.n_), _z(se.log10_sf(dists), se.n_)

    def _fuse(self, stats: npt.ArrayLike, dists: npt.ArrayLike) -> F64:
        """Stouffer's combination of the two terms (see the module docstring)."""
        return _stouffer(*self._z_scores(stats, dists))

    def _independent(self, ts: ThreadScores) -> npt.NDArray[np.intp]:
        """Indices of non-overlapping frames of a thread (always including the last)."""
        step = self.window if isinstance(self.detector, CallDetector) else 2
        n = len(ts.scores)
        return np.unique(np.r_[np.arange(0, n, step), n - 1]).astype(np.intp)

    def _slices(self, seqs: Sequence[I32]) -> tuple[list[I32], list[tuple[int, int]]]:
        """Half-overlapping window-sized slices of each sequence and their (sequence, start)."""
        w = self.window
        slices: list[I32] = []
        owners: list[tuple[int, int]] = []
        for i, s in enumerate(seqs):
            offs = range(0, max(1, len(s) - w + 1), max(1, w // 2)) if len(s) > w else range(1)
            for a in offs:
                slices.append(s[a : a + w])
                owners.append((i, a))
            if len(s) > w and (len(s) - w) % max(1, w // 2):
                slices.append(s[len(s) - w :])  # the tail, so the end of a thread is scored
                owners.append((i, len(s) - w))
        return slices, owners

    # ------------------------------------------------------------------ scoring
    def _thread_scores(self, seqs: Sequence[I32]) -> list[ThreadScores]:
        seqs = [s for s in seqs if len(s)]
        w = self.window
        out: list[ThreadScores] = []
        if isinstance(self.detector, CallDetector):
            for i, cs in enumerate(self.detector.call_scores(seqs)):
                if len(cs) <= w:
                    starts = np.zeros(1, dtype=np.int64)
                    frames = np.array([cs.mean()])
                else:
                    c = np.concatenate([[0.0], np.cumsum(cs)])
                    frames = (c[w:] - c[:-w]) / w
                    starts = np.arange(len(frames), dtype=np.int64)
                out.append(ThreadScores(i, starts, frames, float(cs.mean()), len(cs), cs))
            return out
        # order-blind detectors: half-overlapping windows, plus the whole thread for its mean
        slices, owners = self._slices(seqs)
        win = self.detector.score(slices) if slices else np.empty(0)
        whole = self.detector.score(seqs) if seqs else np.empty(0)
        own = np.array([o[0] for o in owners], dtype=np.int64)
        st = np.array([o[1] for o in owners], dtype=np.int64)
        for i, s in enumerate(seqs):
            m = own == i
            out.append(ThreadScores(i, st[m], win[m], float(whole[i]), len(s)))
        return out

    def _n_frames(self, threads: Sequence[ThreadScores]) -> float:
        """Effective number of independent frames of a trace."""
        return max(1.0, sum(t.length for t in threads) / self.window)

    def _frame_stats(self, scores: F64, n_frames: float) -> F64:
        """``-log10`` of the chance that the worst of ``n_frames`` normal frames scores this high."""
        out: F64 = np.maximum(0.0, -(np.log10(n_frames) + self.frame_tail_.log10_sf(scores)))
        return out

    def _statistic(self, threads: Sequence[ThreadScores]) -> float:
        """Trace statistic: how improbable its worst frame (for its length) or worst thread mean is.

        In ``-log10`` probability units, so traces of any length and thread count compare fairly.
        """
        if not threads:
            return 0.0
        fmax = np.array([max(float(t.scores.max()) for t in threads)])
        frame = float(self._frame_stats(fmax, self._n_frames(threads))[0])
        means = np.array([t.mean for t in threads])
        mean = float(-(np.log10(len(threads)) + self.mean_tail_.log10_sf(means).min()))
        return max(frame, mean, 0.0)

    def window_magnitude(self, score: npt.ArrayLike) -> Any:
        """How far past the window threshold: 1 at threshold, 0 at the typical normal score."""
        c = self.window_center_
        return (np.asarray(score, dtype=np.float64) - c) / (self.window_threshold_ - c)

    def check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise ModelError("baseline is not fitted")

    def score_windows(self, seqs: Sequence[I32]) -> list[ThreadScores]:
        """Frame scores of each sequence (for the live monitor and plots)."""
        self.check_fitted()
        return self._thread_scores(seqs)

    def score_trace(self, trace: Trace, top: int = 5) -> Verdict:
        """Judge one trace: score, anomalous flag, severity, first anomaly time, top features."""
        self.check_fitted()
        thread_idx = [idx for _, idx in trace.events.threads()]
        thread_idx.sort(key=lambda ix: int(ix[0]))
        seqs = [trace.events.sid[ix] for ix in thread_idx]
        keep = [i for i, s in enumerate(seqs) if len(s)]
        seqs = [seqs[i] for i in keep]
        thread_idx = [thread_idx[i] for i in keep]
        threads = self._thread_scores(seqs)
        if not threads:
            return Verdict(trace.name, 0.0, self.trace_threshold_, False, "none", 0.0, None)
        stat = self._statistic(threads)
        score = stat
        set_driven = False
        novel: I32 = np.empty(0, dtype=np.int32)
        if self.set_novelty:
            dists, nearest = self.set_memory_.nearest(seqs)
            odd = int(np.argmax(dists))  # the thread with the most unusual call set
            z_stat, z_set = self._z_scores([stat], dists[odd : odd + 1])
            score = float(_stouffer(z_stat, z_set)[0])
            novel = self.set_memory_.novel_calls(seqs[odd], int(nearest[odd]))
            # the set term is at least as unusual as the statistic: say which calls made it so
            set_driven = bool(z_set[0] >= z_stat[0] and len(novel))
        anomalous = score > self.trace_threshold_
        # new calls in an anomalous trace are worth naming even when its order stood out more
        name_novel = len(novel) > 0 and (set_driven or anomalous)
        w = self.window
        n_windows = 0
        n_anom = 0
        first_ts: float | None = None
        sev_value = 0.0
        n_frames = self._n_frames(threads)
        for ts in threads:
            # non-overlapping windows (the last one included) for frequency counting
            mags = self.window_magnitude(ts.scores[self._independent(ts)])
            n_windows += len(mags)
            n_anom += int((mags > 1.0).sum())
            v, _ = severity_of_windows(mags)
            sev_value = max(sev_value, v)
            if not anomalous:
                continue
            # the start of the anomalous episode around this thread's worst frame: the first of
            # the consecutive frames that each alone make the trace anomalous (an isolated
            # borderline frame long before is not where the anomaly began)
            over = self._frame_stats(ts.scores, n_frames) > self.statistic_threshold_
            peak = int(np.argmax(ts.scores))
            if over[peak]:
                calm = np.flatnonzero(~over[:peak])
                first = int(calm[-1]) + 1 if len(calm) else 0
                t0 = self._peak_time(trace, thread_idx[ts.tid_index], ts, first)
                if t0 is not None and (first_ts is None or t0 < first_ts):
                    first_ts = t0
        if anomalous and sev_value < 1.0:
            sev_value = max(1.0, score / max(self.trace_threshold_, 1e-9))
        if not anomalous:
            sev_value = 0.0
        severity = level_of(sev_value) if anomalous else "none"
        # explanation from the worst frame of the worst thread
        worst = max(threads, key=lambda t: float(t.scores.max()))
        a = int(worst.starts[int(np.argmax(worst.scores))])
        # explain the worst frame, scored with preceding context that is not itself reported
        ctx = min(a, 16)
        seg = seqs[worst.tid_index][a - ctx : a + w]
        contribs: list[Contribution] = (
            self.detector.explain(seg, top, context=ctx) if len(seg) else []
        )
        if name_novel:
            # name the calls no similar normal thread makes (first when the call set is what
            # stands out most), and date the anomaly from the first of them
            names = " ".join(name_of(int(c)) for c in novel)
            contribs.insert(
                0 if set_driven else 1,
                Contribution(
                    f"calls its nearest normal thread never makes: {names}",
                    float(dists[odd]),
                    len(novel),
                ),
            )
            if anomalous:
                pos = int(np.argmax(np.isin(seqs[odd], novel)))
                t_new = float(trace.events.ts[int(thread_idx[odd][pos])])
                if not math.isnan(t_new) and (first_ts is None or t_new < first_ts):
                    first_ts = t_new
        if anomalous and first_ts is None:
            first_ts = self._peak_time(
                trace, thread_idx[worst.tid_index], worst, int(np.argmax(worst.scores))
            )
        return Verdict(
            trace=trace.name,
            score=round(score, 6),
            threshold=round(self.trace_threshold_, 6),
            anomalous=bool(anomalous),
            severity=severity,
            severity_value=round(sev_value, 4),
            first_anomaly_ts=first_ts,
            top=[c.as_dict() for c in contribs],
            windows=n_windows,
            anomalous_windows=n_anom,
            calls=int(sum(t.length for t in threads)),
        )

    def _peak_time(
        self, trace: Trace, idx: npt.NDArray[np.intp], ts: ThreadScores, frame: int
    ) -> float | None:
        """Time of the most anomalous call in frame ``frame`` of a thread (its start if unknown)."""
        a = int(ts.starts[frame])
        if ts.calls is not None and len(ts.calls):
            seg = ts.calls[a : a + self.window]
            a += int(np.argmax(seg)) if len(seg) else 0
        t0 = float(trace.events.ts[int(idx[min(a, len(idx) - 1)])])
        return None if math.isnan(t0) else t0

    def trace_scores(self, traces: Sequence[Sequence[I32]]) -> F64:
        """Trace score for many traces given as per-thread sequences (batched, for eval).

        The trace statistic, or with ``set_novelty`` its combination with the set distance:
        either way comparable with ``trace_threshold_``.
        """
        self.check_fitted()
        flat = [s for seqs in traces for s in seqs if len(s)]
        owner = np.repeat(
            np.arange(len(traces)), [sum(1 for s in seqs if len(s)) for seqs in traces]
        )
        threads = self._thread_scores(flat)
        groups: list[list[ThreadScores]] = [[] for _ in traces]
        for t, o in zip(threads, owner, strict=True):
            groups[int(o)].append(t)
        stats = np.array([self._statistic(g) for g in groups])
        if self.set_novelty:
            return self._fuse(stats, self._set_distances(traces))
        return stats

    # ------------------------------------------------------------------ persistence
    def thresholds(self) -> dict[str, float]:
        return {
            "window": self.window_threshold_,
            "window_center": self.window_center_,
            "mean": self.mean_threshold_,
            "mean_center": self.mean_center_,
            "trace": self.trace_threshold_,
        }

    def tails(self) -> dict[str, Any]:
        return {"frame": self.frame_tail_.state(), "mean": self.mean_tail_.state()}

    def save(self, path: str | Path, history: list[dict[str, Any]] | None = None) -> str:
        """Save detector + thresholds as one artefact; returns its ``model_id``."""
        self.check_fitted()
        det_meta, arrays = self.detector.state()
        meta: dict[str, Any] = {
            "detector": det_meta,
            "params": {
                "window": self.window,
                "target_far": self.target_far,
                "holdout": self.holdout,
                "seed": self.seed,
            },
            "thresholds": self.thresholds(),
            "tails": self.tails(),
            "calibration": self.calibration_,
            "n_fit_calls": self.n_fit_calls_,
            "n_traces": self.n_traces_,
            "history": history if history is not None else getattr(self, "history_", []),
        }
        if self.set_novelty:
            # only when on, so that baselines without it keep their content and model_id
            meta["params"]["set_novelty"] = True
            meta["set_novelty"] = {
                "statistic_threshold": self.statistic_threshold_,
                "statistic_tail": self.statistic_tail_.state(),
                "set_tail": self.set_tail_.state(),
            }
            own = self.set_memory_.arrays(_SET_ARRAYS)
            if own.keys() & arrays.keys():
                raise ModelError("detector arrays clash with the baseline's set-novelty arrays")
            arrays = {**arrays, **own}
        mid = save_artifact(path, "baseline", meta, arrays)
        self.model_id_ = mid
        return mid

    @classmethod
    def load(cls, path: str | Path, expect_model_id: str | None = None) -> Baseline:
        """Load and verify a saved baseline (refused if altered or not the expected id)."""
        meta, arrays, mid = load_artifact(path, "baseline", expect_model_id)
        try:
            det = Detector.from_state(meta["detector"], arrays)
            b = cls(det, **meta["params"])
            th = meta["thresholds"]
            b.window_threshold_ = float(th["window"])
            b.mean_threshold_ = float(th["mean"])
            b.window_center_ = float(th["window_center"])
            b.mean_center_ = float(th["mean_center"])
            b.frame_tail_ = TailModel.from_state(meta["tails"]["frame"])
            b.mean_tail_ = TailModel.from_state(meta["tails"]["mean"])
            b.trace_threshold_ = float(th["trace"])
            b.calibration_ = dict(meta.get("calibration", {}))
            b.n_fit_calls_ = int(meta.get("n_fit_calls", 0))
            b.n_traces_ = int(meta.get("n_traces", 0))
            b.history_ = list(meta.get("history", []))
            b.statistic_threshold_ = b.trace_threshold_
            if b.set_novelty:
                sn = meta["set_novelty"]
                b.statistic_threshold_ = float(sn["statistic_threshold"])
                b.statistic_tail_ = TailModel.from_state(sn["statistic_tail"])
                b.set_tail_ = TailModel.from_state(sn["set_tail"])
                b.set_memory_ = SetMemory.from_arrays(arrays, _SET_ARRAYS)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{path}: baseline metadata is incomplete: {e}") from None
        b.model_id_ = mid
        b.fitted_ = True
        return b


def make_baseline(name: str, window: int = 100, target_far: float = 0.01) -> Baseline:
    """An unfitted baseline by detector name (``catlm``...; ``catlm+set`` adds set novelty)."""
    set_novelty = name.endswith(SET_SUFFIX)
    det = make_detector(name.removesuffix(SET_SUFFIX) if set_novelty else name)
    return Baseline(det, window=window, target_far=target_far, set_novelty=set_novelty)


def _stouffer(z_stat: F64, z_set: F64) -> F64:
    """Stouffer's combination of two z-scores (equal weights)."""
    out: F64 = (z_stat + z_set) / math.sqrt(2.0)
    return out


def _z(log10_p: F64, n: int) -> F64:
    """The standard normal quantile with upper tail ``10**log10_p`` (exact for tiny p).

    ``p`` is at most ``n / (n + 1)`` (``n`` calibration traces), as a conformal p-value: a
    value at or below everything calibrated is "typical", not evidence of normality strong
    enough to cancel an overwhelming other term.
    """
    p = np.clip(np.power(10.0, log10_p), 1e-300, n / (n + 1.0))
    out: F64 = -ndtri(p)
    return out


def _above(threshold: float, center: float) -> float:
    """Magnitudes divide by ``threshold - center``: keep the threshold strictly above."""
    return max(threshold, center + max(abs(center) * 1e-6, 1e-9))
