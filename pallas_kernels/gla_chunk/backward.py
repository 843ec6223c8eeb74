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
3. ``_grads``: grid ``(batch, heads, chunks, key blocks)``, every chunk at once: a program per key block of
   64 (fla's ``BK``; Mosaic TPU: one block, the whole key axis) writes that block's ``dQ, dK`` and its share
   of ``db`` (sums over the key axis, added in XLA); ``dV``, which contracts over the whole key axis, a value
   block each by the first of them. On Triton, contractions over a head dim past 128 run 64 columns at a time.

Backends as the forward: Triton (GPU, and the CPU interpreter) walks the chunks of 1. and 2. with a
``fori_loop`` per (batch, head, value block); under ``backend="mosaic_gpu"`` Mosaic GPU walks them per (batch,
head, value block of 64) with a TMA pipeline over the chunks (``backward_mosaic_gpu.py``, one body for both
walks; its states and state gradients are float32 as here) and runs 3. as two Mosaic GPU kernels (``dQ, dK, db``;
``dV``; head dims then padded to ``key_pad``); Mosaic TPU runs one chunk per grid step with the state in VMEM
scratch (the chunk axis ``"arbitrary"``, reversed by the index map for 2.). The chunk math is one function for
both (gates as columns ``[C, 1]`` and rows ``[1, C]``: broadcasts, no transposes).
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

from pallas_kernels._util import (
    chunk_block,
    column_products,
    column_tile,
    masked_exp,
    mm,
    once_on_tpu,
    tile_sum,
    tpu_params,
    triton_params,
    walk_params,
)
from pallas_kernels.gla_chunk.backward_mosaic_gpu import head_grads_mosaic_gpu, head_walks_mosaic_gpu

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


def _decay(bc, sc, pc, br, sr, pr):
    """``D [C, C]`` from gates as columns ``[C, 1]`` and rows ``[1, C]``, the diagonal included (``= 1``)."""
    c = bc.shape[0]
    causal = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return masked_exp(causal & (sc == sr), bc - br) * (pc * pr)


def _chunk_grads(q, k, v_ref, do_ref, bc, sc, pc, br, sr, pr, s_ref, ds_ref, dq_ref, dk_ref, *, bv):
    """One chunk and one block of ``bk`` key columns: ``q, k [C, bk]`` (input dtype), refs of ``v, do [C, V]``,
    gates as columns ``[C, 1]`` and rows ``[1, C]``, refs of ``s`` (the state before the chunk) and ``ds``
    (the gradient of the state after it), the block's rows ``[bk, V]`` (float32). Writes ``dq, dk [C, bk]``
    to their refs, each as soon as it is finished (few ``[C, bk]`` float32 blocks live at once); returns this
    key block's share of ``db [C, 1]`` (float32; its terms are sums over the key axis, added over the blocks
    in XLA). Every term but ``dO Vᵀ [C, C]`` (recomputed per block) has a key axis: on Triton a program per
    key block of 64 holds ``[C, 64]`` float32 blocks (the whole key axis in one program needed 384 KiB of
    shared memory at head dim 256, over an H100's 227, and spilled registers).

    The contractions over the value axis (``dO Vᵀ`` and its diagonal, ``dO Sᵀ``, ``V dS'ᵀ``, ``⟨S, dS'⟩``):
    with ``bv`` the whole axis, each where it is used (``v, do`` read once, the state rows where their phase
    begins and again for ``⟨S, dS'⟩``); with ``bv`` smaller, all five in one loop over value blocks of ``bv``
    first (a ``[bk, bv]`` slice of the states live at a time)."""
    dt = v_ref.dtype
    c = q.shape[0]
    prods = {  # of the value blocks (or the whole axis) that ``at`` reads from a ref
        "dp": lambda at: mm(at(do_ref), at(v_ref), _T1),  # dO Vᵀ
        "diag": lambda at: jnp.sum(at(do_ref).astype(f32) * at(v_ref).astype(f32), axis=1, keepdims=True),  # D_tt = 1
        "dos": lambda at: mm(at(do_ref), at(s_ref).astype(dt), _T1),
        "vds": lambda at: mm(at(v_ref), at(ds_ref).astype(dt), _T1),
        "carry": lambda at: jnp.sum(jnp.sum(at(s_ref) * at(ds_ref), axis=1, keepdims=True), axis=0, keepdims=True),
    }
    whole = None
    if bv == v_ref.shape[1]:  # v and do read once
        v, do = v_ref[...], do_ref[...]
        whole = lambda r: v if r is v_ref else do if r is do_ref else r[...]
    get = column_products(prods, v_ref.shape[1], bv, whole)
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    fs, fe, a = _state_factors(bc, sc, pc)
    da = jnp.where(rows > cols, get("dp") * _decay(bc, sc, pc, br, sr, pr), 0.0).astype(dt)  # below the diagonal
    diag = get("diag")
    qf = q.astype(f32)
    dq_in = mm(da, k)
    dq_st = fs * get("dos")
    db_in, db_st = jnp.sum(qf * dq_in, axis=1, keepdims=True), jnp.sum(qf * dq_st, axis=1, keepdims=True)
    dq_ref[...] = (dq_in + dq_st + diag * k.astype(f32)).astype(dq_ref.dtype)
    kf = k.astype(f32)
    dk_in = mm(da, q, _T0)
    dk_st = fe * get("vds")
    # db: rows minus columns of M = dO Vᵀ ⊙ Q Kᵀ ⊙ D without its diagonal, the state read, the state
    # writes of all but the last token (whose own write cancels against ⟨S', dS'⟩ exactly), and at the
    # last token ⟨S', dS'⟩ minus that write: a ⟨S, dS'⟩ + Σ_{s<C} k_s · dK^{state}_s
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    writes = jnp.where(is_last, 0.0, jnp.sum(kf * dk_st, axis=1, keepdims=True))
    dk_ref[...] = (dk_in + dk_st + diag * qf).astype(dk_ref.dtype)
    end = a * get("carry") + jnp.sum(writes, axis=0, keepdims=True)
    return db_in - jnp.sum(kf * dk_in, axis=1, keepdims=True) + db_st - writes + jnp.where(is_last, end, 0.0)


def _chunk_dv(q_ref, k_ref, do, bc, sc, pc, br, sr, pr, ds_ref, dv_ref, *, bk):
    """``dV = (Q Kᵀ ⊙ D)ᵀ dO + f^e ⊙ (K dS')`` for one block of value columns: refs of ``q, k [C, K]`` (all of
    the key axis: both terms contract over it, a block of ``bk`` key columns at a time), that block's
    ``do [C, bv]`` and a ref of ``ds [K, bv]`` (float32, the state gradient after the chunk), gates as
    ``_chunk_grads``."""
    dt = do.dtype
    _, fe, _ = _state_factors(bc, sc, pc)
    qk, kds = tile_sum(q_ref.shape[1], bk, lambda sl: (
        mm(q_ref[:, sl], k_ref[:, sl], _T1), mm(k_ref[:, sl], ds_ref[sl, :].astype(dt))))
    att = qk * _decay(bc, sc, pc, br, sr, pr)  # Q Kᵀ ⊙ D
    dv_ref[...] = (mm(att.astype(dt), do, _T0) + fe * kds).astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- Triton / interpreter


def _states_kernel(k_ref, v_ref, bc_ref, sc_ref, pc_ref, h0_ref, hs_ref, ht_ref=None, *, chunk, n_chunks):
    def body(n, s):
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        hs_ref[n] = s
        return _state_step(k_ref[sl, :], v_ref[sl, :], bc_ref[sl, :], sc_ref[sl, :], pc_ref[sl, :], s)

    s = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(f32))
    if ht_ref is not None:
        ht_ref[...] = s


