r"""Continual learning: three ways to keep earlier tasks while learning new ones, and the metrics.

**Hypernetwork output regulariser** (von Oswald et al. 2020; used by Chandra et al. 2023 for the RNN
hypernetwork of :mod:`seqjax.models.hypernet`). Before task :math:`T` store the weights the hypernetwork
generates for every earlier task, :math:`\hat w_t = f_h(e_t, \Theta^*)`; while learning :math:`T` add

.. math::  \frac{\beta}{T-1} \sum_{t<T} \lVert f_h(e_t, \Theta) - \hat w_t \rVert^2

(:func:`hnet_regularizer`, the mean over earlier tasks; the look-ahead and Fisher weighting of the original are
left out). It is exactly zero while :math:`\Theta` is unchanged.

**EWC** (Kirkpatrick et al. 2017): :math:`\frac\lambda2 \sum_t \sum_i F_{t,i} (\theta_i - \theta^*_{t,i})^2`
with the diagonal Fisher :math:`F_t = \mathbb E[(\nabla_\theta \log p(y \mid x, \theta^*_t))^2]` of each
earlier task at its end (:func:`fisher_diagonal`, :func:`ewc_penalty`; :func:`ewc_merge` folds the earlier
tasks into one anchor with the same gradient).

**Hebbian orthogonal projection** (the idea of HLOP, Xiao et al. ICLR 2024, with rate neurons in place of
spiking ones). For each projected layer with input :math:`x \in \mathbb R^n` (weight ``[n, out]``), ``k``
lateral neurons :math:`y = Hx` learn the principal subspace of the layer's inputs by Oja's subspace rule
(Hebbian :math:`y x^\top`, anti-Hebbian :math:`-y y^\top H`),

.. math::  \Delta H = \eta\,\big(y\,x_r^\top - y\,y^\top H\big) / \overline{\lVert x_r\rVert^2},
           \qquad x_r = x - U U^\top x,

run on the residual :math:`x_r` of the subspace :math:`U` already stored (the stored neurons' feedback), so new
neurons find the principal directions not yet protected; the step is divided by the batch's mean
:math:`\lVert x_r\rVert^2` (an upper bound on the largest eigenvalue) so it is stable at any input scale. At
the end of a task the learnt rows are orthonormalised into :math:`U` (:func:`hebbian_consolidate`). Later tasks'
weight updates are projected, :math:`\Delta W \leftarrow (I - U U^\top)\,\Delta W`, so the layer's output on
every input in the stored subspace stays what it was. :func:`hebbian_projection` is the optax transform:
put it last in an ``optax.chain`` (after Adam) so the applied update itself is orthogonal, and pass the
layer inputs as ``hebbian_inputs=`` to ``update`` to learn the current task's subspace as training runs.

**Metrics** on the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training task ``i``):
:func:`average_accuracy` :math:`\frac1T \sum_j R_{T-1,j}`, :func:`forgetting` (Chaudhry et al. 2018:
:math:`\frac1{T-1}\sum_{j<T-1} \max_{j\le l<T-1} R_{l,j} - R_{T-1,j}`) and :func:`backward_transfer` (Lopez-Paz &
Ranzato 2017: :math:`\frac1{T-1}\sum_{j<T-1} R_{T-1,j} - R_{j,j}`). Only ``R[i, j]`` with ``i >= j`` is read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from seqjax.models import hypernet as _hnet

__all__ = ["hnet_regularizer", "hnet_targets", "fisher_diagonal", "ewc_merge", "ewc_penalty", "HebbianState",
           "oja_subspace_step", "project_out", "hebbian_projection", "hebbian_observe", "hebbian_start_task",
           "hebbian_consolidate", "average_accuracy", "forgetting", "backward_transfer"]


# ----------------------------------------------------------------------------- hypernetwork regulariser


def hnet_targets(params: dict, spec: _hnet.TargetSpec, num_old: int) -> jax.Array:
    """The raw weights ``[num_old, size]`` the hypernetwork generates now for tasks ``0 .. num_old − 1``:
    store them before training the next task."""
    if num_old < 1:
        raise ValueError(f"num_old must be >= 1, got {num_old}")
    return jax.lax.stop_gradient(_hnet.generate(params, spec, np.arange(num_old)))


def hnet_regularizer(params: dict, spec: _hnet.TargetSpec, targets: Float[Array, "t size"], mask=None) -> jax.Array:
    """Mean over the stored tasks ``t`` of ``‖f_h(e_t, Θ) − targets[t]‖²`` (scalar; multiply by β). The
    task embeddings of earlier tasks are read through ``stop_gradient``: only Θ is pulled back. ``mask``
    ``[t]`` bool (optional) keeps only some rows, so one compiled step serves every task of a sequence
    (targets padded to the sequence length; 0 when no row is kept)."""
    targets = jnp.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != spec.size:
        raise ValueError(f"targets must have shape [tasks, {spec.size}], got {list(targets.shape)}")
    n = targets.shape[0]
    if n > _hnet.num_tasks(params):
        raise ValueError(f"targets has {n} tasks but the hypernetwork has embeddings for {_hnet.num_tasks(params)}")
    if mask is not None and np.shape(mask) != (n,):
        raise ValueError(f"mask must have shape [{n}] like targets' rows, got {list(np.shape(mask))}")
    frozen = dict(params, task_emb=params["task_emb"].at[:n].set(jax.lax.stop_gradient(params["task_emb"][:n])))
    err = jnp.sum((_hnet.generate(frozen, spec, np.arange(n)) - targets) ** 2, axis=-1)
    if mask is None:
        return jnp.mean(err)
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


# ----------------------------------------------------------------------------- EWC


def fisher_diagonal(log_likelihood: Callable, params, *batch, chunk: int = 64):
    """Diagonal Fisher ``E_n[(∇_θ log_likelihood(θ, *example_n))²]`` (a pytree like ``params``), the mean over
    the examples along axis 0 of every array in ``batch``, ``chunk`` examples at a time. Give labels drawn from
    the model for the Fisher, the data's labels for the empirical Fisher."""
    if not batch:
        raise ValueError("batch is empty: give the examples (e.g. x, y) along axis 0")
    n = int(np.shape(batch[0])[0])
    if n < 1 or any(int(np.shape(b)[0]) != n for b in batch):
        raise ValueError(f"every batch array needs the same number (>= 1) of examples on axis 0, got "
                         f"{[np.shape(b)[0] for b in batch]}")
    per_example = _per_example_grad(log_likelihood, len(batch))
    total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    chunk = min(chunk, n)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)  # the last chunk is padded to the chunk's shape (one compile) and the padding dropped
        part = [b[i : i + m] if m == chunk else jnp.concatenate([jnp.asarray(b[i : i + m]), jnp.asarray(b[: chunk - m])])
                for b in batch]
        g = per_example(params, *part)
        total = jax.tree.map(lambda t, gi: t + jnp.sum(jnp.square(gi[:m].astype(jnp.float32)), 0), total, g)
    return jax.tree.map(lambda t: t / n, total)


