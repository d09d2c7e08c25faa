"""Adaptive baseline: keep learning the workload's normal behaviour without learning the attack.

A baseline profiled once goes stale: software is upgraded, the job mix changes, and the false
alarms that follow teach operators to ignore BAM. Learning online fixes that, but hands the
attacker a lever: anything BAM learns from stops being anomalous. So every window must earn its
way into the training data, and the amount learned is bounded:

* **guard**: a window is a learning candidate only if its magnitude (1 = at the alarm threshold)
  is at most ``guard`` (0.8 by default). A window that alarms, or nearly does, is never learned.
* **alert quarantine**: no window within ``cooldown`` windows of an anomalous one is learned,
  before *or* after it (the prelude of an attack scores just below threshold), and no update runs
  while an alert is open.
* **probation**: a candidate is learned only once ``probation`` windows (default two update
  intervals) have passed after it without it being purged. A slow ramp is detected only some
  hundreds of windows after it starts; probation makes that delay cost the attacker, because
  everything still on probation is discarded when drift is detected or an alert opens nearby.
* **drift = stop**: window magnitudes feed a Page-Hinkley test (:mod:`bam.detect.drift`). A
  sustained rise of the mean is either a changed workload or someone slowly poisoning the
  baseline with just-normal-enough windows; from the inside the two look the same. So drift is
  not learned: auto-learning stops, every candidate still on probation is discarded, and a
  finding asks an operator, who either acknowledges it (learning resumes from the present) or
  rolls back to ``finding["rollback_to"]``, the last version that learned nothing from after
  the estimated change point. The detector is never reset by updates, so a campaign that keeps
  each step within the update budget still accumulates evidence.
* **bounded rate**: one update per ``min_interval`` windows at most, and each adds at most
  ``max_update_fraction`` of the current corpus (in calls). Candidates are a uniform bottom-k
  sample of the period (random keys), so an attacker's share of what is learned is at most
  their share of the stream, and a burst cannot crowd out the rest of the period.
* **bounded memory, fixed anchor**: the corpus is capped; the oldest adapted data is evicted
  first, the original profiling data never is, so the baseline cannot be walked arbitrarily far
  from what was profiled.

An update refits a fresh detector of the same kind and parameters (and a Baseline with the same
window, target false-alarm rate, hold-out fraction and seed) on corpus + accepted windows through
:meth:`Baseline.fit`, so the thresholds are recalibrated on held-out normal data by Baseline's own
split. The number of traces handed to it never changes (adapted windows join the profiled runs
round-robin, see :meth:`_Corpus.traces`), so every profiled run keeps its fit/calibration role
and the thresholds before and after an update differ because of what was learned, not because
the split was reshuffled. Each update (or rollback) appends a history entry: what was added and
evicted, the stream position of the newest learned window, the model ids and thresholds before
and after, the drift state. The history is saved with the baseline; :meth:`AdaptiveBaseline.save`
stores baseline, corpus, pending candidates and guard state in one ``adaptive-baseline``
artefact, so a restart can forget neither an open alert or drift nor the data the model was
built from.

Model ids in the history identify the detector + thresholds: the id that
``Baseline.save(path, history=[])`` gives (a history cannot contain the id of the file that
contains it).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bam.detect.baseline import Baseline
from bam.detect.drift import PageHinkley
from bam.errors import ModelError
from bam.events import SyscallBatch, Trace
from bam.models.base import Detector
from bam.models.persistence import load_artifact, save_artifact

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

KIND = "adaptive-baseline"
_BASELINE_PREFIX = "baseline."

#: Why a window was or was not taken as a learning candidate (codes in ``Observation.reasons``).
REASONS = ("accepted", "anomalous", "above-guard", "drift", "alert-open", "empty")
ACCEPTED, ANOMALOUS, ABOVE_GUARD, DRIFT, ALERT_OPEN, EMPTY = range(len(REASONS))


@dataclass
class Observation:
    """What :meth:`AdaptiveBaseline.observe` decided for one batch of windows.

    ``magnitudes`` are NaN for empty windows; ``reasons`` index :data:`REASONS`.
    """

    magnitudes: F64
    reasons: npt.NDArray[np.int8]
    drift: bool = False
    findings: list[dict[str, Any]] = field(default_factory=list)
    update: dict[str, Any] | None = None

    @property
    def accepted(self) -> npt.NDArray[np.bool_]:
        """Windows taken as learning candidates."""
        out: npt.NDArray[np.bool_] = self.reasons == ACCEPTED
        return out

    @property
    def anomalous(self) -> npt.NDArray[np.bool_]:
        """Windows past the alarm threshold."""
        out: npt.NDArray[np.bool_] = self.reasons == ANOMALOUS
        return out

    def reason_names(self) -> list[str]:
        """The reason of each window, by name."""
        return [REASONS[int(r)] for r in self.reasons]


class _Corpus:
    """Training sequences with their group (a profiled run, or one adapted window) and origin
    (0 = original profile, ``v`` = added by the update that produced version ``v``)."""

    def __init__(self, seqs: list[I32], group: I64, origin: I64) -> None:
        self.seqs = seqs
        self.group = group
        self.origin = origin
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)

    @property
    def calls(self) -> int:
        return int(self.lengths.sum())

    @property
    def original_calls(self) -> int:
        return int(self.lengths[self.origin == 0].sum())

    def extended(self, seqs: list[I32], version: int) -> _Corpus:
        """A new corpus with ``seqs`` appended, each its own group."""
        g0 = int(self.group.max()) + 1 if len(self.group) else 0
        return _Corpus(
            self.seqs + seqs,
            np.concatenate([self.group, np.arange(g0, g0 + len(seqs), dtype=np.int64)]),
            np.concatenate([self.origin, np.full(len(seqs), version, dtype=np.int64)]),
        )

    def subset(self, keep: npt.NDArray[np.bool_]) -> _Corpus:
        idx = np.flatnonzero(keep)
        return _Corpus([self.seqs[i] for i in idx], self.group[idx], self.origin[idx])

    def capped(self, max_calls: int) -> tuple[_Corpus, int, int]:
        """Evict the oldest adapted sequences until within ``max_calls``; never the originals.

        Returns ``(corpus, windows_evicted, calls_evicted)``.
        """
        excess = self.calls - max_calls
        if excess <= 0:
            return self, 0, 0
        adapted = np.flatnonzero(self.origin > 0)
        # oldest first: by origin version, then position (stable)
        order = adapted[np.argsort(self.origin[adapted], kind="stable")]
        freed = np.cumsum(self.lengths[order])
        n_evict = min(int(np.searchsorted(freed, excess)) + 1, len(order))
        keep = np.ones(len(self.seqs), dtype=np.bool_)
        keep[order[:n_evict]] = False
        return self.subset(keep), n_evict, int(self.lengths[order[:n_evict]].sum())

    def traces(self) -> list[Trace]:
        """The corpus as traces for :meth:`Baseline.fit`: one per profiled run, in a fixed order.

        Adapted windows join the runs round-robin (by group id) as extra threads, so the number
        of traces, and with it Baseline's deterministic fit/calibration split, never changes:
        every profiled run keeps its role across updates, and thresholds before and after an
        update differ because of what was learned, not because the split was reshuffled. The
        adapted windows that land in held-out runs are calibration data, as they should be: new
        normal data the refitted model has not seen.
        """
        orig = self.origin == 0
        runs, first = np.unique(self.group[orig], return_index=True)
        runs = runs[np.argsort(first, kind="stable")]
        rank = np.empty(int(runs.max()) + 1, dtype=np.int64)
        rank[runs] = np.arange(len(runs))
        bucket = np.where(orig, rank[np.where(orig, self.group, 0)], self.group % len(runs))
        out: list[Trace] = []
        for r in range(len(runs)):
            members = np.flatnonzero(bucket == r)
            lens = self.lengths[members]
            sid = np.concatenate([self.seqs[i] for i in members]).astype(np.int32, copy=False)
            tid = np.repeat(np.arange(len(members), dtype=np.int32), lens)
            ev = SyscallBatch(
                ts=np.arange(len(sid), dtype=np.float64),
                pid=np.zeros(len(sid), dtype=np.int32),
                tid=tid,
                sid=sid,
            )
            out.append(Trace(f"run-{int(runs[r])}", ev))
        return out

    def arrays(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        return _pack(self.seqs, prefix) | {
            f"{prefix}group": self.group,
            f"{prefix}origin": self.origin,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.NDArray[Any]], prefix: str) -> _Corpus:
        seqs = _unpack(arrays, prefix)
        group = np.asarray(arrays[f"{prefix}group"], dtype=np.int64)
        origin = np.asarray(arrays[f"{prefix}origin"], dtype=np.int64)
        if len(group) != len(seqs) or len(origin) != len(seqs):
            raise ValueError(f"{prefix} arrays disagree on the number of sequences")
        return cls(seqs, group, origin)


class AdaptiveBaseline:
    """A :class:`Baseline` that learns from the windows it judges normal, guarded against poisoning.

    ``corpus`` is the normal data ``baseline`` was profiled on (int32 syscall-id sequences, e.g.
    every thread of every profiled run); ``groups`` names the run of each sequence so that
    recalibration holds out whole runs (default: each sequence is its own run). Use
    :meth:`from_traces` when you have the traces themselves.

    Windows are counted in stream order (``n_seen_``); all intervals are in windows:
    ``guard`` (magnitude above which a window is never learned), ``cooldown`` (alert quarantine
    either side of an anomalous window), ``min_interval`` (between updates), ``probation``
    (age before a candidate may be learned; default ``2 * min_interval``),
    ``max_update_fraction`` (calls learned per update / corpus calls), ``min_update_windows``
    (fewer eligible candidates: no update), ``max_corpus_calls`` (cap; default 3x the original
    corpus), ``max_pending`` (candidates kept between updates, a uniform sample), ``drift``
    (the drift test, fed window magnitudes clipped to ``±drift_clip`` so that one wild window
    cannot fake a trend), ``auto_update`` (update from :meth:`observe` when allowed), ``seed``
    (sampling of candidates; decisions are deterministic given the stream).
    """

    def __init__(
        self,
        baseline: Baseline,
        corpus: Sequence[I32],
        groups: npt.ArrayLike | None = None,
        *,
        guard: float = 0.8,
        cooldown: int = 20,
        max_update_fraction: float = 0.1,
        min_interval: int = 200,
        probation: int | None = None,
        min_update_windows: int = 10,
        max_corpus_calls: int | None = None,
        max_pending: int = 10_000,
        drift: PageHinkley | None = None,
        drift_clip: float = 2.0,
        auto_update: bool = True,
        seed: int = 0,
    ) -> None:
        baseline.check_fitted()
        seqs = [np.ascontiguousarray(s, dtype=np.int32) for s in corpus if len(s)]
        if not seqs:
            raise ModelError("an adaptive baseline needs the normal corpus it was profiled on")
        if not 0.0 < guard <= 1.0:
            raise ValueError(
                "guard must be in (0, 1]: learning from anomalous windows is poisoning"
            )
        if cooldown < 0 or min_interval < 1 or min_update_windows < 1 or max_pending < 1:
            raise ValueError(
                "cooldown >= 0, min_interval >= 1, min_update_windows >= 1 and "
                "max_pending >= 1 are required"
            )
        if not 0.0 < max_update_fraction <= 1.0:
            raise ValueError("max_update_fraction must be in (0, 1]")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        if drift_clip <= 0:
            raise ValueError("drift_clip must be > 0")
        if probation is not None and probation < 0:
            raise ValueError("probation must be >= 0 windows")
        if groups is None:
            group = np.arange(len(seqs), dtype=np.int64)
        else:
            g = [int(x) for x, s in zip(np.asarray(groups).ravel(), corpus, strict=True) if len(s)]
            group = np.unique(np.array(g, dtype=np.int64), return_inverse=True)[1].astype(np.int64)
        self.corpus_ = _Corpus(seqs, group, np.zeros(len(seqs), dtype=np.int64))
        original = self.corpus_.calls
        cap = 3 * original if max_corpus_calls is None else int(max_corpus_calls)
        if cap < original:
            raise ValueError(
                f"max_corpus_calls {cap} is below the original corpus ({original} calls), "
                "which is never evicted"
            )
        self.baseline = baseline
        self.guard = float(guard)
        self.cooldown = int(cooldown)
        self.max_update_fraction = float(max_update_fraction)
        self.min_interval = int(min_interval)
        self.probation = 2 * self.min_interval if probation is None else int(probation)
        self.min_update_windows = int(min_update_windows)
        self.max_corpus_calls = cap
        self.max_pending = int(max_pending)
        self.drift = drift if drift is not None else PageHinkley()
        self.drift.reset()  # it watches this baseline's stream from its first window
        self.drift_clip = float(drift_clip)
        self.auto_update = auto_update
        self.seed = seed
        self.history_: list[dict[str, Any]] = list(getattr(baseline, "history_", []))
        self.findings_: list[dict[str, Any]] = []
        self.version_ = max((int(h.get("version", 0)) for h in self.history_), default=0)
        self.base_version_ = self.version_  # the version the given corpus corresponds to
        self.n_seen_ = 0  # non-empty windows observed (the stream clock)
        self.drift_offset_ = 0  # stream index of the drift detector's first value
        self.last_anomaly_: int | None = None
        self.last_update_at_ = 0
        self.drift_open_: dict[str, Any] | None = None  # the open drift finding, if any
        self.last_blocked_: str | None = None
        self.model_id_: str | None = None  # content id of the current baseline (lazy)
        self._clear_pending()

    @classmethod
    def from_traces(
        cls, baseline: Baseline, traces: Sequence[Trace], **kw: Any
    ) -> AdaptiveBaseline:
        """Wrap ``baseline`` with the profiled ``traces`` as its corpus (a group per trace)."""
        seqs: list[I32] = []
        groups: list[int] = []
        for i, t in enumerate(traces):
            for s in t.sequences():
                seqs.append(s)
                groups.append(i)
        return cls(baseline, seqs, groups, **kw)

    # ------------------------------------------------------------------ state views
    @property
    def alert_open(self) -> bool:
        """An anomalous window was seen within the last ``cooldown`` windows."""
        return self.last_anomaly_ is not None and self.n_seen_ - self.last_anomaly_ <= self.cooldown

    @property
    def drift_open(self) -> bool:
        """A drift finding awaits an operator; auto-learning is suspended until then."""
        return self.drift_open_ is not None

    @property
    def corpus_calls(self) -> int:
        return self.corpus_.calls

    @property
    def pending_windows(self) -> int:
        return len(self._p_seqs)

    def update_blocker(self) -> str | None:
        """Why an update cannot run now (``None`` if it can)."""
        if self.drift_open:
            return "drift"
        if self.alert_open:
            return "alert-open"
        if self.n_seen_ - self.last_update_at_ < self.min_interval:
            return "interval"
        if int(self._eligible().sum()) < self.min_update_windows:
            return "too-few-candidates"
        return None

    # ------------------------------------------------------------------ observing
    def observe(
        self, seqs: Sequence[I32], scores: npt.ArrayLike | None = None, now: float | None = None
    ) -> Observation:
        """Judge a batch of windows (in stream order) as learning candidates.

        ``scores``, if the caller already has them, are each window's raw score under the
        *current* ``self.baseline`` (the max frame score of :meth:`Baseline.score_windows`);
        otherwise the windows are scored here. May run an update (``auto_update``).
        """
        seqs = [np.ascontiguousarray(s, dtype=np.int32) for s in seqs]
        nonempty = np.array([len(s) > 0 for s in seqs], dtype=np.bool_)
        mags_all = np.full(len(seqs), np.nan)
        reasons_all = np.full(len(seqs), EMPTY, dtype=np.int8)
        live = np.flatnonzero(nonempty)
        obs = Observation(mags_all, reasons_all)
        if not len(live):
            return obs
        win = [seqs[i] for i in live]
        if scores is None:
            raw = np.array([t.scores.max() for t in self.baseline.score_windows(win)])
        else:
            raw = np.asarray(scores, dtype=np.float64).ravel()
            if len(raw) != len(seqs):
                raise ValueError(f"{len(raw)} scores for {len(seqs)} windows")
            raw = raw[live]
        mags = np.asarray(self.baseline.window_magnitude(raw), dtype=np.float64)
        if not np.all(np.isfinite(mags)):
            raise ValueError("window scores must be finite")
        k = len(win)
        g = self.n_seen_ + np.arange(k, dtype=np.int64)
        anomalous = mags > 1.0
        reasons = np.full(k, ACCEPTED, dtype=np.int8)

        # Alert quarantine: within `cooldown` windows of an anomaly, before or after it.
        big = np.iinfo(np.int64).max // 4
        prev_seed = self.last_anomaly_ if self.last_anomaly_ is not None else -big
        at = np.where(anomalous, g, -big)
        prev = np.maximum.accumulate(np.concatenate(([prev_seed], at)))[:-1]
        nxt = np.minimum.accumulate(np.where(anomalous, g, big)[::-1])[::-1]
        nxt = np.concatenate((nxt[1:], [big]))
        near = (g - prev <= self.cooldown) | (nxt - g <= self.cooldown)
        reasons[near] = ALERT_OPEN
        if anomalous.any():
            first = int(g[np.argmax(anomalous)])
            self._drop_pending(self._p_idx >= first - self.cooldown)
            self.last_anomaly_ = int(g[anomalous][-1])

        # Drift: a sustained rise of the magnitudes stops learning until an operator looks.
        was_open = self.drift_open
        fed = np.clip(mags, -self.drift_clip, self.drift_clip)
        hits = np.flatnonzero(self.drift.update_many(fed))
        for h in hits:
            det = dict(self.drift.last_detection_ or {})
            began = self.drift_offset_ + int(det.get("began", h))
            if self.drift_open_ is None:
                self.drift_open_ = self._drift_finding(int(g[h]), began, det, now)
                obs.findings.append(self.drift_open_)
                self.findings_.append(self.drift_open_)
            else:  # still rising while the operator has not looked: one finding, escalated
                self.drift_open_["escalations"] += 1
                self.drift_open_["last_window"] = int(g[h])
                self.drift_open_["statistic"] = max(
                    self.drift_open_["statistic"], float(det.get("statistic", 0.0))
                )
            obs.drift = True
        if was_open or obs.drift:
            # everything still on probation (this batch included) is suspect, not just what
            # followed the change-point estimate, which lags on a slow ramp
            self._clear_pending()
            reasons[:] = DRIFT

        reasons[mags > self.guard] = ABOVE_GUARD
        reasons[anomalous] = ANOMALOUS
        self._add_pending(
            [win[i] for i in np.flatnonzero(reasons == ACCEPTED)], g[reasons == ACCEPTED]
        )
        self.n_seen_ += k
        mags_all[live] = mags
        reasons_all[live] = reasons
        if self.auto_update and self.update_blocker() is None:
            obs.update = self.update(now=now, reason="scheduled")
        return obs

    def _drift_finding(
        self, window: int, began: int, det: dict[str, Any], now: float | None
    ) -> dict[str, Any]:
        # Updates that learned data from after the change began may carry poisoned data.
        safe = [
            int(h["version"])
            for h in self.history_
            if int(h["version"]) > self.base_version_ and int(h["learned_through"]) <= began
        ]
        return {
            "kind": "baseline-drift",
            "time": time.time() if now is None else float(now),
            "window": window,
            "change_began": began,
            "statistic": float(det.get("statistic", math.nan)),
            "reference_mean": float(det.get("mean", math.nan)),
            "version": self.version_,
            "rollback_to": max(safe, default=self.base_version_),
            "escalations": 0,
            "last_window": window,
            "message": (
                "sustained rise of window anomaly scores (workload change or slow poisoning); "
                "auto-learning suspended until an operator acknowledges or rolls back"
            ),
        }

    # ------------------------------------------------------------------ pending candidates
    def _clear_pending(self) -> None:
        self._p_seqs: list[I32] = []
        self._p_idx = np.empty(0, dtype=np.int64)
        self._p_key = np.empty(0, dtype=np.float64)

    def _add_pending(self, seqs: list[I32], idx: I64) -> None:
        if not seqs:
            return
        self._p_seqs += seqs
        self._p_idx = np.concatenate([self._p_idx, idx])
        # Keys derive from the stream position, not from hidden RNG state: a reloaded
        # adaptive baseline makes exactly the choices the saved one would have made.
        rng = np.random.default_rng([self.seed, int(idx[0])])
        self._p_key = np.concatenate([self._p_key, rng.random(len(seqs))])
        if len(self._p_seqs) > self.max_pending:
            # bottom-k by random key = a uniform sample of every candidate since the last update
            keep = np.zeros(len(self._p_seqs), dtype=np.bool_)
            keep[np.argpartition(self._p_key, self.max_pending - 1)[: self.max_pending]] = True
            self._drop_pending(~keep)

    def _eligible(self) -> npt.NDArray[np.bool_]:
        """Candidates whose probation is over (seen at least ``probation`` windows ago)."""
        out: npt.NDArray[np.bool_] = self._p_idx < self.n_seen_ - self.probation
        return out

    def _drop_pending(self, drop: npt.NDArray[np.bool_]) -> None:
        if not drop.any():
            return
        keep = np.flatnonzero(~drop)
        self._p_seqs = [self._p_seqs[i] for i in keep]
        self._p_idx = self._p_idx[keep]
        self._p_key = self._p_key[keep]

    # ------------------------------------------------------------------ updating
    def update(self, now: float | None = None, reason: str = "manual") -> dict[str, Any] | None:
        """Learn from the pending candidates if the guards allow; the history entry, or None.

        When refused, ``last_blocked_`` says why (see :meth:`update_blocker`, plus ``budget``).
        """
        self.last_blocked_ = self.update_blocker()
        if self.last_blocked_ is not None:
            return None
        budget = int(self.max_update_fraction * self.corpus_.calls)
        lens = np.array([len(s) for s in self._p_seqs], dtype=np.int64)
        eligible = self._eligible()
        order = np.flatnonzero(eligible)
        order = order[np.argsort(self._p_key[order], kind="stable")]  # uniform over the period
        take = np.sort(order[np.cumsum(lens[order]) <= budget])
        if not len(take):
            self.last_blocked_ = "budget"
            return None
        added = [self._p_seqs[i] for i in take]
        version = self.version_ + 1
        grown = self.corpus_.extended(added, version)
        corpus, n_evicted, calls_evicted = grown.capped(self.max_corpus_calls)
        entry = self._refit(corpus, now, reason, version)
        entry.update(
            windows_added=len(added),
            calls_added=int(lens[take].sum()),
            windows_evicted=n_evicted,
            calls_evicted=calls_evicted,
            candidates=int(eligible.sum()),
            learned_through=int(self._p_idx[take].max()) + 1,
        )
        # Eligible candidates not drawn are dropped (the next period gets a fresh sample);
        # those still on probation stay, re-judged by the model that would learn from them.
        self._drop_pending(eligible)
        self._recheck_pending()
        return entry

    def _recheck_pending(self) -> None:
        if not self._p_seqs:
            return
        raw = np.array([t.scores.max() for t in self.baseline.score_windows(self._p_seqs)])
        self._drop_pending(np.asarray(self.baseline.window_magnitude(raw)) > self.guard)

    def rollback(self, to_version: int, now: float | None = None) -> dict[str, Any]:
        """Discard the data adapted by updates after ``to_version`` and refit (operator action,
        e.g. when a drift finding turns out to be poisoning: ``finding["rollback_to"]``)."""
        if not self.base_version_ <= to_version <= self.version_:
            raise ValueError(f"to_version must be in {self.base_version_}..{self.version_}")
        keep = self.corpus_.origin <= to_version
        removed = self.corpus_.subset(~keep)
        entry = self._refit(self.corpus_.subset(keep), now, "rollback", self.version_ + 1)
        entry.update(
            windows_added=0,
            calls_added=0,
            windows_evicted=len(removed.seqs),
            calls_evicted=removed.calls,
            candidates=0,
            rollback_to=to_version,
            learned_through=next(
                (
                    int(h["learned_through"])
                    for h in self.history_
                    if h["version"] == to_version and to_version > self.base_version_
                ),
                0,
            ),
        )
        self._clear_pending()
        return entry

    def acknowledge_drift(self, note: str = "", now: float | None = None) -> dict[str, Any]:
        """An operator has reviewed the open drift finding: resume learning from the present.

        The drift detector restarts so that the current behaviour becomes its reference.
        """
        if self.drift_open_ is None:
            raise ModelError("no drift finding is open")
        ack = {
            "kind": "drift-acknowledged",
            "time": time.time() if now is None else float(now),
            "window": self.n_seen_,
            "finding_window": self.drift_open_["window"],
            "note": note,
        }
        self.findings_.append(ack)
        self.drift_open_ = None
        self.drift.reset()
        self.drift_offset_ = self.n_seen_
        return ack

    def _refit(
        self, corpus: _Corpus, now: float | None, reason: str, version: int
    ) -> dict[str, Any]:
        """Fit a fresh baseline (same detector kind/params, same Baseline params) on ``corpus``,
        swap it in atomically and append the history entry."""
        old = self.baseline
        det = Detector.from_state(*old.detector.state())  # same kind, params and structure
        new = Baseline(
            det,
            window=old.window,
            target_far=old.target_far,
            holdout=old.holdout,
            seed=old.seed,
            set_novelty=old.set_novelty,
        ).fit(corpus.traces())
        old_id = self.model_id_ or _content_id(old)
        new_id = _content_id(new)
        entry: dict[str, Any] = {
            "version": version,
            "time": time.time() if now is None else float(now),
            "reason": reason,
            "window": self.n_seen_,
            "corpus_calls_before": self.corpus_.calls,
            "corpus_calls_after": corpus.calls,
            "old_model_id": old_id,
            "new_model_id": new_id,
            "thresholds_before": old.thresholds(),
            "thresholds_after": new.thresholds(),
            "drift_state": {
                "open": self.drift_open,
                "statistic": self.drift.statistic_,
                "mean": self.drift.mean_,
                "n": self.drift.n_,
                "detections": self.drift.detections_,
            },
        }
        self.history_.append(entry)
        new.history_ = self.history_
        self.baseline = new
        self.corpus_ = corpus
        self.version_ = version
        self.model_id_ = new_id
        self.last_update_at_ = self.n_seen_
        return entry

    # ------------------------------------------------------------------ persistence
    def _open_finding_index(self) -> int:
        return next(i for i, f in enumerate(self.findings_) if f is self.drift_open_)

    def export_baseline(self, path: str | Path) -> str:
        """Save the current baseline alone (with its history) for ``bam score``; its model_id."""
        return self.baseline.save(path, history=self.history_)

    def save(self, path: str | Path) -> str:
        """Save baseline (with history), corpus, candidates and guard state; the ``model_id``."""
        b_meta, b_arrays, b_id = _baseline_artifact(self.baseline, self.history_)
        meta = {
            "baseline": b_meta,
            "baseline_model_id": b_id,
            "params": {
                "guard": self.guard,
                "cooldown": self.cooldown,
                "max_update_fraction": self.max_update_fraction,
                "min_interval": self.min_interval,
                "probation": self.probation,
                "min_update_windows": self.min_update_windows,
                "max_corpus_calls": self.max_corpus_calls,
                "max_pending": self.max_pending,
                "drift_clip": self.drift_clip,
                "auto_update": self.auto_update,
                "seed": self.seed,
            },
            "state": {
                "version": self.version_,
                "base_version": self.base_version_,
                "n_seen": self.n_seen_,
                "drift_offset": self.drift_offset_,
                "last_anomaly": self.last_anomaly_,
                "last_update_at": self.last_update_at_,
                # index of the open drift finding in `findings` (the same object, escalated)
                "drift_open": None if self.drift_open_ is None else self._open_finding_index(),
                "model_id": self.model_id_,
            },
            "drift": self.drift.state(),
            "findings": self.findings_,
        }
        arrays = {_BASELINE_PREFIX + k: v for k, v in b_arrays.items()}
        arrays |= self.corpus_.arrays("corpus.")
        arrays |= _pack(self._p_seqs, "pending.") | {
            "pending.idx": self._p_idx,
            "pending.key": self._p_key,
        }
        return save_artifact(path, KIND, meta, arrays)

    @classmethod
    def load(cls, path: str | Path, expect_model_id: str | None = None) -> AdaptiveBaseline:
        """Load and verify an adaptive baseline (refused if altered or not the expected id)."""
        meta, arrays, _ = load_artifact(path, KIND, expect_model_id)
        try:
            n = len(_BASELINE_PREFIX)
            b_arrays = {k[n:]: v for k, v in arrays.items() if k.startswith(_BASELINE_PREFIX)}
            baseline = _baseline_from_artifact(
                meta["baseline"], b_arrays, str(meta["baseline_model_id"])
            )
            corpus = _Corpus.from_arrays(arrays, "corpus.")
            p = dict(meta["params"])
            st = meta["state"]
            obj = cls(baseline, corpus.seqs[:1], drift=PageHinkley(), **p)
            obj.corpus_ = corpus
            obj.drift = PageHinkley.from_state(meta["drift"])
            obj.findings_ = list(meta.get("findings", []))
            obj.version_ = int(st["version"])
            obj.base_version_ = int(st["base_version"])
            obj.n_seen_ = int(st["n_seen"])
            obj.drift_offset_ = int(st["drift_offset"])
            la = st["last_anomaly"]
            obj.last_anomaly_ = None if la is None else int(la)
            obj.last_update_at_ = int(st["last_update_at"])
            do = st["drift_open"]
            obj.drift_open_ = None if do is None else obj.findings_[int(do)]
            obj.model_id_ = st["model_id"]
            obj._p_seqs = _unpack(arrays, "pending.")
            obj._p_idx = np.asarray(arrays["pending.idx"], dtype=np.int64)
            obj._p_key = np.asarray(arrays["pending.key"], dtype=np.float64)
            if not len(obj._p_seqs) == len(obj._p_idx) == len(obj._p_key):
                raise ValueError("pending arrays disagree on the number of windows")
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(
                f"{path}: adaptive baseline is incomplete or inconsistent: {e}"
            ) from None
        return obj


# ---------------------------------------------------------------------- helpers
def _pack(seqs: Sequence[I32], prefix: str) -> dict[str, npt.NDArray[Any]]:
    """Ragged sequences as concatenated ids + offsets (``offsets[i]:offsets[i+1]``)."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.concatenate(list(seqs)).astype(np.int32) if len(seqs) else np.empty(0, np.int32)
    return {f"{prefix}ids": ids, f"{prefix}offsets": offsets}


