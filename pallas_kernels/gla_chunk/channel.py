r"""Pallas kernels: chunked GLA with per-channel decay (GLA proper), forward — see ``kernel.py``'s docstring.

Three kernels, as fla's ``chunk_gla`` forward (``chunk_gla_fwd_intra_gk`` / ``chunk_fwd_h`` /
``chunk_gla_fwd_o_gk``): ``channel_intra``, the intra-chunk matrices ``A [C, C]`` by 16-token secondary
chunks, on Triton one secondary chunk's rows ``[16, C]`` per program (grid ``(batch, heads, chunks,
secondary chunks)``, past key dims of 128 also key blocks of 64, their shares added in XLA), on Mosaic TPU one
chunk per program; ``channel_states``, the only serial pass: the per-channel decayed
state update with the state carried transposed, ``Sᵀ [BV, K]`` (the decay is then a broadcast; on Triton past
key dims of 128 in key blocks of 64, the channels being independent), writing the
state entering every chunk (input dtype; float32 in the backward); then ``gla_chunk_channel_out``, grid
``(batch, heads, chunks, value blocks of 128)``: ``O = A V + (Q ⊙ e^{b}) S``. The backward is
``backward_channel.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._util import (
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

SUB = 16  # secondary chunk of the per-channel kernel (the smallest GPU ``dot``)


def _intra_diag(q_ref, k_ref, b_ref, s_ref, p_ref, i, qi, bi, segi, pi, *, rolled):
    """The diagonal ``16 x 16`` block of secondary chunk ``i`` in log space, a key column per step:
    ``Σ_k q_tk k_sk e^{b_tk − b_sk}`` for ``s ≤ t`` in the same document (with the signs)."""
    f32 = jnp.float32
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)

    def column(j, a_d):
        rj = pl.ds(i * SUB + j, 1)
        kj, bj, sj, pj = k_ref[rj, :].astype(f32), b_ref[rj, :], s_ref[rj, :], p_ref[rj, :]
        ok = (row >= j) & (segi == sj)
        colj = jnp.sum(qi * kj * masked_exp(ok, bi - bj) * (pi * pj), axis=1, keepdims=True)
        return jnp.where(col == j, colj, a_d)

    return token_loop(0, SUB, column, jnp.zeros((SUB, SUB), f32), rolled=rolled)


def _intra_channel_kernel(q_ref, k_ref, b_ref, s_ref, p_ref, a_ref):
    """Triton: rows ``[16, C]`` of the intra-chunk matrix ``A`` (``o_intra = A V``) for one secondary chunk
    ``i`` of 16 tokens per grid step ``(batch, head, chunk, i)`` — every secondary chunk in parallel, as
    fla's ``chunk_gla_fwd_A_kernel_intra_sub_inter`` / ``_intra``:

    * its blocks against the earlier secondary chunks ``j < i``, through the reference token ``r`` before
      ``i``: ``(q_t e^{b_t − b_r}) · (k_s e^{b_r − b_s})`` for ``s ≤ r``, one ``[16, K] × [K, 16]`` matmul
      each, stored at its lane offset;
    * its diagonal block in log space (:func:`_intra_diag`); the blocks after it are zero.

    A program holds one secondary chunk's ``[16, K]`` rows, not the chunk's: the whole chunk per program
    (all four secondary chunks unrolled) spilled 1.8 KB of registers per thread on sm_90. Every exponent
    is ``≤ 0`` and masked (segment equality, causality) before ``exp``. ``q_ref [16, K]`` is the secondary
    chunk's queries; ``k, b, seg, p [C, K]`` the chunk's keys and gates (cumulative log decay within the
    chunk, document index, cumulative sign); past key dims of 128, ``K`` is one key block of 64 and the
    rows written are that block's share of ``A``."""
    f32 = jnp.float32
    md = q_ref.dtype
    nb = k_ref.shape[0] // SUB
    i = pl.program_id(3)
    si = pl.ds(pl.multiple_of(i * SUB, SUB), SUB)
    qi, bi, segi, pi = q_ref[...].astype(f32), b_ref[si, :], s_ref[si, :], p_ref[si, :]
    a_d = _intra_diag(q_ref, k_ref, b_ref, s_ref, p_ref, i, qi, bi, segi, pi, rolled=True)
    rr = pl.ds(jnp.maximum(i * SUB - 1, 0), 1)  # the reference token (unused by the first secondary chunk)
    br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
    qf = (qi * masked_exp(segi == sr, bi - br) * (pi * pr)).astype(md)
    nt = (((1,), (1,)), ((), ()))
    for j in range(nb):
        sj = pl.ds(j * SUB, SUB)

        @pl.when(j < i)
        def _(sj=sj):
            kf = k_ref[sj, :].astype(f32) * masked_exp(s_ref[sj, :] == sr, br - b_ref[sj, :]) * (p_ref[sj, :] * pr)
            a_ref[:, sj] = mm(qf, kf.astype(md), nt)

        @pl.when(j == i)
        def _(sj=sj):
            a_ref[:, sj] = a_d

        @pl.when(j > i)
        def _(sj=sj):
            a_ref[:, sj] = jnp.zeros((SUB, SUB), f32)


