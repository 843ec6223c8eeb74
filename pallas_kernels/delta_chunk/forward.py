r"""The forward stages of the chunked delta-rule kernel (see ``kernel.py`` for the algorithm): the gates and
padding (``_prepare``), the serial state pass (:func:`chunk_states`) and the chunk-parallel output kernel;
``backward.py`` reuses them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic_gpu import key_pad
from pallas_kernels._util import chunk_block, column_tile, key_tiles, mm, out_specs, tpu_params, walk_params
from pallas_kernels.delta_chunk.mosaic_gpu import chunk_out_mosaic_gpu, chunk_states_mosaic_gpu
from pallas_kernels.delta_chunk.wy import chunk_gamma, wy_factors

__all__ = ["chunk_states"]

f32 = jnp.float32
_HI = lax.Precision.HIGHEST
_NN = (((1,), (0,)), ((), ()))  # X Y
_TN = (((0,), (0,)), ((), ()))  # Xᵀ Y
_NT = (((1,), (1,)), ((), ()))  # X Yᵀ


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _mm(x, y, dims=_NN):
    """Matmul with float32 accumulation; float32 operands at ``HIGHEST`` (the MXU/TF32 default passes are
    bf16-like), lower-precision operands at their native precision (``_util.mm``)."""
    return mm(x, y, dims, precision=_HI)


def _col_factors(gc, rc, sc):
    """Column gates ``[C, 1]`` -> ``γ, e^{rev}`` (masked to the chunk's first / last document) ``[C, 1]``,
    ``γ_C [1, 1]``."""
    c = gc.shape[0]
    last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    end = lambda x: jnp.sum(jnp.where(last, x, 0.0), axis=0, keepdims=True)
    g_last, s_last = end(gc), end(sc)
    gamma = chunk_gamma(gc, sc)
    total = jnp.where(s_last == 0.0, jnp.exp(g_last), 0.0)
    to_end = jnp.where(sc == s_last, jnp.exp(rc), 0.0)
    return gamma, total, to_end


def _decay_incl(gc, sc, gr, sr):
    """``Γ_ts = e^{g_t − g_s}`` for ``s ≤ t`` in one document, else 0 (masked before ``exp``)."""
    c = gc.shape[0]
    ok = (lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (sc == sr)
    return jnp.where(ok, jnp.exp(jnp.where(ok, gc - gr, 0.0)), 0.0)


def _state_step(k, w, u, gc, rc, sc, st, md):
    """``U' = U − W S`` and ``S⁺ = γ_C S + (K ⊙ e^{rev})ᵀ U'`` (float32), the state as row tiles ``st``;
    ``k(j)``, ``w(j)`` load the matching column tiles ``[C, kt]`` of ``K``, ``W`` where they are used (one
    tile: the whole key axis); ``md`` their dtype. Each contraction over the key axis is a sum of one matmul
    per tile."""
    _, total, to_end = _col_factors(gc, rc, sc)
    u_new = u.astype(f32)
    for j, s in enumerate(st):
        u_new = u_new - _mm(w(j), s.astype(md))
    un = u_new.astype(md)
    return tuple(total * s + _mm((k(j).astype(f32) * to_end).astype(md), un, _TN) for j, s in enumerate(st)), u_new


def _chunk_out(q, k, un, gc, sc, gr, sr, s, scale):
    """``O = scale [(γ ⊙ Q) S + (Q Kᵀ ⊙ Γ) U']`` for one chunk; ``s`` and ``un`` in the input dtype."""
    md = q.dtype
    gamma = chunk_gamma(gc, sc)
    qk = (_mm(q, k, _NT) * _decay_incl(gc, sc, gr, sr)).astype(md)
    return scale * (_mm((q.astype(f32) * gamma).astype(md), s) + _mm(qk, un))


# ----------------------------------------------------------------------------- kernels


def _states_kernel(k_ref, w_ref, u_ref, gc_ref, rc_ref, sc_ref, h0_ref, hs_ref, ht_ref, un_ref=None, *, c, n, kt):
    """Triton: the state ``[K, BV]`` carried as row tiles of ``kt`` (``_util.column_tile``: 64 past key dims
    of 128)."""
    tiles = key_tiles(h0_ref.shape[0], kt)

    def body(i, st):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        for r, s in zip(tiles, st):
            hs_ref[i, r, :] = s.astype(hs_ref.dtype)
        st, u_new = _state_step(lambda j: k_ref[sl, tiles[j]], lambda j: w_ref[sl, tiles[j]], u_ref[sl, :],
                                gc_ref[sl, :], rc_ref[sl, :], sc_ref[sl, :], st, k_ref.dtype)
        if un_ref is not None:
            un_ref[sl, :] = u_new.astype(un_ref.dtype)
        return st

    st = lax.fori_loop(0, n, body, tuple(h0_ref[r, :].astype(f32) for r in tiles))
    for r, s in zip(tiles, st):
        ht_ref[r, :] = s


def _states_kernel_tpu(k_ref, w_ref, u_ref, gc_ref, rc_ref, sc_ref, h0_ref, hs_ref, ht_ref, *rest):
    *un_ref, s_scr = rest

    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(f32)

    s = s_scr[...]
    hs_ref[...] = s.astype(hs_ref.dtype)
    (s,), u_new = _state_step(lambda j: k_ref[...], lambda j: w_ref[...], u_ref[...], gc_ref[...], rc_ref[...],
                              sc_ref[...], (s,), k_ref.dtype)
    s_scr[...] = s
    if un_ref:
        un_ref[0][...] = u_new.astype(un_ref[0].dtype)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = s


def _out_kernel(q_ref, k_ref, un_ref, gc_ref, sc_ref, gr_ref, sr_ref, h_ref, o_ref, *, scale):
    o = _chunk_out(q_ref[...], k_ref[...], un_ref[...], gc_ref[...], sc_ref[...], gr_ref[...], sr_ref[...],
                   h_ref[...], scale)
    o_ref[...] = o.astype(o_ref.dtype)


# ----------------------------------------------------------------------------- drivers


def chunk_states(kh, w, u, g, rev, seg, h0p, *, c, interpret, backend, dtype=f32, with_u_new=False):
    """The serial pass on either backend: the state entering every chunk ``H [b, h, N, Kp, Vp]`` in
    ``dtype``, the final state ``[b, h, Kp, Vp]`` float32 and, with ``with_u_new``, ``U' = U − W S``
    ``[b, h, Tp, Vp]`` in the input dtype. Gates ``g, rev, seg [b, h, Tp]`` float32."""
    b, h, tp, kp = kh.shape
    vp, n = u.shape[-1], tp // c
    cols = [x[..., None] for x in (g, rev, seg)]  # [b, h, Tp, 1]
    out_shape = [jax.ShapeDtypeStruct((b, h, n, kp, vp), dtype), jax.ShapeDtypeStruct((b, h, kp, vp), f32)]
    out_shape += [jax.ShapeDtypeStruct((b, h, tp, vp), u.dtype)] if with_u_new else []
    if backend == "mosaic_tpu":
        blk = lambda d: chunk_block(c, d)
        whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
        chunk_state = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0))
        return pl.pallas_call(
            _states_kernel_tpu, grid=(b, h, n),
            in_specs=[blk(kp), blk(kp), blk(vp), blk(1), blk(1), blk(1), whole],
            out_specs=[chunk_state, whole] + ([blk(vp)] if with_u_new else []), out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((kp, vp), f32)], interpret=interpret,
            compiler_params=tpu_params(interpret, "parallel", "parallel", "arbitrary"), name="delta_chunk_states_tpu",
        )(kh, w, u, *cols, h0p)
    # past key dims of 128: value blocks of 32 and the state in key tiles of 64 (sm_90 at K = 256: 20 and 76 B of
    # spills at 64 whole, 0 B now)
    bv = min(vp, 32 if kp > 128 else 64)
    full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))
    vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
    vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
    vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
    return pl.pallas_call(
        functools.partial(_states_kernel, c=c, n=n, kt=column_tile(kp, backend)), grid=(b, h, vp // bv),
        in_specs=[full(kp), full(kp), vseq, full(1), full(1), full(1), vstate],
        out_specs=[vstates, vstate] + ([vseq] if with_u_new else []), out_shape=out_shape, interpret=interpret,
        compiler_params=walk_params(interpret, backend, kp, num_warps=4, num_stages=1), name="delta_chunk_states",
    )(kh, w, u, *cols, h0p)


def _chunk_gates(la, rs, c, n):
    """``[b, h, n*c]`` chunk-local inclusive cumsum ``g``, exclusive reverse cumsum ``rev`` of the
    log decays, and the document index ``seg`` of each token inside its chunk (float32)."""
    b, h = la.shape[:2]
    la = la.reshape(b, h, n, c)
    g = jnp.cumsum(la, -1)
    rev = jnp.flip(jnp.cumsum(jnp.flip(la, -1), -1), -1)
    rev = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], -1)
    seg = jnp.cumsum(rs.reshape(b, 1, n, c).astype(jnp.float32), -1)
    seg = jnp.broadcast_to(seg, g.shape)
    return tuple(x.reshape(b, h, n * c) for x in (g, rev, seg))


