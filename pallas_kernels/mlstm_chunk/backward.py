r"""Pallas backward of the chunkwise mLSTM kernel.

The output ``h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)`` does not depend on the stabiliser ``m`` (it cancels
between the numerator, the normaliser and the floor ``e^{−m_t}``), so the backward holds every
stabiliser constant — the chunk's entering ``m``, the row maxima ``m_t``, the chunk-end ``m⁺`` — and
differentiates a gated linear attention with an extra "value" column of ones for the normaliser. Per
chunk, with entering state ``(C', n')`` (stabilised by ``m``), log weights ``w_ts = b_t − b_s + i_s``
(causal, one document), ``D_ts = e^{w_ts − m_t}``, readout ``ρ_t = e^{b_t + m − m_t}``, write
``ε_s = e^{b_C − b_s + i_s − m⁺}`` and carry ``φ = e^{b_C + m − m⁺}``:

.. math::
    \mathrm{num} = (Q K^\top ⊙ D) V + ρ ⊙ Q C', \quad r = (Q K^\top ⊙ D) 1 + ρ ⊙ Q n', \quad
    h = \mathrm{num} / \max(|r|, e^{−m_t}), \quad C'^+ = φ C' + (K ⊙ ε)^\top V, \ n'^+ = φ n' + K^\top ε.

With ``d\mathrm{num} = dh / \mathrm{den}`` and ``dr = −(dh · h) \mathrm{sign}(r) / \mathrm{den}`` where
``|r|`` is the larger, ``dP = d\mathrm{num}\, V^\top + dr 1^\top`` plays the role of GLA's ``dO Vᵀ``; the
gradients of ``q, k, v``, the states and the log gates follow as in ``pallas_kernels/gla_chunk/backward.py``
(rows minus columns of ``M = dP ⊙ Q Kᵀ ⊙ D`` without its diagonal for the cumulative log forget gate
``b``, all of its columns for the input gate ``i``; the carry's ``φ ⟨S, dS⁺⟩`` at the chunk's last token).
The final state's stabiliser ``m_T`` is the one place ``m`` matters: the wrapper rescales the returned
state to an ``m_T`` that XLA computes (and differentiates) as the reference's
``max(b_T + m_0, max_s Σ_{u>s} log σ(f_u) + i_s)``. The entering ``m_0`` gets
``⟨dC'_0, C'_0⟩ + ⟨dn'_0, n'_0⟩`` (the output depends on ``C' e^{m}``).

Passes: XLA the chunk-level stabilisers ``m, m⁺, φ``, the write weights ``ε`` and the normaliser states
``n'`` (vectors; cheap); (1) Pallas, the entering ``C'`` of every chunk; (2) Pallas, chunk-parallel: each
row's ``m_t``, ``1/den``, ``dr`` and ``ρ`` (the forward recomputed: nothing but the inputs is kept);
(3) Pallas, ``dC'`` after every chunk walking backwards (``dn'`` in XLA); (4) Pallas, chunk-parallel, a
program per (chunk, key block of 64; Mosaic TPU: one block, the whole key axis): ``dq, dk`` of its key block,
its share of ``db, di`` (sums over the key axis, added in XLA), and a value block of ``dv`` (a contraction
over the whole key axis: ``dv`` in ``nv = min(nk, V / 64)`` value blocks of ``V / nv``, one each by the
first ``nv`` programs). Triton
walks (1) and (3) per (batch, head, value block of 64); Mosaic TPU runs one chunk per grid step with the
state in VMEM scratch; the per-chunk math is shared.

``backend="mosaic_gpu"``: all four passes take Mosaic GPU bodies, their matmul operands bf16, both head dims
padded on to ``key_pad`` once (zeros: exact) and the gradients sliced back. The serial passes (1) and (3)
(``mosaic_gpu.py``): one warpgroup per (batch, head, value block of 64), the float32 state or state gradient
the loop carry, one ``wgmma`` per chunk; (3) is (1)'s body walking backwards, ``Qᵀ (ρ/den ⊙ dO)`` in place of
``Kᵀ (ε ⊙ V)``. The chunk-parallel passes (2) and (4) (``backward_mosaic_gpu.py``): (2) per (chunk, value block
of 64), each value block's share of ``Σ_v dO ⊙ num`` (added in XLA, where ``1/den`` and ``dr`` follow); (4) a
``dq, dk, db, di`` kernel per (chunk, key block of 64 × value block of up to 128), every output linear in the
value-axis products so that XLA adds the value blocks' shares (the normaliser column in the first one's), and a
``dv`` kernel per (chunk, value block of 64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic_gpu import key_pad
from pallas_kernels._util import (
    chunk_block,
    column_products,
    column_tile,
    mm,
    once_on_tpu,
    tile_sum,
    tpu_params,
    triton_params,
    walk_params,
)
from pallas_kernels.mlstm_chunk.backward_mosaic_gpu import grads_mosaic_gpu, rows_mosaic_gpu
from pallas_kernels.mlstm_chunk.forward import (
    _NT,
    _TN,
    NEG,
    _affine,
    _last,
    _pad_c,
    _pad_last,
    _readout,
    _rsum,
    _weights,
    chunk_stabilisers,
    chunk_states,
    f32,
    key_terms,
)
from pallas_kernels.mlstm_chunk.mosaic_gpu import dstates_mosaic_gpu


def _dstate_step(q, do, fs, fo, ds):
    """``dC' = φ dC'⁺ + (Q ⊙ ρ / den)ᵀ dh``."""
    return _last(fo) * ds + mm((q.astype(f32) * fs).astype(do.dtype), do, _TN)


def _rows(v, do, bc, sc, br, sr, ir, er, m_in, terms):
    """Pass 2, one chunk: ``(m_t, 1/den, dr, ρ)`` columns ``[C, 1]``, from the readout's ``key_terms``."""
    num, raw, m_t, rho = _readout(v, bc, sc, br, sr, ir, er, m_in, terms)
    return _row_grads(raw, m_t, rho, _rsum(do.astype(f32) * num))


