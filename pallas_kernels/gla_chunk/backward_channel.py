r"""Pallas backward of the per-channel-decay GLA kernel (``channel.py``): the intra matrices and the chunk
states recomputed, the state gradients walking the chunks backwards, then every chunk's gradients in
parallel (fla's ``chunk_gla`` backward). The per-head kernel's backward, ``backward.py``, has the derivation.

The same passes with per-channel gates ``b, seg, p [C, K]`` and the state carried transposed,
``Sᵀ [V, K]`` (as the forward's state pass: the per-channel decay is then a broadcast). The intra-chunk
gradients contract over tokens with a decay per channel, ``dq_t = Σ_s dP_ts p_t p_s k_s ⊙ e^{b_t − b_s}``
(and ``dk_s`` likewise over ``t``), so they follow the forward's secondary chunks of 16: earlier
(later, for ``dk``) secondary chunks through a reference token with every exponent ``≤ 0``, one
``[16, C] × [C, K]`` matmul each; the diagonal ``16 × 16`` blocks one token at a time in log space,
strictly below the diagonal. The diagonal itself (``e^0 = 1``) is added separately, as for per-head
decays, so the decay gradient ``q ⊙ dq − k ⊙ dk`` never adds and subtracts it.

Every term of ``dq``, ``dk`` and the decay gradient is channelwise (its contractions run over tokens and
values), so on Triton one program takes one secondary chunk's rows and 64 key channels (fla's ``BK``), the
earlier / later secondary chunks a ``[16, 16] × [16, BK]`` matmul at a time; the Mosaic TPU body takes a
whole chunk per program. ``dv``, which contracts over the keys, is a kernel of its own on both backends
(fla's ``chunk_gla_bwd_dv``): ``dV = Aᵀ dO + (K ⊙ f^e) dSᵀ⁺ᵀ``, chunk-parallel like the forward's outputs.
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
    column_tile,
    key_blocks,
    masked_exp,
    mm,
    out_specs,
    tile_sum,
    token_loop,
    tpu_params,
    triton_params,
    walk_params,
)
from pallas_kernels.gla_chunk.channel import SUB, channel_factors, channel_intra, channel_states

f32 = jnp.float32
_T0 = (((0,), (0,)), ((), ()))  # Xᵀ Y
_T1 = (((1,), (1,)), ((), ()))  # X Yᵀ

def _channel_dstate_step(q, do, b, seg, p, b_end, s_end, p_end, dst):
    """``dSᵀ = a ⊙ dSᵀ⁺ + dOᵀ (Q ⊙ f^s)``."""
    fs, _, a = channel_factors(b, seg, p, b_end, s_end, p_end)
    return a * dst + mm(do, (q.astype(f32) * fs).astype(do.dtype), _T0)


def _block_grads(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, h_ref, dh_ref, i, *, rolled):
    """``dq, dk [16, K]`` and the decay gradient ``db`` (but the last token's end term) of secondary chunk
    ``i``'s rows; also its state writes ``k_s ⊙ dk_st_s`` with the chunk's last token left out (``writes``)
    and the mask of that token (``last``). ``i`` is a Python int (Mosaic TPU: the earlier / later
    secondary-chunk terms are skipped where there are none, and taken as one ``[16, C] × [C, K]`` matmul) or
    the grid index (Triton: a ``fori_loop`` over the earlier / later secondary chunks, one ``[16, 16] × [16,
    K]`` matmul each). Every operand is read from its ref where it is used.
    With ``rolled`` (Triton) the diagonal blocks' token loops are ``fori_loop`` calls."""
    c = q_ref.shape[0]
    nb = c // SUB
    md = v_ref.dtype
    static = isinstance(i, int)
    end = pl.ds(c - 1, 1)
    b_end, s_end, p_end = b_ref[end, :], s_ref[end, :], p_ref[end, :]
    pos = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    si = pl.ds(i * SUB, SUB) if static else pl.ds(pl.multiple_of(i * SUB, SUB), SUB)
    bi, segi, pi = b_ref[si, :], s_ref[si, :], p_ref[si, :]
    # dq of rows t in block i, strictly below the diagonal: the diagonal block a key token s at a time
    doi = do_ref[si, :].astype(f32)

    def key(j, acc):
        rj = pl.ds(i * SUB + j, 1)
        dpj = jnp.sum(doi * v_ref[rj, :].astype(f32), axis=1, keepdims=True)
        ok = (row > j) & (segi == s_ref[rj, :])
        return acc + dpj * k_ref[rj, :].astype(f32) * masked_exp(ok, bi - b_ref[rj, :]) * (pi * p_ref[rj, :])

    dq_in = token_loop(0, SUB - 1, key, jnp.zeros((SUB, q_ref.shape[1]), f32), rolled=rolled)
    if static and i > 0:  # earlier blocks through the token r before this one, as one [16, C] x [C, K]
        rr = pl.ds(i * SUB - 1, 1)
        br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
        dp = mm(do_ref[si, :], v_ref[...], _T1)  # [16, C]
        kfac = k_ref[...].astype(f32) * masked_exp((pos <= i * SUB - 1) & (s_ref[...] == sr), br - b_ref[...]) * (
            p_ref[...] * pr)
        dq_in = dq_in + masked_exp(segi == sr, bi - br) * (pi * pr) * mm(dp.astype(md), kfac.astype(md))
    elif not static:  # the same, an earlier block j < i at a time ([16, 16] x [16, K])
        rr = pl.ds(jnp.maximum(i * SUB - 1, 0), 1)
        br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]

        def earlier(j, acc):
            sj = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)
            dp = mm(do_ref[si, :], v_ref[sj, :], _T1)
            kfac = k_ref[sj, :].astype(f32) * masked_exp(s_ref[sj, :] == sr, br - b_ref[sj, :]) * (p_ref[sj, :] * pr)
            return acc + mm(dp.astype(md), kfac.astype(md))

        inter = lax.fori_loop(0, i, earlier, jnp.zeros((SUB, q_ref.shape[1]), f32))
        dq_in = dq_in + masked_exp(segi == sr, bi - br) * (pi * pr) * inter
    fs_i, fe_i, _ = channel_factors(bi, segi, pi, b_end, s_end, p_end)
    dq_in = dq_in + fs_i * mm(do_ref[si, :], h_ref[...].astype(md))  # through the states
    vi = v_ref[si, :].astype(f32)
    diag = jnp.sum(doi * vi, axis=1, keepdims=True)  # the diagonal (e^0 = 1)
    qi = q_ref[si, :].astype(f32)
    db = qi * dq_in
    dq = dq_in + diag * k_ref[si, :].astype(f32)

    # dk of rows s in block i (t > s): the diagonal block a query token t at a time
    def query(u, acc):
        ru = pl.ds(i * SUB + u, 1)
        dpu = jnp.sum(vi * do_ref[ru, :].astype(f32), axis=1, keepdims=True)
        ok = (row < u) & (segi == s_ref[ru, :])
        return acc + dpu * q_ref[ru, :].astype(f32) * masked_exp(ok, b_ref[ru, :] - bi) * (pi * p_ref[ru, :])

    dk_in = token_loop(1, SUB, query, jnp.zeros((SUB, q_ref.shape[1]), f32), rolled=rolled)
    if static and i < nb - 1:  # later blocks through this one's last token r, as one [16, C] x [C, K]
        rr = pl.ds(i * SUB + SUB - 1, 1)
        br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
        dpt = mm(v_ref[si, :], do_ref[...], _T1)  # [16, C]: dPᵀ rows
        qfac = q_ref[...].astype(f32) * masked_exp((pos > i * SUB + SUB - 1) & (s_ref[...] == sr),
                                                   b_ref[...] - br) * (p_ref[...] * pr)
        dk_in = dk_in + masked_exp(segi == sr, br - bi) * (pi * pr) * mm(dpt.astype(md), qfac.astype(md))
    elif not static:  # the same, a later block j > i at a time
        rr = pl.ds(i * SUB + SUB - 1, 1)
        br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]

        def later(j, acc):
            sj = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)
            dpt = mm(v_ref[si, :], do_ref[sj, :], _T1)
            qfac = q_ref[sj, :].astype(f32) * masked_exp(s_ref[sj, :] == sr, b_ref[sj, :] - br) * (p_ref[sj, :] * pr)
            return acc + mm(dpt.astype(md), qfac.astype(md))

        inter = lax.fori_loop(i + 1, nb, later, jnp.zeros((SUB, q_ref.shape[1]), f32))
        dk_in = dk_in + masked_exp(segi == sr, br - bi) * (pi * pr) * inter
    # through the states, the diagonal, and the decay gradient
    dk_st = fe_i * mm(v_ref[si, :], dh_ref[...].astype(md))
    ki = k_ref[si, :].astype(f32)
    last = row + i * SUB == c - 1
    # the last token's own write cancels against the carry ⟨Sᵀ, dSᵀ⁺⟩: left out of both
    writes = jnp.where(last, 0.0, ki * dk_st)
    dk = dk_in + diag * qi + dk_st
    db = db - ki * dk_in - writes
    return dq, dk, db, writes, last


