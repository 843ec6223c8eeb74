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

__all__ = ["solve"]


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


@jax.custom_vjp
def _solve_cpu(a, b):
    return _gauss_jordan(a, b)


def _solve_fwd(a, b):
    x = _gauss_jordan(a, b)
    return x, (a, x)


def _solve_bwd(res, dx):
    a, x = res
    db = _gauss_jordan(jnp.swapaxes(a, -1, -2), dx)
    return -jnp.einsum("...im,...jm->...ij", db, x), db


_solve_cpu.defvjp(_solve_fwd, _solve_bwd)


def solve(a, b):
    """``a^{-1} b`` for ``a [..., n, n]``, ``b [..., n, m]`` (float32): ``jnp.linalg.solve`` except on CPU."""
    return lax.platform_dependent(a, b, cpu=_solve_cpu, default=jnp.linalg.solve)
