r"""The forward stages of the chunkwise mLSTM kernel (see ``kernel.py`` for the algorithm): the gates and
padding (``_prepare``), the chunk stabilisers, the serial state pass (:func:`chunk_states`) and the
chunk-parallel output kernel; ``backward.py`` reuses them. ``backend="mosaic_gpu"`` takes both kernels'
Mosaic GPU bodies (``mosaic_gpu.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _mosaic_gpu
from pallas_kernels._mosaic_gpu import key_pad
from pallas_kernels._util import chunk_block, column_tile, mm, out_specs, tile_sum, tpu_params, walk_params
from pallas_kernels.mlstm_chunk.mosaic_gpu import out_mosaic_gpu, states_mosaic_gpu
from seqjax.ops.gla import prepare_chunks

__all__ = ["chunk_states", "chunk_stabilisers", "NEG"]

f32 = jnp.float32
NEG = -1e30  # as seqjax.ops.mlstm: "minus infinity" that keeps differences finite
_TN = (((0,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _rsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _last(x):
    """The last row of a column ``[C, 1]`` as ``[1, 1]``."""
    c = x.shape[0]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1, x, 0.0), axis=0, keepdims=True)


def _weights(bc, sc, br, sr, ir, er, m_in):
    """``D [C, C]``, the row stabilisers ``m_t`` and readout ``ρ`` ``[C, 1]`` of one chunk (gates as columns
    ``[C, 1]`` and rows ``[1, C]``, ``m_in [1, 1]`` the stabiliser entering the chunk)."""
    c = bc.shape[0]
    ok = (lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (sc == sr)
    diff = bc - br
    m_intra = jnp.max(jnp.where(ok, diff + er, NEG), axis=1, keepdims=True)
    inter = jnp.where(sc == 0.0, bc + m_in, NEG)
    m_t = jnp.maximum(m_intra, inter)
    return jnp.exp(jnp.where(ok, diff + ir, NEG) - m_t), m_t, jnp.exp(inter - m_t)


def key_terms(q_ref, k_ref, s_ref, n_ref, md, kt):
    """A chunk's readout contractions over the key axis, ``(Q Kᵀ [C, C], Q C' [C, V], Σ_k Q ⊙ n' [C, 1])``,
    read from refs ``kt`` key columns at a time (``_util.column_tile``; ``s_ref [K, V]`` and ``n_ref [1, K]``
    the entering ``C'`` and ``n'``; ``md`` the matmul dtype)."""
    def term(cols):
        q = q_ref[:, cols]
        return mm(q, k_ref[:, cols], _NT), mm(q, s_ref[cols, :].astype(md)), _rsum(q.astype(f32) * n_ref[:, cols])

    return tile_sum(q_ref.shape[1], kt, term)


def _readout(v, bc, sc, br, sr, ir, er, m_in, terms):
    """One chunk's numerator ``[C, V]`` (``V`` may be one value block), raw normaliser ``r``, row stabiliser
    ``m_t`` and ``ρ`` ``[C, 1]``, from :func:`key_terms`."""
    qk, qs, qn = terms
    d, m_t, rho = _weights(bc, sc, br, sr, ir, er, m_in)
    att = qk * d
    num = mm(att.astype(v.dtype), v) + rho * qs
    raw = _rsum(att) + rho * qn
    return num, raw, m_t, rho


def _state_step(k, v, ew, fo, s):
    """``C'⁺ = φ C' + (K ⊙ ε)ᵀ V`` (``φ`` broadcast over the chunk's tokens; its last row is used)."""
    return _last(fo) * s + mm((k.astype(f32) * ew).astype(v.dtype), v, _TN)


# ----------------------------------------------------------------------------- kernels


def _states_kernel(k_ref, v_ref, ew_ref, fo_ref, h0_ref, hs_ref, ht_ref, *, c, n):
    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        hs_ref[i] = s.astype(hs_ref.dtype)
        return _state_step(k_ref[sl, :], v_ref[sl, :], ew_ref[sl, :], fo_ref[sl, :], s)

    ht_ref[...] = lax.fori_loop(0, n, body, h0_ref[...])


def _states_kernel_tpu(k_ref, v_ref, ew_ref, fo_ref, h0_ref, hs_ref, ht_ref, s_scr):
    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = h0_ref[...]

    s = s_scr[...]
    hs_ref[...] = s.astype(hs_ref.dtype)
    s = _state_step(k_ref[...], v_ref[...], ew_ref[...], fo_ref[...], s)
    s_scr[...] = s

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = s


def _out_kernel(q_ref, k_ref, v_ref, bc_ref, sc_ref, mi_ref, br_ref, sr_ref, ir_ref, er_ref, s_ref, n_ref, o_ref, *, kt):
    terms = key_terms(q_ref, k_ref, s_ref, n_ref, v_ref.dtype, kt)
    num, raw, m_t, _ = _readout(v_ref[...], bc_ref[...], sc_ref[...], br_ref[...], sr_ref[...], ir_ref[...],
                                er_ref[...], _last(mi_ref[...]), terms)
    o_ref[...] = (num / jnp.maximum(jnp.abs(raw), jnp.exp(-m_t))).astype(o_ref.dtype)


# ----------------------------------------------------------------------------- drivers


def _maxplus(x, y):
    """Compose ``m -> max(m + a, l)`` maps: ``x`` first, then ``y`` (an associative operator)."""
    return x[0] + y[0], jnp.maximum(x[1] + y[0], y[1])


def _affine(x, y):
    """Compose ``n -> f n + z`` maps (``f [..]``, ``z [.., K]``): ``x`` first, then ``y``."""
    return x[0] * y[0], y[0][..., None] * x[1] + y[1]


def chunk_stabilisers(bt, st, it, et, kh, n0, m0, c):
    """XLA, per chunk: the entering stabiliser ``m [b, h, N]``, the write weights ``ε [b, h, Tp]``, the carry
    ``φ [b, h, N]``, the entering normaliser ``n' [b, h, N, K]`` and the final ``(n'_T, m_T)``. The
    chunk-to-chunk recurrences ``m⁺ = max(a + m, m_loc)`` and ``n'⁺ = φ n' + Kᵀ ε`` run as associative
    scans (log depth: a ``lax.scan`` over ``N`` chunks would launch ``N`` tiny steps on a GPU)."""
    b, h, tp = bt.shape
    n = tp // c
    ch = lambda x: x.reshape(b, h, n, c)
    bb, ss, ii, ee = ch(bt), ch(st), ch(it), ch(et)
    b_end, s_end = bb[..., -1:], ss[..., -1:]
    live = ss == s_end
    m_loc = jnp.max(jnp.where(live, b_end - bb + ee, NEG), axis=-1)
    a = jnp.where(s_end[..., 0] == 0.0, b_end[..., 0], NEG)
    cum_a, cum_l = lax.associative_scan(_maxplus, (a, m_loc), axis=2)
    m_out = jnp.maximum(m0[..., None] + cum_a, cum_l)
    m_in = jnp.concatenate([m0[..., None], m_out[..., :-1]], axis=2)
    fo = jnp.exp(jnp.minimum(a + m_in - m_out, 0.0))
    ew = jnp.where(live, jnp.exp(jnp.minimum(b_end - bb + ii - m_out[..., None], 0.0)), 0.0)
    n_loc = jnp.einsum("bhnc,bhnck->bhnk", ew, kh.reshape(b, h, n, c, -1).astype(f32), precision=lax.Precision.HIGHEST)
    cum_f, cum_n = lax.associative_scan(_affine, (fo, n_loc), axis=2)
    n_out = cum_f[..., None] * n0[:, :, None] + cum_n
    n_in = jnp.concatenate([n0[:, :, None], n_out[:, :, :-1]], axis=2)
    return m_in, ew.reshape(b, h, tp), fo, n_in, (n_out[:, :, -1], m_out[..., -1])


def chunk_states(kh, vh, ew, fo, C0, *, c, interpret, backend, dtype=f32):
    """The serial pass on any backend: the ``C'`` entering every chunk ``[b, h, N, Kp, Vp]`` in ``dtype``
    and the final one ``[b, h, Kp, Vp]`` float32, from the write weights ``ε [b, h, Tp]`` and carries
    ``φ [b, h, N]`` of ``chunk_stabilisers``. ``backend="mosaic_gpu"``: ``mosaic_gpu.states_mosaic_gpu``
    (matmul operands bf16)."""
    b, h, tp, kp = kh.shape
    vp, n = vh.shape[-1], tp // c
    if backend == "mosaic_gpu":  # head dims padded on to key_pad (zeros: exact) and sliced back
        kq, vq = key_pad(kp), key_pad(vp)
        hs, ht = states_mosaic_gpu(_pad_last(kh, kq), _pad_last(vh, vq), ew, fo, _pad_c(C0, kq, vq), c=c, dtype=dtype,
                                   interpret=interpret)
        return hs[..., :kp, :vp], ht[..., :kp, :vp]
    ew, fo = ew[..., None], jnp.repeat(fo, c, axis=2)[..., None]  # [b, h, Tp, 1]: φ on each of its tokens
    out_shape = [jax.ShapeDtypeStruct((b, h, n, kp, vp), dtype), jax.ShapeDtypeStruct((b, h, kp, vp), f32)]
    C0 = C0.astype(f32)
    if backend == "mosaic_tpu":
        blk = lambda d: chunk_block(c, d)
        whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
        return pl.pallas_call(
            _states_kernel_tpu, grid=(b, h, n), in_specs=[blk(kp), blk(vp), blk(1), blk(1), whole],
            out_specs=[pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0)), whole],
            out_shape=out_shape, scratch_shapes=[pltpu.VMEM((kp, vp), f32)], interpret=interpret,
            compiler_params=tpu_params(interpret, "parallel", "parallel", "arbitrary"), name="mlstm_chunk_states_tpu",
        )(kh, vh, ew, fo, C0)
    bv = min(vp, 64)
    full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))
    vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
    return pl.pallas_call(
        functools.partial(_states_kernel, c=c, n=n), grid=(b, h, vp // bv),
        in_specs=[full(kp), pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l)), full(1), full(1), vstate],
        out_specs=[pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l)), vstate], out_shape=out_shape,
        interpret=interpret, compiler_params=walk_params(interpret, backend, kp), name="mlstm_chunk_states",
    )(kh, vh, ew, fo, C0)


