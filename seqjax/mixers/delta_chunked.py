r"""The (gated) delta rule's chunked WY/UT form laid out for XLA's CPU backend (``impl="chunked"``).

The same algorithm as ``seqjax.ops.delta.chunk_delta_rule`` (that module's docstring has the derivation),
arranged so that almost all the work is large batched matmuls:

* **chunk-major layout** ``[n, b, h, c, d]``: every batched matmul multiplies contiguous ``[c, d]`` tiles,
  and the serial pass over chunks scans the leading axis, so no operand is transposed inside the loop;
* **blocked triangular inverse**: ``T = (I + tril(diag(β) K Kᵀ ⊙ Γ, −1))⁻¹`` is formed once per chunk from
  ``16 × 16`` diagonal blocks (forward substitution, one row per step, on ``[…, 16, 16]`` tiles) merged by
  block forward substitution (matmuls), and then applied as one ``[c, c] @ [c, dk + dv]`` matmul. The
  engine's CPU path (``seqjax._linalg.solve_unit_lower``) substitutes row by row through the whole
  right-hand side: ``c`` serial, memory-bound passes over ``[n, c, dk + dv]``, which took most of its time
  (``benchmarks/results/cpu_mixers.md``).

Decays are the engine's (``_chunk_decays``: every ``exp`` of a non-positive, masked log difference), so the
numbers agree with it to rounding, under autodiff too (gradients are plain autodiff of this function).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from seqjax.ops import delta as E

__all__ = ["chunk_delta_rule_cpu", "unit_lower_inverse"]

BLOCK = 16


def _base_inverse(a):
    """``(I + N)⁻¹`` for ``a = I + N`` ``[..., s, s]`` with ``N`` strictly lower, by forward substitution
    (row ``i`` of the inverse is ``e_i − N_i,<i X_<i``), unrolled over the ``s`` rows."""
    s = a.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(s, dtype=a.dtype), a.shape)
    rows = [eye[..., 0, :]]
    for i in range(1, s):
        x = jnp.stack(rows, axis=-2)  # [..., i, s]
        rows.append(eye[..., i, :] - jnp.einsum("...j,...js->...s", a[..., i, :i], x))
    return jnp.stack(rows, axis=-2)


def unit_lower_inverse(a, block=BLOCK):
    """``a⁻¹`` for unit lower-triangular ``a [..., c, c]`` (its upper part must be 0): ``block × block``
    diagonal blocks inverted by :func:`_base_inverse`, then merged by block forward substitution,
    ``X_{i,<i} = −X_ii A_{i,<i} X_{<i,<i}``."""
    c = a.shape[-1]
    if c <= block:
        return _base_inverse(a)
    m = -(-c // block)
    pad = m * block - c
    if pad:  # identity rows/columns at the end: the leading c x c block of the inverse is unchanged
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, pad)]).at[..., c:, c:].set(
            jnp.broadcast_to(jnp.eye(pad, dtype=a.dtype), a.shape[:-2] + (pad, pad)))
    lead = a.shape[:-2]
    blocks = a.reshape(*lead, m, block, m, block)
    diag = jnp.stack([blocks[..., i, :, i, :] for i in range(m)], axis=-3)  # [..., m, s, s]
    dinv = _base_inverse(diag)
    x = dinv[..., 0, :, :]  # inverse of the leading (i * block) square, grown one block row at a time
    for i in range(1, m):
        left = a[..., i * block:(i + 1) * block, : i * block]  # A_{i,<i}
        row = -jnp.einsum("...st,...tu->...su", dinv[..., i, :, :], jnp.einsum("...st,...tu->...su", left, x))
        top = jnp.concatenate([x, jnp.zeros((*lead, i * block, block), a.dtype)], axis=-1)
        x = jnp.concatenate([top, jnp.concatenate([row, dinv[..., i, :, :]], axis=-1)], axis=-2)
    return x[..., :c, :c]


def _to_chunk_major(x, c):
    """``[b, t, h, ...]`` (t a multiple of c) -> ``[n, b, h, c, ...]``."""
    b, t = x.shape[:2]
    x = x.reshape(b, t // c, c, *x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)


def chunk_delta_rule_cpu(q, k, v, beta, log_alpha=None, *, h0=None, resets=None, scale=1.0, chunk_size=64):
    """The arguments and results of ``seqjax.ops.delta.chunk_delta_rule`` (``(o, S_T)``; ``o`` in the
    inputs' dtype, ``S_T`` float32), computed in the chunk-major layout with the blocked inverse."""
    dtype = jnp.result_type(q, k, v)
    q, k, v, beta, la, rs = E._prepare(q, k, v, beta, log_alpha, resets)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, beta, la, rs = map(padt, (q, k, v, beta, la, rs))
    qc, kc, vc = (_to_chunk_major(x, c) for x in (q, k, v))  # [n, b, h, c, d]
    bc, lac = _to_chunk_major(beta, c), _to_chunk_major(la, c)  # [n, b, h, c]
    rsc = jnp.moveaxis(rs.reshape(b, n, 1, c), 1, 0)  # [n, b, 1, c]
    Gamma, gamma, to_end = E._chunk_decays(lac, rsc, c)

    strict = jnp.tril(jnp.ones((1, 1, 1, c, c), bool), -1)
    kk = jnp.einsum("nbhid,nbhjd->nbhij", kc, kc)
    a = jnp.where(strict, bc[..., :, None] * kk * Gamma, 0.0) + jnp.eye(c, dtype=jnp.float32)[None, None, None]
    tb = unit_lower_inverse(a) * bc[..., None, :]  # T = (I + tril(...))^{-1} diag(beta)
    w = jnp.einsum("nbhij,nbhjd->nbhid", tb, kc * gamma[..., None])
    u = jnp.einsum("nbhij,nbhjd->nbhid", tb, vc)

    S0 = jnp.zeros((b, h, dk, dv), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)

    def chunk_step(S, xs):
        w_n, u_n, k_end, total = xs
        u_new = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, S)
        S_next = total[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", k_end, u_new)
        return S_next, (S, u_new)

    S_last, (S_start, u_new) = lax.scan(chunk_step, S0, (w, u, kc * to_end[..., None], gamma[..., -1]))
    qk = jnp.einsum("nbhid,nbhjd->nbhij", qc, kc) * Gamma
    o = jnp.einsum("nbhck,nbhkv->nbhcv", qc * gamma[..., None], S_start) + jnp.einsum("nbhij,nbhjv->nbhiv", qk, u_new)
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, dv)  # [b, h, n, c, v] -> [b, h, t, v]
    o = jnp.swapaxes(o, 1, 2)[:, :t]
    return (scale * o).astype(dtype), S_last