def _end_term(h_ref, dh_ref, b_ref, s_ref, p_ref, writes_sum):
    """The chunk's last token's decay gradient beyond its rows' own: the carry ``a ⊙ ⟨Sᵀ, dSᵀ⁺⟩`` and every
    earlier token's state write ``writes_sum [1, K]``."""
    c = b_ref.shape[0]
    end = pl.ds(c - 1, 1)
    _, _, a = channel_factors(b_ref[end, :], s_ref[end, :], p_ref[end, :], b_ref[end, :], s_ref[end, :], p_ref[end, :])
    return a * jnp.sum(h_ref[...] * dh_ref[...], axis=0, keepdims=True) + writes_sum


def _channel_grads_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, h_ref, dh_ref, dq_ref, dk_ref, db_ref, *,
                          nk):
    """Triton: one secondary chunk ``i`` of 16 rows and one block of 64 key channels per grid step
    ``(batch, head, chunk, i · nk + key block)`` (fla's ``BK``). Every term of ``dq, dk, db`` is
    channelwise (its contractions are over tokens and values), so a program reads the chunk's
    ``q, k, b, seg, p [C, BK]``, ``v, do [C, V]`` and ``Sᵀ, dSᵀ⁺ [V, BK]`` and writes its block
    ``dq, dk, db [16, BK]`` (:func:`_block_grads`); the last secondary chunk's programs also sum the chunk's
    state writes for its last token's end term. Compiled for sm_90 (Triton 3.9), the whole chunk per
    program (four secondary chunks unrolled, ``dv`` too, 8 warps) spilled 0.4 KB of registers per thread."""
    c = q_ref.shape[0]
    nb = c // SUB
    md = v_ref.dtype
    i = pl.program_id(3) // nk
    end = pl.ds(c - 1, 1)
    dq, dk, db, _, last = _block_grads(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, h_ref, dh_ref, i,
                                       rolled=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    b_end, s_end, p_end = b_ref[end, :], s_ref[end, :], p_ref[end, :]
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)

    def end_term():  # the writes of every block, summed in block order as the TPU body does; a loop, since
        # unrolled the blocks' loads were hoisted together (36 B of spills at head dim 256 on sm_90, none now)
        def block(j, writes_sum):
            sj = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)
            _, fe_j, _ = channel_factors(b_ref[sj, :], s_ref[sj, :], p_ref[sj, :], b_end, s_end, p_end)
            dk_st = fe_j * mm(v_ref[sj, :], dh_ref[...].astype(md))
            w = jnp.where(row + j * SUB == c - 1, 0.0, k_ref[sj, :].astype(f32) * dk_st)
            return writes_sum + jnp.sum(w, axis=0, keepdims=True)

        writes_sum = lax.fori_loop(0, nb, block, jnp.zeros((1, q_ref.shape[1]), f32))
        return _end_term(h_ref, dh_ref, b_ref, s_ref, p_ref, writes_sum)

    extra = lax.cond(i == nb - 1, end_term, lambda: jnp.zeros((1, q_ref.shape[1]), f32))
    db_ref[...] = db + jnp.where(last, extra, 0.0)