@functools.lru_cache(maxsize=32)
def _per_example_grad(log_likelihood: Callable, n_args: int):
    return jax.jit(jax.vmap(jax.grad(log_likelihood), in_axes=(None,) + (0,) * n_args))


def ewc_merge(anchors: Sequence[tuple[object, object]]) -> tuple[object, object]:
    """One anchor with the same penalty gradient as many: ``F = Σ_t F_t``, ``θ* = Σ_t F_t θ*_t / F`` (``θ*_0``
    where ``F = 0``); the penalties differ by a constant. Keeps a training step's arguments one shape."""
    if not anchors:
        raise ValueError("anchors is empty")
    fisher = jax.tree.map(lambda *f: sum(f), *[f for _, f in anchors])
    weighted = jax.tree.map(lambda *af: sum(a * f for a, f in zip(af[::2], af[1::2])),
                            *[x for a, f in anchors for x in (a, f)])
    anchor = jax.tree.map(lambda w, f, a0: jnp.where(f > 0, w / jnp.where(f > 0, f, 1.0), a0), weighted, fisher,
                          anchors[0][0])
    return anchor, fisher


def ewc_penalty(params, anchors: Sequence[tuple[object, object]], lam: float) -> jax.Array:
    """``lam/2 · Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²`` over ``anchors`` = ``[(θ*_t, F_t), ...]`` (pytrees like
    ``params``)."""
    total = jnp.zeros((), jnp.float32)
    for anchor, fisher in anchors:
        terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a)), params, anchor, fisher)
        total = total + sum(jax.tree.leaves(terms))
    return 0.5 * lam * total


