"""Supervised attack classifier: what an anomaly looks like (benign, or which attack family).

The unsupervised baselines say *that* behaviour is unusual; this model, trained on labelled
benign and malicious traces, says *what it resembles* and how sure it is. Features are TF-IDF
weights of call n-grams (1..``max_n``; sublinear term frequency, so a long trace's loops do not
drown its rare phrases), learned from training data only; the model is a multinomial logistic
regression with balanced class weights, whose probabilities are reasonably calibrated (the
evaluation reports the Brier score). Persisted as JSON + arrays, never pickled: the predictor is
rebuilt from its coefficients on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from scipy import sparse

from bam.events import Trace
from bam.features.ngrams import ngram_keys
from bam.features.vocabulary import Vocabulary
from bam.models._ngram_table import KeyIndex, encode_pack, gram_name
from bam.models.base import Contribution
from bam.models.persistence import load_artifact, save_artifact

I32 = npt.NDArray[np.int32]
F64 = npt.NDArray[np.float64]
Doc = Sequence[I32]  # one trace = its per-thread sequences

NORMAL = "normal"


def _docs(items: Sequence[Trace] | Sequence[Doc]) -> list[list[I32]]:
    return [t.sequences() if isinstance(t, Trace) else list(t) for t in items]


class AttackClassifier:
    """TF-IDF n-grams + multinomial logistic regression over whole traces (or windows)."""

    def __init__(
        self, max_n: int = 3, min_df: int = 2, c: float = 10.0, max_iter: int = 3000
    ) -> None:
        self.max_n = max_n
        self.min_df = min_df
        self.c = c
        self.max_iter = max_iter

    # ------------------------------------------------------------------ features
    def _keys(
        self, docs: list[list[I32]]
    ) -> tuple[list[npt.NDArray[np.uint64]], npt.NDArray[np.int64]]:
        """Per order: n-gram keys of every call of every document, and each call's document."""
        flat = [s for d in docs for s in d if len(s)]
        owner = np.repeat(np.arange(len(docs)), [sum(len(s) for s in d if len(s)) for d in docs])
        keys = []
        for n in range(1, self.order_ + 1):
            p = encode_pack(self.vocab_, flat, n) if flat else None
            keys.append(
                ngram_keys(p, n, self.vocab_.bits) if p is not None else np.empty(0, np.uint64)
            )
        return keys, owner.astype(np.int64)

    def _counts(self, docs: list[list[I32]]) -> sparse.csr_matrix:
        keys, owner = self._keys(docs)
        rows, cols, offset = [], [], 0
        for n, k in enumerate(keys):
            idx, found = self.index_[n].find(k)
            rows.append(owner[found])
            cols.append(idx[found] + offset)
            offset += len(self.keys_[n])
        r = np.concatenate(rows) if rows else np.empty(0, np.int64)
        c = np.concatenate(cols) if cols else np.empty(0, np.int64)
        m = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(docs), offset))
        m.sum_duplicates()
        return m

    def _tfidf(self, counts: sparse.csr_matrix) -> sparse.csr_matrix:
        x = counts.astype(np.float64).tocsr()
        x.data = 1.0 + np.log(x.data)
        x = x @ sparse.diags(self.idf_)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        return sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ x

    # ------------------------------------------------------------------ fitting
    def fit(self, items: Sequence[Trace] | Sequence[Doc], labels: Sequence[str]) -> Self:
        """Learn from labelled traces (``"normal"`` or an attack family name)."""
        from sklearn.linear_model import LogisticRegression

        docs = _docs(items)
        if len(docs) != len(labels):
            raise ValueError(f"{len(docs)} traces but {len(labels)} labels")
        if len(set(labels)) < 2:
            raise ValueError("need at least two classes (e.g. normal and one attack family)")
        self.vocab_ = Vocabulary.fit([s for d in docs for s in d])
        self.order_ = self.vocab_.max_order(self.max_n)
        keys, owner = self._keys(docs)
        self.keys_: list[npt.NDArray[np.uint64]] = []
        for k in keys:
            pairs = np.unique(np.stack([owner, k.astype(np.int64)]), axis=1)  # (doc, key) once
            uk, df = np.unique(pairs[1].astype(np.uint64), return_counts=True)
            self.keys_.append(uk[df >= self.min_df])
        self.index_ = [KeyIndex(k) for k in self.keys_]
        counts = self._counts(docs)
        df_all = np.asarray((counts > 0).sum(0)).ravel()
        self.idf_ = np.log((1.0 + len(docs)) / (1.0 + df_all)) + 1.0
        x = self._tfidf(counts)
        lr = LogisticRegression(C=self.c, class_weight="balanced", max_iter=self.max_iter)
        lr.fit(x, np.asarray(labels))
        self.classes_ = [str(c) for c in lr.classes_]
        self.coef_ = np.asarray(lr.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(lr.intercept_, dtype=np.float64)
        if len(self.classes_) == 2:  # binary LR keeps one row: expand to one per class
            self.coef_ = np.vstack([-self.coef_[0] / 2, self.coef_[0] / 2])
            self.intercept_ = np.array([-self.intercept_[0] / 2, self.intercept_[0] / 2])
        self.fitted_ = True
        return self

    # ------------------------------------------------------------------ prediction
    def _logits(self, items: Sequence[Trace] | Sequence[Doc]) -> F64:
        if not getattr(self, "fitted_", False):
            raise ValueError("classifier is not fitted")
        x = self._tfidf(self._counts(_docs(items)))
        out: F64 = np.asarray(x @ self.coef_.T) + self.intercept_
        return out

    def predict_proba(self, items: Sequence[Trace] | Sequence[Doc]) -> F64:
        """Class probabilities, columns in the order of ``classes_``."""
        z = self._logits(items)
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        out: F64 = e / e.sum(1, keepdims=True)
        return out

    def predict(self, items: Sequence[Trace] | Sequence[Doc]) -> list[str]:
        """Most probable class of each trace."""
        return [self.classes_[i] for i in np.argmax(self.predict_proba(items), axis=1)]

    def attack_score(self, items: Sequence[Trace] | Sequence[Doc]) -> F64:
        """``1 - P(normal)``: the binary "looks like an attack" score."""
        p = self.predict_proba(items)
        if NORMAL not in self.classes_:
            out: F64 = np.ones(len(p))
            return out
        out = 1.0 - p[:, self.classes_.index(NORMAL)]
        return out

    def explain(self, seqs: Doc, top: int = 5) -> list[Contribution]:
        """The n-grams that pushed this trace most towards its predicted class."""
        counts = self._counts([list(seqs)])
        x = self._tfidf(counts).tocsr()
        cls = int(np.argmax(self.predict_proba([list(seqs)])[0]))
        contrib = x.data * self.coef_[cls, x.indices]
        order = np.argsort(-contrib)[:top]
        sizes = np.cumsum([0] + [len(k) for k in self.keys_])
        out = []
        for j in order:
            col = int(x.indices[j])
            n = int(np.searchsorted(sizes, col, side="right"))
            key = int(self.keys_[n - 1][col - sizes[n - 1]])
            out.append(
                Contribution(gram_name(self.vocab_, key, n), float(contrib[j]), int(counts[0, col]))
            )
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> str:
        """Save as JSON + arrays; returns the ``model_id``."""
        meta = {
            "params": {
                "max_n": self.max_n,
                "min_df": self.min_df,
                "c": self.c,
                "max_iter": self.max_iter,
            },
            "vocab": self.vocab_.names(),
            "order": self.order_,
            "classes": self.classes_,
        }
        arrays: dict[str, Any] = {
            "idf": self.idf_,
            "coef": self.coef_,
            "intercept": self.intercept_,
        }
        arrays.update({f"keys{n}": k for n, k in enumerate(self.keys_)})
        return save_artifact(path, "attack-classifier", meta, arrays)

    @classmethod
    def load(cls, path: str | Path, expect_model_id: str | None = None) -> AttackClassifier:
        """Load and verify a saved classifier."""
        meta, arrays, _ = load_artifact(path, "attack-classifier", expect_model_id)
        m = cls(**meta["params"])
        m.vocab_ = Vocabulary.from_names(meta["vocab"])
        m.order_ = int(meta["order"])
        m.classes_ = [str(c) for c in meta["classes"]]
        m.idf_, m.coef_, m.intercept_ = arrays["idf"], arrays["coef"], arrays["intercept"]
        m.keys_ = [arrays[f"keys{n}"] for n in range(m.order_)]
        m.index_ = [KeyIndex(k) for k in m.keys_]
        m.fitted_ = True
        return m