def _channel_grads_kernel_tpu(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, h_ref, dh_ref, dq_ref, dk_ref, db_ref):
    """Mosaic TPU: one chunk per grid step: ``q, k [C, K]``, ``v, do [C, V]``, gates ``[C, K]``, ``Sᵀ``
    before the chunk and ``dSᵀ`` after it ``[V, K]``. Writes ``dq, dk, db``, one secondary chunk of rows
    at a time (:func:`_block_grads`, static offsets), each written before the next one starts."""
    nb = q_ref.shape[0] // SUB
    writes_sum = jnp.zeros((1, q_ref.shape[1]), f32)  # Σ_s k_s ⊙ dk_st_s over the chunk but its last token
    for i in range(nb):
        si = pl.ds(i * SUB, SUB)
        dq, dk, db, writes, last = _block_grads(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, p_ref, h_ref, dh_ref, i,
                                                rolled=False)
        dq_ref[si, :] = dq.astype(dq_ref.dtype)
        dk_ref[si, :] = dk.astype(dk_ref.dtype)
        writes_sum = writes_sum + jnp.sum(writes, axis=0, keepdims=True)
        if i == nb - 1:  # the last token: the carry and every earlier write (the sum is complete here)
            db = db + jnp.where(last, _end_term(h_ref, dh_ref, b_ref, s_ref, p_ref, writes_sum), 0.0)
        db_ref[si, :] = db


