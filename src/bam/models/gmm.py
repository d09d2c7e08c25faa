"""Gaussian mixture over per-window feature vectors (syscall frequencies; resource vectors).

Order-blind on purpose: it catches a workload doing a different *mix* of things (a web server
suddenly forking, reading many files, writing a lot) that sequence models can miss when each
short phrase is individually normal. Features are standardised and reduced by PCA before the
mixture (a full-covariance mixture in 150 dimensions from a few hundred windows would be all
noise); the number of components is chosen by BIC on the training data. Score is the negative
log-density. Scoring uses the saved parameters directly, so nothing sklearn-specific is
persisted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from bam.features.histogram import column_names, frequency_vectors
from bam.features.vocabulary import OOV, Vocabulary
from bam.models.base import F64, I32, Arrays, Contribution, Detector
from bam.syscalls import name_of

F2 = npt.NDArray[np.float64]


class GaussianMixtureDensity:
    """Standardise -> PCA -> GMM (BIC-chosen size) density model of feature vectors."""

    def __init__(
        self,
        max_components: int = 8,
        pca_dims: int = 16,
        reg_covar: float = 1e-3,
        standardize: bool = True,
        random_state: int = 0,
    ) -> None:
        self.max_components = max_components
        self.pca_dims = pca_dims
        self.reg_covar = reg_covar
        self.standardize = standardize
        self.random_state = random_state

    def fit(self, x: F2) -> Self:
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        if len(x) < 3:
            raise ValueError(f"need at least 3 windows to fit a mixture, got {len(x)}")
        self.mean_ = x.mean(0)
        self.scale_ = x.std(0) if self.standardize else np.ones(x.shape[1])
        self.scale_[self.scale_ < 1e-6] = 1.0
        z = (x - self.mean_) / self.scale_
        dims = max(1, min(self.pca_dims, z.shape[1], len(z) - 1))
        pca = PCA(dims, random_state=self.random_state).fit(z)
        self.components_ = pca.components_
        self.pca_mean_ = pca.mean_
        y = (z - self.pca_mean_) @ self.components_.T
        # What PCA discards is not ignored: the residual is scored as isotropic Gaussian noise
        # (probabilistic PCA), so a window unlike anything in training cannot hide off-subspace.
        resid = z - self.pca_mean_ - y @ self.components_
        free = max(1, z.shape[1] - dims)
        self.resid_var_ = np.array([max(float((resid**2).sum(1).mean()) / free, 1e-8)])
        self.resid_dims_ = np.array([free], dtype=np.int64)
        best: Any = None
        best_bic = np.inf
        k = 1
        while k <= min(self.max_components, max(1, len(y) // (2 * dims))):
            g = GaussianMixture(
                k, covariance_type="full", reg_covar=self.reg_covar, random_state=self.random_state
            ).fit(y)
            bic = g.bic(y)
            if bic < best_bic:
                best, best_bic = g, bic
            k *= 2
        self.column_std_ = x.std(0)
        self.weights_ = best.weights_
        self.means_ = best.means_
        self.covariances_ = best.covariances_
        self._prepare()
        return self

    def _prepare(self) -> None:
        self.chol_ = np.linalg.cholesky(self.covariances_)
        self.log_det_ = 2 * np.log(np.diagonal(self.chol_, axis1=1, axis2=2)).sum(1)

    def project(self, x: F2) -> tuple[F2, F64]:
        """PCA coordinates and squared residual norm of each row."""
        z = (x - self.mean_) / self.scale_ - self.pca_mean_
        y = z @ self.components_.T
        return y, ((z - y @ self.components_) ** 2).sum(1)

    def score(self, x: F2) -> F64:
        """Negative log-density of each row (higher = more anomalous)."""
        y, r2 = self.project(x)
        d = y.shape[1]
        logp = np.empty((len(y), len(self.weights_)))
        for k in range(len(self.weights_)):
            sol = np.linalg.solve(self.chol_[k], (y - self.means_[k]).T)
            logp[:, k] = np.log(self.weights_[k]) - 0.5 * (
                d * np.log(2 * np.pi) + self.log_det_[k] + (sol**2).sum(0)
            )
        var, free = float(self.resid_var_[0]), int(self.resid_dims_[0])
        resid_nll = 0.5 * (r2 / var + free * np.log(2 * np.pi * var))
        from scipy.special import logsumexp  # lazy: keeps scipy out of agents that use no GMM

        out: F64 = -logsumexp(logp, axis=1) + resid_nll
        return out

    def component_logpdf(self, x: F2) -> tuple[F2, F64]:
        """Per-row, per-component ``log(weight_k * N_k(y))`` in PCA space, and the residual's
        NLL: the two parts of :meth:`score`, in numpy alone (all components at once)."""
        y, r2 = self.project(x)
        d = y.shape[1]
        inv_chol = np.linalg.inv(self.chol_)
        sol = np.einsum("kij,nkj->nki", inv_chol, y[:, None, :] - self.means_[None])
        logp: F2 = np.log(self.weights_) - 0.5 * (
            d * np.log(2 * np.pi) + self.log_det_ + (sol**2).sum(2)
        )
        var, free = float(self.resid_var_[0]), int(self.resid_dims_[0])
        resid_nll: F64 = 0.5 * (r2 / var + free * np.log(2 * np.pi * var))
        return logp, resid_nll

    def nll(self, x: F2) -> F64:
        """:meth:`score` without scipy (a numpy log-sum-exp): for a long-running process that
        scores a small model and should not carry scipy's memory for it."""
        logp, resid_nll = self.component_logpdf(x)
        top = logp.max(1)
        out: F64 = -(top + np.log(np.exp(logp - top[:, None]).sum(1))) + resid_nll
        return out

    def conditional_residuals(self, x: F2) -> F2:
        """How far each column of each row is from what the *other* columns predict.

        Under the row's most likely component (Gaussian, in standardised units), column ``j``'s
        residual is ``(x_j - E[x_j | rest]) / sd(x_j | rest)``, i.e. ``(P d)_j / sqrt(P_jj)``
        with ``P`` the component's precision and ``d`` the row's deviation from its mean. A row
        whose every column is ordinary but whose *combination* is not (CPU busy, network
        silent) gets large residuals on exactly the columns that disagree; the sign says which
        way (``+``: higher than the rest imply). PCA's discarded directions count with their
        isotropic residual variance, so this is the full model's precision.
        """
        z = (x - self.mean_) / self.scale_ - self.pca_mean_
        c = self.components_
        inv_chol = np.linalg.inv(self.chol_)  # (k, d, d)
        prec_y = np.einsum("kji,kjl->kil", inv_chol, inv_chol)  # Σ_k^-1 = L^-T L^-1
        rest = (np.eye(c.shape[1]) - c.T @ c) / float(self.resid_var_[0])
        prec = np.einsum("ai,kab,bj->kij", c, prec_y, c) + rest  # (k, D, D), D = columns
        best = self.component_logpdf(x)[0].argmax(1)
        mu_z = self.means_[best] @ c  # component means back in standardised coordinates
        p = prec[best]  # (n, D, D)
        out: F2 = np.einsum("nij,nj->ni", p, z - mu_z) / np.sqrt(np.einsum("nii->ni", p))
        return out

    def arrays(self) -> Arrays:
        return {
            "mean": self.mean_,
            "scale": self.scale_,
            "components": self.components_,
            "pca_mean": self.pca_mean_,
            "weights": self.weights_,
            "means": self.means_,
            "covariances": self.covariances_,
            "resid_var": self.resid_var_,
            "resid_dims": self.resid_dims_,
            "column_std": self.column_std_,
        }

    def set_arrays(self, a: Arrays) -> None:
        self.mean_, self.scale_ = a["mean"], a["scale"]
        self.components_, self.pca_mean_ = a["components"], a["pca_mean"]
        self.weights_, self.means_, self.covariances_ = a["weights"], a["means"], a["covariances"]
        self.resid_var_, self.resid_dims_ = a["resid_var"], a["resid_dims"]
        self.column_std_ = a["column_std"]
        self._prepare()


