"""The supervised classifier on ADFA-LD, on splits that leak neither runs nor normal traces.

ADFA-LD records each attack type in ten runs (``<Type>_<run>`` folders); traces of one run are
near-duplicates, so a random split would test on copies of training traces. Two protocols:

**Run-disjoint.** Attack runs 1-5 train, runs 6-10 test. The classifier also needs normal traces
on both sides, and no normal test trace may be seen in training: ``Training_Data_Master`` plus
the even-indexed half of ``Validation_Data_Master`` (files sorted by name) train; the odd half
tests. Parity rather than first-half/second-half because the validation files are not
homogeneous along their numbering: a contiguous split tests on a different mix of programs than
it trains on. (With plain TF-IDF, training on the first half and testing on the second scored
+0.007 run-disjoint and +0.02 leave-one-type-out AUC over parity: an artefact of which programs
land in which half, not of the model. Parity is the harder and the more representative split.)

**Leave-one-type-out.** For each attack type T, train on every other type's traces (all runs)
plus the same training normals, and test T against the same held-out normals. This asks whether
the classifier flags an attack family it has never seen; a family label cannot be right there,
so only the anomaly score ``1 - P(normal)`` is assessed.

Every hyper-parameter choice and the probability calibration happen inside ``fit``, by group
cross-validation on the training side of each split (see :mod:`bam.models.classifier`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import softmax
from sklearn.metrics import average_precision_score

from bam.evaluation.metrics import auc, detection_metrics
from bam.events import Trace
from bam.models.classifier import NORMAL, AttackClassifier
from bam.traces.adfa import AdfaDataset

F64 = npt.NDArray[np.float64]
Progress = Callable[[str], None]


def normal_split(data: AdfaDataset) -> tuple[list[Trace], list[Trace]]:
    """Normal traces for training (Training + even Validation) and testing (odd Validation)."""
    val = sorted(data.validation, key=lambda t: t.name)
    return list(data.training) + val[0::2], val[1::2]


def expected_calibration_error(p: F64, y: npt.NDArray[np.bool_], bins: int = 10) -> float:
    """Binary ECE: mean |predicted - observed| attack rate over equal-width probability bins."""
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += float(m.mean()) * abs(float(p[m].mean()) - float(y[m].mean()))
    return err


def _labels(traces: Sequence[Trace]) -> list[str]:
    return [t.label or "?" for t in traces]


def run_disjoint(data: AdfaDataset) -> dict[str, Any]:
    """Train on normal traces + attack runs 1-5; test on held-out normals + runs 6-10."""
    train_norm, test_norm = normal_split(data)
    attack = list(data.attack)
    runs = np.array([int(t.meta.get("run", 0)) for t in attack])
    att_tr = [t for t, r in zip(attack, runs, strict=True) if r <= 5]
    att_te = [t for t, r in zip(attack, runs, strict=True) if r > 5]
    t0 = time.perf_counter()
    clf = AttackClassifier().fit(train_norm + att_tr, [NORMAL] * len(train_norm) + _labels(att_tr))
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    test = test_norm + att_te
    logits = clf.decision_function(test)
    score_s = time.perf_counter() - t0
    proba = softmax(logits / clf.temperature_, axis=1)  # what predict_proba gives
    raw = softmax(logits, axis=1)  # the logistic regression's own probabilities

    k_norm = clf.classes_.index(NORMAL)
    truth = [NORMAL] * len(test_norm) + _labels(att_te)
    y = np.array([t != NORMAL for t in truth])
    score = 1.0 - proba[:, k_norm]
    pred = [clf.classes_[i] for i in np.argmax(proba, axis=1)]
    families = sorted(set(_labels(att_te)))
    onehot = np.array([[c == t for c in clf.classes_] for t in truth], dtype=np.float64)
    p_true = np.maximum((proba * onehot).sum(1), 1e-15)

    out: dict[str, Any] = detection_metrics(score[~y], score[y])
    out["ap"] = round(float(average_precision_score(y, score)), 4)
    fam_ok = [p == t for p, t in zip(pred, truth, strict=True)]
    out["accuracy_family"] = round(float(np.mean(np.array(fam_ok)[y])), 4)
    out["accuracy"] = round(float(np.mean(fam_ok)), 4)
    out["recall_per_family"] = {
        f: round(float(np.mean([p == f for p, t in zip(pred, truth, strict=True) if t == f])), 4)
        for f in families
    }
    out["brier"] = round(float(np.mean((score - y) ** 2)), 4)
    out["brier_uncalibrated"] = round(float(np.mean((1.0 - raw[:, k_norm] - y) ** 2)), 4)
    out["ece"] = round(expected_calibration_error(score, y), 4)
    out["ece_uncalibrated"] = round(expected_calibration_error(1.0 - raw[:, k_norm], y), 4)
    out["brier_multiclass"] = round(float(((proba - onehot) ** 2).sum(1).mean()), 4)
    out["log_loss"] = round(float(-np.log(p_true).mean()), 4)
    out["temperature"] = round(clf.temperature_, 4)
    out["C"] = clf.C_
    out["n_features"] = clf.n_features_
    out["train"] = {"normal": len(train_norm), "attack": len(att_tr)}
    out["test"] = {"normal": len(test_norm), "attack": len(att_te)}
    out["fit_s"] = round(fit_s, 2)
    out["score_s"] = round(score_s, 2)
    return out


def leave_one_type_out(data: AdfaDataset, progress: Progress | None = None) -> dict[str, Any]:
    """For each attack type: train without it, test it against the held-out normals."""
    train_norm, test_norm = normal_split(data)
    attack = list(data.attack)
    types = _labels(attack)
    per_type: dict[str, float] = {}
    fit_s = score_s = 0.0
    for held in sorted(set(types)):
        if progress:
            progress(f"classifier: leave out {held}")
        others = [t for t, k in zip(attack, types, strict=True) if k != held]
        target = [t for t, k in zip(attack, types, strict=True) if k == held]
        t0 = time.perf_counter()
        clf = AttackClassifier().fit(
            train_norm + others, [NORMAL] * len(train_norm) + _labels(others)
        )
        fit_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        s = clf.score(test_norm + target)
        score_s += time.perf_counter() - t0
        per_type[held] = auc(s[: len(test_norm)], s[len(test_norm) :])
    return {
        "mean_auc": round(float(np.mean(list(per_type.values()))), 4),
        "per_type": per_type,
        "test_normal": len(test_norm),
        "fit_s": round(fit_s, 2),
        "score_s": round(score_s, 2),
    }


def evaluate_classifier(data: AdfaDataset, progress: Progress | None = None) -> dict[str, Any]:
    """``{"run_disjoint": {"auc", "ap", "accuracy_family", "brier", ...},
    "leave_one_type_out": {"mean_auc", "per_type": {TYPE: auc}}}`` (plus timings)."""
    t0 = time.perf_counter()
    if progress:
        progress("classifier: run-disjoint")
    rd = run_disjoint(data)
    loto = leave_one_type_out(data, progress)
    return {
        "run_disjoint": rd,
        "leave_one_type_out": loto,
        "normal_split": "train: Training + even-indexed Validation; test: odd-indexed Validation",
        "seconds": round(time.perf_counter() - t0, 1),
    }