def _row_grads(raw, m_t, rho, do_num):
    """``(m_t, 1/den, dr, ρ)`` from the raw normaliser ``r``, ``m_t``, ``ρ`` and ``Σ_v dh ⊙ num`` ``[C, 1]``."""
    floor = jnp.exp(-m_t)
    inv = 1.0 / jnp.maximum(jnp.abs(raw), floor)
    sign = jnp.where(raw < 0.0, -1.0, 1.0)  # not jnp.sign: its Mosaic lowering asks which TPU it runs on
    dr = jnp.where(jnp.abs(raw) >= floor, -sign * inv * inv * do_num, 0.0)
    return m_t, inv, dr, rho


def _rows_tiled(q_ref, k_ref, v_ref, do_ref, bc, sc, br, sr, ir, er, m_in, s_ref, n_ref, *, kt, wv):
    """:func:`_rows` with the value axis in tiles of ``wv`` (past value dims of 128 on Triton): ``num`` is only
    needed through ``Σ_v dh ⊙ num``, so per value tile ``num_v = (Q Kᵀ ⊙ D) V_v + ρ ⊙ Q C'_v`` (``Q C'_v``
    over key tiles of ``kt``) is formed and reduced, and no ``[C, V]`` float32 block (nor a ``[kt, V]`` slice
    of the state) is live."""
    md = v_ref.dtype
    kp = q_ref.shape[1]
    qk, qn = tile_sum(kp, kt, lambda cols: (mm(q_ref[:, cols], k_ref[:, cols], _NT),
                                            _rsum(q_ref[:, cols].astype(f32) * n_ref[:, cols])))
    d, m_t, rho = _weights(bc, sc, br, sr, ir, er, m_in)
    att = qk * d
    raw = _rsum(att) + rho * qn
    attm = att.astype(md)

    def value_tile(vs):
        qs = tile_sum(kp, kt, lambda cols: mm(q_ref[:, cols], s_ref[cols, vs].astype(md)))
        return _rsum(do_ref[:, vs].astype(f32) * (mm(attm, v_ref[:, vs]) + rho * qs))

    return _row_grads(raw, m_t, rho, tile_sum(v_ref.shape[1], wv, value_tile))