class HistogramGMM(Detector):
    """GMM density of a window's syscall-frequency vector."""

    kind = "gmm"

    def __init__(
        self,
        max_components: int = 8,
        pca_dims: int = 8,
        reg_covar: float = 1e-3,
        standardize: bool = False,
    ) -> None:
        self.max_components = max_components
        self.pca_dims = pca_dims
        self.reg_covar = reg_covar
        self.standardize = standardize

    @property
    def name(self) -> str:
        return "gmm-hist"

    def get_params(self) -> dict[str, Any]:
        return {
            "max_components": self.max_components,
            "pca_dims": self.pca_dims,
            "reg_covar": self.reg_covar,
            "standardize": self.standardize,
        }

    def _density(self) -> GaussianMixtureDensity:
        return GaussianMixtureDensity(
            self.max_components, self.pca_dims, self.reg_covar, standardize=self.standardize
        )

    def fit(self, seqs: Sequence[I32]) -> Self:
        seqs = [s for s in seqs if len(s)]
        self.vocab_ = Vocabulary.fit(seqs)
        self.density_ = self._density().fit(frequency_vectors(self.vocab_, seqs))
        self.fitted_ = True
        return self

    def score(self, seqs: Sequence[I32]) -> F64:
        self.check_fitted()
        if not seqs:
            return np.empty(0)
        return self.density_.score(frequency_vectors(self.vocab_, seqs))

    def explain(self, seq: I32, top: int = 5, context: int = 0) -> list[Contribution]:
        """Calls whose share of the window deviates most from normal (``+``: more than usual)."""
        seq = seq[context:]
        x = frequency_vectors(self.vocab_, [seq])
        # sqrt-frequency deviation in units of the training spread, floored so that calls that
        # never vary in training (std 0) rank by how much of the window they take
        dev = (x[0] - self.density_.mean_) / np.hypot(self.density_.column_std_, 0.05)
        names = column_names(self.vocab_)
        counts = np.rint((x[0] ** 2) * len(seq)).astype(int)
        unseen = self.vocab_.encode(seq) == OOV
        if unseen.any():  # name the calls behind the "unseen" column
            names[0] = ",".join(name_of(int(c)) + "!" for c in np.unique(seq[unseen]))
        order = np.argsort(-np.abs(dev), kind="stable")[:top]
        return [
            Contribution(
                f"{'+' if dev[i] > 0 else '-'}{names[i]}", float(abs(dev[i])), int(counts[i])
            )
            for i in order
        ]

    def _get_state(self) -> tuple[dict[str, Any], Arrays]:
        return {"vocab": self.vocab_.names()}, self.density_.arrays()

    def _set_state(self, meta: dict[str, Any], arrays: Arrays) -> None:
        self.vocab_ = Vocabulary.from_names(meta["vocab"])
        self.density_ = self._density()
        self.density_.set_arrays(arrays)
