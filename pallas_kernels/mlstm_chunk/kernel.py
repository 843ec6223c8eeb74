r"""Pallas kernel: the chunkwise mLSTM (xLSTM's matrix memory) with its stabilised exponential gating.

Computes ``seqjax.mixers.mlstm``'s recurrence (see that module for the equations): per head, forget gate
``σ(f)``, exponential input gate ``e^{i}``, stabiliser ``m``, memory ``C [dk, dv]``, normaliser
``n [dk]``; ``h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, e^{-m_t})``.

How it works
    Grid ``(batch, heads, value blocks)``; one program walks its sequence chunk by chunk
    (``fori_loop``) carrying ``(C' [dk, BV], n' [dk], m)`` on chip (``n'`` and ``m`` do not depend on
    the value block, so every block recomputes them — a ``[C, dk]`` reduction per chunk). Per chunk of
    ``C`` tokens, as the XLA chunked form (``seqjax.mixers.mlstm._chunk``, after NX-AI's
    ``mlstm_kernels``): the log-weight matrix ``w_ts = b_t − b_s + i_s`` (``b`` the cumulative log
    forget gate within the chunk; causal, one document), the row stabiliser
    ``m_t = max(max_s w_ts, b_t + m_in)``, ``O = ((Q Kᵀ ⊙ e^{w − m_t}) V + e^{b + m_in − m_t} Q C') / max(|den|, e^{−m_t})``,
    then the chunk-end state with its own local max. Every ``exp`` sees an argument ``≤ 0``.
    The elementwise preparation (cumulative gates, document index, the reset-aware stabiliser term,
    ``k / √dk``, padding) runs in XLA in the wrapper.

Backward (``custom_vjp``, ``backward="pallas"``, the default): ``backward.py`` — the output does not depend on
the stabiliser, so every stabiliser is held constant and the backward is a gated linear attention's with the
normaliser as an extra value column: the chunk states recomputed, per-row ``1/den`` and the normaliser's
gradient, the state gradients walking the chunks backwards, then every chunk's ``dq, dk, dv`` and gate
gradients in parallel. Only the inputs are kept from the forward. The final ``m`` is recomputed in XLA
(``_final_m``) so its gradient reaches the winning gate as in the reference. ``backward="xla"`` runs the XLA
chunked form's forward and backward under ``jax.grad`` (what ``impl="auto"`` does until the Pallas backward
is timed on a GPU).

Lowering: the Triton lowering on GPU, for the reasons given in ``pallas_kernels/gla_chunk`` (block-level
``dot``s with masks and a sequential chunk loop). TPU: a separate Mosaic body (``backend="mosaic_tpu"``,
automatic on a TPU; one chunk per grid step, state in VMEM scratch), interpret-tested and checked to lower
to Mosaic (``tests/test_pallas_lowering.py``); not yet run on a TPU.

Status: interpret-mode tests on CPU (``tests/test_pallas_mlstm.py``, CI); the forward's tests pass compiled on
an NVIDIA H200 (jax 0.11.2, 2026-11-27), where the forward is 1.91x the XLA chunked form's at B=8, T=2k, H=16,
D=128, bf16 (``benchmarks/results/NVIDIA_H200.md``). The backward (written after that GPU session) lowers to
Triton and to Mosaic TPU on CPU (``tests/test_pallas_lowering.py``) but has not been compiled or timed on a GPU. The ``[C, C]`` log-weight and stabiliser work sits in
the serial chunk loop; moving it to a chunk-parallel kernel is the next step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._util import check_chunk_size, resolve, tpu_params, triton_params

__all__ = ["mlstm_chunk"]

NEG = -1e30  # as seqjax.mixers.mlstm: "minus infinity" that keeps differences finite


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _kernel(q_ref, k_ref, v_ref, b_ref, s_ref, i_ref, e_ref, c0_ref, n0_ref, m0_ref,
            o_ref, ct_ref, nt_ref, mt_ref, *, c, n_chunks):
    f32 = jnp.float32
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    pos = lax.broadcasted_iota(jnp.int32, (c,), 0)
    causal = row >= col

    def last(x):  # x[c - 1] of a [c] vector, as a scalar
        return jnp.sum(jnp.where(pos == c - 1, x, 0.0))

    def chunk(j, carry):
        C, nv, m = carry
        sl = pl.ds(pl.multiple_of(j * c, c), c)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        bt, st, it, et = b_ref[sl], s_ref[sl], i_ref[sl], e_ref[sl]
        ok = causal & (st[:, None] == st[None, :])
        diff = bt[:, None] - bt[None, :]
        w = jnp.where(ok, diff + it[None, :], NEG)
        m_intra = jnp.max(jnp.where(ok, diff + et[None, :], NEG), axis=1)  # [c]
        # output: stabilised intra-chunk weights plus the carried state
        inter = jnp.where(st == 0.0, bt + m, NEG)
        m_t = jnp.maximum(m_intra, inter)
        att = jnp.dot(q, k.T, preferred_element_type=f32) * jnp.exp(w - m_t[:, None])
        w0 = jnp.exp(inter - m_t)
        qf = q.astype(f32)
        num = jnp.dot(att.astype(v.dtype), v, preferred_element_type=f32)
        num = num + jnp.dot((qf * w0[:, None]).astype(v.dtype), C.astype(v.dtype), preferred_element_type=f32)
        den = jnp.sum(att, axis=1) + jnp.sum(qf * nv[None, :], axis=1) * w0
        den = jnp.maximum(jnp.abs(den), jnp.exp(-m_t))
        o_ref[sl, :] = (num / den[:, None]).astype(o_ref.dtype)
        # chunk-end state with its own max, then merged into the carry
        m_loc = last(m_intra)
        we = jnp.exp(jnp.sum(jnp.where(row == c - 1, w, 0.0), axis=0) - m_loc)  # [c] weights of the last row
        kw = k.astype(f32) * we[:, None]
        u = jnp.dot(kw.T.astype(v.dtype), v, preferred_element_type=f32)
        n_loc = jnp.sum(kw, axis=0)
        a = jnp.where(jnp.max(st) == 0.0, last(bt), NEG)
        m_new = jnp.maximum(a + m, m_loc)
        fo, fl = jnp.exp(a + m - m_new), jnp.exp(m_loc - m_new)
        return fo * C + fl * u, fo * nv + fl * n_loc, m_new

    C, nv, m = lax.fori_loop(0, n_chunks, chunk, (c0_ref[...].astype(f32), n0_ref[...].astype(f32), jnp.max(m0_ref[...])))
    ct_ref[...] = C
    nt_ref[...] = nv
    mt_ref[...] = jnp.full(mt_ref.shape, m, f32)


def _prepare(q, k, v, i, f, resets, chunk):
    """Chunk-local gates ``[b, h, Tp]`` and padded, heads-first ``q, k, v`` (``k / √dk``)."""
    from seqjax.mixers import _gla_chunk as eng

    b, t, h, dk = q.shape
    n = -(-t // chunk)
    tp = n * chunk
    padt = lambda x, fill: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)  # noqa: E731
    logf = jax.nn.log_sigmoid(f.astype(jnp.float32))
    cut = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    # padded tokens at the end: forget gate 1, input gate 0 (log weight NEG); they leave the state as it is
    _, _, bc, seg, _ = eng.prepare_chunks(padt(logf, 0.0)[..., None], None, padt(cut, False), tp, chunk)
    i32 = i.astype(jnp.float32)
    e = jnp.where(cut[..., None], jnp.maximum(i32, logf), i32)  # a reset also brings the fresh m = 0
    heads = lambda x: jnp.moveaxis(x, 2, 1)  # noqa: E731  [b, t, h, ...] -> [b, h, t, ...]
    gate = lambda x: heads(x.reshape(b, tp, h))  # noqa: E731
    ks = (k.astype(jnp.float32) / math.sqrt(dk)).astype(k.dtype)
    dkp, dvp = _pow2(dk), _pow2(v.shape[-1])
    seq = lambda x, d: heads(jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])]))  # noqa: E731
    return (seq(q, dkp), seq(ks, dkp), seq(v, dvp), gate(bc), gate(seg.astype(jnp.float32)),
            heads(padt(i32, NEG)), heads(padt(e, NEG)), n)


def _pad_state(h0, dkp, dvp):
    """``(C, n, m)`` float32 with head dims zero-padded: ``C [b, h, Kp, Vp]``, ``n [b, h, Kp]``, ``m [b, h]``."""
    C0, n0, m0 = (jnp.asarray(x, jnp.float32) for x in h0)
    return (jnp.pad(C0, [(0, 0), (0, 0), (0, dkp - C0.shape[2]), (0, dvp - C0.shape[3])]),
            jnp.pad(n0, [(0, 0), (0, 0), (0, dkp - n0.shape[2])]), m0)


def _core(qh, kh, vh, bt, st, it, et, C0, n0, m0, *, chunk, interpret):
    """Triton (and the interpreter) on prepared inputs: ``(o [b, h, Tp, Vp] float32, (C, n, m))`` padded."""
    b, h, tp, dkp = qh.shape
    dvp, n = vh.shape[-1], tp // chunk
    m0 = jnp.broadcast_to(m0[..., None], (b, h, 16))
    bv = min(dvp, 64)
    nvb = dvp // bv
    seq = lambda d: pl.BlockSpec((None, None, tp, d), lambda x, y, z: (x, y, 0, 0))  # noqa: E731
    vseq = pl.BlockSpec((None, None, tp, bv), lambda x, y, z: (x, y, 0, z))
    gate = pl.BlockSpec((None, None, tp), lambda x, y, z: (x, y, 0))
    cst = pl.BlockSpec((None, None, dkp, bv), lambda x, y, z: (x, y, 0, z))
    nin = pl.BlockSpec((None, None, dkp), lambda x, y, z: (x, y, 0))
    min_ = pl.BlockSpec((None, None, 16), lambda x, y, z: (x, y, 0))
    nout = pl.BlockSpec((None, None, None, dkp), lambda x, y, z: (x, y, z, 0))
    mout = pl.BlockSpec((None, None, None, 16), lambda x, y, z: (x, y, z, 0))
    params = triton_params(interpret, "triton")
    o, Ct, nt, mt = pl.pallas_call(
        functools.partial(_kernel, c=chunk, n_chunks=n),
        grid=(b, h, nvb),
        in_specs=[seq(dkp), seq(dkp), vseq, gate, gate, gate, gate, cst, nin, min_],
        out_specs=[vseq, cst, nout, mout],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dvp), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, nvb, dkp), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, nvb, 16), jnp.float32)],
        interpret=interpret,
        compiler_params=params,
        name="mlstm_chunk_fwd",
    )(qh, kh, vh, bt, st, it, et, C0, n0, m0)
    return o, (Ct, nt[:, :, 0], mt[:, :, 0, 0])


def _forward(q, k, v, i, f, h0, resets, chunk, interpret, backend):
    t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    qh, kh, vh, bt, st, it, et, _ = _prepare(q, k, v, i, f, resets, chunk)
    core = _core_tpu if backend == "mosaic_tpu" else _core
    o, (Ct, nt, mt) = core(qh, kh, vh, bt, st, it, et, *_pad_state(h0, qh.shape[-1], vh.shape[-1]), chunk=chunk,
                           interpret=interpret)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], (Ct[:, :, :dk, :dv], nt[:, :, :dk], mt)


def _kernel_tpu(q_ref, k_ref, v_ref, bc_ref, sc_ref, ic_ref, br_ref, sr_ref, ir_ref, er_ref, c0_ref, n0_ref, m0_ref,
                o_ref, ct_ref, nt_ref, mt_ref, c_scr, n_scr, m_scr):
    """Mosaic TPU body: one chunk per grid step (the chunk axis sequential), ``(C', n', m)`` in VMEM scratch
    (``n'`` as a row ``[1, dk]``, ``m`` as ``[1, 1]``); gates as columns ``[C, 1]`` and rows ``[1, C]``, so
    every value stays 2-D and the ``C x C`` masks are broadcasts."""
    f32 = jnp.float32
    c = q_ref.shape[0]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        c_scr[...] = c0_ref[...]
        n_scr[...] = n0_ref[...]
        m_scr[...] = m0_ref[...]

    C, nv, m = c_scr[...], n_scr[...], m_scr[...]
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    bcol, scol, icol = bc_ref[...], sc_ref[...], ic_ref[...]  # [C, 1]
    brow, srow, irow, erow = br_ref[...], sr_ref[...], ir_ref[...], er_ref[...]  # [1, C]
    causal = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
    ok = causal & (scol == srow)
    diff = bcol - brow
    w = jnp.where(ok, diff + irow, NEG)
    m_intra = jnp.max(jnp.where(ok, diff + erow, NEG), axis=1, keepdims=True)  # [C, 1]
    inter = jnp.where(scol == 0.0, bcol + m, NEG)
    m_t = jnp.maximum(m_intra, inter)
    att = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32) * jnp.exp(w - m_t)
    w0 = jnp.exp(inter - m_t)
    qf = q.astype(f32)
    num = jnp.dot(att.astype(v.dtype), v, preferred_element_type=f32)
    num = num + jnp.dot((qf * w0).astype(v.dtype), C.astype(v.dtype), preferred_element_type=f32)
    den = jnp.sum(att, axis=1, keepdims=True) + jnp.sum(qf * nv, axis=1, keepdims=True) * w0
    den = jnp.maximum(jnp.abs(den), jnp.exp(-m_t))
    o_ref[...] = (num / den).astype(o_ref.dtype)
    lane = lax.broadcasted_iota(jnp.int32, (1, c), 1)
    sub = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    b_end = jnp.sum(jnp.where(lane == c - 1, brow, 0.0), axis=1, keepdims=True)  # [1, 1]
    s_end = jnp.sum(jnp.where(lane == c - 1, srow, 0.0), axis=1, keepdims=True)
    m_loc = jnp.sum(jnp.where(sub == c - 1, m_intra, 0.0), axis=0, keepdims=True)
    w_end = jnp.where(scol == s_end, b_end - bcol + icol, NEG)  # the last row of w, as a column
    kw = k.astype(f32) * jnp.exp(w_end - m_loc)
    u = lax.dot_general(kw.astype(v.dtype), v, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    n_loc = jnp.sum(kw, axis=0, keepdims=True)
    a = jnp.where(s_end == 0.0, b_end, NEG)
    m_new = jnp.maximum(a + m, m_loc)
    fo, fl = jnp.exp(a + m - m_new), jnp.exp(m_loc - m_new)
    C, nv, m = fo * C + fl * u, fo * nv + fl * n_loc, m_new
    c_scr[...], n_scr[...], m_scr[...] = C, nv, m

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        ct_ref[...], nt_ref[...], mt_ref[...] = C, nv, m


def _core_tpu(qh, kh, vh, bt, st, it, et, C0, n0, m0, *, chunk, interpret):
    """Mosaic TPU on prepared inputs, as ``_core``."""
    from jax.experimental.pallas import tpu as pltpu

    b, h, tp, dkp = qh.shape
    dvp, n = vh.shape[-1], tp // chunk
    n0, m0 = n0[:, :, None], m0[:, :, None, None]  # [b, h, 1, Kp], [b, h, 1, 1]
    col = lambda x: x[..., None]  # noqa: E731
    row = lambda x: x.reshape(b, h, n, 1, chunk)  # noqa: E731
    blk = lambda d: pl.BlockSpec((None, None, chunk, d), lambda x, y, z: (x, y, z, 0))  # noqa: E731
    rblk = pl.BlockSpec((None, None, None, 1, chunk), lambda x, y, z: (x, y, z, 0, 0))
    whole = lambda a, bb: pl.BlockSpec((None, None, a, bb), lambda x, y, z: (x, y, 0, 0))  # noqa: E731
    params = tpu_params(interpret, "parallel", "parallel", "arbitrary")
    o, Ct, nt, mt = pl.pallas_call(
        _kernel_tpu,
        grid=(b, h, n),
        in_specs=[blk(dkp), blk(dkp), blk(dvp), blk(1), blk(1), blk(1), rblk, rblk, rblk, rblk,
                  whole(dkp, dvp), whole(1, dkp), whole(1, 1)],
        out_specs=[blk(dvp), whole(dkp, dvp), whole(1, dkp), whole(1, 1)],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dvp), jnp.float32), jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, 1, dkp), jnp.float32), jax.ShapeDtypeStruct((b, h, 1, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((dkp, dvp), jnp.float32), pltpu.VMEM((1, dkp), jnp.float32), pltpu.VMEM((1, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=params,
        name="mlstm_chunk_fwd_tpu",
    )(qh, kh, vh, col(bt), col(st), col(it), row(bt), row(st), row(it), row(et), C0, n0, m0)
    return o, (Ct, nt[:, :, 0], mt[:, :, 0, 0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _mlstm(q, k, v, i, f, h0, resets, chunk, interpret, backend):
    return _forward(q, k, v, i, f, h0, resets, chunk, interpret, backend)


def _fwd(q, k, v, i, f, h0, resets, chunk, interpret, backend):
    """Under differentiation the XLA chunked form runs forward and backward (see the module docstring)."""
    from seqjax.mixers.mlstm import _chunk

    del interpret, backend
    out, vjp = jax.vjp(lambda q, k, v, i, f, h0: _chunk(q, k, v, i, f, h0, resets, chunk), q, k, v, i, f, h0)
    return out, (vjp, resets)


def _bwd(chunk, interpret, backend, res, cts):
    vjp, resets = res
    return (*vjp(cts), None if resets is None else jnp.zeros_like(resets, jnp.float32))


_mlstm.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _mlstm_core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, interpret, backend):
    """The kernel on prepared inputs, differentiated by ``backward.py`` with every stabiliser held constant
    (the returned ``m`` gets no gradient: ``mlstm_chunk`` rescales the state to an ``m`` XLA differentiates)."""
    core = _core_tpu if backend == "mosaic_tpu" else _core
    return core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk=chunk, interpret=interpret)


def _core_fwd(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, interpret, backend):
    out = _mlstm_core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, interpret, backend)
    return out, (qh, kh, vh, bt, st, it, et, C0, n0, m0)


def _core_bwd(chunk, interpret, backend, res, cts):
    from pallas_kernels.mlstm_chunk.backward import mlstm_bwd

    do, (dCt, dnt, _) = cts
    dq, dk, dv, db, di, (dC0, dn0, dm0) = mlstm_bwd(*res, do, dCt, dnt, chunk=chunk, interpret=interpret,
                                                    backend=backend)
    zero = jnp.zeros_like(res[4])
    return dq, dk, dv, db, zero, di, zero, dC0, dn0, dm0


_mlstm_core.defvjp(_core_fwd, _core_bwd)


def _final_m(i, f, resets, m0):
    """The reference's final stabiliser ``m_T = max(Σ log σ(f) + m_0, max_s Σ_{u>s} log σ(f_u) + e_s)`` over the
    last document (``e_s = max(i_s, log σ(f_s))`` at a reset token, else ``i_s``), in XLA so that its
    gradient reaches the winning gate as the reference's chain of maxima sends it."""
    logf = jax.nn.log_sigmoid(f.astype(jnp.float32))
    i = i.astype(jnp.float32)
    cut = jnp.zeros(i.shape[:2], bool) if resets is None else jnp.asarray(resets).astype(bool)
    e = jnp.where(cut[..., None], jnp.maximum(i, logf), i)
    after = jnp.flip(jnp.cumsum(jnp.flip(logf, 1), 1), 1) - logf  # Σ_{u>s} log σ(f_u), without cancellation
    seg = jnp.cumsum(cut, axis=1)
    live = (seg == seg[:, -1:])[..., None]
    z = jnp.max(jnp.where(live, after + e, NEG), axis=1)  # [b, h]
    z0 = jnp.where((seg[:, -1] == 0)[:, None], jnp.sum(logf, axis=1) + m0.astype(jnp.float32), NEG)
    return jnp.maximum(z0, z)


def mlstm_chunk(q, k, v, i, f, *, h0=None, resets=None, chunk_size=64, interpret=None, backend=None,
                backward="pallas"):
    """The chunkwise mLSTM through the Pallas kernel; same contract as ``seqjax.mixers.mlstm.mlstm``.

    Args:
      q, k: ``[b, t, h, dk]``; v: ``[b, t, h, dv]`` (float32 or bf16); i, f: ``[b, t, h]`` gate
        pre-activations; h0: ``(C [b, h, dk, dv], n [b, h, dk], m [b, h])`` or ``None``;
        resets: ``[b, t]`` bool or ``None``. chunk_size: a power of two ``>= 16``.
      interpret: run as HLO (CPU); ``None`` = interpret exactly when the backend is CPU.
      backend: ``"triton"`` (GPU, and the CPU interpreter) or ``"mosaic_tpu"``; ``None`` picks by platform.
      backward: what ``jax.grad`` runs: ``"pallas"`` (``backward.py``) or ``"xla"`` (the XLA chunked form's
        forward and backward).

    Returns:
      ``(y [b, t, h, dv] float32, (C, n, m))``.
    """
    if backward not in ("pallas", "xla"):
        raise ValueError(f"backward must be 'pallas' or 'xla', got {backward!r}")
    dt = jnp.result_type(q, k, v)  # one matmul dtype (the gradients return to each input's own)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    check_chunk_size(chunk_size)
    interpret, backend = resolve(interpret, backend)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if h0 is None:
        h0 = (jnp.zeros((b, h, dk, dv), jnp.float32), jnp.zeros((b, h, dk), jnp.float32), jnp.zeros((b, h), jnp.float32))
    rs = None if resets is None else jnp.asarray(resets).astype(jnp.float32)
    chunk = min(int(chunk_size), max(16, _pow2(t)))
    if backward == "xla":
        return _mlstm(q, k, v, i, f, tuple(h0), rs, chunk, bool(interpret), backend)
    qh, kh, vh, bt, st, it, et, _ = _prepare(q, k, v, i, f, rs, chunk)
    C0, n0, m0 = _pad_state(h0, qh.shape[-1], vh.shape[-1])
    o, (Ck, nk, mk) = _mlstm_core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, bool(interpret), backend)
    m_t = _final_m(i, f, rs, h0[2])
    rescale = jnp.exp(lax.stop_gradient(mk) - m_t)  # ~1: the same maximum, computed twice
    y = jnp.moveaxis(o, 1, 2)[:, :t, :, :dv]
    return y, (Ck[:, :, :dk, :dv] * rescale[..., None, None], nk[:, :, :dk] * rescale[..., None], m_t)
