r"""Pallas backward of the chunked GLA kernels: recompute the chunk states, walk the state gradients
backwards, then every chunk's gradients in parallel (fla's ``chunk_simple_gla`` backward). Per-head decay;
per-channel decay (GLA proper) is ``backward_channel.py``.

Per chunk of ``C`` tokens with inclusive cumulative log decay ``b`` (within the chunk), cumulative sign
``p`` and segment counter ``seg`` (all from ``seqjax.ops.gla.prepare_chunks``):
``D_ts = [s ≤ t, seg_s = seg_t] p_t p_s e^{b_t − b_s}``, ``f^s_t = [seg_t = 0] p_t e^{b_t}`` (state read),
``f^e_s = [seg_s = seg_C] p_s p_C e^{b_C − b_s}`` (state write), ``a = [seg_C = 0] p_C e^{b_C}`` (carry), so

.. math::  O = (Q K^\top ⊙ D) V + f^s ⊙ (Q S), \qquad S' = a S + (K ⊙ f^e)^\top V.

Given ``dO`` and ``dS'`` (the gradient of the state *after* the chunk):

.. math::
    dS &= a\, dS' + (Q ⊙ f^s)^\top dO \\
    dQ &= (dO V^\top ⊙ D) K + f^s ⊙ (dO S^\top), \quad dK = (dO V^\top ⊙ D)^\top Q + f^e ⊙ (V dS'^\top) \\
    dV &= (Q K^\top ⊙ D)^\top dO + f^e ⊙ (K dS')

and the gradient of ``b`` from "every term carrying ``e^{b_t}`` minus every term carrying ``e^{−b_t}``":
``db_t = Σ_s M_ts − Σ_{t'} M_{t't} + q_t·dQ^{state}_t − k_t·dK^{state}_t`` plus, at the last token,
``⟨S', dS'⟩`` (``b_C`` scales the whole written state), where ``M = dO V^⊤ ⊙ Q K^⊤ ⊙ D``. The diagonal
of ``M`` and the last token's own write are *left out of both sides* rather than added and subtracted:
under strong decay (log −20 per step) the true ``db`` is ~1e-9 while those terms are O(1), and their
float32 rounding would swamp it (the same reason as ``_factor(same=...)`` in the XLA form). XLA maps
``db`` back to the log decays through ``prepare_chunks``' own VJP (a reverse cumulative sum). The signs
``p`` are ``±1`` by contract (``seqjax.mixers.mamba2.transition`` makes them with ``jnp.sign``), so their
cotangent is zero.

Three ``pallas_call``s, as fla's ``chunk_fwd_h`` / ``chunk_bwd_dh`` / ``chunk_bwd_dqkwg``+``dv``:

1. ``_states``: the state *before* every chunk, ``H [b, h, N, K, V]`` float32, recomputed (nothing but
   the inputs is kept from the forward, so training memory is the inputs plus ``H`` and ``dH``, linear in
   ``T`` with ``K V / C`` floats per token and head);
2. ``_dstates``: ``dH`` (the gradient of the state after every chunk) walking the chunks backwards, and ``dh0``;
3. ``_grads``: grid ``(batch, heads, chunks)``, every chunk at once: ``dQ, dK, dV, db``.

Backends as the forward: Triton (GPU, and the CPU interpreter) walks the chunks of 1. and 2. with a
``fori_loop`` per (batch, head, value block); under ``backend="mosaic_gpu"`` so does Mosaic GPU
(``backward_mosaic_gpu.py``, one body for both walks; its states and state gradients are float32 as here), and
3. keeps its Triton body (head dims then padded to ``key_pad``); Mosaic TPU runs one chunk per grid step with the state in
VMEM scratch (the chunk axis ``"arbitrary"``, reversed by the index map for 2.). The chunk math is one
function for both (gates as columns ``[C, 1]`` and rows ``[1, C]``: broadcasts, no transposes).
Big arrays stay time-major ``[b, T, h, d]`` on Triton (strided blocks, no copies) and go heads-first
on the TPU, whose blocks need whole trailing dims.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._util import chunk_block, masked_exp, mm, tpu_params, triton_params
from pallas_kernels.gla_chunk.backward_mosaic_gpu import head_walks_mosaic_gpu

f32 = jnp.float32
_T0 = (((0,), (0,)), ((), ()))  # contract the leading (time) axes: Xᵀ Y
_T1 = (((1,), (1,)), ((), ()))  # contract the trailing axes: X Yᵀ


def _state_factors(bc, sc, pc):
    """Column gates ``[C, 1]`` -> ``f^s, f^e [C, 1]`` and ``a [1, 1]`` (see the module docstring)."""
    c = bc.shape[0]
    last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    end = lambda x: jnp.sum(jnp.where(last, x, 0.0), axis=0, keepdims=True)
    b_end, s_end, p_end = end(bc), end(sc), end(pc)
    fs = jnp.where(sc == 0, jnp.exp(bc), 0.0) * pc
    fe = masked_exp(sc == s_end, b_end - bc) * (pc * p_end)
    a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end
    return fs, fe, a


def _state_step(k, v, bc, sc, pc, s):
    """``S' = a S + (K ⊙ f^e)ᵀ V``."""
    _, fe, a = _state_factors(bc, sc, pc)
    return a * s + mm((k.astype(f32) * fe).astype(v.dtype), v, _T0)