def _unpack(arrays: dict[str, npt.NDArray[Any]], prefix: str) -> list[I32]:
    ids = np.asarray(arrays[f"{prefix}ids"], dtype=np.int32)
    off = np.asarray(arrays[f"{prefix}offsets"], dtype=np.int64)
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(ids):
        raise ValueError(f"{prefix}offsets do not index {prefix}ids")
    if np.any(np.diff(off) < 0):
        raise ValueError(f"{prefix}offsets are not increasing")
    return np.split(ids, off[1:-1]) if len(off) > 1 else []


def _baseline_artifact(
    b: Baseline, history: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]], str]:
    """The exact artefact :meth:`Baseline.save` writes, as ``(meta, arrays, model_id)``.

    Goes through Baseline's own save path (via a private temporary file) so that whatever the
    Baseline persists, the adaptive artefact persists too, byte for byte.
    """
    with tempfile.TemporaryDirectory(prefix="bam-adaptive-") as d:
        p = Path(d) / "baseline.npz"
        had_id = "model_id_" in vars(b)
        saved_id = vars(b).get("model_id_")
        mid = b.save(p, history=history)
        # Baseline.save records the id of the file it wrote: keep the caller's own
        if had_id:
            b.model_id_ = str(saved_id)
        else:
            del b.model_id_
        meta, arrays, check = load_artifact(p, "baseline", mid)
    return meta, arrays, check


def _baseline_from_artifact(
    meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]], model_id: str
) -> Baseline:
    """Rebuild a Baseline through :meth:`Baseline.load`, verifying it is ``model_id``."""
    with tempfile.TemporaryDirectory(prefix="bam-adaptive-") as d:
        p = Path(d) / "baseline.npz"
        save_artifact(p, "baseline", meta, arrays)
        return Baseline.load(p, expect_model_id=model_id)


def _content_id(b: Baseline) -> str:
    """Id of the detector + thresholds: what ``Baseline.save(path, history=[])`` records."""
    return _baseline_artifact(b, [])[2]