def _prepare(q, k, v, beta, la, h0, rs, chunk_size, backend=None):
    """The XLA preprocessing (differentiable): heads-first inputs padded to ``Tp = n C`` and head dims to
    powers of two (``key_pad``, at least 64, for ``backend="mosaic_gpu"``), ``beta [b, h, Tp]`` and the chunk gates
    ``g, rev, seg [b, h, Tp]`` (``_chunk_gates``)."""
    b, t, h, dk = q.shape
    c = _pow2(chunk_size)
    n = -(-t // c)
    pad = key_pad if backend == "mosaic_gpu" else _pow2
    tp, dkp, dvp = n * c, pad(dk), pad(v.shape[-1])

    def heads_first(x, d):  # [b, t, h, d] -> [b, h, tp, d_pad], zero padded
        x = jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])])
        return jnp.moveaxis(x, 2, 1)

    pad_t = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
    la = jnp.where(rs[..., None], 0.0, la.astype(jnp.float32))
    bh = jnp.moveaxis(pad_t(beta.astype(jnp.float32)), 2, 1)
    g, rev, seg = _chunk_gates(jnp.moveaxis(pad_t(la), 2, 1), pad_t(rs), c, n)
    h0p = jnp.pad(h0.astype(jnp.float32), [(0, 0), (0, 0), (0, dkp - dk), (0, dvp - v.shape[-1])])
    return (heads_first(q, dkp), heads_first(k, dkp), heads_first(v, dvp), bh, g, rev, seg, h0p), c, n