def _bf16_values(x):
    """``x`` at the values it takes as a Mosaic GPU ``wgmma`` operand (``_mosaic_gpu.BF16``), its dtype kept and its
    gradient passed straight through (``x + (r − x)`` is ``r`` exactly: the difference of two floats this close is
    exact)."""
    op = _mosaic_gpu.BF16
    if x.dtype == op:
        return x
    return x + lax.stop_gradient(x.astype(op).astype(x.dtype) - x)


def _prepare(q, k, v, i, f, resets, chunk, backend=None):
    """Chunk-local gates ``[b, h, Tp]`` and padded, heads-first ``q, k, v`` (``k / √dk``). Under
    ``backend="mosaic_gpu"`` ``q, k, v`` are rounded to the bf16 values its bodies multiply (:func:`_bf16_values`),
    so that the normaliser states ``n'`` XLA sums from ``k`` (:func:`chunk_stabilisers`) hold the keys the kernels
    see. With ``n'`` from the unrounded keys the readout's normaliser ``r = (Q Kᵀ ⊙ D) 1 + ρ ⊙ Q n'`` would mix the
    two, and the division by a small ``|r|`` amplifies the mismatch: under mild gates the gradients of float32 inputs
    land 5x further from the float32 reference than the Triton body's on the same inputs in bf16."""
    b, t, h, dk = q.shape
    n = -(-t // chunk)
    tp = n * chunk
    padt = lambda x, fill: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    logf = jax.nn.log_sigmoid(f.astype(jnp.float32))
    cut = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    # padded tokens at the end: forget gate 1, input gate 0 (log weight NEG); they leave the state as it is
    _, _, bc, seg, _ = prepare_chunks(padt(logf, 0.0)[..., None], None, padt(cut, False), tp, chunk)
    i32 = i.astype(jnp.float32)
    e = jnp.where(cut[..., None], jnp.maximum(i32, logf), i32)  # a reset also brings the fresh m = 0
    heads = lambda x: jnp.moveaxis(x, 2, 1)
    gate = lambda x: heads(x.reshape(b, tp, h))
    ks = (k.astype(jnp.float32) / math.sqrt(dk)).astype(k.dtype)
    dkp, dvp = _pow2(dk), _pow2(v.shape[-1])
    seq = lambda x, d: heads(jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])]))
    if backend == "mosaic_gpu":
        q, ks, v = _bf16_values(q), _bf16_values(ks), _bf16_values(v)
    return (seq(q, dkp), seq(ks, dkp), seq(v, dvp), gate(bc), gate(seg.astype(jnp.float32)),
            heads(padt(i32, NEG)), heads(padt(e, NEG)), n)


