"""Detection: baselines with calibrated thresholds, severity, and the adaptive baseline."""

from bam.detect.baseline import Baseline, Verdict, conformal_threshold
from bam.detect.severity import LEVELS, SeverityTracker, level_of, severity_of_windows

__all__ = [
    "LEVELS",
    "Baseline",
    "SeverityTracker",
    "Verdict",
    "conformal_threshold",
    "level_of",
    "severity_of_windows",
]
