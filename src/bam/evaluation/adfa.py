"""``bam eval adfa-ld``: the official ADFA-LD protocol for every unsupervised detector.

Fit on ``Training_Data_Master`` only (normal), score ``Validation_Data_Master`` (normal) against
``Attack_Data_Master``; no attack data is used for fitting or calibration. Each detector runs
inside a :class:`bam.detect.Baseline`, so the figures are for what ``bam score`` actually does
(local frames, calibrated thresholds), not for a raw model score. Besides the ranking metrics,
the flags at the calibrated threshold are reported: ``calibrated_far`` is what an operator
would see on new normal data (ADFA-LD's validation set contains programs absent from the
training set, so it is above the target rate), ``calibrated_tpr`` the share of attacks flagged.
``catlm+set`` is ``catlm`` with the baseline's syscall-set novelty term (``set_novelty``).

Label noise, reported beside (never instead of) the official figures: some traces in
``Attack_Data_Master`` are, call for call, the start of a *normal* Training trace (shell
job-control and helper processes recorded during the attack runs; 31 of 746, in every attack
type). A detector fitted on Training cannot flag them without flagging the identical normal
behaviour, so each detector also reports ``without_training_replays``: the same metrics with
those attack traces left out. The rule is parameter-free and uses the Training data only
(:func:`training_replays`); nothing is tuned on it.

Dataset: G. Creech and J. Hu, "Generation of a new IDS test dataset: Time to retire the KDD
collection", IEEE WCNC 2013; and "A Semantic Approach to Host-Based Intrusion Detection Systems
Using Contiguous and Discontiguous System Call Patterns", IEEE Trans. Computers 63(4), 2014.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bam.detect.baseline import make_baseline
from bam.evaluation.metrics import auc, detection_metrics
from bam.traces.adfa import AdfaDataset

DEFAULT_DETECTORS = ("lm", "catlm", "hmm", "stide", "t-stide", "gmm", "ensemble", "catlm+set")
# ADFA-LD traces are whole single processes (75-4,494 calls); frames of 1,000 calls score most of
# them whole while still localising in the longest ones.
EVAL_WINDOW = 1000

Progress = Callable[[str], None]


def default_path() -> Path | None:
    """``../shared/datasets/adfa-ld`` relative to the working directory or the source tree."""
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        p = base.parent / "shared" / "datasets" / "adfa-ld"
        if (p / "Training_Data_Master").is_dir():
            return p
    return None


def training_replays(data: AdfaDataset, head: int = 8) -> npt.NDArray[np.bool_]:
    """Per attack trace: is its whole call sequence the start of some normal Training trace?"""
    train = [np.concatenate(t.sequences()) for t in data.training]
    by_head: defaultdict[bytes, list[npt.NDArray[Any]]] = defaultdict(list)
    for s in train:
        by_head[s[:head].tobytes()].append(s)
    out = np.zeros(len(data.attack), dtype=bool)
    for i, t in enumerate(data.attack):
        a = np.concatenate(t.sequences())
        candidates = by_head.get(a[:head].tobytes(), []) if len(a) >= head else train
        out[i] = any(len(s) >= len(a) and np.array_equal(s[: len(a)], a) for s in candidates)
    return out


def evaluate_detector(
    data: AdfaDataset,
    name: str,
    window: int = EVAL_WINDOW,
    target_far: float = 0.01,
    replays: npt.NDArray[np.bool_] | None = None,
) -> dict[str, Any]:
    """Fit one detector's baseline on Training; score Validation vs Attack.

    ``replays``: attack traces to leave out of the supplementary ``without_training_replays``
    figures (see the module docstring); the official figures always use every trace.
    """
    t0 = time.perf_counter()
    base = make_baseline(name, window=window, target_far=target_far)  # "catlm+set": set novelty
    base.fit(data.training)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    normal = base.trace_scores([t.sequences() for t in data.validation])
    attack = base.trace_scores([t.sequences() for t in data.attack])
    score_s = time.perf_counter() - t0
    types = np.array([t.label or "?" for t in data.attack])
    model = base.detector.name + (" + syscall-set novelty" if base.set_novelty else "")
    out: dict[str, Any] = {"model": model}
    out.update(detection_metrics(normal, attack))
    out["per_attack"] = {str(k): auc(normal, attack[types == k]) for k in sorted(set(types))}
    if replays is not None and replays.any():
        clean = detection_metrics(normal, attack[~replays])
        out["without_training_replays"] = {
            "auc": clean["auc"],
            "far_at_90": clean["far_at_90"],
            "attack_traces": int((~replays).sum()),
        }
    thr = base.trace_threshold_
    out["calibrated_far"] = round(float((normal > thr).mean()), 4)
    out["calibrated_tpr"] = round(float((attack > thr).mean()), 4)
    out["target_far"] = target_far
    out["fit_s"] = round(fit_s, 2)
    out["score_s"] = round(score_s, 2)
    n_calls = sum(len(t.events) for t in data.validation) + sum(len(t.events) for t in data.attack)
    out["events_per_s"] = round(n_calls / max(score_s, 1e-9))
    return out


def evaluate(
    data: AdfaDataset,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    classifier: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The whole ``bam eval adfa-ld`` result."""
    result: dict[str, Any] = {
        "dataset": {
            "training": len(data.training),
            "validation": len(data.validation),
            "attack": len(data.attack),
        },
        "protocol": "fit on Training (normal only); Validation (normal) vs Attack",
        "window": EVAL_WINDOW,
        "detectors": {},
    }
    replays = training_replays(data)
    result["dataset"]["attack_replaying_training"] = int(replays.sum())
    for name in detectors:
        if progress:
            progress(f"detector {name}")
        result["detectors"][name] = evaluate_detector(data, name, replays=replays)
    if classifier:
        if progress:
            progress("classifier")
        from bam.evaluation.classifier_eval import evaluate_classifier

        result["classifier"] = evaluate_classifier(data)
    best = max(result["detectors"].items(), key=lambda kv: kv[1]["auc"], default=None)
    if best:
        result["best_unsupervised"] = {"detector": best[0], "auc": best[1]["auc"]}
    return result
