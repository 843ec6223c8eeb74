r"""Memory-efficient ("flash") softmax attention in plain JAX: an online softmax over key blocks and a
backward that recomputes each block's scores, so no ``[b, h, T, S]`` buffer exists in either pass.

Math (Rabe & Staats 2021, arXiv 2112.05682; Dao 2023, FlashAttention-2, arXiv 2307.08691). For a query
block ``Q_i`` and key/value blocks ``K_j, V_j``::

    S_ij = scale Q_i K_jᵀ  (masked entries -inf)
    m_i ← max(m_i, rowmax S_ij),   l_i ← e^{m_old - m_i} l_i + rowsum e^{S_ij - m_i}
    A_i ← e^{m_old - m_i} A_i + e^{S_ij - m_i} V_j,     O_i = A_i / l_i,   L_i = m_i + log l_i

and the backward, from ``O``, ``L`` and ``D_i = rowsum(dO_i ⊙ O_i)``::

    P_ij = e^{S_ij - L_i},  dV_j += P_ijᵀ dO_i,  dS_ij = P_ij ⊙ (dO_i V_jᵀ - D_i)
    dQ_i += scale dS_ij K_j,  dK_j += scale dS_ijᵀ Q_i

The forward and the ``dQ`` pass loop over query blocks (``lax.map``) and, inside, over the key blocks a query
block can see; the ``dK, dV`` pass loops over key blocks and the query blocks that see them. A block pair that
the causal / window / segment mask hides entirely is skipped (``lax.cond``); the loop bounds already leave out
the blocks above the causal diagonal and outside the window. Matmuls take the inputs' dtype and accumulate in
float32; ``O`` comes back in ``q``'s dtype.

Mask (positions: query ``i`` sits at ``q_offset + i``, key ``j`` at ``j``)::

    visible_ij = (j <= q_offset + i if causal) and (q_offset + i - j < window) and seg_q[i] == seg_k[j]

``q_offset`` may be traced (context parallelism: ``axis_index * T_local``). A row with no visible key
returns 0, as ``seqjax.ops.attention.attention_reference`` does.

Layout: ``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]`` with ``heads % kv_heads == 0`` (GQA: query head
``n`` reads kv head ``n // (heads / kv_heads)``; no repeat of K/V).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import _checks
from seqjax.types import AnyArray, Array, Float, Shaped

__all__ = ["flash_attention", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 128  # query and key block (benchmarks/attention.py: 128 beat 256 and 512 forward+backward on the CPU)
NEG = -1e30  # finite "minus infinity" for the running max (exp(NEG - m) = 0 without nan)


class _Cfg(NamedTuple):
    causal: bool
    window: int | None
    scale: float
    bq: int
    bk: int
    t: int
    s: int


def _cdiv(a, b):
    return -(-a // b)


def _pad_to(x, axis, size, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return x if size == x.shape[axis] else jnp.pad(x, pad, mode=mode)


def _q_blocks(x, bq, nq, kvh):
    """``[b, t, h, d] -> [nq, b, kvh, g, bq, d]`` (query heads grouped by the kv head they read)."""
    b, _, h, d = x.shape
    x = _pad_to(x, 1, nq * bq).reshape(b, nq, bq, kvh, h // kvh, d)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _q_unblock(x, t):
    nq, b, kvh, g, bq, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, kvh * g, d)[:, :t]


def _k_blocks(x, bk, nk):
    """``[b, s, kvh, d] -> [nk, b, kvh, bk, d]``."""
    b, _, kvh, d = x.shape
    return _pad_to(x, 1, nk * bk).reshape(b, nk, bk, kvh, d).transpose(1, 0, 3, 2, 4)


def _k_unblock(x, s):
    nk, b, kvh, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kvh, d)[:, :s]


def _seg_blocks(seg, n, blk):
    """``[b, t] -> [n, b, blk]``, padded with the last id (padding is masked by position anyway)."""
    return _pad_to(seg, 1, n * blk, mode="edge").reshape(seg.shape[0], n, blk).transpose(1, 0, 2)


def _visible_blocks(cfg: _Cfg, q_offset, q_seg, k_seg):
    """``[nq, nk]`` bool: block pairs with possibly some visible entry (exact for causal / window, a
    min/max overlap test for segment ids)."""
    nq, nk = _cdiv(cfg.t, cfg.bq), _cdiv(cfg.s, cfg.bk)
    qb, kb = np.arange(nq), np.arange(nk)
    q0 = q_offset + qb * cfg.bq
    q1 = q_offset + np.minimum(qb * cfg.bq + cfg.bq, cfg.t) - 1
    k0, k1 = kb * cfg.bk, np.minimum(kb * cfg.bk + cfg.bk, cfg.s) - 1
    vis = jnp.ones((nq, nk), bool)
    if cfg.causal:
        vis = vis & (k0[None, :] <= q1[:, None])
    if cfg.window is not None:
        vis = vis & (q0[:, None] - k1[None, :] < cfg.window)
    if q_seg is not None:
        qs, ks = _seg_blocks(q_seg, nq, cfg.bq), _seg_blocks(k_seg, nk, cfg.bk)  # [n, b, blk]
        qmin, qmax, kmin, kmax = qs.min(-1), qs.max(-1), ks.min(-1), ks.max(-1)  # [n, b]
        overlap = (qmin[:, None] <= kmax[None, :]) & (kmin[None, :] <= qmax[:, None])  # [nq, nk, b]
        vis = vis & overlap.any(-1)
    return vis


def _bounds(vis):
    """Per row of ``vis``: ``[lo, hi)`` spanning its True entries (``0, 0`` if none)."""
    n = vis.shape[1]
    anyv = vis.any(1)
    lo = jnp.argmax(vis, axis=1)
    hi = n - jnp.argmax(vis[:, ::-1], axis=1)
    return jnp.where(anyv, lo, 0).astype(jnp.int32), jnp.where(anyv, hi, 0).astype(jnp.int32)


def _mask(cfg: _Cfg, q_offset, qb, kb, q_seg_blk, k_seg_blk):
    """``[b|1, 1, 1, bq, bk]`` bool mask of block pair ``(qb, kb)``."""
    qi = qb * cfg.bq + jnp.arange(cfg.bq, dtype=jnp.int32)
    kj = kb * cfg.bk + jnp.arange(cfg.bk, dtype=jnp.int32)
    qpos = q_offset + qi
    m = (qi < cfg.t)[:, None] & (kj < cfg.s)[None, :]
    if cfg.causal:
        m = m & (kj[None, :] <= qpos[:, None])
    if cfg.window is not None:
        m = m & (qpos[:, None] - kj[None, :] < cfg.window)
    m = m[None]
    if q_seg_blk is not None:
        m = m & (q_seg_blk[:, :, None] == k_seg_blk[:, None, :])
    return m[:, None, None]


def _dot(a, b, spec):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(cfg: _Cfg, q, k, v, q_offset, q_seg, k_seg):
    b, _, h, d = q.shape
    kvh = k.shape[2]
    nq, nk = _cdiv(cfg.t, cfg.bq), _cdiv(cfg.s, cfg.bk)
    qs, ks, vs = _q_blocks(q, cfg.bq, nq, kvh), _k_blocks(k, cfg.bk, nk), _k_blocks(v, cfg.bk, nk)
    qseg = None if q_seg is None else _seg_blocks(q_seg, nq, cfg.bq)
    kseg = None if k_seg is None else _seg_blocks(k_seg, nk, cfg.bk)
    vis = _visible_blocks(cfg, q_offset, q_seg, k_seg)
    lo, hi = _bounds(vis)
    g = h // kvh

    def row(qb):
        qblk = qs[qb]
        qsb = None if qseg is None else qseg[qb]

        def step(kb, carry):
            def compute(carry):
                m, l, acc = carry
                mask = _mask(cfg, q_offset, qb, kb, qsb, None if kseg is None else kseg[kb])
                s = jnp.where(mask, _dot(qblk, ks[kb], "bngqd,bnkd->bngqk") * cfg.scale, NEG)
                m_new = jnp.maximum(m, s.max(-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + _dot(p.astype(v.dtype), vs[kb], "bngqk,bnkd->bngqd")
                return m_new, l, acc

            return jax.lax.cond(vis[qb, kb], compute, lambda c: c, carry)

        init = (
            jnp.full((b, kvh, g, cfg.bq), NEG, jnp.float32),
            jnp.zeros((b, kvh, g, cfg.bq), jnp.float32),
            jnp.zeros((b, kvh, g, cfg.bq, d), jnp.float32),
        )
        m, l, acc = jax.lax.fori_loop(lo[qb], hi[qb], step, init)
        o = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # inf: P = e^{S - L} = 0
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(row, jnp.arange(nq))  # [nq, b, kvh, g, bq, d], [nq, b, kvh, g, bq]
    return _q_unblock(o, cfg.t), lse


def _backward(cfg: _Cfg, q, k, v, q_offset, q_seg, k_seg, o, lse, do):
    h = q.shape[2]
    kvh = k.shape[2]
    nq, nk = _cdiv(cfg.t, cfg.bq), _cdiv(cfg.s, cfg.bk)
    qs, ks, vs = _q_blocks(q, cfg.bq, nq, kvh), _k_blocks(k, cfg.bk, nk), _k_blocks(v, cfg.bk, nk)
    dos = _q_blocks(do.astype(q.dtype), cfg.bq, nq, kvh)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[..., None]  # [b, t, h, 1]
    deltas = _q_blocks(delta, cfg.bq, nq, kvh)[..., 0]  # [nq, b, kvh, g, bq]
    qseg = None if q_seg is None else _seg_blocks(q_seg, nq, cfg.bq)
    kseg = None if k_seg is None else _seg_blocks(k_seg, nk, cfg.bk)
    vis = _visible_blocks(cfg, q_offset, q_seg, k_seg)

    def probs(qb, kb):
        """``P`` and ``dS`` of block pair ``(qb, kb)``, float32 ``[b, kvh, g, bq, bk]``."""
        mask = _mask(cfg, q_offset, qb, kb, None if qseg is None else qseg[qb], None if kseg is None else kseg[kb])
        s = _dot(qs[qb], ks[kb], "bngqd,bnkd->bngqk") * cfg.scale
        p = jnp.where(mask, jnp.exp(s - lse[qb][..., None]), 0.0)
        dp = _dot(dos[qb], vs[kb], "bngqd,bnkd->bngqk")
        return p, p * (dp - deltas[qb][..., None])

    lo, hi = _bounds(vis)

    def dq_row(qb):
        def step(kb, dq):
            def compute(dq):
                _, ds = probs(qb, kb)
                return dq + _dot(ds.astype(k.dtype), ks[kb], "bngqk,bnkd->bngqd")

            return jax.lax.cond(vis[qb, kb], compute, lambda c: c, dq)

        dq = jax.lax.fori_loop(lo[qb], hi[qb], step, jnp.zeros(qs.shape[1:], jnp.float32))
        return (dq * cfg.scale).astype(q.dtype)

    qlo, qhi = _bounds(vis.T)

    def dkv_col(kb):
        def step(qb, carry):
            def compute(carry):
                dk, dv = carry
                p, ds = probs(qb, kb)
                dv = dv + _dot(p.astype(v.dtype), dos[qb], "bngqk,bngqd->bnkd")
                dk = dk + _dot(ds.astype(q.dtype), qs[qb], "bngqk,bngqd->bnkd")
                return dk, dv

            return jax.lax.cond(vis[qb, kb], compute, lambda c: c, carry)

        zero = jnp.zeros(ks.shape[1:], jnp.float32)
        dk, dv = jax.lax.fori_loop(qlo[kb], qhi[kb], step, (zero, zero))
        return (dk * cfg.scale).astype(k.dtype), dv.astype(v.dtype)

    dq = _q_unblock(jax.lax.map(dq_row, jnp.arange(nq)), cfg.t)
    dk, dv = jax.lax.map(dkv_col, jnp.arange(nk))
    del h
    return dq, _k_unblock(dk, cfg.s), _k_unblock(dv, cfg.s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_offset, q_seg, k_seg):
    return _forward(cfg, q, k, v, q_offset, q_seg, k_seg)[0]


def _flash_fwd(cfg, q, k, v, q_offset, q_seg, k_seg):
    o, lse = _forward(cfg, q, k, v, q_offset, q_seg, k_seg)
    return o, (q, k, v, q_offset, q_seg, k_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_offset, q_seg, k_seg, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, q_offset, q_seg, k_seg, o, lse, do)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b s kvh d"],
    v: Float[AnyArray, "b s kvh d"],
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: Shaped[AnyArray, "b t"] | None = None,
    kv_segment_ids: Shaped[AnyArray, "b s"] | None = None,
    q_offset=0,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Float[Array, "b t h d"]:
    """Blocked softmax attention (see the module docstring); differentiable, no ``[b, h, t, s]`` buffer.

    Args:
      q: ``[b, t, heads, d]``; k, v: ``[b, s, kv_heads, d]``.
      causal / window: key ``j`` is visible to query ``i`` if ``j <= q_offset + i`` and ``q_offset + i - j < window``.
      segment_ids: ``[b, t]`` int, the queries' documents; ``kv_segment_ids`` ``[b, s]`` the keys' (default:
        ``segment_ids``, which then needs ``s == t``).
      q_offset: position of the first query on the key axis (an int or a traced int scalar).
      block_q / block_k: block sizes (default :data:`DEFAULT_BLOCK`, cut to the length rounded up to 8).

    Returns ``[b, t, heads, d]`` in ``q.dtype``.
    """
    _checks.check_ndim("q", q, 4, "[batch, time, heads, head_dim]")
    _checks.check_ndim("k", k, 4, "[batch, time, kv_heads, head_dim]")
    _checks.check_ndim("v", v, 4, "[batch, time, kv_heads, head_dim]")
    b, t, h, d = q.shape
    s = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape}: need k == v shape, same batch and "
                         "head_dim, heads a multiple of kv_heads")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got {window}")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if kv_segment_ids is None:
            if s != t:
                raise ValueError(f"kv_segment_ids is needed when keys ({s}) and queries ({t}) differ in length")
            kv_segment_ids = segment_ids
        kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
        if segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
            raise ValueError(f"segment_ids {segment_ids.shape} / kv_segment_ids {kv_segment_ids.shape} must be "
                             f"[batch, time] = {(b, t)} / {(b, s)}")
    elif kv_segment_ids is not None:
        raise ValueError("kv_segment_ids needs segment_ids")
    rnd = lambda n: max(8, _cdiv(n, 8) * 8)
    bq = min(block_q or DEFAULT_BLOCK, rnd(t))
    bk = min(block_k or DEFAULT_BLOCK, rnd(s))
    scale = float(1.0 / np.sqrt(d) if scale is None else scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    cfg = _Cfg(bool(causal), None if window is None else int(window), scale, bq, bk, t, s)
    return _flash(cfg, q, k, v, jnp.asarray(q_offset, jnp.int32), segment_ids, kv_segment_ids)
