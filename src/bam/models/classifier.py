"""Supervised attack classifier: what an anomaly looks like (benign, or which attack family).

The unsupervised baselines say *that* behaviour is unusual; this model, trained on labelled
benign and malicious traces, says *what it resembles* and how sure it is. A document is one trace
(or window): its per-thread call sequences, so no n-gram spans two threads.

Features, all learned from training data only:

- **TF-IDF of call n-grams** (1..3 by default; sublinear term frequency, so a long trace's loops
  do not drown its rare phrases; L2-normalised rows);
- the same n-grams as **binary presence** TF-IDF: "did this phrase occur at all" matters as much
  as "how often" for attacks that run one short payload inside a long benign process;
- **novelty**: per order n (2..6), the share of the trace's n-grams never seen in *benign*
  training traces (log-scaled, standardised). This is stide's signal as a feature, and it is what
  lets the classifier flag an attack family it was never trained on (leave-one-type-out), where
  the n-gram weights alone only know the families they saw. For a benign training trace the share
  is computed leave-one-out (against the other benign traces), so training and unseen benign
  traces get the same distribution of values.

The model is a multinomial logistic regression. ``C`` = 10 was chosen by group cross-validation
on the training side of ADFA-LD's run-disjoint split only (3..30 all scored within 0.002 AUC); a
sequence of values is searched inside ``fit`` by the same group cross-validation (groups = attack
runs, so no run is split between folds). The out-of-fold logits of that cross-validation fit one
**temperature** that calibrates the probabilities: temperature scaling keeps the arg-max and is a
single number to persist, and on ADFA-LD the logistic regression's own probabilities turned out
nearly calibrated already (T ~ 1.2). The anomaly score is ``1 - P(benign)``.

Persistence is JSON + numeric arrays through :mod:`bam.models.persistence` (never pickle): the
syscall vocabulary as *names* (canonical ids may shift between versions), the n-gram keys over
dense codes, idf weights, the benign n-gram set, standardisation, coefficients, intercepts,
classes and temperature; the predictor is plain numpy rebuilt from those on load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from scipy import sparse

from bam.events import Trace
from bam.features.vocabulary import Vocabulary
from bam.models.base import Contribution
from bam.models.persistence import load_artifact, save_artifact

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: One document: a :class:`Trace`, one sequence of canonical ids (array or list), or a trace's
#: per-thread sequences.
Doc = Trace | npt.NDArray[np.integer[Any]] | Sequence[int] | Sequence[npt.NDArray[np.integer[Any]]]

NORMAL = "normal"
KIND = "attack-classifier"
_KEY_BITS = 63  # n-gram keys are packed into non-negative int64
_NOVELTY_EPS = 1e-3  # log(share + eps): keeps "no unseen n-gram" finite yet far from "a few"


# ---------------------------------------------------------------------------- helpers


def _as_seqs(doc: Doc) -> list[I32]:
    """Per-thread sequences of one document, whatever form it came in."""
    if isinstance(doc, Trace):
        return doc.sequences()
    if isinstance(doc, np.ndarray):
        if doc.ndim != 1:
            raise ValueError(f"a call sequence must be 1-D, got shape {doc.shape}")
        return [doc.astype(np.int32, copy=False)]
    if len(doc) and isinstance(doc[0], int | np.integer):  # a plain list of ids: one thread
        return [np.asarray(doc, dtype=np.int32)]
    return [np.asarray(s, dtype=np.int32) for s in doc]


def _unique(a: I64) -> I64:
    """Sorted unique values.

    Sort-based on purpose: numpy >= 2.3 answers a bare ``np.unique`` with a hash table that is
    ~50x slower than sorting on millions of distinct 64-bit keys.
    """
    s = np.sort(a)
    if len(s) == 0:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _lookup(table: I64, keys: I64) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Positions of ``keys`` in the sorted ``table`` and whether each was found."""
    if len(table) == 0:
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return pos.astype(np.int64), table[pos] == keys


