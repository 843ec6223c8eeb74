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

from pallas_kernels._util import chunk_block, masked_exp, tpu_params, triton_params
from pallas_kernels.gla_chunk.channel import SUB, channel_factors, channel_intra, channel_states

f32 = jnp.float32
_T0 = (((0,), (0,)), ((), ()))  # Xᵀ Y
_T1 = (((1,), (1,)), ((), ()))  # X Yᵀ

def _channel_dstate_step(q, do, b, seg, p, b_end, s_end, p_end, dst):
    """``dSᵀ = a ⊙ dSᵀ⁺ + dOᵀ (Q ⊙ f^s)``."""
    fs, _, a = channel_factors(b, seg, p, b_end, s_end, p_end)
    return a * dst + lax.dot_general(do, (q.astype(f32) * fs).astype(do.dtype), _T0, preferred_element_type=f32)


def _channel_grads_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, a_ref, h_ref, dh_ref,
                          dq_ref, dk_ref, dv_ref, db_ref):
    """One chunk: ``q, k [C, K]``, ``v, do [C, V]``, gates ``[C, K]``, the intra matrix ``A [C, C]`` (the
    forward's), ``Sᵀ`` before the chunk and ``dSᵀ`` after it ``[V, K]``. Writes ``dq, dk, dv, db``."""
    c = q_ref.shape[0]
    nb = c // SUB
    md = v_ref.dtype
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    b, seg, p = b_ref[...], s_ref[...], p_ref[...]
    st, dst = h_ref[...], dh_ref[...]
    qf, kf = q.astype(f32), k.astype(f32)
    end = pl.ds(c - 1, 1)
    _, fe, a = channel_factors(b, seg, p, b_ref[end, :], s_ref[end, :], p_ref[end, :])
    dk_st = fe * jnp.dot(v, dst.astype(md), preferred_element_type=f32)
    dv = lax.dot_general(a_ref[...].astype(md), do, _T0, preferred_element_type=f32)
    dv_ref[...] = (dv + lax.dot_general((kf * fe).astype(md), dst.astype(md), _T1,
                                        preferred_element_type=f32)).astype(dv_ref.dtype)
    pos = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    dq_in, dk_in = [], []
    for i in range(nb):  # rows t of secondary chunk i: dq, strictly below the diagonal
        si = pl.ds(i * SUB, SUB)
        doi, bi, segi, pi = do_ref[si, :].astype(f32), b_ref[si, :], s_ref[si, :], p_ref[si, :]
        acc = jnp.zeros((SUB, q.shape[1]), f32)
        for j in range(SUB - 1):  # key token s = i·16 + j against the rows after it
            rj = pl.ds(i * SUB + j, 1)
            dpj = jnp.sum(doi * v_ref[rj, :].astype(f32), axis=1, keepdims=True)
            ok = (row > j) & (segi == s_ref[rj, :])
            acc = acc + dpj * k_ref[rj, :].astype(f32) * masked_exp(ok, bi - b_ref[rj, :]) * (pi * p_ref[rj, :])
        if i > 0:  # earlier secondary chunks through the token r before this one
            rr = pl.ds(i * SUB - 1, 1)
            br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
            dp = lax.dot_general(do_ref[si, :], v, _T1, preferred_element_type=f32)  # [16, C]
            kfac = kf * masked_exp((pos <= i * SUB - 1) & (seg == sr), br - b) * (p * pr)
            acc = acc + masked_exp(segi == sr, bi - br) * (pi * pr) * jnp.dot(
                dp.astype(md), kfac.astype(md), preferred_element_type=f32)
        dq_in.append(acc)
    for j in range(nb):  # rows s of secondary chunk j: dk, strictly below the diagonal (t > s)
        sj = pl.ds(j * SUB, SUB)
        vj, bj, segj, pj = v_ref[sj, :].astype(f32), b_ref[sj, :], s_ref[sj, :], p_ref[sj, :]
        acc = jnp.zeros((SUB, q.shape[1]), f32)
        for u in range(1, SUB):  # query token t = j·16 + u against the keys before it
            ru = pl.ds(j * SUB + u, 1)
            dpu = jnp.sum(vj * do_ref[ru, :].astype(f32), axis=1, keepdims=True)
            ok = (row < u) & (segj == s_ref[ru, :])
            acc = acc + dpu * q_ref[ru, :].astype(f32) * masked_exp(ok, b_ref[ru, :] - bj) * (pj * p_ref[ru, :])
        if j < nb - 1:  # later secondary chunks through this one's last token r
            rr = pl.ds(j * SUB + SUB - 1, 1)
            br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
            dpt = lax.dot_general(v_ref[sj, :], do, _T1, preferred_element_type=f32)  # [16, C]: dPᵀ rows
            qfac = qf * masked_exp((pos > j * SUB + SUB - 1) & (seg == sr), b - br) * (p * pr)
            acc = acc + masked_exp(segj == sr, br - bj) * (pj * pr) * jnp.dot(
                dpt.astype(md), qfac.astype(md), preferred_element_type=f32)
        dk_in.append(acc)
    # the last token's own write cancels against the carry ⟨Sᵀ, dSᵀ⁺⟩: left out of both
    writes = jnp.where(pos == c - 1, 0.0, kf * dk_st)
    end_term = a * jnp.sum(st * dst, axis=0, keepdims=True) + jnp.sum(writes, axis=0, keepdims=True)  # [1, K]
    b_end, s_end, p_end = b_ref[end, :], s_ref[end, :], p_ref[end, :]
    for i in range(nb):  # written block by block (the GPU lowering has no value slicing or concatenation)
        si = pl.ds(i * SUB, SUB)
        qi, ki, doi, vi = q_ref[si, :], k_ref[si, :], do_ref[si, :], v_ref[si, :]
        fs_i, fe_i, _ = channel_factors(b_ref[si, :], s_ref[si, :], p_ref[si, :], b_end, s_end, p_end)
        dq_st_i = fs_i * jnp.dot(doi, st.astype(md), preferred_element_type=f32)
        dk_st_i = fe_i * jnp.dot(vi, dst.astype(md), preferred_element_type=f32)
        diag_i = jnp.sum(doi.astype(f32) * vi.astype(f32), axis=1, keepdims=True)
        qi, ki = qi.astype(f32), ki.astype(f32)
        last_i = row + i * SUB == c - 1
        writes_i = jnp.where(last_i, 0.0, ki * dk_st_i)
        dq_ref[si, :] = (dq_in[i] + diag_i * ki + dq_st_i).astype(dq_ref.dtype)
        dk_ref[si, :] = (dk_in[i] + diag_i * qi + dk_st_i).astype(dk_ref.dtype)
        db_ref[si, :] = qi * (dq_in[i] + dq_st_i) - ki * dk_in[i] - writes_i + jnp.where(last_i, end_term, 0.0)


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
    heads = lambda x: jnp.moveaxis(x, 2, 1)  # noqa: E731
    q, k, v, do, bc, seg, p = map(heads, (q, k, v, do.astype(v.dtype), bc, seg, p))
    a = channel_intra(q, k, bc, seg, p, chunk=chunk, interpret=interpret, backend=backend)
    h0t, dhtt = jnp.swapaxes(h0, -1, -2), jnp.swapaxes(dht.astype(f32), -1, -2)  # Sᵀ [b, h, Vp, Kp]
    hs_shape = jax.ShapeDtypeStruct((bsz, h, n, vp, kp), f32)
    st_shape = jax.ShapeDtypeStruct((bsz, h, vp, kp), f32)
    blk = lambda d, rev=False: chunk_block(chunk, d, n if rev else None)  # noqa: E731  reversed: the backward walk
    chunk_state = pl.BlockSpec((None, None, None, vp, kp), lambda i, j, l: (i, j, l, 0, 0))
    hs, _ = channel_states(k, v, bc, seg, p, h0t, chunk=chunk, interpret=interpret, backend=backend)
    if tpu:
        from jax.experimental.pallas import tpu as pltpu

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
        full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))  # noqa: E731
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
        params = triton_params(interpret, backend, num_warps=4, num_stages=1)
    dq, dk, dv, db = pl.pallas_call(
        _channel_grads_kernel, grid=(bsz, h, n),
        in_specs=[blk(kp), blk(kp), blk(vp), blk(vp), blk(kp), blk(kp), blk(kp), blk(chunk), chunk_state, chunk_state],
        out_specs=[blk(kp), blk(kp), blk(vp), blk(kp)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)] + [jax.ShapeDtypeStruct(bc.shape, f32)],
        interpret=interpret, compiler_params=params,
        name="gla_chunk_channel_bwd_grads" + ("_tpu" if tpu else ""),
    )(q, k, v, do, bc, seg, p, a, hs, dhs)
    back = lambda x: jnp.moveaxis(x, 1, 2)  # noqa: E731
    return back(dq), back(dk), back(dv), back(db), jnp.swapaxes(dh0t, -1, -2)