def _intra_channel_kernel_tpu(q_ref, k_ref, b_ref, s_ref, p_ref, a_ref):
    """Mosaic TPU: the whole ``A [C, C]`` of one chunk per grid step ``(batch, head, chunk)``, the same
    blocks as :func:`_intra_channel_kernel`, written as whole rows: the earlier blocks as one ``[16, C]``
    matmul, the diagonal block placed by a ``[16, 16] × [16, C]`` selector matmul (exact at ``HIGHEST``;
    a 16-lane store at a lane offset lowers, but whether Mosaic compiles it cannot be checked without a
    TPU). Secondary-chunk offsets are static (a dynamic single-row offset into a packed bf16 block is not a
    given on Mosaic TPU)."""
    f32, hi = jnp.float32, lax.Precision.HIGHEST
    md = q_ref.dtype
    c = q_ref.shape[0]
    pos = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    nt = (((1,), (1,)), ((), ()))
    for i in range(c // SUB):
        si = pl.ds(i * SUB, SUB)
        qi, bi, segi, pi = q_ref[si, :].astype(f32), b_ref[si, :], s_ref[si, :], p_ref[si, :]
        a_d = _intra_diag(q_ref, k_ref, b_ref, s_ref, p_ref, i, qi, bi, segi, pi, rolled=False)
        sel_col = lax.broadcasted_iota(jnp.int32, (SUB, c), 1)
        sel_row = lax.broadcasted_iota(jnp.int32, (SUB, c), 0)
        place = jnp.where(sel_col == sel_row + i * SUB, 1.0, 0.0).astype(f32)  # [16, C]: block i's columns
        rows = mm(a_d, place, precision=hi)
        if i > 0:
            rr = pl.ds(i * SUB - 1, 1)
            br, sr, pr = b_ref[rr, :], s_ref[rr, :], p_ref[rr, :]
            qf = (qi * masked_exp(segi == sr, bi - br) * (pi * pr)).astype(md)
            kf = k_ref[...].astype(f32) * masked_exp((pos <= i * SUB - 1) & (s_ref[...] == sr), br - b_ref[...]) * (
                p_ref[...] * pr)
            rows = rows + mm(qf, kf.astype(md), nt)
        a_ref[si, :] = rows


def channel_factors(b, seg, p, b_end, s_end, p_end):
    """``f^s`` (state read), ``f^e`` (state write) ``[C, K]`` and the carry ``a [1, K]`` of a chunk with
    per-channel gates ``[C, K]``; ``*_end [1, K]`` are its last token's."""
    fs = jnp.where(seg == 0, jnp.exp(b), 0.0) * p
    fe = masked_exp(seg == s_end, b_end - b) * (p * p_end)
    a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end
    return fs, fe, a


def channel_state_step(k, v, fe, a, st):
    """``Sᵀ⁺ = a ⊙ Sᵀ + Vᵀ (K ⊙ f^e)`` on the transposed state ``Sᵀ [BV, K]`` (the per-channel decay is a
    broadcast over its last axis)."""
    return a * st + mm(v, (k.astype(jnp.float32) * fe).astype(v.dtype), (((0,), (0,)), ((), ())))


def _channel_states_kernel(k_ref, v_ref, b_ref, s_ref, p_ref, h0_ref, hs_ref, ht_ref, *, chunk, n_chunks):
    """Triton: one program per (batch, head, value block) walks the chunks with ``Sᵀ [BV, BK]`` on chip,
    writing the state entering every chunk; past key dims of 128 also one per key block (``BK = 64``,
    ``_util.key_blocks``), else ``BK = K``."""
    def body(n, st):
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        end = pl.ds(n * chunk + chunk - 1, 1)
        hs_ref[n] = st.astype(hs_ref.dtype)
        _, fe, a = channel_factors(b_ref[sl, :], s_ref[sl, :], p_ref[sl, :], b_ref[end, :], s_ref[end, :], p_ref[end, :])
        return channel_state_step(k_ref[sl, :], v_ref[sl, :], fe, a, st)

    ht_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(jnp.float32))


