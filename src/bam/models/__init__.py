"""Behaviour models: one small interface (``fit``/``score``/``explain``), safe persistence."""

from bam.models.base import CallDetector, Contribution, Detector, registered
from bam.models.category_lm import CategoryLM
from bam.models.ensemble import Ensemble
from bam.models.gmm import GaussianMixtureDensity, HistogramGMM
from bam.models.hmm import HMM
from bam.models.ngram_lm import NgramLM
from bam.models.stide import Stide
from bam.models.tstide import TStide

DETECTORS = ("lm", "catlm", "hmm", "stide", "t-stide", "gmm", "ensemble")


def make_detector(name: str) -> Detector:
    """A detector with BAM's default parameters, by its CLI name."""
    if name == "lm":
        return NgramLM()
    if name == "catlm":
        return CategoryLM()
    if name == "hmm":
        return HMM()
    if name == "stide":
        return Stide()
    if name == "t-stide":
        return TStide()
    if name == "gmm":
        return HistogramGMM()
    if name == "ensemble":
        return Ensemble([NgramLM(), HistogramGMM()])
    raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")


__all__ = [
    "DETECTORS",
    "HMM",
    "CallDetector",
    "CategoryLM",
    "Contribution",
    "Detector",
    "Ensemble",
    "GaussianMixtureDensity",
    "HistogramGMM",
    "NgramLM",
    "Stide",
    "TStide",
    "make_detector",
    "registered",
]
