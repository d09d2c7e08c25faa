"""The one small interface every behaviour model follows (like scikit-learn / PyOD / river).

``fit(seqs) -> self`` learns from normal syscall sequences (one per thread or window, canonical
ids); ``score(seqs)`` gives one score per sequence, higher = more anomalous; ``explain(seq)``
names what drove a score. Models that can score each call in context (n-gram, HMM) also implement
``call_scores``: the :class:`bam.detect.Baseline` turns per-call scores into sliding-frame window
scores with one cumulative sum, which is how a short attack inside a long trace stays visible.
Parameters live in ``__init__``; learned state ends with ``_``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from bam.errors import ModelError
from bam.models.persistence import load_artifact, save_artifact

I32 = npt.NDArray[np.int32]
F64 = npt.NDArray[np.float64]
Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One feature that drove an anomaly score (e.g. an unseen n-gram, by syscall names)."""

    feature: str
    score: float
    count: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "score": round(float(self.score), 4), "count": self.count}


_REGISTRY: dict[str, type[Detector]] = {}


class Detector(ABC):
    """An unsupervised model of normal behaviour over syscall sequences."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            _REGISTRY[cls.kind] = cls

    @abstractmethod
    def fit(self, seqs: Sequence[I32]) -> Self:
        """Learn normal behaviour from ``seqs``; returns ``self``."""

    @abstractmethod
    def score(self, seqs: Sequence[I32]) -> F64:
        """One anomaly score per sequence (higher = more anomalous)."""

    @abstractmethod
    def explain(self, seq: I32, top: int = 5, context: int = 0) -> list[Contribution]:
        """The features of ``seq`` that contributed most to its score.

        The first ``context`` calls only give context (the calls before a window): they are
        scored but not reported.
        """

    @abstractmethod
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-serialisable)."""

    @abstractmethod
    def _get_state(self) -> tuple[dict[str, Any], Arrays]:
        """Learned state as JSON metadata + numeric arrays."""

    @abstractmethod
    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        """Restore learned state saved by :meth:`_get_state`."""

    @property
    def name(self) -> str:
        """Human-readable name, including the main parameters."""
        return self.kind

    def check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise ModelError(f"{self.name} is not fitted")

    # ---- persistence (JSON + npz, never pickle) ----
    def state(self) -> tuple[dict[str, Any], Arrays]:
        """Everything needed to rebuild this model: ``({"kind", "params", "state"}, arrays)``."""
        self.check_fitted()
        meta, arrays = self._get_state()
        return {"kind": self.kind, "params": self.get_params(), "state": meta}, arrays

    @staticmethod
    def from_state(meta: dict[str, Any], arrays: Arrays) -> Detector:
        """Rebuild any registered detector from :meth:`state` output."""
        kind = meta.get("kind")
        cls = _REGISTRY.get(str(kind))
        if cls is None:
            raise ModelError(
                f"unknown detector kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}"
            )
        try:
            obj = cls(**meta.get("params", {}))
            obj._set_state(meta.get("state", {}), arrays)
        except (TypeError, KeyError, ValueError) as e:
            raise ModelError(f"cannot rebuild {kind} model: {e}") from None
        obj.fitted_ = True  # type: ignore[attr-defined]
        return obj

    def save(self, path: str | Path) -> str:
        """Save to ``path``; returns the ``model_id``."""
        meta, arrays = self.state()
        return save_artifact(path, "detector", meta, arrays)

    @staticmethod
    def load(path: str | Path, expect_model_id: str | None = None) -> Detector:
        """Load a detector saved by :meth:`save`, verifying its integrity."""
        meta, arrays, _ = load_artifact(path, "detector", expect_model_id)
        return Detector.from_state(meta, arrays)


class CallDetector(Detector):
    """A detector that scores every call in its context (its window score is the mean)."""

    @abstractmethod
    def call_scores(self, seqs: Sequence[I32]) -> list[F64]:
        """Per-call anomaly scores, one array per sequence, aligned with the calls."""

    def score(self, seqs: Sequence[I32]) -> F64:
        return np.array([s.mean() if len(s) else 0.0 for s in self.call_scores(seqs)])


def registered() -> dict[str, type[Detector]]:
    """Detector kinds known to :meth:`Detector.from_state`."""
    return dict(_REGISTRY)