def _channel_states_kernel_tpu(k_ref, v_ref, b_ref, s_ref, p_ref, h0_ref, hs_ref, ht_ref, s_scr):
    """Mosaic TPU: one chunk per grid step (the chunk axis sequential), ``Sᵀ`` in a VMEM scratch."""
    c = k_ref.shape[0]
    end = pl.ds(c - 1, 1)

    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(jnp.float32)

    st = s_scr[...]
    hs_ref[...] = st.astype(hs_ref.dtype)
    _, fe, a = channel_factors(b_ref[...], s_ref[...], p_ref[...], b_ref[end, :], s_ref[end, :], p_ref[end, :])
    st = channel_state_step(k_ref[...], v_ref[...], fe, a, st)
    s_scr[...] = st

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = st


def _channel_out_kernel(a_ref, q_ref, v_ref, b_ref, s_ref, p_ref, h_ref, o_ref, *, kt):
    """One chunk and value block, both backends: ``O = A V + (Q ⊙ f^s) S`` with ``Sᵀ [BV, K]`` the state
    entering the chunk (``f^s = e^{b}`` on the chunk's first document, with the sign); the state read
    ``kt`` key columns at a time (``_util.column_tile``)."""
    f32 = jnp.float32
    md = v_ref.dtype

    def read(cols):
        fs = jnp.where(s_ref[:, cols] == 0, jnp.exp(b_ref[:, cols]), 0.0) * p_ref[:, cols]
        return mm((q_ref[:, cols].astype(f32) * fs).astype(md), h_ref[:, cols].astype(md), (((1,), (1,)), ((), ())))

    o = mm(a_ref[...].astype(md), v_ref[...])
    o_ref[...] = (o + tile_sum(q_ref.shape[1], kt, read)).astype(o_ref.dtype)


