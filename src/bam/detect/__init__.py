"""Detection: baselines with calibrated thresholds, severity, and the adaptive baseline."""

from bam.detect.adaptive import AdaptiveBaseline, Observation
from bam.detect.baseline import Baseline, Verdict, conformal_threshold
from bam.detect.drift import PageHinkley
from bam.detect.severity import LEVELS, SeverityTracker, level_of, severity_of_windows

__all__ = [
    "LEVELS",
    "AdaptiveBaseline",
    "Baseline",
    "Observation",
    "PageHinkley",
    "SeverityTracker",
    "Verdict",
    "conformal_threshold",
    "level_of",
    "severity_of_windows",
]
