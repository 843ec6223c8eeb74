r"""Centered kernel alignment (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network
Representations Revisited").

For representations ``x`` ``[n, ...]`` and ``y`` ``[n, ...]`` of the same ``n`` examples (flattened per example to
``[n, p]`` and ``[n, q]``), with Gram matrices ``K = k(x_i, x_j)``, ``L = l(y_i, y_j)`` and the centring
``H = I - 11^T/n``:

.. math::  \mathrm{HSIC}(K, L) = \langle HKH, HLH \rangle_F, \qquad
           \mathrm{CKA}(x, y) = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}} \in [0, 1].

- **linear** kernel ``K = x x^T``: CKA is invariant to orthogonal transforms and isotropic scaling of either
  representation (not to arbitrary invertible linear maps); with one feature each it is the squared Pearson
  correlation.
- **rbf** kernel ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))``, ``sigma = threshold * median_ij |x_i - x_j|``
  (Kornblith et al.'s bandwidth, chosen per representation).
- ``debiased=True``: the unbiased HSIC estimator of Song et al. (2012) in place of ``<HKH, HLH>`` (needs
  ``n >= 4``), as in Kornblith et al.'s reference code; it removes CKA's upward bias at small ``n`` and large
  widths, and can be slightly negative.

Everything is computed in float32 and is differentiable (a guidance loss trains through it); a constant
representation (zero centred Gram) has CKA 0 by convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from seqjax import _checks

__all__ = ["KERNELS", "cka", "linear_cka", "rbf_cka", "gram_linear", "gram_rbf", "hsic"]

KERNELS = ("linear", "rbf")


def _check_pair(x, y, debiased: bool) -> None:
    for name, a in (("x", x), ("y", y)):
        if np.ndim(a) < 2:
            raise ValueError(f"{name} must be [n_samples, features...] with at least 2 dims, got shape {list(np.shape(a))}")
        _checks.check_dtype(name, a, "float")
    nx, ny = np.shape(x)[0], np.shape(y)[0]
    if nx != ny:
        raise ValueError(f"x and y must hold the same examples (same sample count on axis 0), got {nx} and {ny}")
    need = 4 if debiased else 2
    if nx < need:
        raise ValueError(f"CKA needs n_samples >= {need}{' (debiased)' if debiased else ''}, got {nx}")


def _flat(x) -> Float[Array, "n p"]:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape[0], -1)


def gram_linear(x: Float[Array, "n ..."]) -> Float[Array, "n n"]:
    """``K = x x^T`` of the per-example flattened ``x``."""
    x = _flat(x)
    return x @ x.T


def _sqdist(x):
    sq = jnp.sum(x * x, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def gram_rbf(x: Float[Array, "n ..."], threshold: float = 1.0) -> Float[Array, "n n"]:
    """``K_ij = exp(-d_ij^2 / (2 sigma^2))`` with ``sigma = threshold * median(d_ij)`` over all pairs."""
    d2 = _sqdist(_flat(x))
    med = jax.lax.stop_gradient(jnp.median(jnp.sqrt(d2)))  # the bandwidth is a constant of the data
    sigma2 = jnp.maximum((threshold * med) ** 2, 1e-12)
    return jnp.exp(-d2 / (2.0 * sigma2))


def _center(g, debiased: bool):
    n = g.shape[0]
    if not debiased:
        g = g - jnp.mean(g, axis=0, keepdims=True)
        return g - jnp.mean(g, axis=1, keepdims=True)
    # Song et al. (2012) via Kornblith et al.'s `center_gram(unbiased=True)`: <ret(K), ret(L)> is the unbiased HSIC
    g = g * (1.0 - jnp.eye(n, dtype=g.dtype))
    means = jnp.sum(g, axis=0) / (n - 2)
    means = means - jnp.sum(means) / (2 * (n - 1))
    g = g - means[:, None] - means[None, :]
    return g * (1.0 - jnp.eye(n, dtype=g.dtype))


def hsic(gx: Float[Array, "n n"], gy: Float[Array, "n n"], *, debiased: bool = False) -> Float[Array, ""]:
    """``<H K H, H L H>_F`` of two Gram matrices (the unbiased estimator's numerator with ``debiased``)."""
    return jnp.sum(_center(gx, debiased) * _center(gy, debiased))


def _cka_grams(gx, gy, debiased):
    cx, cy = _center(gx, debiased), _center(gy, debiased)
    xy, xx, yy = jnp.sum(cx * cy), jnp.sum(cx * cx), jnp.sum(cy * cy)
    den2 = xx * yy
    ok = den2 > 0
    return jnp.where(ok, xy / jnp.sqrt(jnp.where(ok, den2, 1.0)), 0.0)


def linear_cka(x: Float[Array, "n ..."], y: Float[Array, "n ..."], *, debiased: bool = False) -> Float[Array, ""]:
    """Linear CKA of two representations of the same ``n`` examples (see the module docstring)."""
    _check_pair(x, y, debiased)
    return _cka_grams(gram_linear(x), gram_linear(y), debiased)


def rbf_cka(x: Float[Array, "n ..."], y: Float[Array, "n ..."], *, threshold: float = 1.0,
            debiased: bool = False) -> Float[Array, ""]:
    """RBF-kernel CKA, bandwidth ``threshold`` times the median pairwise distance of each representation."""
    _check_pair(x, y, debiased)
    if not threshold > 0:
        raise ValueError(f"threshold (the RBF bandwidth in median distances) must be > 0, got {threshold}")
    return _cka_grams(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)


def cka(x: Float[Array, "n ..."], y: Float[Array, "n ..."], kernel: str = "linear", *, threshold: float = 1.0,
        debiased: bool = False) -> Float[Array, ""]:
    """CKA with ``kernel`` ``"linear"`` or ``"rbf"`` (``threshold``: the RBF bandwidth in median distances)."""
    _checks.check_choice("kernel", kernel, KERNELS)
    if kernel == "linear":
        return linear_cka(x, y, debiased=debiased)
    return rbf_cka(x, y, threshold=threshold, debiased=debiased)