def _pad_last(x, d):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def _pad_c(C, kp, vp):
    return jnp.pad(C, [(0, 0), (0, 0), (0, kp - C.shape[2]), (0, vp - C.shape[3])])


def _pad_state(h0, dkp, dvp):
    """``(C, n, m)`` float32 with head dims zero-padded: ``C [b, h, Kp, Vp]``, ``n [b, h, Kp]``, ``m [b, h]``."""
    C0, n0, m0 = (jnp.asarray(x, jnp.float32) for x in h0)
    return (jnp.pad(C0, [(0, 0), (0, 0), (0, dkp - C0.shape[2]), (0, dvp - C0.shape[3])]),
            jnp.pad(n0, [(0, 0), (0, 0), (0, dkp - n0.shape[2])]), m0)



def _core(qh, kh, vh, bt, st, it, et, C0, n0, m0, *, chunk, interpret, backend):
    """Both kernels on prepared inputs: ``(o [b, h, Tp, Vp] float32, (C, n, m))`` padded."""
    b, h, tp, kp = qh.shape
    vp, c = vh.shape[-1], chunk
    n = tp // c
    tpu = backend == "mosaic_tpu"
    m_in, ew, fo, n_in, (n_t, m_t) = chunk_stabilisers(bt, st, it, et, kh, n0.astype(f32), m0.astype(f32), c)
    if backend == "mosaic_gpu":  # both head dims padded on to key_pad (zeros: exact), the outputs sliced back
        kq, vq = key_pad(kp), key_pad(vp)
        qq, kk, vv = _pad_last(qh, kq), _pad_last(kh, kq), _pad_last(vh, vq)
        hs, C_t = chunk_states(kk, vv, ew, fo, _pad_c(C0, kq, vq), c=c, interpret=interpret, backend=backend,
                               dtype=jnp.bfloat16)  # the entering C' are the readout's bf16 wgmma operand
        o = out_mosaic_gpu(qq, kk, vv, bt, st, it, et, m_in, hs, _pad_last(n_in, kq), c=c, interpret=interpret)
        return o[..., :vp], (C_t[:, :, :kp, :vp], n_t, m_t)
    hs, C_t = chunk_states(kh, vh, ew, fo, C0, c=c, interpret=interpret, backend=backend, dtype=vh.dtype)
    col = lambda x: x[..., None]
    row = lambda x: x.reshape(b, h, n, 1, c)
    bv, blk, rblk, vblk, params = out_specs(c, vp, interpret=interpret, backend=backend)
    o = pl.pallas_call(
        functools.partial(_out_kernel, kt=column_tile(kp, backend)), grid=(b, h, n, vp // bv),
        in_specs=[blk(kp), blk(kp), vblk, blk(1), blk(1), blk(1), rblk, rblk, rblk, rblk,
                  pl.BlockSpec((None, None, None, kp, bv), lambda i, j, l, z: (i, j, l, 0, z)),
                  pl.BlockSpec((None, None, None, 1, kp), lambda i, j, l, z: (i, j, l, 0, 0))],
        out_specs=vblk, out_shape=jax.ShapeDtypeStruct((b, h, tp, vp), f32), interpret=interpret,
        compiler_params=params, name="mlstm_chunk_out" + ("_tpu" if tpu else ""),
    )(qh, kh, vh, col(bt), col(st), jnp.repeat(m_in, c, axis=2)[..., None], row(bt), row(st), row(it), row(et), hs,
      n_in[:, :, :, None])
    return o, (C_t, n_t, m_t)


def _forward(q, k, v, i, f, h0, resets, chunk, interpret, backend):
    t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    qh, kh, vh, bt, st, it, et, _ = _prepare(q, k, v, i, f, resets, chunk, backend)
    o, (Ct, nt, mt) = _core(qh, kh, vh, bt, st, it, et, *_pad_state(h0, qh.shape[-1], vh.shape[-1]), chunk=chunk,
                            interpret=interpret, backend=backend)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], (Ct[:, :, :dk, :dv], nt[:, :, :dk], mt)
