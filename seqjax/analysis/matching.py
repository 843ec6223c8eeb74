"""Convergent learning (Li, Yosinski, Clune, Lipson & Hopcroft, ICLR 2016): match the units of two networks
trained from different seeds by what they compute on the same inputs.

Activations are ``[n, units]`` (samples × units; flatten batch and time into samples first). Three matchings:

- **one-to-one** (:func:`match_units`): the Pearson correlation ``corr_ij = E[(a_i − μ_i)(b_j − μ_j)]/(σ_i σ_j)``;
  ``"hungarian"`` is the maximum-weight bipartite matching (``scipy.optimize.linear_sum_assignment``), ``"semi"``
  pairs each unit of ``a`` with its most correlated unit of ``b`` (repeats allowed). Li et al. report, per layer,
  the sorted correlations of matched pairs; :func:`near_perfect_fraction` is the share above a threshold.
- **one-to-many** (:func:`sparse_prediction`): each unit of ``b`` predicted from all units of ``a`` by L1-penalised
  linear regression on standardised activations (the paper's 1×1 conv with L1 weight decay); with a strong
  penalty most units need one or a few predictors ("a mix of local and slightly distributed code").
- **many-to-many** (:func:`spectral_groups`): spectral clustering of the joint ``(p + q)`` units on the absolute
  correlations within and between the networks; a cluster holding units of both nets is a subspace that both
  learned in different bases.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment

from seqjax import _checks

__all__ = ["Matching", "SparseMatching", "correlation", "match_units", "near_perfect_fraction", "sparse_prediction",
           "spectral_groups"]


class Matching(NamedTuple):
    """``a``'s unit ``rows[i]`` is matched to ``b``'s unit ``cols[i]`` with correlation ``corr[i]``."""

    rows: np.ndarray  # [m] int
    cols: np.ndarray  # [m] int
    corr: np.ndarray  # [m] float


class SparseMatching(NamedTuple):
    """``weights[i, j]``: the L1 regression weight of ``a``'s unit ``i`` in predicting ``b``'s unit ``j``
    (standardised units); ``r2[j]``: the fraction of ``b_j``'s variance explained."""

    weights: np.ndarray  # [p, q]
    r2: np.ndarray  # [q]

    def predictors(self, tol: float = 1e-3) -> list[np.ndarray]:
        """Per unit of ``b``, the units of ``a`` whose |weight| exceeds ``tol`` × that unit's largest |weight|."""
        w = np.abs(self.weights)
        top = w.max(axis=0)
        return [np.flatnonzero(w[:, j] > tol * top[j]) if top[j] > 0 else np.zeros(0, int) for j in range(w.shape[1])]


def _check_pair(a, b):
    _checks.check_ndim("a", a, 2, "[samples, units]")
    _checks.check_ndim("b", b, 2, "[samples, units]")
    if np.shape(a)[0] != np.shape(b)[0]:
        raise ValueError(f"a and b must hold the same samples (first axis): got {np.shape(a)[0]} and {np.shape(b)[0]} "
                         "samples; flatten batch and time into one samples axis for both networks")
    if np.shape(a)[0] < 2:
        raise ValueError(f"a and b need at least 2 samples, got {np.shape(a)[0]}")


def _standardise(x, eps=1e-12):
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    sd = x.std(0)
    return x / np.where(sd > eps, sd, 1.0), sd > eps


def correlation(a: Float[np.ndarray, "n p"], b: Float[np.ndarray, "n q"]) -> Float[np.ndarray, "p q"]:
    """Pearson correlation of every unit of ``a`` with every unit of ``b``; a constant (dead) unit correlates 0."""
    _check_pair(a, b)
    za, _ = _standardise(a)
    zb, _ = _standardise(b)
    return za.T @ zb / za.shape[0]


def match_units(a: Float[np.ndarray, "n p"], b: Float[np.ndarray, "n q"], method: str = "hungarian") -> Matching:
    """One-to-one matching of ``a``'s units to ``b``'s by correlation (see the module docstring).

    ``"hungarian"``: ``min(p, q)`` pairs maximising the summed correlation, each unit used once; ``"semi"``: every
    unit of ``a`` with its argmax partner in ``b``. Pairs are returned in ``a``'s unit order.
    """

    _checks.check_choice("method", method, ("hungarian", "semi"))
    c = correlation(a, b)
    if method == "semi":
        rows = np.arange(c.shape[0])
        cols = np.argmax(c, axis=1)
    else:
        rows, cols = linear_sum_assignment(c, maximize=True)
    return Matching(rows, cols, c[rows, cols])


def near_perfect_fraction(matching: Matching, threshold: float = 0.9) -> float:
    """Fraction of matched pairs whose correlation is at least ``threshold``."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a correlation in [-1, 1], got {threshold}")
    return float(np.mean(matching.corr >= threshold)) if len(matching.corr) else 0.0


def sparse_prediction(a: Float[np.ndarray, "n p"], b: Float[np.ndarray, "n q"], alpha: float = 0.05,
                      max_iter: int = 5000) -> SparseMatching:
    """One-to-many mapping: every (standardised) unit of ``b`` regressed on all (standardised) units of ``a``
    with an L1 penalty ``alpha`` (``sklearn.linear_model.Lasso``: ``1/(2n)‖b_j − A w‖² + alpha‖w‖₁``)."""
    from sklearn.linear_model import Lasso

    _check_pair(a, b)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (the L1 weight), got {alpha}")
    za, _ = _standardise(a)
    zb, live = _standardise(b)
    model = Lasso(alpha=alpha, fit_intercept=False, max_iter=max_iter, tol=1e-6).fit(za, zb)
    w = np.asarray(model.coef_).reshape(zb.shape[1], za.shape[1]).T
    resid = zb - za @ w
    r2 = np.where(live, 1.0 - (resid**2).mean(0), 0.0)
    return SparseMatching(w, r2)


def spectral_groups(a: Float[np.ndarray, "n p"], b: Float[np.ndarray, "n q"], n_groups: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Many-to-many: spectral clustering of the ``p + q`` units of both networks on the affinity ``|corr|`` of the
    stacked activations; returns the group label of each unit of ``a`` and of ``b``."""
    from sklearn.cluster import SpectralClustering

    _check_pair(a, b)
    p, q = np.shape(a)[1], np.shape(b)[1]
    if not 2 <= n_groups <= p + q:
        raise ValueError(f"n_groups must be in [2, p + q = {p + q}], got {n_groups}")
    joint = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)], axis=1)
    affinity = np.abs(correlation(joint, joint))
    np.fill_diagonal(affinity, 1.0)
    labels = SpectralClustering(n_groups, affinity="precomputed", random_state=seed,
                                assign_labels="cluster_qr").fit_predict(affinity)
    return labels[:p], labels[p:]