def _walk(kernel, x, y, cols, init, *, chunk, interpret, backend, name, final):
    """A Triton walk over the chunks, a program per (batch, head, value block of 64): ``kernel`` reads time-major
    ``x [b, Tp, h, Kp]`` whole and ``y [b, Tp, h, Vp]`` by value block, the gate columns ``cols = (bc, seg, p)``
    ``[b, h, Tp, 1]`` and the ``[b, h, Kp, Vp]`` state it starts from; writes a ``[Kp, Vp]`` float32 state per
    chunk and, with ``final``, the last one."""
    bsz, tp, h, kp = x.shape
    vp, n = y.shape[-1], tp // chunk
    bv = min(vp, 64)
    tseq = lambda d, vb=False: pl.BlockSpec(
        (None, tp, None, d), (lambda i, j, l: (i, 0, j, l)) if vb else (lambda i, j, l: (i, 0, j, 0)))
    gseq = pl.BlockSpec((None, None, tp, 1), lambda i, j, l: (i, j, 0, 0))
    vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
    vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
    hs_shape = jax.ShapeDtypeStruct((bsz, h, n, kp, vp), f32)
    st_shape = jax.ShapeDtypeStruct((bsz, h, kp, vp), f32)
    return pl.pallas_call(
        functools.partial(kernel, chunk=chunk, n_chunks=n), grid=(bsz, h, vp // bv),
        in_specs=[tseq(kp), tseq(bv, True), gseq, gseq, gseq, vstate],
        out_specs=[vstates, vstate] if final else vstates, out_shape=[hs_shape, st_shape] if final else hs_shape,
        interpret=interpret, compiler_params=walk_params(interpret, backend, kp), name=name,
    )(x, y, *cols, init)


def head_states(k, v, cols, h0, *, chunk, interpret, backend, final=False):
    """Walk 1. on Triton: ``H [b, h, N, Kp, Vp]`` float32, the state before every chunk (:func:`_walk`'s
    arguments); with ``final``, also the state after the last chunk."""
    return _walk(_states_kernel, k, v, cols, h0, chunk=chunk, interpret=interpret, backend=backend,
                 name="gla_chunk_bwd_states", final=final)


def _dstates_kernel(q_ref, do_ref, bc_ref, sc_ref, pc_ref, dht_ref, dhs_ref, dh0_ref, *, chunk, n_chunks):
    def body(i, ds):
        n = n_chunks - 1 - i
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        dhs_ref[n] = ds
        return _dstate_step(q_ref[sl, :], do_ref[sl, :], bc_ref[sl, :], sc_ref[sl, :], pc_ref[sl, :], ds)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...])


