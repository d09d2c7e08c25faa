"""Detection metrics with honest tie handling.

ROC operating points are read off ``sklearn.metrics.roc_curve``, which moves tied scores
together, and interpolated linearly between points: the expected rate under random tie-breaking.
A detector that gives many normal and attack traces the same score therefore cannot claim a
detection rate at 1% false alarms that it only reaches by an arbitrary order among ties.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score, roc_curve


def detection_metrics(normal: npt.ArrayLike, attack: npt.ArrayLike) -> dict[str, float]:
    """AUC, false-alarm rate at 90% detection, detection rate at 1% and 5% false alarms."""
    n = np.asarray(normal, dtype=np.float64)
    a = np.asarray(attack, dtype=np.float64)
    y = np.r_[np.zeros(len(n)), np.ones(len(a))]
    s = np.r_[n, a]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auc": round(float(roc_auc_score(y, s)), 4),
        "far_at_90": round(_interp_x(0.9, tpr, fpr), 4),
        "tpr_at_1": round(float(np.interp(0.01, fpr, tpr)), 4),
        "tpr_at_5": round(float(np.interp(0.05, fpr, tpr)), 4),
    }


def _interp_x(target_tpr: float, tpr: np.ndarray, fpr: np.ndarray) -> float:
    """False-alarm rate where the (monotone) ROC first reaches ``target_tpr``, interpolated."""
    i = int(np.searchsorted(tpr, target_tpr, side="left"))
    if i == 0:
        return float(fpr[0])
    if i >= len(tpr):
        return 1.0
    t0, t1 = tpr[i - 1], tpr[i]
    f0, f1 = fpr[i - 1], fpr[i]
    if t1 == t0:
        return float(f1)
    return float(f0 + (target_tpr - t0) * (f1 - f0) / (t1 - t0))


def auc(normal: npt.ArrayLike, attack: npt.ArrayLike) -> float:
    """ROC AUC of attack vs normal scores."""
    n = np.asarray(normal, dtype=np.float64)
    a = np.asarray(attack, dtype=np.float64)
    return round(float(roc_auc_score(np.r_[np.zeros(len(n)), np.ones(len(a))], np.r_[n, a])), 4)