def channel_intra(q, k, bc, seg, p, *, chunk, interpret, backend):
    """The intra-chunk matrices ``A [b, h, Tp, C]`` float32, all chunks in parallel; heads-first inputs.
    Triton: one secondary chunk's rows per program; Mosaic TPU: one chunk per program."""
    bsz, h, tp, kp = q.shape
    if backend == "mosaic_tpu":
        blk = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, l: (i, j, l, 0))
        return pl.pallas_call(
            _intra_channel_kernel_tpu, grid=(bsz, h, tp // chunk),
            in_specs=[blk(kp), blk(kp), blk(kp), blk(kp), blk(kp)], out_specs=blk(chunk),
            out_shape=jax.ShapeDtypeStruct((bsz, h, tp, chunk), jnp.float32), interpret=interpret,
            compiler_params=tpu_params(interpret, "parallel", "parallel", "parallel"),
            name="gla_chunk_channel_intra_tpu",
        )(q, k, bc, seg, p)
    nb = chunk // SUB
    # A is a sum over the key channels: past key dims of 128, a grid axis over key blocks of 64 (fla's BK), each
    # program's share of its rows written apart and added in XLA (one program holding all 256 channels spilled
    # 136 B of registers per thread on sm_90 at 8 warps, 652 B at 4)
    wk, kgrid, kb = key_blocks(kp, backend)
    rows = pl.BlockSpec((None, None, SUB, wk), lambda i, j, l, z, *m: (i, j, l * nb + z, kb(m)))
    whole = pl.BlockSpec((None, None, chunk, wk), lambda i, j, l, z, *m: (i, j, l, kb(m)))
    if kgrid:
        out_spec = pl.BlockSpec((None, None, None, SUB, chunk), lambda i, j, l, z, *m: (kb(m), i, j, l * nb + z, 0))
    else:
        out_spec = pl.BlockSpec((None, None, SUB, chunk), lambda i, j, l, z, *m: (i, j, l * nb + z, 0))
    a = pl.pallas_call(
        _intra_channel_kernel, grid=(bsz, h, tp // chunk, nb, *kgrid),
        in_specs=[rows, whole, whole, whole, whole], out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((*kgrid, bsz, h, tp, chunk), jnp.float32), interpret=interpret,
        compiler_params=triton_params(interpret, backend, num_warps=4), name="gla_chunk_channel_intra",
    )(q, k, bc, seg, p)
    return jnp.sum(a, axis=0) if kgrid else a


def channel_states(k, v, bc, seg, p, h0t, *, chunk, interpret, backend, dtype=jnp.float32):
    """The serial pass on either backend, heads-first inputs: the transposed state entering every chunk
    ``[b, h, N, Vp, Kp]`` in ``dtype`` and the final one ``[b, h, Vp, Kp]`` float32, from ``h0t = Sᵀ_0``."""
    bsz, h, tp, kp = k.shape
    vp = v.shape[-1]
    n = tp // chunk
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((bsz, h, n, vp, kp), dtype), jax.ShapeDtypeStruct((bsz, h, vp, kp), f32)]
    if backend == "mosaic_tpu":
        blk = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, l: (i, j, l, 0))
        whole = pl.BlockSpec((None, None, vp, kp), lambda i, j, l: (i, j, 0, 0))
        return pl.pallas_call(
            _channel_states_kernel_tpu, grid=(bsz, h, n),
            in_specs=[blk(kp), blk(vp), blk(kp), blk(kp), blk(kp), whole],
            out_specs=[pl.BlockSpec((None, None, None, vp, kp), lambda i, j, l: (i, j, l, 0, 0)), whole],
            out_shape=out_shape, scratch_shapes=[pltpu.VMEM((vp, kp), f32)], interpret=interpret,
            compiler_params=tpu_params(interpret, "parallel", "parallel", "arbitrary"),
            name="gla_chunk_channel_states_tpu",
        )(k, v, bc, seg, p, h0t)
    # every key channel's state evolves on its own, so past key dims of 128 the grid also splits the key
    # axis into blocks of 64 (fla's chunk_fwd_h; at K = 256 the whole axis spilled 140 B a thread on sm_90)
    bv, (bk, kgrid, kb) = min(vp, 64), key_blocks(kp, backend)
    kseq = pl.BlockSpec((None, None, tp, bk), lambda i, j, l, *m: (i, j, 0, kb(m)))
    vstate = pl.BlockSpec((None, None, bv, bk), lambda i, j, l, *m: (i, j, l, kb(m)))
    return pl.pallas_call(
        functools.partial(_channel_states_kernel, chunk=chunk, n_chunks=n), grid=(bsz, h, vp // bv, *kgrid),
        in_specs=[kseq, pl.BlockSpec((None, None, tp, bv), lambda i, j, l, *m: (i, j, 0, l)), kseq, kseq, kseq, vstate],
        out_specs=[pl.BlockSpec((None, None, n, bv, bk), lambda i, j, l, *m: (i, j, 0, l, kb(m))), vstate],
        out_shape=out_shape, interpret=interpret, compiler_params=walk_params(interpret, backend, bk),
        name="gla_chunk_channel_states",
    )(k, v, bc, seg, p, h0t)


def forward_channel(q, k, v, bc, seg, p, h0, *, chunk, interpret, backend):
    """Per-channel decay: the chunk-parallel intra kernel, the state pass, then the chunk-parallel outputs.
    Padded inputs as ``kernel._forward``'s, gates ``bc, seg, p [b, Tp, h, Kp]``; heads-first inside."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    n = tp // chunk
    heads = lambda x: jnp.moveaxis(x, 2, 1)
    q, k, v, bc, seg, p = map(heads, (q, k, v, bc, seg, p))
    tpu = backend == "mosaic_tpu"
    a = channel_intra(q, k, bc, seg, p, chunk=chunk, interpret=interpret, backend=backend)
    hs, ht = channel_states(k, v, bc, seg, p, jnp.swapaxes(h0, -1, -2), chunk=chunk, interpret=interpret,
                            backend=backend, dtype=v.dtype)
    bv, blk, _, vblk, params = out_specs(chunk, vp, interpret=interpret, backend=backend)
    o = pl.pallas_call(
        functools.partial(_channel_out_kernel, kt=column_tile(kp, backend)), grid=(bsz, h, n, vp // bv),
        in_specs=[blk(chunk), blk(kp), vblk, blk(kp), blk(kp), blk(kp),
                  pl.BlockSpec((None, None, None, bv, kp), lambda i, j, l, z: (i, j, l, z, 0))],
        out_specs=vblk, out_shape=jax.ShapeDtypeStruct((bsz, h, tp, vp), jnp.float32), interpret=interpret,
        compiler_params=params,
        name="gla_chunk_channel_out" + ("_tpu" if tpu else ""),
    )(a, q, v, bc, seg, p, hs)
    return jnp.moveaxis(o, 1, 2), jnp.swapaxes(ht, -1, -2)