def _dstate_step(q, do, bc, sc, pc, ds):
    """``dS = a dS' + (Q ⊙ f^s)ᵀ dO``."""
    fs, _, a = _state_factors(bc, sc, pc)
    return a * ds + mm((q.astype(f32) * fs).astype(do.dtype), do, _T0)


def _chunk_grads(q, k, v, do, bc, sc, pc, br, sr, pr, s, ds, dq_ref, dk_ref, dv_ref):
    """One chunk: ``q, k [C, K]``, ``v, do [C, V]`` (input dtype), gates as columns ``[C, 1]`` and rows
    ``[1, C]``, ``s`` the state before the chunk and ``ds`` the gradient of the state after it
    (``[K, V]`` float32). Writes ``dq, dk [C, K]`` and ``dv [C, V]`` to their refs, each as soon as it is
    finished (few ``[C, K]`` float32 blocks live at once: the sm_90 compile spills registers otherwise);
    returns ``db [C, 1]`` (float32)."""
    dt = v.dtype
    c = q.shape[0]
    # the float32 states are read once, here (held through the chunk on a GPU they spill registers)
    carry = jnp.sum(jnp.sum(s * ds, axis=1, keepdims=True), axis=0, keepdims=True)  # ⟨S, dS'⟩ [1, 1]
    sm, dsm = s.astype(dt), ds.astype(dt)
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    same = sc == sr
    d = masked_exp((rows >= cols) & same, bc - br) * (pc * pr)  # D, diagonal included (= 1)
    fs, fe, a = _state_factors(bc, sc, pc)
    dp = mm(do, v, _T1)  # dO Vᵀ
    da = jnp.where(rows > cols, dp * d, 0.0).astype(dt)  # strictly below the diagonal
    diag = jnp.sum(do.astype(f32) * v.astype(f32), axis=1, keepdims=True)  # the diagonal of dO Vᵀ (D_tt = 1)
    qf = q.astype(f32)
    dq_in = mm(da, k)
    dq_st = fs * mm(do, sm, _T1)
    db_in, db_st = jnp.sum(qf * dq_in, axis=1, keepdims=True), jnp.sum(qf * dq_st, axis=1, keepdims=True)
    dq_ref[...] = (dq_in + dq_st + diag * k.astype(f32)).astype(dq_ref.dtype)
    kf = k.astype(f32)
    dk_in = mm(da, q, _T0)
    dk_st = fe * mm(v, dsm, _T1)
    # db: rows minus columns of M = dO Vᵀ ⊙ Q Kᵀ ⊙ D without its diagonal, the state read, the state
    # writes of all but the last token (whose own write cancels against ⟨S', dS'⟩ exactly), and at the
    # last token ⟨S', dS'⟩ minus that write: a ⟨S, dS'⟩ + Σ_{s<C} k_s · dK^{state}_s
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    writes = jnp.where(is_last, 0.0, jnp.sum(kf * dk_st, axis=1, keepdims=True))
    end = a * carry + jnp.sum(writes, axis=0, keepdims=True)
    db = db_in - jnp.sum(kf * dk_in, axis=1, keepdims=True) + db_st - writes + jnp.where(is_last, end, 0.0)
    dk_ref[...] = (dk_in + dk_st + diag * qf).astype(dk_ref.dtype)
    att = mm(q, k, _T1) * d  # Q Kᵀ ⊙ D
    dv_ref[...] = (mm(att.astype(dt), do, _T0) + fe * mm(k, dsm)).astype(dv_ref.dtype)
    return db