# ----------------------------------------------------------------------------- Hebbian orthogonal projection


class HebbianState(NamedTuple):
    """Per projected leaf (``None`` at the others): ``lateral`` ``H`` ``[k_max, n]`` (rows are lateral
    neurons), ``basis`` ``U`` ``[n, k_max]`` (orthonormal columns ``0 .. stored − 1``, zeros after),
    ``stored`` and ``learning`` (int32 scalars: rows frozen in ``U``; rows learning now, after those)."""

    lateral: object
    basis: object
    stored: object
    learning: object


def _is_none(x):
    return x is None


def oja_subspace_step(H: Float[Array, "k n"], x: Float[Array, "b n"], basis: Float[Array, "n k"], stored, learning,
                      lr: float, clip: float = 10.0) -> jax.Array:
    """One Oja-subspace step (module docstring) for the rows ``stored .. stored + learning − 1`` of ``H`` on the
    batch ``x`` ``[b, n]``, on its residual outside ``basis``; the other rows are returned unchanged."""
    x = x.astype(jnp.float32)
    rows = jnp.arange(H.shape[0])
    active = ((rows >= stored) & (rows < stored + learning)).astype(jnp.float32)[:, None]
    xr = x - (x @ basis) @ basis.T
    Ha = H * active
    y = xr @ Ha.T  # [b, k]
    dH = (y.T @ xr - (y.T @ y) @ Ha) / x.shape[0]
    scale = lr / jnp.maximum(jnp.mean(jnp.sum(xr * xr, -1)), 1e-12)
    return H + jnp.clip(scale * dH, -clip, clip) * active


def project_out(u: Float[Array, "n ..."], basis: Float[Array, "n k"]) -> jax.Array:
    """``(I − U Uᵀ) u`` along ``u``'s first (input) axis."""
    u2 = u.reshape(u.shape[0], -1).astype(jnp.float32)
    return (u2 - basis @ (basis.T @ u2)).reshape(u.shape).astype(u.dtype)


def _resolve_mask(mask, params):
    m = mask(params) if callable(mask) else mask
    leaves_m, leaves_p = jax.tree.leaves(m), jax.tree.leaves(params)
    if len(leaves_m) != len(leaves_p):
        raise ValueError(f"mask must be a pytree of bools like params ({len(leaves_p)} leaves), got {len(leaves_m)} leaves")
    for i, (on, p) in enumerate(zip(leaves_m, leaves_p)):
        if on and np.ndim(p) != 2:
            raise ValueError(f"projected leaf {i} must be a 2-d weight [inputs, outputs], got shape {list(np.shape(p))}")
    return m