class _Corpus:
    """Documents flattened into one array of dense codes, for vectorised n-gram extraction."""

    def __init__(self, docs: Sequence[Doc], vocab: Vocabulary) -> None:
        seqs = [[s for s in _as_seqs(d) if len(s)] for d in docs]
        flat = [s for d in seqs for s in d]
        lens = np.array([len(s) for s in flat], dtype=np.int64)
        self.n_docs = len(docs)
        doc_of_seq = np.repeat(np.arange(len(seqs), dtype=np.int64), [len(d) for d in seqs])
        self.codes = vocab.encode(np.concatenate(flat)) if flat else np.empty(0, np.int64)
        self.doc = np.repeat(doc_of_seq, lens)
        ends = np.cumsum(lens)
        # calls left in the sequence from each position on (itself included)
        self.left = np.repeat(ends, lens) - np.arange(int(ends[-1]) if len(ends) else 0)
        self.bits = vocab.bits

    def grams(self, n_max: int) -> Iterator[tuple[int, I64, I64]]:
        """``(n, keys, doc)`` for n = 1..n_max: every n-gram inside one sequence, packed.

        Keys pack codes oldest-first, ``bits`` per call. Dense codes are >= 1 (OOV = 1, known
        calls >= 2), so keys of different orders never collide and can share one table.
        """
        key = self.codes.copy()
        for n in range(1, n_max + 1):
            if n > 1:
                m = len(self.codes) - n + 1
                key = (key[: max(m, 0)] << self.bits) | self.codes[n - 1 : n - 1 + max(m, 0)]
            ok = self.left[: len(key)] >= n
            yield n, key[ok], self.doc[: len(key)][ok]


def _doc_matrix(doc: I64, col: I64, n_docs: int, n_cols: int) -> sparse.csr_matrix:
    """Document x column count matrix (duplicates summed by the COO -> CSR conversion)."""
    m = sparse.csr_matrix((np.ones(len(doc), dtype=np.float64), (doc, col)), shape=(n_docs, n_cols))
    m.sum_duplicates()
    return m


def _l2_rows(x: sparse.csr_matrix) -> sparse.csr_matrix:
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    out: sparse.csr_matrix = sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ x
    return out.tocsr()


def _softmax(z: F64) -> F64:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: F64 = e / e.sum(axis=1, keepdims=True)
    return out


def _nll(z: F64, y: I64) -> float:
    p = _softmax(z)[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.maximum(p, 1e-300))))