# ----------------------------------------------------------------------------- Triton / interpreter


def _states_kernel(k_ref, v_ref, bc_ref, sc_ref, pc_ref, h0_ref, hs_ref, *, chunk, n_chunks):
    def body(n, s):
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        hs_ref[n] = s
        return _state_step(k_ref[sl, :], v_ref[sl, :], bc_ref[sl, :], sc_ref[sl, :], pc_ref[sl, :], s)

    lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(f32))


def _dstates_kernel(q_ref, do_ref, bc_ref, sc_ref, pc_ref, dht_ref, dhs_ref, dh0_ref, *, chunk, n_chunks):
    def body(i, ds):
        n = n_chunks - 1 - i
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        dhs_ref[n] = ds
        return _dstate_step(q_ref[sl, :], do_ref[sl, :], bc_ref[sl, :], sc_ref[sl, :], pc_ref[sl, :], ds)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...])


def _grads_kernel(q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, pc_ref, br_ref, sr_ref, pr_ref, h_ref, dh_ref,
                  dq_ref, dk_ref, dv_ref, db_ref):
    db_ref[...] = _chunk_grads(q_ref[...], k_ref[...], v_ref[...], do_ref[...], bc_ref[...], sc_ref[...], pc_ref[...],
                               br_ref[...], sr_ref[...], pr_ref[...], h_ref[...], dh_ref[...], dq_ref, dk_ref, dv_ref)


# ----------------------------------------------------------------------------- Mosaic TPU


def _states_kernel_tpu(k_ref, v_ref, bc_ref, sc_ref, pc_ref, h0_ref, hs_ref, s_scr):
    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(f32)

    s = s_scr[...]
    hs_ref[...] = s
    s_scr[...] = _state_step(k_ref[...], v_ref[...], bc_ref[...], sc_ref[...], pc_ref[...], s)


