"""The supervised classifier on ADFA-LD, on splits that do not leak runs.

Run-disjoint: attack runs 1-5 train, 6-10 test. Normal traces: Training plus the even-indexed
half of Validation train; the odd half tests. Leave-one-attack-type-out: for each family, train
a normal-vs-attack model on every other family (all runs) plus the training normals and test on
the held-out family against the held-out normals — can it flag an attack type it has never seen?
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bam.evaluation.metrics import auc
from bam.models.classifier import NORMAL, AttackClassifier
from bam.traces.adfa import AdfaDataset


def evaluate_classifier(data: AdfaDataset) -> dict[str, Any]:
    """``{"run_disjoint": {...}, "leave_one_type_out": {"mean_auc", "per_type"}}``."""
    train_norm = data.training + data.validation[0::2]
    test_norm = data.validation[1::2]
    runs = np.array([int(t.meta.get("run", 0)) for t in data.attack])
    types = np.array([t.label or "?" for t in data.attack])
    att_tr = [t for t, r in zip(data.attack, runs, strict=True) if r <= 5]
    att_te = [t for t, r in zip(data.attack, runs, strict=True) if r > 5]

    t0 = time.perf_counter()
    clf = AttackClassifier().fit(
        train_norm + att_tr, [NORMAL] * len(train_norm) + [t.label or "?" for t in att_tr]
    )
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_norm = clf.attack_score(test_norm)
    s_att = clf.attack_score(att_te)
    proba = clf.predict_proba(test_norm + att_te)
    score_s = time.perf_counter() - t0
    y = [NORMAL] * len(test_norm) + [t.label or "?" for t in att_te]
    onehot = np.array([[c == lab for c in clf.classes_] for lab in y], dtype=np.float64)
    pred = [clf.classes_[i] for i in np.argmax(proba, 1)]
    fam = [(p == t) for p, t in zip(pred[len(test_norm) :], y[len(test_norm) :], strict=True)]
    run_disjoint = {
        "auc": auc(s_norm, s_att),
        "accuracy_family": round(float(np.mean(fam)), 4),
        "accuracy": round(float(np.mean([p == t for p, t in zip(pred, y, strict=True)])), 4),
        "brier": round(float(((proba - onehot) ** 2).sum(1).mean()), 4),
        "train": {"normal": len(train_norm), "attack": len(att_tr)},
        "test": {"normal": len(test_norm), "attack": len(att_te)},
        "fit_s": round(fit_s, 2),
        "score_s": round(score_s, 2),
    }
    per_type: dict[str, float] = {}
    for typ in sorted(set(types)):
        others = [t for t, k in zip(data.attack, types, strict=True) if k != typ]
        held = [t for t, k in zip(data.attack, types, strict=True) if k == typ]
        # an unseen family can only be "not normal": train normal vs. attack
        c = AttackClassifier().fit(
            train_norm + others, [NORMAL] * len(train_norm) + ["attack"] * len(others)
        )
        per_type[str(typ)] = auc(c.attack_score(test_norm), c.attack_score(held))
    return {
        "run_disjoint": run_disjoint,
        "leave_one_type_out": {
            "mean_auc": round(float(np.mean(list(per_type.values()))), 4),
            "per_type": per_type,
        },
    }