def default_groups(docs: Sequence[Doc], labels: Sequence[str], blocks: int = 10) -> list[str]:
    """Cross-validation groups that keep related traces together.

    Traces of one attack run share a run (``meta["run"]``, as ADFA-LD's reader records it) and
    are near-duplicates: they form one group, so a fold never trains on half a run and tests on
    the other half. Anything without a run is grouped in ``blocks`` contiguous blocks per label,
    on the same reasoning for consecutive recordings.
    """
    per_label: dict[str, int] = {}
    for lab in labels:
        per_label[lab] = per_label.get(lab, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for d, lab in zip(docs, labels, strict=True):
        run = d.meta.get("run") if isinstance(d, Trace) else None
        i = seen.get(lab, 0)
        seen[lab] = i + 1
        out.append(
            f"{lab}/run{run}" if run is not None else f"{lab}/block{i * blocks // per_label[lab]}"
        )
    return out


# ---------------------------------------------------------------------------- the model


class AttackClassifier:
    """N-gram TF-IDF + novelty features, multinomial logistic regression, temperature-calibrated.

    Parameters (scikit-learn style; learned state ends with ``_``):

    ``ngram_range``: n-gram orders of the TF-IDF and presence features.
    ``min_df``: an n-gram needs this many training documents to become a feature (a phrase seen
    once cannot generalise and only inflates the model).
    ``novelty_range``: orders of the "unseen in benign training" shares (``None``: off).
    ``C``: inverse regularisation; a sequence is a grid chosen from by group cross-validation.
    ``cv``: folds for that choice and for calibration (``< 2``: no CV, temperature 1).
    ``benign_label``: the label of benign documents; the anomaly score is ``1 - P(benign)``.
    """

    kind = KIND

    # learned state (set by fit/load)
    vocab_: Vocabulary
    orders_: tuple[int, int, int, int]
    classes_: list[str]
    keys_: I64
    idf_: F64
    benign_keys_: I64
    novelty_mean_: F64
    novelty_scale_: F64
    coef_: F64
    intercept_: F64
    C_: float
    temperature_: float
    cv_scores_: dict[str, float]
    n_features_: int
    fit_seconds_: float
    #: ``model_id`` of the file this model was loaded from (``None`` if fitted here)
    model_id_: str | None = None

    def __init__(
        self,
        ngram_range: tuple[int, int] = (1, 3),
        min_df: int = 2,
        novelty_range: tuple[int, int] | None = (2, 6),
        C: float | Sequence[float] = 10.0,  # noqa: N803 - scikit-learn's name
        cv: int = 3,
        benign_label: str = NORMAL,
        max_iter: int = 1000,
    ) -> None:
        self.ngram_range = ngram_range
        self.min_df = min_df
        self.novelty_range = novelty_range
        self.C = C
        self.cv = cv
        self.benign_label = benign_label
        self.max_iter = max_iter

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-serialisable)."""
        c = self.C
        return {
            "ngram_range": list(self.ngram_range),
            "min_df": self.min_df,
            "novelty_range": list(self.novelty_range) if self.novelty_range else None,
            "C": float(c) if isinstance(c, int | float) else [float(x) for x in c],
            "cv": self.cv,
            "benign_label": self.benign_label,
            "max_iter": self.max_iter,
        }

    # ------------------------------------------------------------------ features

    def _orders(self, bits: int) -> tuple[int, int, int, int]:
        """Effective n-gram orders: shortened if a huge vocabulary would overflow 63-bit keys."""
        cap = max(1, _KEY_BITS // bits)
        lo, hi = self.ngram_range
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram_range {self.ngram_range} must satisfy 1 <= lo <= hi")
        nlo, nhi = self.novelty_range or (0, 0)
        if self.novelty_range and not 1 <= nlo <= nhi:
            raise ValueError(f"novelty_range {self.novelty_range} must satisfy 1 <= lo <= hi")
        return min(lo, cap), min(hi, cap), min(nlo, cap), min(nhi, cap)

    def _extract(
        self, corpus: _Corpus, loo: tuple[npt.NDArray[np.bool_], I64] | None = None
    ) -> tuple[sparse.csr_matrix, F64]:
        """Raw n-gram counts (documents x ``keys_``) and per-order shares of unseen n-grams.

        ``loo`` = (benign-document mask, benign document frequency of each ``benign_keys_``)
        makes the shares leave-one-out for the benign *training* documents: their own n-grams
        do not count as seen.
        """
        lo, hi, nlo, nhi = self.orders_
        tf_doc, tf_col = [], []
        unseen = np.zeros((corpus.n_docs, nhi - nlo + 1 if nhi else 0))
        for n, keys, doc in corpus.grams(max(hi, nhi)):
            if lo <= n <= hi:
                pos, found = _lookup(self.keys_, keys)
                tf_doc.append(doc[found])
                tf_col.append(pos[found])
            if nhi and nlo <= n <= nhi:
                pos, found = _lookup(self.benign_keys_, keys)
                if loo is not None:
                    own = loo[0][doc].astype(np.int64)
                    novel = np.where(found, loo[1][pos], 0) <= own
                else:
                    novel = ~found
                total = np.bincount(doc, minlength=corpus.n_docs)
                new = np.bincount(doc[novel], minlength=corpus.n_docs)
                unseen[:, n - nlo] = new / np.maximum(total, 1)
        counts = _doc_matrix(
            np.concatenate(tf_doc) if tf_doc else np.empty(0, np.int64),
            np.concatenate(tf_col) if tf_col else np.empty(0, np.int64),
            corpus.n_docs,
            len(self.keys_),
        )
        return counts, unseen

    def _matrix(self, counts: sparse.csr_matrix, unseen: F64) -> sparse.csr_matrix:
        """Feature matrix ``[tf-idf | presence tf-idf | standardised log novelty]``."""
        idf = sparse.diags(self.idf_)
        tf = counts.copy()
        tf.data = 1.0 + np.log(tf.data)
        presence = counts.copy()
        presence.data[:] = 1.0
        blocks = [_l2_rows(tf @ idf), _l2_rows(presence @ idf)]
        if unseen.shape[1]:
            z = (np.log(unseen + _NOVELTY_EPS) - self.novelty_mean_) / self.novelty_scale_
            blocks.append(sparse.csr_matrix(z))
        out: sparse.csr_matrix = sparse.hstack(blocks, format="csr")
        return out

    def _fit_features(self, corpus: _Corpus, benign: npt.NDArray[np.bool_]) -> sparse.csr_matrix:
        """Learn the n-gram vocabulary, idf, benign n-gram set and novelty scaling."""
        lo, hi, nlo, nhi = self.orders_
        tf_keys, tf_doc, nv_keys, nv_doc = [], [], [], []
        for n, keys, doc in corpus.grams(max(hi, nhi)):
            if lo <= n <= hi:
                tf_keys.append(keys)
                tf_doc.append(doc)
            if nhi and nlo <= n <= nhi:
                nv_keys.append(keys[benign[doc]])
                nv_doc.append(doc[benign[doc]])
        keys, df = self._document_frequency(tf_keys, tf_doc, corpus.n_docs)
        keep = df >= self.min_df
        self.keys_ = keys[keep]
        self.idf_ = np.log((1.0 + corpus.n_docs) / (1.0 + df[keep])) + 1.0
        loo = None
        if nhi:
            self.benign_keys_, benign_df = self._document_frequency(nv_keys, nv_doc, corpus.n_docs)
            loo = (benign, benign_df)
        counts, unseen = self._extract(corpus, loo)
        if nhi:
            log_unseen = np.log(unseen + _NOVELTY_EPS)
            self.novelty_mean_ = log_unseen.mean(axis=0)
            self.novelty_scale_ = np.maximum(log_unseen.std(axis=0), 1e-6)
        return self._matrix(counts, unseen)

    @staticmethod
    def _document_frequency(keys: list[I64], docs: list[I64], n_docs: int) -> tuple[I64, I64]:
        """Sorted distinct keys and, for each, the number of documents containing it."""
        k = np.concatenate(keys) if keys else np.empty(0, np.int64)
        d = np.concatenate(docs) if docs else np.empty(0, np.int64)
        table = _unique(k)
        pos, _ = _lookup(table, k)
        present = _doc_matrix(d, pos, n_docs, len(table))
        df = np.bincount(present.indices, minlength=len(table)).astype(np.int64)
        return table, df

    def transform(self, docs: Sequence[Doc]) -> sparse.csr_matrix:
        """Feature matrix of documents, as the fitted model sees them."""
        self._check_fitted()
        return self._matrix(*self._extract(_Corpus(docs, self.vocab_)))

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        docs: Sequence[Doc],
        labels: Sequence[str],
        groups: Sequence[str] | None = None,
    ) -> Self:
        """Learn from labelled documents (``benign_label`` or an attack family name).

        ``groups`` keep related documents in one cross-validation fold (default:
        :func:`default_groups`, i.e. attack runs).
        """
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import GroupKFold

        if len(docs) != len(labels):
            raise ValueError(f"{len(docs)} documents but {len(labels)} labels")
        y_names = [str(lab) for lab in labels]
        self.classes_ = sorted(set(y_names))
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes (benign and one attack family)")
        if self.benign_label not in self.classes_:
            raise ValueError(f"no document is labelled {self.benign_label!r} (the benign class)")
        t0 = time.perf_counter()
        y = np.searchsorted(np.array(self.classes_), np.array(y_names)).astype(np.int64)
        benign = y == self.classes_.index(self.benign_label)
        seqs = [_as_seqs(d) for d in docs]
        ids = np.concatenate([s for d in seqs for s in d] or [np.empty(0, np.int32)])
        self.vocab_ = Vocabulary(_unique(ids.astype(np.int64)))
        self.orders_ = self._orders(self.vocab_.bits)
        x = self._fit_features(_Corpus(seqs, self.vocab_), benign)

        grid = [float(self.C)] if isinstance(self.C, int | float) else [float(c) for c in self.C]
        if not grid or min(grid) <= 0:
            raise ValueError(f"C must be positive, got {self.C!r}")
        g = list(groups) if groups is not None else default_groups(docs, y_names)
        folds = min(self.cv, len(set(g)))
        self.cv_scores_ = {}
        self.temperature_ = 1.0
        self.C_ = grid[0]
        if folds >= 2:
            splits = list(GroupKFold(n_splits=folds).split(x, y, g))
            best: tuple[float, float, F64] | None = None
            for c in grid:
                oof = np.zeros((len(y), len(self.classes_)))
                for tr, te in splits:
                    oof[te] = self._fit_lr(x[tr], y[tr], c).decision(x[te])
                s = 1.0 - _softmax(oof)[:, self.classes_.index(self.benign_label)]
                auc = float(roc_auc_score(~benign, s)) if 0 < benign.sum() < len(y) else 0.5
                self.cv_scores_[f"{c:g}"] = round(auc, 5)
                if best is None or auc > best[0] + 1e-9:  # ties keep the smaller C
                    best = (auc, c, oof)
            assert best is not None
            self.C_ = best[1]
            self.temperature_ = _fit_temperature(best[2], y)
        lr = self._fit_lr(x, y, self.C_)
        self.coef_, self.intercept_ = lr.coef, lr.intercept
        self.fit_seconds_ = time.perf_counter() - t0
        self.n_features_ = int(x.shape[1])
        return self

    def _fit_lr(self, x: sparse.csr_matrix, y: I64, c: float) -> _Linear:
        """Multinomial logistic regression, as plain arrays over all ``classes_``.

        BLAS is held to one thread: on a busy 2-core host the default thread pool
        oversubscribes and made each fit ~10x slower.
        """
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        k = len(self.classes_)
        coef = np.zeros((k, x.shape[1]))
        intercept = np.full(k, -30.0)  # a class absent from this fold: probability ~0
        present = np.unique(y)
        if len(present) == 1:
            intercept[present[0]] = 0.0
            return _Linear(coef, intercept)
        with threadpool_limits(limits=1):
            lr = LogisticRegression(C=c, solver="newton-cg", max_iter=self.max_iter, tol=1e-4)
            lr.fit(x, y)
        w = np.asarray(lr.coef_, dtype=np.float64)
        b = np.asarray(lr.intercept_, dtype=np.float64)
        if len(present) == 2:  # binary LR keeps one row: split it symmetrically over 2 classes
            w = np.vstack([-w[0] / 2, w[0] / 2])
            b = np.array([-b[0] / 2, b[0] / 2])
        coef[present] = w
        intercept[present] = b
        return _Linear(coef, intercept)

    # ------------------------------------------------------------------ prediction

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("AttackClassifier is not fitted; call fit() or load() first")

    def decision_function(self, docs: Sequence[Doc]) -> F64:
        """Uncalibrated logits, one column per class of ``classes_``."""
        x = self.transform(docs)
        return _Linear(self.coef_, self.intercept_).decision(x)

    def predict_proba(self, docs: Sequence[Doc], calibrated: bool = True) -> F64:
        """Class probabilities (columns in ``classes_`` order), temperature-calibrated."""
        z = self.decision_function(docs)
        return _softmax(z / self.temperature_ if calibrated else z)

    def predict(self, docs: Sequence[Doc]) -> list[str]:
        """Most probable class of each document: the benign label or an attack family."""
        p = self.predict_proba(docs)
        return [self.classes_[i] for i in np.argmax(p, axis=1)]

    def score(self, docs: Sequence[Doc]) -> F64:
        """Anomaly score ``1 - P(benign)`` (higher = more likely an attack), like the detectors."""
        return self.attack_probability(self.predict_proba(docs))

    def attack_probability(self, proba: F64) -> F64:
        """``1 - P(benign)`` from :meth:`predict_proba`'s output (no second pass over docs)."""
        out: F64 = 1.0 - proba[:, self.classes_.index(self.benign_label)]
        return out

    def attack_score(self, docs: Sequence[Doc]) -> F64:
        """Same as :meth:`score` (the name an earlier version of this class used)."""
        return self.score(docs)

    # ------------------------------------------------------------------ explanation

    def gram_name(self, key: int) -> str:
        """An n-gram key rendered with syscall names, e.g. ``"open read mmap"``."""
        bits = self.vocab_.bits
        n = max(1, (int(key).bit_length() + bits - 1) // bits)
        mask = (1 << bits) - 1
        codes = [(int(key) >> (bits * (n - 1 - i))) & mask for i in range(n)]
        return " ".join(self.vocab_.name(c) for c in codes)

    def explain(self, doc: Doc, top: int = 5) -> list[Contribution]:
        """The features that pushed ``doc`` most towards its predicted class.

        The contrast is the predicted class against the benign class (for an attack), or
        against the most probable attack family (for a benign verdict): that difference of
        logits is exactly what decided the label. N-grams are named by syscall names; the
        novelty features appear as one entry, ``"unseen n-grams (2: 0.1%, ..., 6: 12.5%)"``,
        whose count is the number of unseen n-grams of the longest order. Only features that
        pushed towards the predicted class are listed.
        """
        self._check_fitted()
        x = self.transform([doc]).tocsr()
        p = _softmax(_Linear(self.coef_, self.intercept_).decision(x))[0]
        k = int(np.argmax(p))
        benign = self.classes_.index(self.benign_label)
        if k != benign:
            ref = benign
        else:
            others = np.delete(np.arange(len(p)), benign)
            ref = int(others[np.argmax(p[others])])
        w = self.coef_[k] - self.coef_[ref]
        n_feat = len(self.keys_)
        gram_counts, unseen = self._doc_counts(doc)
        contrib: dict[str, float] = {}
        counts: dict[str, int] = {}
        novelty = 0.0
        for j, v in zip(x.indices.tolist(), x.data.tolist(), strict=True):
            if j < 2 * n_feat:  # the tf-idf and presence columns of one n-gram add up
                col = j % n_feat
                name = self.gram_name(int(self.keys_[col]))
                counts[name] = gram_counts.get(col, 0)
                contrib[name] = contrib.get(name, 0.0) + v * float(w[j])
            else:
                novelty += v * float(w[j])
        if self.orders_[3]:
            # The per-order shares are strongly correlated, so their individual weights are
            # not meaningful (one may be negative, its neighbour positive): report their sum.
            nlo, nhi = self.orders_[2], self.orders_[3]
            z = x[:, 2 * n_feat :].toarray()[0]
            share = np.maximum(
                np.exp(z * self.novelty_scale_ + self.novelty_mean_) - _NOVELTY_EPS, 0.0
            )
            name = (
                "unseen n-grams ("
                + ", ".join(f"{n}: {100 * share[n - nlo]:.1f}%" for n in range(nlo, nhi + 1))
                + ")"
            )
            contrib[name] = novelty
            counts[name] = unseen[-1]
        ranked = sorted(contrib.items(), key=lambda kv: -kv[1])[:top]
        return [Contribution(name, s, counts[name]) for name, s in ranked if s > 0]

    def _doc_counts(self, doc: Doc) -> tuple[dict[int, int], list[int]]:
        """Vocabulary n-gram counts (column -> count) and unseen-n-gram counts per order."""
        lo, hi, nlo, nhi = self.orders_
        cols = []
        unseen = [0] * max(nhi - nlo + 1, 0)
        for n, keys, _ in _Corpus([doc], self.vocab_).grams(max(hi, nhi)):
            if lo <= n <= hi:
                pos, found = _lookup(self.keys_, keys)
                cols.append(pos[found])
            if nhi and nlo <= n <= nhi:
                unseen[n - nlo] = int((~_lookup(self.benign_keys_, keys)[1]).sum())
        c = np.sort(np.concatenate(cols)) if cols else np.empty(0, np.int64)
        u = _unique(c)
        n_of = np.diff(np.r_[np.searchsorted(c, u), len(c)])
        return dict(zip(u.tolist(), n_of.tolist(), strict=True)), unseen

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> str:
        """Save as JSON + arrays (no pickle); returns the ``model_id``."""
        self._check_fitted()
        meta: dict[str, Any] = {
            "params": self.get_params(),
            "vocab": self.vocab_.names(),
            "classes": list(self.classes_),
            "orders": list(self.orders_),
            "C": self.C_,
            "temperature": self.temperature_,
            "cv_scores": self.cv_scores_,
            "n_features": self.n_features_,
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            "keys": self.keys_,
            "idf": self.idf_,
            "coef": self.coef_,
            "intercept": self.intercept_,
        }
        if self.orders_[3]:
            arrays["benign_keys"] = self.benign_keys_
            arrays["novelty_mean"] = self.novelty_mean_
            arrays["novelty_scale"] = self.novelty_scale_
        return save_artifact(path, KIND, meta, arrays)

    @classmethod
    def load(cls, path: str | Path, expect_model_id: str | None = None) -> AttackClassifier:
        """Load and verify a saved classifier (:class:`ModelIntegrityError` if altered)."""
        meta, arrays, model_id = load_artifact(path, KIND, expect_model_id)
        p = dict(meta["params"])
        m = cls(
            ngram_range=tuple(p["ngram_range"]),
            min_df=int(p["min_df"]),
            novelty_range=tuple(p["novelty_range"]) if p["novelty_range"] else None,
            C=p["C"],
            cv=int(p["cv"]),
            benign_label=str(p["benign_label"]),
            max_iter=int(p["max_iter"]),
        )
        m.vocab_ = Vocabulary.from_names(meta["vocab"])
        m.classes_ = [str(c) for c in meta["classes"]]
        lo, hi, nlo, nhi = (int(v) for v in meta["orders"])
        m.orders_ = (lo, hi, nlo, nhi)
        m.C_ = float(meta["C"])
        m.temperature_ = float(meta["temperature"])
        m.cv_scores_ = {str(k): float(v) for k, v in meta["cv_scores"].items()}
        m.n_features_ = int(meta["n_features"])
        m.keys_ = arrays["keys"].astype(np.int64)
        m.idf_ = arrays["idf"].astype(np.float64)
        m.coef_ = arrays["coef"].astype(np.float64)
        m.intercept_ = arrays["intercept"].astype(np.float64)
        if nhi:
            m.benign_keys_ = arrays["benign_keys"].astype(np.int64)
            m.novelty_mean_ = arrays["novelty_mean"].astype(np.float64)
            m.novelty_scale_ = arrays["novelty_scale"].astype(np.float64)
        m.model_id_ = model_id
        return m


class _Linear:
    """Coefficients and intercepts of a fitted linear model: all that prediction needs."""

    def __init__(self, coef: F64, intercept: F64) -> None:
        self.coef = coef
        self.intercept = intercept

    def decision(self, x: sparse.csr_matrix) -> F64:
        out: F64 = np.asarray(x @ self.coef.T) + self.intercept
        return out


def _fit_temperature(logits: F64, y: I64) -> float:
    """The temperature minimising the log-loss of out-of-fold logits (temperature scaling)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda lt: _nll(logits / np.exp(lt), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(res.x))