def _dstates_kernel_tpu(q_ref, do_ref, bc_ref, sc_ref, pc_ref, dht_ref, dhs_ref, dh0_ref, ds_scr):
    @pl.when(pl.program_id(2) == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    ds = ds_scr[...]
    dhs_ref[...] = ds
    ds = _dstate_step(q_ref[...], do_ref[...], bc_ref[...], sc_ref[...], pc_ref[...], ds)
    ds_scr[...] = ds

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds


# ----------------------------------------------------------------------------- driver


def gla_head_bwd(q, k, v, bc, seg, p, h0, do, dht, *, chunk, interpret, backend):
    """Gradients of the per-head kernel. Padded inputs as its forward: ``q, k [b, Tp, h, Kp]``,
    ``v [b, Tp, h, Vp]`` (input dtype), gates ``bc, seg, p [b, Tp, h]`` float32, ``h0 [b, h, Kp, Vp]``;
    cotangents ``do [b, Tp, h, Vp]`` and ``dht [b, h, Kp, Vp]``. Returns ``dq, dk, dv`` (input dtype),
    ``dbc [b, Tp, h]`` and ``dh0`` (float32)."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    n = tp // chunk
    dt = v.dtype
    do = do.astype(dt)  # the matmul operands take the input dtype (float32 accumulation), as in the forward
    dht = dht.astype(f32)
    heads = lambda x: jnp.moveaxis(x, 2, 1)
    gcol = lambda x: heads(x)[..., None]
    grow = lambda x: heads(x).reshape(bsz, h, n, 1, chunk)
    cols, rows = [gcol(x) for x in (bc, seg, p)], [grow(x) for x in (bc, seg, p)]
    hs_shape = jax.ShapeDtypeStruct((bsz, h, n, kp, vp), f32)
    st_shape = jax.ShapeDtypeStruct((bsz, h, kp, vp), f32)
    ccol = pl.BlockSpec((None, None, chunk, 1), lambda i, j, l: (i, j, l, 0))
    crow = pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, l: (i, j, l, 0, 0))
    chunk_state = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0))
    grad_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)] + [jax.ShapeDtypeStruct((bsz, h, tp, 1), f32)]
    if backend == "mosaic_tpu":
        qh, kh, vh, doh = map(heads, (q, k, v, do))
        blk = lambda d, rev=False: chunk_block(chunk, d, n if rev else None)
        whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
        seq = tpu_params(interpret, "parallel", "parallel", "arbitrary")
        hs = pl.pallas_call(
            _states_kernel_tpu, grid=(bsz, h, n),
            in_specs=[blk(kp), blk(vp), ccol, ccol, ccol, whole], out_specs=chunk_state, out_shape=hs_shape,
            scratch_shapes=[pltpu.VMEM((kp, vp), f32)], interpret=interpret, compiler_params=seq,
            name="gla_chunk_bwd_states_tpu",
        )(kh, vh, *cols, h0)
        rcol = blk(1, rev=True)
        dhs, dh0 = pl.pallas_call(
            _dstates_kernel_tpu, grid=(bsz, h, n),
            in_specs=[blk(kp, True), blk(vp, True), rcol, rcol, rcol, whole],
            out_specs=[pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, n - 1 - l, 0, 0)), whole],
            out_shape=[hs_shape, st_shape], scratch_shapes=[pltpu.VMEM((kp, vp), f32)],
            interpret=interpret, compiler_params=seq, name="gla_chunk_bwd_dstates_tpu",
        )(qh, doh, *cols, dht)
        big, big_args, params = blk, (qh, kh, vh, doh), tpu_params(interpret, "parallel", "parallel", "parallel")
        grad_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qh, kh, vh)] + grad_shapes[3:]
    elif backend == "mosaic_gpu":  # the two walks on Mosaic GPU (backward_mosaic_gpu.py), the chunk gradients on Triton
        hs, dhs, dh0 = head_walks_mosaic_gpu(q, k, v, bc, seg, p, h0, do, dht, chunk=chunk, interpret=interpret)
    else:
        bv = min(vp, 64)
        tseq = lambda d, vb=False: pl.BlockSpec(
            (None, tp, None, d), (lambda i, j, l: (i, 0, j, l)) if vb else (lambda i, j, l: (i, 0, j, 0)))
        gseq = pl.BlockSpec((None, None, tp, 1), lambda i, j, l: (i, j, 0, 0))
        vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
        vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
        walk = triton_params(interpret, backend)
        hs = pl.pallas_call(
            functools.partial(_states_kernel, chunk=chunk, n_chunks=n), grid=(bsz, h, vp // bv),
            in_specs=[tseq(kp), tseq(bv, True), gseq, gseq, gseq, vstate], out_specs=vstates, out_shape=hs_shape,
            interpret=interpret, compiler_params=walk, name="gla_chunk_bwd_states",
        )(k, v, *cols, h0)
        dhs, dh0 = pl.pallas_call(
            functools.partial(_dstates_kernel, chunk=chunk, n_chunks=n), grid=(bsz, h, vp // bv),
            in_specs=[tseq(kp), tseq(bv, True), gseq, gseq, gseq, vstate], out_specs=[vstates, vstate],
            out_shape=[hs_shape, st_shape], interpret=interpret, compiler_params=walk, name="gla_chunk_bwd_dstates",
        )(q, do, *cols, dht)
    if backend != "mosaic_tpu":
        big = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, j, l: (i, l, j, 0))
        big_args, params = (q, k, v, do), triton_params(interpret, "triton", num_warps=8, num_stages=1)
    dq, dk, dv, db = pl.pallas_call(
        _grads_kernel, grid=(bsz, h, n),
        in_specs=[big(kp), big(kp), big(vp), big(vp), ccol, ccol, ccol, crow, crow, crow, chunk_state, chunk_state],
        out_specs=[big(kp), big(kp), big(vp), ccol], out_shape=grad_shapes,
        interpret=interpret, compiler_params=params,
        name="gla_chunk_bwd_grads" + ("_tpu" if backend == "mosaic_tpu" else ""),
    )(*big_args, *cols, *rows, hs, dhs)
    if backend == "mosaic_tpu":
        dq, dk, dv = (jnp.moveaxis(x, 1, 2) for x in (dq, dk, dv))
    return dq, dk, dv, jnp.moveaxis(db[..., 0], 1, 2), dh0