def hebbian_projection(mask, k_max: int, *, lr: float = 0.5, iters: int = 1, clip: float = 10.0,
                       seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """The HLOP-style optax transform (module docstring). ``mask``: a pytree of bools like the params (or a
    function of the params giving one) marking the 2-d weights ``[inputs, outputs]`` to project; ``k_max``:
    lateral neurons per projected leaf (at most its input size), the capacity over all tasks.

    ``update(updates, state, params=None, hebbian_inputs=None)``: projects the marked updates off the stored
    subspaces; ``hebbian_inputs`` (a pytree like ``params`` with the layer input ``[batch, inputs]`` at each
    marked leaf, ``None`` elsewhere) also runs ``iters`` Hebbian steps of the learning rows. Between tasks
    call :func:`hebbian_consolidate` then :func:`hebbian_start_task` on the state."""
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if not 0 < lr < 1:
        raise ValueError(f"lr must be in (0, 1), got {lr}")

    def init_fn(params):
        m = _resolve_mask(mask, params)
        keys = iter(jax.random.split(jax.random.PRNGKey(seed), max(1, len(jax.tree.leaves(params)))))

        def lateral(on, p):
            if not on:
                return None
            n = p.shape[0]
            if k_max > n:
                raise ValueError(f"k_max={k_max} exceeds a projected leaf's input size {n}")
            q, _ = jnp.linalg.qr(jax.random.normal(next(keys), (n, k_max), jnp.float32))
            return q.T  # orthonormal rows (HLOP's orthogonal initialisation)

        lat = jax.tree.map(lateral, m, params)
        zero = lambda on, p: jnp.zeros((p.shape[0], k_max), jnp.float32) if on else None
        count = lambda on, p: jnp.zeros((), jnp.int32) if on else None
        return HebbianState(lat, jax.tree.map(zero, m, params), jax.tree.map(count, m, params),
                            jax.tree.map(count, m, params))

    def update_fn(updates, state, params=None, hebbian_inputs=None, **extra):
        del params, extra
        projected = jax.tree.map(lambda u, U: u if U is None else project_out(u, U), updates, state.basis,
                                 is_leaf=_is_none)
        if hebbian_inputs is not None:
            state = hebbian_observe(state, hebbian_inputs, lr=lr, iters=iters, clip=clip)
        return projected, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hebbian_observe(state: HebbianState, inputs, *, lr: float = 0.5, iters: int = 1, clip: float = 10.0) -> HebbianState:
    """``iters`` Hebbian steps of the learning rows on ``inputs`` (a pytree like the params: ``[batch, n]`` at
    each projected leaf, ``None`` elsewhere); no weight update."""

    def learn(H, x, U, s, k):
        if H is None:
            return None
        if x is None:
            raise ValueError("hebbian_inputs has None at a projected leaf: give that layer's input [batch, inputs]")
        if x.ndim != 2 or x.shape[1] != H.shape[1]:
            raise ValueError(f"a layer input must have shape [batch, {H.shape[1]}], got {list(x.shape)}")
        for _ in range(iters):
            H = oja_subspace_step(H, x, U, s, k, lr, clip)
        return H

    lat = jax.tree.map(learn, state.lateral, inputs, state.basis, state.stored, state.learning, is_leaf=_is_none)
    return state._replace(lateral=lat)


def hebbian_start_task(state: HebbianState, k: int) -> HebbianState:
    """Give the next task ``k`` learning rows per projected leaf (after the stored ones)."""
    def grow(H, s):
        if H is None:
            return None
        if int(s) + k > H.shape[0]:
            raise ValueError(f"k={k} more lateral neurons exceed k_max={H.shape[0]} ({int(s)} stored)")
        return jnp.asarray(k, jnp.int32)

    return state._replace(learning=jax.tree.map(grow, state.lateral, state.stored, is_leaf=_is_none))


def hebbian_consolidate(state: HebbianState) -> HebbianState:
    """Store the learning rows: orthonormalise them against the stored basis (Gram–Schmidt by QR) into ``U``;
    afterwards they are frozen and ``learning`` is 0. Eager (not under jit)."""
    def store(H, U, s, k):
        if H is None:
            return None
        s, k = int(s), int(k)
        if k == 0:
            return U
        new = H[s : s + k].T  # [n, k]
        new = new - U @ (U.T @ new)
        q, r = jnp.linalg.qr(new)
        q = q * jnp.where(jnp.abs(jnp.diagonal(r)) > 1e-6, 1.0, 0.0)[None]  # drop directions already stored
        return U.at[:, s : s + k].set(q)

    basis = jax.tree.map(store, state.lateral, state.basis, state.stored, state.learning, is_leaf=_is_none)
    stored = jax.tree.map(lambda s, k: None if s is None else s + k, state.stored, state.learning, is_leaf=_is_none)
    zero = jax.tree.map(lambda s: None if s is None else jnp.zeros((), jnp.int32), state.stored, is_leaf=_is_none)
    return HebbianState(state.lateral, basis, stored, zero)


# ----------------------------------------------------------------------------- metrics


def _check_matrix(R):
    R = np.asarray(R, np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"R must be a square accuracy matrix [tasks, tasks], got shape {list(R.shape)}")
    return R


def average_accuracy(R) -> float:
    """Mean accuracy over all tasks after the last one, ``mean_j R[T−1, j]``."""
    R = _check_matrix(R)
    return float(R[-1].mean())


def forgetting(R) -> float:
    """Average forgetting (Chaudhry et al. 2018): ``mean_{j<T−1} max_{j≤l<T−1} R[l, j] − R[T−1, j]`` (0 for one
    task)."""
    R = _check_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([R[j : T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


def backward_transfer(R) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): ``mean_{j<T−1} R[T−1, j] − R[j, j]`` (negative = forgetting)."""
    R = _check_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))