def _grads_kernel(q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, pc_ref, br_ref, sr_ref, pr_ref, h_ref, dh_ref,
                  qf_ref, kf_ref, dov_ref, dhv_ref, dq_ref, dk_ref, dv_ref, db_ref, *, nv, wv, wk):
    """Both backends: one chunk and key block (Mosaic TPU: the whole key axis) per grid step
    ``(batch, head, chunk, key block)``; ``dv`` a block of value columns, by the first ``nv`` of them, from
    the whole key axis (``qf, kf [C, K]``, ``dhv [K, bv]``). ``wv, wk``: the width of the value blocks of
    ``_chunk_grads``' contractions and of the key blocks of ``_chunk_dv``'s (the whole axis: no loop)."""
    gates = [r[...] for r in (bc_ref, sc_ref, pc_ref, br_ref, sr_ref, pr_ref)]
    db_ref[...] = _chunk_grads(q_ref[...], k_ref[...], v_ref, do_ref, *gates, h_ref, dh_ref, dq_ref, dk_ref, bv=wv)

    @pl.when(pl.program_id(3) < nv)
    def _():
        _chunk_dv(qf_ref, kf_ref, dov_ref[...], *gates, dhv_ref, dv_ref, bk=wk)


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
    chunk_state = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0))
    tpu = backend == "mosaic_tpu"
    if tpu:
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
    elif backend == "mosaic_gpu":  # the walks and the chunk gradients on Mosaic GPU (backward_mosaic_gpu.py)
        hs, dhs, dh0 = head_walks_mosaic_gpu(q, k, v, bc, seg, p, h0, do, dht, chunk=chunk, interpret=interpret)
        return (*head_grads_mosaic_gpu(q, k, v, do, bc, seg, p, hs, dhs, chunk=chunk, interpret=interpret), dh0)
    else:
        hs = head_states(k, v, cols, h0, chunk=chunk, interpret=interpret, backend=backend)
        dhs, dh0 = _walk(_dstates_kernel, q, do, cols, dht, chunk=chunk, interpret=interpret, backend=backend,
                         name="gla_chunk_bwd_dstates", final=True)
    # every chunk's gradients, a program per key block of 64 (Mosaic TPU: the whole key axis, as its blocks'
    # last dim must be a multiple of 128 or all of it); dv contracts over the whole key axis: the first nv of
    # them write a value block of it each
    bk = kp if tpu else min(kp, 64)
    nk = kp // bk
    nv = min(nk, max(1, vp // 64))
    bv = vp // nv
    vz = lambda z: jnp.minimum(z, nv - 1)  # the programs past nv write no dv
    # the contractions over a head dim past 128 (the value axis in dq, dk; the key axis in dv) run 64 columns
    # at a time on Triton: compiled for sm_90 (bf16, chunk 64, 8 warps), at 256 the whole axes spilled 0.2 KB of
    # registers per thread and the loops none; at 128 the whole axes none and the loops a few dozen bytes
    if tpu:  # heads-first [b, h, Tp, d]
        big_args, params = (qh, kh, vh, doh), tpu_params(interpret, *["parallel"] * 4)
        big = lambda d, f=lambda z: 0: pl.BlockSpec((None, None, chunk, d), lambda i, j, l, z: (i, j, l, f(z)))
    else:  # time-major [b, Tp, h, d]
        big_args, params = (q, k, v, do), triton_params(interpret, "triton", num_warps=8, num_stages=1)
        big = lambda d, f=lambda z: 0: pl.BlockSpec((None, chunk, None, d), lambda i, j, l, z: (i, l, j, f(z)))
    kcol, vcol = big(bk, lambda z: z), big(bv, vz)
    col = pl.BlockSpec((None, None, chunk, 1), lambda i, j, l, z: (i, j, l, 0))
    row = pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, l, z: (i, j, l, 0, 0))
    kstate = pl.BlockSpec((None, None, None, bk, vp), lambda i, j, l, z: (i, j, l, z, 0))
    vstate = pl.BlockSpec((None, None, None, kp, bv), lambda i, j, l, z: (i, j, l, 0, vz(z)))
    kpart = pl.BlockSpec((None, None, None, chunk, 1), lambda i, j, l, z: (z, i, j, l, 0))
    kernel, in_specs, args = once_on_tpu(
        tpu, functools.partial(_grads_kernel, nv=nv, wv=column_tile(vp, backend), wk=column_tile(kp, backend)),
        [kcol, kcol, big(vp), big(vp)] + [col] * 3 + [row] * 3 + [kstate, kstate, big(kp), big(kp), vcol, vstate],
        [*big_args, *cols, *rows, hs, dhs, big_args[0], big_args[1], big_args[3], dhs], {12: 0, 13: 1, 14: 3, 15: 11})
    dq, dk, dv, db = pl.pallas_call(
        kernel, grid=(bsz, h, n, nk), in_specs=in_specs, out_specs=[kcol, kcol, vcol, kpart],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in big_args[:3]]
        + [jax.ShapeDtypeStruct((nk, bsz, h, tp, 1), f32)],
        interpret=interpret, compiler_params=params, name="gla_chunk_bwd_grads" + ("_tpu" if tpu else ""),
    )(*args)
    if tpu:
        dq, dk, dv = (jnp.moveaxis(x, 1, 2) for x in (dq, dk, dv))
    return dq, dk, dv, jnp.moveaxis(jnp.sum(db, axis=0)[..., 0], 1, 2), dh0
