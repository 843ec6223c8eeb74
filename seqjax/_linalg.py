"""Small dense solves that are safe on the CPU backend.

jaxlib's CPU LAPACK kernels (``getrf``, ``trsm``, …) split a batched call over XLA's intra-op thread pool
and block until the parts finish. When XLA's thunk executor runs two such calls at the same time, they can
occupy every pool thread and wait on each other forever; on a 2-core machine this hung LSSL training
and evaluation, and DeltaNet training, in jax 0.10.2 (gdb: both ``tf_XLAEigen`` threads in
``jax::ParallelBatchMap`` → ``BlockingCounter::Wait``). On CPU we therefore solve in plain XLA ops;
GPU and TPU keep the library solvers (``lax.platform_dependent`` picks per backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["solve", "solve_unit_lower"]


def _gauss_jordan(a, b):
    """``a^{-1} b`` by Gauss–Jordan elimination with partial pivoting; ``a [..., n, n]``, ``b [..., n, m]``."""
    n = a.shape[-1]
    m = jnp.concatenate([a, b], axis=-1)
    lead = (1,) * (m.ndim - 2)
    rows = jnp.arange(n).reshape(lead + (n,))  # broadcast explicitly (works under strict rank promotion)

    def body(k, m):
        col = jnp.abs(lax.dynamic_index_in_dim(m, k, axis=-1, keepdims=False))  # [..., n]
        p = jnp.argmax(jnp.where(rows >= k, col, -1.0), axis=-1)  # pivot row among rows >= k
        row_k = lax.dynamic_index_in_dim(m, k, axis=-2, keepdims=True)
        row_p = jnp.take_along_axis(m, p[..., None, None], axis=-2)
        is_k, is_p = (rows == k)[..., None], (rows[..., None] == p[..., None, None])
        m = jnp.where(is_k, row_p, jnp.where(is_p, row_k, m))  # swap rows k and p
        pivot = lax.dynamic_index_in_dim(m, k, axis=-2, keepdims=True)
        pivot = pivot / lax.dynamic_slice_in_dim(pivot, k, 1, axis=-1)
        factor = lax.dynamic_slice_in_dim(m, k, 1, axis=-1)  # [..., n, 1]
        return jnp.where(is_k, pivot, m - factor * pivot)

    return lax.fori_loop(0, n, body, m)[..., n:]


def _with_solve_vjp(forward, transposed, grad_mask=None):
    """``x = forward(a, b) = a^{-1} b`` with the implicit VJP: ``db = a^{-T} dx`` (``transposed(a, dx)``),
    ``da = −db xᵀ`` (restricted to the entries ``a`` really has, ``grad_mask``). Nothing but ``a`` and ``x``
    is saved, whatever loop ``forward`` runs."""

    @jax.custom_vjp
    def f(a, b):
        return forward(a, b)

    def fwd(a, b):
        x = forward(a, b)
        return x, (a, x)

    def bwd(res, dx):
        a, x = res
        db = transposed(a, dx)
        da = -jnp.einsum("...im,...jm->...ij", db, x)
        return (da if grad_mask is None else jnp.where(grad_mask(a), da, 0.0)), db

    f.defvjp(fwd, bwd)
    return f


_solve_cpu = _with_solve_vjp(_gauss_jordan, lambda a, dx: _gauss_jordan(jnp.swapaxes(a, -1, -2), dx))


def solve(a, b):
    """``a^{-1} b`` for ``a [..., n, n]``, ``b [..., n, m]`` (float32): ``jnp.linalg.solve`` except on CPU."""
    return lax.platform_dependent(a, b, cpu=_solve_cpu, default=jnp.linalg.solve)


def _forward_substitution(a, rhs):
    """``(I + N)^{-1} rhs`` for ``a = I + N`` with ``N`` strictly lower (``a``'s upper part must be 0).

    One row per step of a ``fori_loop`` over the ``c`` rows, every batch/chunk/head at once: row ``i`` is
    ``rhs_i − Σ_{j<i} N_ij x_j`` (the unit diagonal multiplies the not-yet-written ``x_i = 0``).
    """
    def body(i, x):
        row = lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)  # [..., c]
        xi = lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False) - jnp.einsum("...j,...jd->...d", row, x)
        return lax.dynamic_update_index_in_dim(x, xi, i, axis=-2)

    return lax.fori_loop(0, a.shape[-1], body, jnp.zeros_like(rhs))


def _backward_substitution(a, dx):
    """``a^{-T} dx`` for unit lower-triangular ``a``: ``aᵀ`` is unit upper; reversing both index orders
    makes it unit lower again."""
    at = jnp.flip(jnp.swapaxes(a, -1, -2), axis=(-1, -2))
    return jnp.flip(_forward_substitution(at, jnp.flip(dx, axis=-2)), axis=-2)


def _strictly_lower(a):
    c = a.shape[-1]
    return jnp.tril(jnp.ones((c, c), bool), -1).reshape((1,) * (a.ndim - 2) + (c, c))


_solve_unit_lower_substitution = _with_solve_vjp(_forward_substitution, _backward_substitution, _strictly_lower)


def solve_unit_lower(a, rhs):
    """``A^{-1} rhs`` for unit lower-triangular ``a [..., c, c]`` (upper part 0), ``rhs [..., c, d]``.

    On CPU this is a forward substitution in XLA (with a ``custom_vjp`` whose backward is one more
    substitution and an outer product), not ``lax.linalg.triangular_solve`` (LAPACK ``trsm``, which hung
    a DeltaNet training step at batch 64 on 2 cores; see the module docstring). GPU and TPU use
    ``triangular_solve`` (cuBLAS / XLA's own expansion). The delta rule's WY/UT transform calls it.
    """
    return lax.platform_dependent(
        a, rhs,
        cpu=_solve_unit_lower_substitution,
        default=lambda a, rhs: lax.linalg.triangular_solve(a, rhs, left_side=True, lower=True, unit_diagonal=True),
    )