def _channel_dv_kernel(a_ref, k_ref, do_ref, b_ref, s_ref, p_ref, dh_ref, dv_ref, *, kt):
    """One chunk and value block, both backends (fla's ``chunk_gla_bwd_dv``):
    ``dV = Aᵀ dO + (K ⊙ f^e) dSᵀ⁺ᵀ`` with ``A [C, C]`` the forward's intra matrix and ``dSᵀ⁺ [BV, K]``
    the state gradient after the chunk, read ``kt`` key columns at a time (``_util.column_tile``)."""
    md = do_ref.dtype
    end = pl.ds(k_ref.shape[0] - 1, 1)

    def write(cols):
        _, fe, _ = channel_factors(b_ref[:, cols], s_ref[:, cols], p_ref[:, cols], b_ref[end, cols], s_ref[end, cols],
                                   p_ref[end, cols])
        return mm((k_ref[:, cols].astype(f32) * fe).astype(md), dh_ref[:, cols].astype(md), _T1)

    dv = mm(a_ref[...].astype(md), do_ref[...], _T0)
    dv_ref[...] = (dv + tile_sum(k_ref.shape[1], kt, write)).astype(dv_ref.dtype)


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
        # key channels are independent here too: key blocks of 64 past 128, as channel_states
        bv, (wk, kgrid, kb) = min(vp, 64), key_blocks(kp, backend)  # the walk's key block
        kseq = pl.BlockSpec((None, None, tp, wk), lambda i, j, l, *m: (i, j, 0, kb(m)))
        vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l, *m: (i, j, 0, l))
        vstate = pl.BlockSpec((None, None, bv, wk), lambda i, j, l, *m: (i, j, l, kb(m)))
        vstates = pl.BlockSpec((None, None, n, bv, wk), lambda i, j, l, *m: (i, j, 0, l, kb(m)))
        walk = walk_params(interpret, backend, wk)
        dhs, dh0t = pl.pallas_call(
            functools.partial(_channel_dstates_kernel, chunk=chunk, n_chunks=n), grid=(bsz, h, vp // bv, *kgrid),
            in_specs=[kseq, vseq, kseq, kseq, kseq, vstate], out_specs=[vstates, vstate],
            out_shape=[hs_shape, st_shape], interpret=interpret, compiler_params=walk,
            name="gla_chunk_channel_bwd_dstates",
        )(q, do, bc, seg, p, dhtt)
        params = triton_params(interpret, backend, num_warps=8, num_stages=1)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k)] + [jax.ShapeDtypeStruct(bc.shape, f32)]
    if tpu:
        dq, dk, db = pl.pallas_call(
            _channel_grads_kernel_tpu, grid=(bsz, h, n),
            in_specs=[blk(kp), blk(kp), blk(vp), blk(vp), blk(kp), blk(kp), blk(kp), chunk_state, chunk_state],
            out_specs=[blk(kp), blk(kp), blk(kp)], out_shape=out_shape, interpret=interpret,
            compiler_params=params, name="gla_chunk_channel_bwd_grads_tpu",
        )(q, k, v, do, bc, seg, p, hs, dhs)
    else:
        nb, bk = chunk // SUB, min(kp, 64)
        nk = kp // bk
        whole = pl.BlockSpec((None, None, chunk, vp), lambda i, j, l, z: (i, j, l, 0))
        kcols = pl.BlockSpec((None, None, chunk, bk), lambda i, j, l, z: (i, j, l, z % nk))
        rows = pl.BlockSpec((None, None, SUB, bk), lambda i, j, l, z: (i, j, l * nb + z // nk, z % nk))
        state = pl.BlockSpec((None, None, None, vp, bk), lambda i, j, l, z: (i, j, l, 0, z % nk))
        dq, dk, db = pl.pallas_call(
            functools.partial(_channel_grads_kernel, nk=nk), grid=(bsz, h, n, nb * nk),
            in_specs=[kcols, kcols, whole, whole, kcols, kcols, kcols, state, state],
            out_specs=[rows, rows, rows], out_shape=out_shape, interpret=interpret, compiler_params=params,
            name="gla_chunk_channel_bwd_grads",
        )(q, k, v, do, bc, seg, p, hs, dhs)
    bv, blk4, _, vblk, out_params = out_specs(chunk, vp, interpret=interpret, backend=backend)
    dv = pl.pallas_call(
        functools.partial(_channel_dv_kernel, kt=column_tile(kp, backend)), grid=(bsz, h, n, vp // bv),
        in_specs=[blk4(chunk), blk4(kp), vblk, blk4(kp), blk4(kp), blk4(kp),
                  pl.BlockSpec((None, None, None, bv, kp), lambda i, j, l, z: (i, j, l, z, 0))],
        out_specs=vblk, out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype), interpret=interpret,
        compiler_params=out_params, name="gla_chunk_channel_bwd_dv" + ("_tpu" if tpu else ""),
    )(a, k, do, bc, seg, p, dhs)
    back = lambda x: jnp.moveaxis(x, 1, 2)
    return back(dq), back(dk), back(dv), back(db), jnp.swapaxes(dh0t, -1, -2)