def _decay(bc, sc, ir, mt, br, sr):
    """``D_ts = e^{w_ts − m_t}`` ``[C, C]`` (causal, one document; 0 elsewhere)."""
    c = bc.shape[0]
    ok = (lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (sc == sr)
    return jnp.exp(jnp.where(ok, bc - br + ir, NEG) - mt)


def _chunk_dv(q_ref, k_ref, do, bc, sc, mt, inv, ew, br, sr, ir, ds_ref, dv_ref, *, wk):
    """``dv = (Q Kᵀ ⊙ D)ᵀ dnum + ε ⊙ K dS`` for one block of value columns: refs of ``q, k [C, K]`` (all of the
    key axis: both terms contract over it, ``wk`` key columns at a time), that block's ``do [C, bv]`` and a
    ref of ``ds [K, bv]`` (float32, the state gradient after the chunk), the columns ``b, seg, m_t, 1/den, ε``
    and rows ``b, seg, i`` (as ``_chunk_grads``)."""
    md = do.dtype
    dnm = (do.astype(f32) * inv).astype(md)
    if wk < q_ref.shape[1]:
        qk, kds = tile_sum(q_ref.shape[1], wk, lambda sl: (
            mm(q_ref[:, sl], k_ref[:, sl], _NT), mm(k_ref[:, sl], ds_ref[sl, :].astype(md))))
        k_ds = lambda: kds
    else:  # q, k, dS read first, the K dS matmul where it is used (taken before the decay, sm_90 spilled 44 B at 128)
        q, k, ds = q_ref[...], k_ref[...], ds_ref[...]
        qk, k_ds = mm(q, k, _NT), (lambda: mm(k, ds.astype(md)))
    qk = (qk * _decay(bc, sc, ir, mt, br, sr)).astype(md)
    dv_ref[...] = (mm(qk, dnm, _TN) + ew * k_ds()).astype(dv_ref.dtype)


def _chunk_grads(q, k, v_ref, do_ref, bc, sc, ic, mt, rho, inv, dr, ew, fo, br, sr, ir, s_ref, ds_ref, nv, dnv, dq_ref,
                 dk_ref, *, wv):
    """Pass 4, one chunk and one block of ``bk`` key columns (module docstring): ``q, k [C, bk]``, refs of
    ``v, do [C, V]``; columns ``[C, 1]``: gates ``b, seg, i``, the row stabiliser ``m_t``, ``ρ``, ``1/den``,
    ``dr``, the write weights ``ε`` and the carry ``φ``; rows ``[1, C]``: ``b, seg, i``; refs of ``s, ds``
    ``[bk, V]`` (float32), the block's rows of the state before the chunk and of the gradient after it,
    ``nv, dnv [1, bk]`` likewise for the normaliser. Writes ``dq, dk [C, bk]`` to their refs, each as soon as
    it is finished; returns this key block's share of ``db, di [C, 1]`` (float32; sums over the key axis,
    added over the blocks in XLA). Every matrix term but ``dP [C, C]`` (recomputed per block) has a key axis:
    a program per key block of 64 holds ``[C, 64]`` float32 blocks and ``[64, V]`` state rows (``[64, wv]`` a tile
    at a time when tiled), and the sm_90 compile keeps them in registers (the whole key axis in one program
    spilled).

    The contractions over the value axis (``dnum Vᵀ``, its diagonal, ``dnum Sᵀ``, ``V dSᵀ``, ``⟨S, dS⟩``):
    with ``wv`` the whole axis, each where it is used (``s`` for ``dq``, ``dS`` for ``dk``, both again for
    the carry at the end); with ``wv`` smaller (``_util.column_tile``: past value dims of 128 on Triton), all
    five in one loop over value tiles of ``wv`` first, a ``[C, wv]`` and a ``[bk, wv]`` slice live at a time."""
    md = v_ref.dtype
    c = q.shape[0]
    tiled = wv < v_ref.shape[1]
    if not tiled:
        v = v_ref[...]
        dnum_all = do_ref[...].astype(f32) * inv
    # dnum = dh / den of the value columns that ``at`` reads from a ref (the whole axis: computed once)
    dn = (lambda at: at(do_ref).astype(f32) * inv) if tiled else (lambda at: dnum_all)
    prods = {
        "dp": lambda at: mm(dn(at).astype(md), at(v_ref), _NT),  # dnum Vᵀ
        "diag": lambda at: _rsum(dn(at) * at(v_ref).astype(f32)),
        "ds": lambda at: mm(dn(at).astype(md), at(s_ref).astype(md), _NT),  # dnum Sᵀ
        "vds": lambda at: mm(at(v_ref), at(ds_ref).astype(md), _NT),  # V dSᵀ (dS in the input dtype: spills held in f32)
        "carry": lambda at: jnp.sum(_rsum(at(s_ref) * at(ds_ref)), axis=0, keepdims=True),  # ⟨S, dS⟩
    }
    get = column_products(prods, v_ref.shape[1], wv, None if tiled else (lambda r: v if r is v_ref else r[...]))
    strict = lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(jnp.int32, (c, c), 1)
    d = _decay(bc, sc, ir, mt, br, sr)
    da = jnp.where(strict, (get("dp") + dr) * d, 0.0).astype(md)
    dd = (get("diag") + dr) * jnp.exp(jnp.minimum(ic - mt, 0.0))  # the diagonal of dP ⊙ D
    qf = q.astype(f32)
    qk = _rsum(qf * k.astype(f32))
    dq_in = mm(da, k)
    dq_rd = rho * (get("ds") + dr * nv)
    db_in, db_rd = _rsum(qf * dq_in), _rsum(qf * dq_rd)
    dq_ref[...] = (dq_in + dd * k.astype(f32) + dq_rd).astype(dq_ref.dtype)
    # then dK, through dS
    kf = k.astype(f32)
    dk_in = mm(da, q, _TN)
    col_m = _rsum(kf * dk_in)
    dk_wr = ew * (get("vds") + dnv)
    k_wr = _rsum(kf * dk_wr)
    dk_ref[...] = (dk_in + dd * q.astype(f32) + dk_wr).astype(dk_ref.dtype)
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    writes = jnp.where(is_last, 0.0, k_wr)  # the last token's own write cancels against the carry
    carry = get("carry") + jnp.sum(nv * dnv, axis=1, keepdims=True)
    end = _last(fo) * carry + jnp.sum(writes, axis=0, keepdims=True)
    db = db_in - col_m + db_rd - writes + jnp.where(is_last, end, 0.0)
    di = col_m + dd * qk + k_wr
    return db, di


# ----------------------------------------------------------------------------- kernels


def _dstates_kernel(q_ref, do_ref, fs_ref, fo_ref, dht_ref, dhs_ref, dh0_ref, *, c, n):
    def body(j, ds):
        i = n - 1 - j
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        dhs_ref[i] = ds
        return _dstate_step(q_ref[sl, :], do_ref[sl, :], fs_ref[sl, :], fo_ref[sl, :], ds)

    dh0_ref[...] = lax.fori_loop(0, n, body, dht_ref[...])


def _dstates_kernel_tpu(q_ref, do_ref, fs_ref, fo_ref, dht_ref, dhs_ref, dh0_ref, ds_scr):
    @pl.when(pl.program_id(2) == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    ds = ds_scr[...]
    dhs_ref[...] = ds
    ds = _dstate_step(q_ref[...], do_ref[...], fs_ref[...], fo_ref[...], ds)
    ds_scr[...] = ds

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds


def _rows_kernel(q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, mi_ref, br_ref, sr_ref, ir_ref, er_ref, s_ref,
                 n_ref, mt_ref, inv_ref, dr_ref, rho_ref, *, kt, wv):
    gates = lambda: (bc_ref[...], sc_ref[...], br_ref[...], sr_ref[...], ir_ref[...], er_ref[...], _last(mi_ref[...]))
    if wv < v_ref.shape[1]:
        out = _rows_tiled(q_ref, k_ref, v_ref, do_ref, *gates(), s_ref, n_ref, kt=kt, wv=wv)
    else:  # the key terms first, then the gates (read first, sm_90 took 255 registers and 64 KiB at 128, not 241, 48)
        terms = key_terms(q_ref, k_ref, s_ref, n_ref, v_ref.dtype, kt)
        out = _rows(v_ref[...], do_ref[...], *gates(), terms)
    for ref, val in zip((mt_ref, inv_ref, dr_ref, rho_ref), out):
        ref[...] = val


def _grads_kernel(q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, ic_ref, mt_ref, rho_ref, inv_ref, dr_ref, ew_ref, fo_ref,
                  br_ref, sr_ref, ir_ref, s_ref, ds_ref, n_ref, dn_ref, qf_ref, kf_ref, dov_ref, dsv_ref, dq_ref, dk_ref,
                  dv_ref, db_ref, di_ref, *, nv, wk, wv):
    db_ref[...], di_ref[...] = _chunk_grads(
        q_ref[...], k_ref[...], v_ref, do_ref,
        *(r[...] for r in (bc_ref, sc_ref, ic_ref, mt_ref, rho_ref, inv_ref, dr_ref, ew_ref, fo_ref, br_ref, sr_ref,
                           ir_ref)), s_ref, ds_ref, n_ref[...], dn_ref[...], dq_ref, dk_ref, wv=wv)

    @pl.when(pl.program_id(3) < nv)  # dv: a block of value columns, by the first nv programs
    def _():
        _chunk_dv(qf_ref, kf_ref, *(r[...] for r in (dov_ref, bc_ref, sc_ref, mt_ref, inv_ref, ew_ref, br_ref, sr_ref,
                                                     ir_ref)), dsv_ref, dv_ref, wk=wk)


# ----------------------------------------------------------------------------- driver


def mlstm_bwd(qh, kh, vh, bt, st, it, et, C0, n0, m0, do, dCt, dnt, *, chunk, interpret, backend):
    """Gradients of ``forward._core`` on its prepared heads-first inputs (``q, k [b, h, Tp, Kp]``,
    ``v [b, h, Tp, Vp]``, gates ``[b, h, Tp]``, state ``C0 [b, h, Kp, Vp], n0 [b, h, Kp], m0 [b, h]``) for
    the cotangents of ``o`` and of the final ``(C', n')``. Returns ``dq, dk, dv`` (input dtypes),
    ``db, di [b, h, Tp]`` and ``(dC0, dn0, dm0)``."""
    b, h, tp, kp = qh.shape
    vp, c = vh.shape[-1], chunk
    n = tp // c
    tpu, mgpu = backend == "mosaic_tpu", backend == "mosaic_gpu"
    if mgpu and (kp != key_pad(kp) or vp != key_pad(vp)):  # both head dims padded on to key_pad (zeros: exact)
        kq, vq = key_pad(kp), key_pad(vp)
        pk, pv = (lambda x: _pad_last(x, kq)), (lambda x: _pad_last(x, vq))
        dq, dk, dv, db, di, (dC0, dn0, dm0) = mlstm_bwd(
            pk(qh), pk(kh), pv(vh), bt, st, it, et, _pad_c(C0, kq, vq), pk(n0), m0, pv(do), _pad_c(dCt, kq, vq), pk(dnt),
            chunk=chunk, interpret=interpret, backend=backend)
        return dq[..., :kp], dk[..., :kp], dv[..., :vp], db, di, (dC0[..., :kp, :vp], dn0[..., :kp], dm0)
    md = vh.dtype
    do = do.astype(md)
    m_in, ew, fo, n_in, _ = chunk_stabilisers(bt, st, it, et, kh, n0, m0, c)
    tok = lambda x: jnp.repeat(x, c, axis=2)[..., None]
    col = lambda x: x[..., None]
    row = lambda x: x.reshape(b, h, n, 1, c)
    fo_t, mi_t = tok(fo), tok(m_in)
    hs_shape = jax.ShapeDtypeStruct((b, h, n, kp, vp), f32)
    blk = lambda d, rev=False: chunk_block(c, d, n if rev else None)
    rblk = pl.BlockSpec((None, None, None, 1, c), lambda i, j, l: (i, j, l, 0, 0))
    state_n = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0))
    norm_n = pl.BlockSpec((None, None, None, 1, kp), lambda i, j, l: (i, j, l, 0, 0))
    whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
    par = tpu_params(interpret, "parallel", "parallel", "parallel") if tpu else triton_params(interpret, backend, num_warps=8)
    # (1) the entering C' of every chunk
    hs, _ = chunk_states(kh, vh, ew, fo, C0, c=c, interpret=interpret, backend="mosaic_gpu" if mgpu else backend)
    if tpu:
        seq = tpu_params(interpret, "parallel", "parallel", "arbitrary")
    else:
        bv = min(vp, 64)
        full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))
        vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
        vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
        vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
        walk = walk_params(interpret, backend, kp)
    # (2) per row: the stabiliser, 1/den, dr and the readout weight (the chunk's forward again)
    ccol = jax.ShapeDtypeStruct((b, h, tp, 1), f32)
    if mgpu:  # Σ_v dO ⊙ num over every value column (XLA adds the value blocks' shares), r, m_t and ρ
        dnum, raw, m_t, rho = rows_mosaic_gpu(qh, kh, vh, do, bt, st, it, et, m_in, hs, n_in, c=c, interpret=interpret)
        mt, inv, dr, rho = (col(x) for x in _row_grads(raw, m_t, rho, dnum))
    else:
        mt, inv, dr, rho = pl.pallas_call(
            functools.partial(_rows_kernel, kt=column_tile(kp, backend), wv=column_tile(vp, backend)), grid=(b, h, n),
            in_specs=[blk(kp), blk(kp), blk(vp), blk(vp), blk(1), blk(1), blk(1), rblk, rblk, rblk, rblk, state_n, norm_n],
            out_specs=[blk(1)] * 4, out_shape=[ccol] * 4, interpret=interpret, compiler_params=par,
            name="mlstm_chunk_bwd_rows" + ("_tpu" if tpu else ""),
        )(qh, kh, vh, do, col(bt), col(st), mi_t, row(bt), row(st), row(it), row(et), hs, n_in[:, :, :, None])
    # (3) dC' after every chunk, walking backwards; dn' in XLA
    fs = rho * inv
    if tpu:
        r = blk(1, True)
        dhs, dC0 = pl.pallas_call(
            _dstates_kernel_tpu, grid=(b, h, n), in_specs=[blk(kp, True), blk(vp, True), r, r, whole],
            out_specs=[pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, n - 1 - l, 0, 0)), whole],
            out_shape=[hs_shape, jax.ShapeDtypeStruct((b, h, kp, vp), f32)],
            scratch_shapes=[pltpu.VMEM((kp, vp), f32)], interpret=interpret, compiler_params=seq,
            name="mlstm_chunk_bwd_dstates_tpu",
        )(qh, do, fs, fo_t, dCt.astype(f32))
    elif mgpu:
        dhs, dC0 = dstates_mosaic_gpu(qh, do, fs[..., 0], fo, dCt.astype(f32), c=c, interpret=interpret)
    else:
        dhs, dC0 = pl.pallas_call(
            functools.partial(_dstates_kernel, c=c, n=n), grid=(b, h, vp // bv),
            in_specs=[full(kp), vseq, full(1), full(1), vstate], out_specs=[vstates, vstate],
            out_shape=[hs_shape, jax.ShapeDtypeStruct((b, h, kp, vp), f32)], interpret=interpret,
            compiler_params=walk, name="mlstm_chunk_bwd_dstates",
        )(qh, do, fs, fo_t, dCt.astype(f32))
    r_n = jnp.einsum("bhnc,bhnck->bhnk", (rho * dr)[..., 0].reshape(b, h, n, c), qh.reshape(b, h, n, c, kp).astype(f32),
                     precision=lax.Precision.HIGHEST)

    # dn'_before = φ dn'_after + r, walking backwards: an associative scan of the affine maps
    cum_f, cum_r = lax.associative_scan(_affine, (fo, r_n), axis=2, reverse=True)
    dn_before = cum_f[..., None] * dnt.astype(f32)[:, :, None] + cum_r  # [b, h, N, K]
    dn0 = dn_before[:, :, 0]
    dn_after = jnp.concatenate([dn_before[:, :, 1:], dnt.astype(f32)[:, :, None]], axis=2)[:, :, :, None]
    dm0 = jnp.sum(dC0 * C0, axis=(2, 3)) + jnp.sum(dn0 * n0, axis=2)
    if mgpu:  # (4) on Mosaic GPU: a dq, dk, db, di kernel per (key block, value block) and a dv kernel
        return (*grads_mosaic_gpu(qh, kh, vh, do, bt, st, it, *(x[..., 0] for x in (mt, rho, inv, dr)), ew, fo, hs, dhs,
                                  n_in, dn_after[:, :, :, 0], c=c, interpret=interpret), (dC0, dn0, dm0))
    # (4) every chunk's gradients, a program per key block of 64 (Mosaic TPU: the whole key axis, as its blocks'
    # last dim must be a multiple of 128 or all of it); dv contracts over the whole key axis: the first nv of them
    # write a value block of it each
    bk = kp if tpu else min(kp, 64)
    nk = kp // bk
    nv = min(nk, max(1, vp // 64))
    bv = vp // nv
    vz = lambda z: jnp.minimum(z, nv - 1)  # the programs past nv write no dv
    kblk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, l, z: (i, j, l, 0))
    kcol = pl.BlockSpec((None, None, c, bk), lambda i, j, l, z: (i, j, l, z))
    vcol = pl.BlockSpec((None, None, c, bv), lambda i, j, l, z: (i, j, l, vz(z)))
    krow = pl.BlockSpec((None, None, None, 1, c), lambda i, j, l, z: (i, j, l, 0, 0))
    kstate = pl.BlockSpec((None, None, None, bk, vp), lambda i, j, l, z: (i, j, l, z, 0))
    vstate_n = pl.BlockSpec((None, None, None, kp, bv), lambda i, j, l, z: (i, j, l, 0, vz(z)))
    knorm = pl.BlockSpec((None, None, None, 1, bk), lambda i, j, l, z: (i, j, l, 0, z))
    kpart = pl.BlockSpec((None, None, None, c, 1), lambda i, j, l, z: (z, i, j, l, 0))
    pshape = jax.ShapeDtypeStruct((nk, b, h, tp, 1), f32)
    kernel, in_specs, args = once_on_tpu(
        # value tiles of 32 past 128: sm_90 at K = V = 256 spilled 16 B at 64, 0 at 32
        tpu, functools.partial(_grads_kernel, nv=nv, wk=column_tile(kp, backend), wv=column_tile(vp, backend, 32)),
        [kcol, kcol, kblk(vp), kblk(vp)] + [kblk(1)] * 9 + [krow] * 3 + [kstate, kstate, knorm, knorm]
        + [kblk(kp), kblk(kp), vcol, vstate_n],
        [qh, kh, vh, do, col(bt), col(st), col(it), mt, rho, inv, dr, col(ew), fo_t, row(bt), row(st), row(it),
         hs, dhs, n_in[:, :, :, None], dn_after, qh, kh, do, dhs], {20: 0, 21: 1, 22: 3, 23: 17})
    dq, dk, dv, db, di = pl.pallas_call(
        kernel, grid=(b, h, n, nk), in_specs=in_specs,
        out_specs=[kcol, kcol, vcol, kpart, kpart],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qh, kh, vh)] + [pshape, pshape],
        interpret=interpret,
        compiler_params=tpu_params(interpret, *["parallel"] * 4) if tpu
        else triton_params(interpret, backend, num_warps=8, num_stages=1),
        name="mlstm_chunk_bwd_grads" + ("_tpu" if tpu else ""),
    )(*args)
    db, di = jnp.sum(db, axis=0), jnp.sum(di, axis=0)
    return dq, dk, dv, db[..., 0], di[..., 0], (dC0, dn0, dm0)
