"""The interaction basis (Bushnaq et al. 2024, "Using Degeneracy in the Loss Landscape for Mechanistic
Interpretability", and the Local Interaction Basis of Bushnaq et al. 2024): rotate each layer's activations into
a basis that drops the directions the network does not use and aligns the rest with how the next layer reads them.

For a layer with activations ``f ∈ R^d`` (samples ``[n, d]``) read by the map ``F: R^d → R^{d'}`` into a next layer
whose basis is ``C⁺`` (``[d', r']``; the last layer uses its PCA basis):

1. ``G = E[f fᵀ] = U D Uᵀ`` (uncentred); eigen-directions with ``D ≤ tol · max D`` are dropped (linearly dependent
   activations, degeneracy 1);
2. ``M′ = E[Jᵀ J]`` with ``J = ∂(C⁺ᵀ F(f))/∂f`` (the plain-Jacobian form of the first paper);
3. whiten and rotate: ``M = (U D^½)ᵀ M′ (U D^½) = V S Vᵀ``; directions with ``S ≤ tol · max S`` are dropped (no
   gradient flows through them, degeneracy 2);
4. basis ``C = U D^{−½} V`` (``[d, r]``), features ``f̂ = f C`` (whitened, unit second moment), reconstruction
   ``f ≈ f̂ C_pinv`` with ``C_pinv = Vᵀ D^½ Uᵀ``.

For a linear layer ``F(f) = W f`` on whitened activations the basis is the SVD: ``C`` holds ``W``'s right singular
vectors, ``S = σ²``, and the next layer's PCA basis its left singular vectors, so every feature talks to exactly one
feature of the next layer.

Interaction graph: edge ``E_ij = E[(∂f̂^{out}_i/∂f̂^{in}_j · f̂^{in}_j)²]`` (squared gradient × activation
attribution). Its sparsity (:func:`edge_sparsity`: the fraction of edges that hold 99 % of the total weight) and
Newman's modularity (:func:`modularity`, :func:`find_modules` by spectral clustering of the layered graph) are
compared with the PCA and the plain neuron basis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from seqjax import _checks

__all__ = ["InteractionBasis", "pca_basis", "neuron_basis", "interaction_basis", "interaction_bases", "interaction_graph",
           "edge_sparsity", "layered_adjacency", "modularity", "find_modules"]


class InteractionBasis(NamedTuple):
    """Features ``f̂ = f @ C``; reconstruction ``f ≈ f̂ @ C_pinv``; ``eigvals`` (descending): the Jacobian-metric
    eigenvalues ``S`` of the kept directions (the Gram eigenvalues for a PCA basis)."""

    C: np.ndarray  # [d, r]
    C_pinv: np.ndarray  # [r, d]
    eigvals: np.ndarray  # [r]

    @property
    def rank(self) -> int:
        return self.C.shape[1]


def _check_acts(name, acts):
    _checks.check_ndim(name, acts, 2, "[samples, width]")
    if np.shape(acts)[0] < 1:
        raise ValueError(f"{name} has no samples")


def _gram(acts, tol):
    f = np.asarray(acts, np.float64)
    D, U = np.linalg.eigh(f.T @ f / f.shape[0])
    order = np.argsort(D)[::-1]
    D, U = D[order], U[:, order]
    keep = D > tol * max(D[0], 1e-300)
    return U[:, keep], D[keep]


def pca_basis(acts: Float[np.ndarray, "n d"], tol: float = 1e-5, whiten: bool = False) -> InteractionBasis:
    """The eigenbasis of the uncentred Gram matrix ``E[f fᵀ]`` with null directions dropped (``whiten``: scaled
    to unit second moment)."""
    _check_acts("acts", acts)
    U, D = _gram(acts, tol)
    s = D ** -0.5 if whiten else np.ones_like(D)
    return InteractionBasis(U * s, (U / s).T, D)


def neuron_basis(width: int) -> InteractionBasis:
    """The standard basis (one feature per unit)."""
    eye = np.eye(width)
    return InteractionBasis(eye, eye, np.ones(width))


def _jacobians(fn, acts, out_C, name):
    if fn is None or not callable(fn):
        raise ValueError(f"{name} has no layer map to differentiate (got {fn!r}); the interaction basis needs the "
                         "Jacobian of the map from this layer's activations to the next layer's")
    x = jnp.asarray(acts, jnp.float32)
    y = jax.eval_shape(fn, x[0])
    if not jnp.issubdtype(y.dtype, jnp.floating) or y.ndim != 1:
        raise ValueError(f"{name}'s map must take one activation vector [d] to a float vector [d'], got "
                         f"{y.dtype} {list(y.shape)}: it has no Jacobian")
    if out_C is not None and out_C.shape[0] != y.shape[0]:
        raise ValueError(f"the next layer's basis must have {y.shape[0]} rows (the map's output width), got "
                         f"{out_C.shape[0]}")
    Cj = jnp.asarray(np.eye(y.shape[0]) if out_C is None else out_C, jnp.float32)
    jac = jax.jit(jax.vmap(jax.jacrev(lambda v: fn(v) @ Cj)))
    J = np.concatenate([np.asarray(jac(x[i : i + 512]), np.float64) for i in range(0, x.shape[0], 512)])
    return J  # [n, r', d]


def interaction_basis(fn: Callable | None, acts: Float[np.ndarray, "n d"], out_basis: InteractionBasis | None = None,
                      tol: float = 1e-5, importance: bool = False) -> InteractionBasis:
    """One layer's interaction basis (steps 1–4 of the module docstring). ``fn``: one activation vector ``[d]``
    to the next layer's ``[d']`` (jax-differentiable); ``out_basis``: the next layer's basis (``None``: its
    units). ``importance``: scale each direction by ``|Λ_i|^½``, its gradient × activation attribution
    ``Λ_i = |E[g̃_i f̃_i]|`` with ``g = Jᵀ f̂^{out}`` (the Local Interaction Basis's step), and order and drop
    directions by ``|Λ|`` instead of ``S``."""
    _check_acts("acts", acts)
    U, D = _gram(acts, tol)
    J = _jacobians(fn, acts, None if out_basis is None else out_basis.C, "this layer")
    Mp = np.einsum("nrd,nre->de", J, J) / J.shape[0]
    A = U * np.sqrt(D)
    S, V = np.linalg.eigh(A.T @ Mp @ A)
    order = np.argsort(S)[::-1]
    S, V = S[order], V[:, order]
    keep = S > tol * max(S[0], 1e-300) if len(S) else np.zeros(0, bool)
    S, V = S[keep], V[:, keep]
    C = (U / np.sqrt(D)) @ V
    C_pinv = V.T @ A.T
    if importance and len(S):
        f = np.asarray(acts, np.float64)
        fn_out = jax.jit(jax.vmap(fn))
        out = np.concatenate([np.asarray(fn_out(jnp.asarray(f[i : i + 512], jnp.float32)), np.float64) for i in range(0, len(f), 512)])
        f_out = out if out_basis is None else out @ out_basis.C
        g = np.einsum("nrd,nr->nd", J, f_out)  # Jᵀ f̂^{out}
        lam = np.abs(np.mean((g @ A @ V) * (f @ C), axis=0))
        order = np.argsort(lam)[::-1]
        lam, C, C_pinv, S = lam[order], C[:, order], C_pinv[order], S[order]
        keep = lam > tol * max(lam[0], 1e-300)
        lam, C, C_pinv = lam[keep], C[:, keep], C_pinv[keep]
        return InteractionBasis(C * np.sqrt(lam), C_pinv / np.sqrt(lam)[:, None], lam)
    return InteractionBasis(C, C_pinv, S)


def interaction_bases(fns: Sequence[Callable | None], acts: Sequence[np.ndarray], tol: float = 1e-5,
                      importance: bool = False) -> list[InteractionBasis]:
    """Every layer's basis, computed backwards from the output: ``acts = [f^0, ..., f^L]`` (``[n, d_l]`` each, the
    same samples), ``fns[l]`` maps ``f^l → f^(l+1)`` for one sample; the last layer gets its PCA basis."""
    if len(fns) != len(acts) - 1:
        raise ValueError(f"fns must hold one map per pair of consecutive layers: {len(acts)} activations need "
                         f"{len(acts) - 1} maps, got {len(fns)}")
    n = np.shape(acts[0])[0]
    for i, a in enumerate(acts):
        _check_acts(f"acts[{i}]", a)
        if np.shape(a)[0] != n:
            raise ValueError(f"acts[{i}] must hold the same {n} samples as acts[0], got {np.shape(a)[0]}")
    for i, fn in enumerate(fns):
        if fn is None or not callable(fn):
            raise ValueError(f"layer {i} has no map (fns[{i}] = {fn!r}), so it has no Jacobian")
    bases = [pca_basis(acts[-1], tol)]
    for i in range(len(fns) - 1, -1, -1):
        bases.insert(0, interaction_basis(fns[i], acts[i], bases[0], tol, importance))
    return bases


def interaction_graph(fn: Callable, acts: Float[np.ndarray, "n d"], basis_in: InteractionBasis,
                      basis_out: InteractionBasis) -> np.ndarray:
    """Edges ``E [r_out, r_in]``: ``E_ij = E[(∂f̂^{out}_i/∂f̂^{in}_j · f̂^{in}_j)²]`` with ``f̂^{in} = f C_in`` and
    ``f̂^{out} = fn(f) C_out``; ``∂f̂^{out}/∂f̂^{in} = C_outᵀ J C_pinvᵀ``."""
    _check_acts("acts", acts)
    J = _jacobians(fn, acts, basis_out.C, "this layer")  # [n, r_out, d]
    Jt = J @ basis_in.C_pinv.T  # [n, r_out, r_in]
    fh = np.asarray(acts, np.float64) @ basis_in.C  # [n, r_in]
    return np.mean((Jt * fh[:, None, :]) ** 2, axis=0)


def edge_sparsity(E, mass: float = 0.99) -> float:
    """The fraction of edges needed (largest first) to hold ``mass`` of the total edge weight; lower is sparser."""
    w = np.sort(np.asarray(E, np.float64).ravel())[::-1]
    if w.size == 0 or w.sum() <= 0:
        raise ValueError("E must hold at least one positive edge")
    k = int(np.searchsorted(np.cumsum(w) / w.sum(), mass - 1e-12) + 1)
    return min(k, w.size) / w.size


def layered_adjacency(edges: Sequence[np.ndarray]) -> np.ndarray:
    """The symmetric adjacency of a layered graph: ``edges[l]`` is ``[r_{l+1}, r_l]`` (as :func:`interaction_graph`
    returns it); nodes are ordered layer by layer."""
    sizes = [edges[0].shape[1]] + [e.shape[0] for e in edges]
    for i in range(1, len(edges)):
        if edges[i].shape[1] != edges[i - 1].shape[0]:
            raise ValueError(f"edges[{i}] must read {edges[i - 1].shape[0]} nodes (edges[{i - 1}]'s outputs), "
                             f"got {edges[i].shape[1]}")
    off = np.concatenate([[0], np.cumsum(sizes)])
    A = np.zeros((off[-1], off[-1]))
    for i, e in enumerate(edges):
        A[off[i + 1] : off[i + 2], off[i] : off[i + 1]] = e
    return A + A.T


def modularity(A, labels) -> float:
    """Newman's modularity ``Q = (1/2m) Σ_ij [A_ij − k_i k_j / 2m] δ(c_i, c_j)`` of a weighted undirected graph."""
    A = np.asarray(A, np.float64)
    labels = np.asarray(labels)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or not np.allclose(A, A.T):
        raise ValueError(f"A must be a symmetric [nodes, nodes] adjacency, got shape {list(A.shape)}")
    if labels.shape != (A.shape[0],):
        raise ValueError(f"labels must have shape [{A.shape[0]}], got {list(labels.shape)}")
    k = A.sum(1)
    two_m = k.sum()
    if two_m <= 0:
        raise ValueError("A has no edges")
    same = labels[:, None] == labels[None, :]
    return float(((A - np.outer(k, k) / two_m) * same).sum() / two_m)


def find_modules(A, n_modules: int, seed: int = 0) -> np.ndarray:
    """Module labels by spectral clustering on the adjacency ``A`` (isolated nodes get their own label ``-1``)."""
    from sklearn.cluster import SpectralClustering

    A = np.asarray(A, np.float64)
    live = A.sum(1) > 0
    if not 2 <= n_modules <= live.sum():
        raise ValueError(f"n_modules must be in [2, {live.sum()}] (the connected nodes), got {n_modules}")
    labels = -np.ones(A.shape[0], int)
    sub = A[np.ix_(live, live)]
    labels[live] = SpectralClustering(n_modules, affinity="precomputed", random_state=seed,
                                      assign_labels="cluster_qr").fit_predict(sub / sub.max())
    return labels