def _kernels(qh, kh, vh, bh, g, rev, seg, h0p, *, c, scale, interpret, backend):
    """The three forward kernels on prepared inputs: ``(o [b, h, Tp, Vp] input dtype, S_T [b, h, Kp, Vp]
    float32)``. ``backend="mosaic_gpu"``: all three on Mosaic GPU (``wy_mosaic_gpu.py``,
    ``mosaic_gpu.py``)."""
    b, h, tp, kp = qh.shape
    vp, n = vh.shape[-1], tp // c
    dtype = jnp.result_type(qh, kh, vh)
    tpu = backend == "mosaic_tpu"
    if backend == "mosaic_gpu":
        w, u = wy_factors(kh, vh, bh, g, seg, c=c, interpret=interpret, backend=backend)
        hs, ht, un = chunk_states_mosaic_gpu(kh, w, u, g, rev, seg, h0p, c=c, interpret=interpret)
        o = chunk_out_mosaic_gpu(qh, kh, un, g, rev, seg, hs, c=c, scale=scale, dtype=dtype, interpret=interpret)
        return o, ht
    w, u = wy_factors(kh, vh, bh, g, seg, c=c, interpret=interpret, backend=backend)
    hs, ht, un = chunk_states(kh, w, u, g, rev, seg, h0p, c=c, interpret=interpret, backend=backend, dtype=dtype,
                              with_u_new=True)
    bv, blk, rblk, vblk, params = out_specs(c, vp, interpret=interpret, backend=backend)
    o = pl.pallas_call(
        functools.partial(_out_kernel, scale=scale), grid=(b, h, n, vp // bv),
        in_specs=[blk(kp), blk(kp), vblk, blk(1), blk(1), rblk, rblk,
                  pl.BlockSpec((None, None, None, kp, bv), lambda i, j, l, z: (i, j, l, 0, z))],
        out_specs=vblk, out_shape=jax.ShapeDtypeStruct((b, h, tp, vp), dtype), interpret=interpret,
        compiler_params=params, name="delta_chunk_out" + ("_tpu" if tpu else ""),
    )(qh, kh, un, g[..., None], seg[..., None], g.reshape(b, h, n, 1, c), seg.reshape(b, h, n, 1, c), hs)
    return o, ht


def _forward(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    args, c, _ = _prepare(q, k, v, beta, la, h0, rs, chunk_size, backend)
    o, ht = _kernels(*args, c=c, scale=float(scale), interpret=interpret, backend=backend)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], ht[:, :, :dk, :dv]
