r"""Pallas backward of the per-channel-decay GLA kernel (``channel.py``): the intra matrices and the chunk
states recomputed, the state gradients walking the chunks backwards, then every chunk's gradients in
parallel (fla's ``chunk_gla`` backward). The per-head kernel's backward, ``backward.py``, has the derivation.

The same three passes with per-channel gates ``b, seg, p [C, K]`` and the state carried transposed,
``Sᵀ [V, K]`` (as the forward's state pass: the per-channel decay is then a broadcast). The intra-chunk
gradients contract over tokens with a decay per channel, ``dq_t = Σ_s dP_ts p_t p_s k_s ⊙ e^{b_t − b_s}``
(and ``dk_s`` likewise over ``t``), so they follow the forward's secondary chunks of 16: earlier
(later, for ``dk``) secondary chunks through a reference token with every exponent ``≤ 0``, one
``[16, C] × [C, K]`` matmul each; the diagonal ``16 × 16`` blocks one token at a time in log space,
strictly below the diagonal. The diagonal itself (``e^0 = 1``) is added separately, as for per-head
decays, so the decay gradient ``q ⊙ dq − k ⊙ dk`` never adds and subtracts it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._util import chunk_block, masked_exp, mm, token_loop, tpu_params, triton_params
from pallas_kernels.gla_chunk.channel import SUB, channel_factors, channel_intra, channel_states

f32 = jnp.float32
_T0 = (((0,), (0,)), ((), ()))  # Xᵀ Y
_T1 = (((1,), (1,)), ((), ()))  # X Yᵀ

def _channel_dstate_step(q, do, b, seg, p, b_end, s_end, p_end, dst):
    """``dSᵀ = a ⊙ dSᵀ⁺ + dOᵀ (Q ⊙ f^s)``."""
    fs, _, a = channel_factors(b, seg, p, b_end, s_end, p_end)
    return a * dst + mm(do, (q.astype(f32) * fs).astype(do.dtype), _T0)


def _channel_grads_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, a_ref, h_ref, dh_ref,
                          dq_ref, dk_ref, dv_ref, db_ref, *, rolled):
    """One chunk: ``q, k [C, K]``, ``v, do [C, V]``, gates ``[C, K]``, the intra matrix ``A [C, C]`` (the
    forward's), ``Sᵀ`` before the chunk and ``dSᵀ`` after it ``[V, K]``. Writes ``dq, dk, dv, db``.

    ``dv`` first, then one secondary chunk of rows at a time: its ``dq, dk`` (intra, through the states)
    and ``db`` are computed and written before the next one starts, and every operand is read from its
    ref where it is used, so no ``[C, K]`` float32 value stays live across the loop. With ``rolled``
    (Triton) the diagonal blocks' token loops are ``fori_loop`` calls. Compiled for sm_90 (Triton 3.9), the
    earlier form (every block's partial ``dq, dk`` held to the end, the token loops unrolled, 4 warps)
    spilled 21 KB of registers per thread; this one, at 8 warps, 0.4 KB (each block's ``dq`` written before
    its ``dk`` is begun)."""
    c = q_ref.shape[0]
    nb = c // SUB
    md = v_ref.dtype
    end = pl.ds(c - 1, 1)
    b_end, s_end, p_end = b_ref[end, :], s_ref[end, :], p_ref[end, :]
    _, fe, a = channel_factors(b_ref[...], s_ref[...], p_ref[...], b_end, s_end, p_end)
    dv = mm(a_ref[...].astype(md), do_ref[...], _T0)
    dv_ref[...] = (dv + mm((k_ref[...].astype(f32) * fe).astype(md), dh_ref[...].astype(md), _T1)).astype(dv_ref.dtype)
    pos = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    writes_sum = jnp.zeros((1, q_ref.shape[1]), f32)  # Σ_s k_s ⊙ dk_st_s over the chunk but its last token
    for i in range(nb):
        si = pl.ds(i * SUB, SUB)
        bi, segi, pi = b_ref[si, :], s_ref[si, :], p_ref[si, :]
        # dq of rows t in block i, strictly below the diagonal: the diagonal block a key token s at a time
        doi = do_ref[si, :].astype(f32)

        def key(j, acc, i=i, doi=doi, bi=bi, segi=segi, pi=pi):
            rj = pl.ds(i * SUB + j, 1)
            dpj = jnp.sum(doi * v_ref[rj, :].astype(f32), axis=1, keepdims=True)
            ok = (row > j) & (segi == s_ref[rj, :])
            return acc + dpj * k_ref[rj, :].astype(f32) * masked_exp(ok, bi - b_ref[rj, :]) * (pi * p_ref[rj, :])

        dq_in = token_loop(0, SUB - 1, key, jnp.zeros((SUB, q_ref.shape[1]), f32), rolled=rolled)
        if i > 0:  # earlier blocks through the token r before this one
            rr = pl.ds(i * SUB - 1, 1)
            br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
            dp = mm(do_ref[si, :], v_ref[...], _T1)  # [16, C]
            kfac = k_ref[...].astype(f32) * masked_exp((pos <= i * SUB - 1) & (s_ref[...] == sr), br - b_ref[...]) * (
                p_ref[...] * pr)
            dq_in = dq_in + masked_exp(segi == sr, bi - br) * (pi * pr) * mm(
                dp.astype(md), kfac.astype(md))
        # dq finished and written before dk is begun (fewer float32 blocks live at once on a GPU)
        fs_i, fe_i, _ = channel_factors(bi, segi, pi, b_end, s_end, p_end)
        dq_in = dq_in + fs_i * mm(do_ref[si, :], h_ref[...].astype(md))  # through the states
        vi = v_ref[si, :].astype(f32)
        diag = jnp.sum(doi * vi, axis=1, keepdims=True)  # the diagonal (e^0 = 1)
        qi = q_ref[si, :].astype(f32)
        db = qi * dq_in
        dq_ref[si, :] = (dq_in + diag * k_ref[si, :].astype(f32)).astype(dq_ref.dtype)
        # dk of rows s in block i (t > s): the diagonal block a query token t at a time

        def query(u, acc, i=i, vi=vi, bi=bi, segi=segi, pi=pi):
            ru = pl.ds(i * SUB + u, 1)
            dpu = jnp.sum(vi * do_ref[ru, :].astype(f32), axis=1, keepdims=True)
            ok = (row < u) & (segi == s_ref[ru, :])
            return acc + dpu * q_ref[ru, :].astype(f32) * masked_exp(ok, b_ref[ru, :] - bi) * (pi * p_ref[ru, :])

        dk_in = token_loop(1, SUB, query, jnp.zeros((SUB, q_ref.shape[1]), f32), rolled=rolled)
        if i < nb - 1:  # later blocks through this one's last token r
            rr = pl.ds(i * SUB + SUB - 1, 1)
            br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
            dpt = mm(v_ref[si, :], do_ref[...], _T1)  # [16, C]: dPᵀ rows
            qfac = q_ref[...].astype(f32) * masked_exp((pos > i * SUB + SUB - 1) & (s_ref[...] == sr),
                                                       b_ref[...] - br) * (p_ref[...] * pr)
            dk_in = dk_in + masked_exp(segi == sr, br - bi) * (pi * pr) * mm(
                dpt.astype(md), qfac.astype(md))
        # through the states, the diagonal, and the decay gradient
        dk_st = fe_i * mm(v_ref[si, :], dh_ref[...].astype(md))
        ki = k_ref[si, :].astype(f32)
        last = row + i * SUB == c - 1
        # the last token's own write cancels against the carry ⟨Sᵀ, dSᵀ⁺⟩: left out of both
        writes = jnp.where(last, 0.0, ki * dk_st)
        writes_sum = writes_sum + jnp.sum(writes, axis=0, keepdims=True)
        dk_ref[si, :] = (dk_in + diag * qi + dk_st).astype(dk_ref.dtype)
        db = db - ki * dk_in - writes
        if i == nb - 1:  # the last token: the carry and every earlier write (the sum is complete here)
            end_term = a * jnp.sum(h_ref[...] * dh_ref[...], axis=0, keepdims=True) + writes_sum
            db = db + jnp.where(last, end_term, 0.0)
        db_ref[si, :] = db


def _channel_dstates_kernel(q_ref, do_ref, b_ref, s_ref, p_ref, dht_ref, dhs_ref, dh0_ref, *, chunk, n_chunks):
    def body(i, dst):
        n = n_chunks - 1 - i
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        end = pl.ds(n * chunk + chunk - 1, 1)
        dhs_ref[n] = dst
        return _channel_dstate_step(q_ref[sl, :], do_ref[sl, :], b_ref[sl, :], s_ref[sl, :], p_ref[sl, :],
                                    b_ref[end, :], s_ref[end, :], p_ref[end, :], dst)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...])


def _channel_dstates_kernel_tpu(q_ref, do_ref, b_ref, s_ref, p_ref, dht_ref, dhs_ref, dh0_ref, ds_scr):
    c = q_ref.shape[0]
    end = pl.ds(c - 1, 1)

    @pl.when(pl.program_id(2) == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    dst = ds_scr[...]
    dhs_ref[...] = dst
    dst = _channel_dstate_step(q_ref[...], do_ref[...], b_ref[...], s_ref[...], p_ref[...], b_ref[end, :],
                               s_ref[end, :], p_ref[end, :], dst)
    ds_scr[...] = dst

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = dst


def gla_channel_bwd(q, k, v, bc, seg, p, h0, do, dht, *, chunk, interpret, backend):
    """Gradients of the per-channel kernel. Padded inputs as its forward: ``q, k [b, Tp, h, Kp]``,
    ``v [b, Tp, h, Vp]``, gates ``bc, seg, p [b, Tp, h, Kp]`` float32, ``h0 [b, h, Kp, Vp]``; cotangents
    ``do [b, Tp, h, Vp]``, ``dht [b, h, Kp, Vp]``. Returns ``dq, dk, dv`` (input dtype), ``dbc`` and ``dh0``."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    n = tp // chunk
    tpu = backend == "mosaic_tpu"
    heads = lambda x: jnp.moveaxis(x, 2, 1)
    q, k, v, do, bc, seg, p = map(heads, (q, k, v, do.astype(v.dtype), bc, seg, p))
    a = channel_intra(q, k, bc, seg, p, chunk=chunk, interpret=interpret, backend=backend)
    h0t, dhtt = jnp.swapaxes(h0, -1, -2), jnp.swapaxes(dht.astype(f32), -1, -2)  # Sᵀ [b, h, Vp, Kp]
    hs_shape = jax.ShapeDtypeStruct((bsz, h, n, vp, kp), f32)
    st_shape = jax.ShapeDtypeStruct((bsz, h, vp, kp), f32)
    blk = lambda d, rev=False: chunk_block(chunk, d, n if rev else None)
    chunk_state = pl.BlockSpec((None, None, None, vp, kp), lambda i, j, l: (i, j, l, 0, 0))
    hs, _ = channel_states(k, v, bc, seg, p, h0t, chunk=chunk, interpret=interpret, backend=backend)
    if tpu:
        whole = pl.BlockSpec((None, None, vp, kp), lambda i, j, l: (i, j, 0, 0))
        seq = tpu_params(interpret, "parallel", "parallel", "arbitrary")
        r = blk(kp, True)
        dhs, dh0t = pl.pallas_call(
            _channel_dstates_kernel_tpu, grid=(bsz, h, n),
            in_specs=[r, blk(vp, True), r, r, r, whole],
            out_specs=[pl.BlockSpec((None, None, None, vp, kp), lambda i, j, l: (i, j, n - 1 - l, 0, 0)), whole],
            out_shape=[hs_shape, st_shape], scratch_shapes=[pltpu.VMEM((vp, kp), f32)], interpret=interpret,
            compiler_params=seq, name="gla_chunk_channel_bwd_dstates_tpu",
        )(q, do, bc, seg, p, dhtt)
        params = tpu_params(interpret, "parallel", "parallel", "parallel")
    else:
        bv = min(vp, 64)
        full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))
        vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
        vstate = pl.BlockSpec((None, None, bv, kp), lambda i, j, l: (i, j, l, 0))
        vstates = pl.BlockSpec((None, None, n, bv, kp), lambda i, j, l: (i, j, 0, l, 0))
        walk = triton_params(interpret, backend)
        dhs, dh0t = pl.pallas_call(
            functools.partial(_channel_dstates_kernel, chunk=chunk, n_chunks=n), grid=(bsz, h, vp // bv),
            in_specs=[full(kp), vseq, full(kp), full(kp), full(kp), vstate], out_specs=[vstates, vstate],
            out_shape=[hs_shape, st_shape], interpret=interpret, compiler_params=walk,
            name="gla_chunk_channel_bwd_dstates",
        )(q, do, bc, seg, p, dhtt)
        params = triton_params(interpret, backend, num_warps=8, num_stages=1)
    dq, dk, dv, db = pl.pallas_call(
        functools.partial(_channel_grads_kernel, rolled=not tpu), grid=(bsz, h, n),
        in_specs=[blk(kp), blk(kp), blk(vp), blk(vp), blk(kp), blk(kp), blk(kp), blk(chunk), chunk_state, chunk_state],
        out_specs=[blk(kp), blk(kp), blk(vp), blk(kp)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)] + [jax.ShapeDtypeStruct(bc.shape, f32)],
        interpret=interpret, compiler_params=params,
        name="gla_chunk_channel_bwd_grads" + ("_tpu" if tpu else ""),
    )(q, k, v, do, bc, seg, p, a, hs, dhs)
    back = lambda x: jnp.moveaxis(x, 1, 2)
    return back(dq), back(dk), back(dv), back(db), jnp.swapaxes(dh0t, -1, -2)
