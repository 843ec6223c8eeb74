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
(3) Pallas, ``dC'`` after every chunk walking backwards (``dn'`` in XLA); (4) Pallas, chunk-parallel:
``dq, dk, dv, db, di``. Triton walks (1) and (3) per (batch, head, value block of 64); Mosaic TPU runs
one chunk per grid step with the state in VMEM scratch; the per-chunk math is shared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._util import chunk_block, tpu_params, triton_params

f32 = jnp.float32
NEG = -1e30
_NN = (((1,), (0,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def _mm(x, y, dims=_NN):
    return lax.dot_general(x, y, dims, preferred_element_type=f32)


def _rsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _last(x):
    """The last row of a column ``[C, 1]`` as ``[1, 1]``."""
    c = x.shape[0]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1, x, 0.0), axis=0, keepdims=True)


def _weights(bc, sc, ic, br, sr, ir, er, m_in):
    """``D [C, C]``, the row stabilisers ``m_t`` and readout ``ρ`` ``[C, 1]`` as the forward computes them."""
    c = bc.shape[0]
    ok = (lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (sc == sr)
    diff = bc - br
    m_intra = jnp.max(jnp.where(ok, diff + er, NEG), axis=1, keepdims=True)
    inter = jnp.where(sc == 0.0, bc + m_in, NEG)
    m_t = jnp.maximum(m_intra, inter)
    return jnp.exp(jnp.where(ok, diff + ir, NEG) - m_t), m_t, jnp.exp(inter - m_t)


def _state_step(k, v, ew, fo, s):
    """``C'⁺ = φ C' + (K ⊙ ε)ᵀ V`` (``φ`` broadcast over the chunk's tokens; its last row is used)."""
    return _last(fo) * s + _mm((k.astype(f32) * ew).astype(v.dtype), v, _TN)


def _dstate_step(q, do, fs, fo, ds):
    """``dC' = φ dC'⁺ + (Q ⊙ ρ / den)ᵀ dh``."""
    return _last(fo) * ds + _mm((q.astype(f32) * fs).astype(do.dtype), do, _TN)


def _rows(q, k, v, do, bc, sc, ic, br, sr, ir, er, m_in, s, nv):
    """Pass 2, one chunk: ``(m_t, 1/den, dr, ρ)`` columns ``[C, 1]``; ``s [K, V]``, ``nv [1, K]`` entering."""
    md = v.dtype
    d, m_t, rho = _weights(bc, sc, ic, br, sr, ir, er, m_in)
    att = _mm(q, k, _NT) * d
    qf = q.astype(f32)
    num = _mm(att.astype(md), v) + rho * _mm(q, s.astype(md))
    raw = _rsum(att) + rho * _rsum(qf * nv)
    floor = jnp.exp(-m_t)
    den = jnp.maximum(jnp.abs(raw), floor)
    inv = 1.0 / den
    sign = jnp.where(raw < 0.0, -1.0, 1.0)  # not jnp.sign: its Mosaic lowering asks which TPU it runs on
    dr = jnp.where(jnp.abs(raw) >= floor, -sign * inv * inv * _rsum(do.astype(f32) * num), 0.0)
    return m_t, inv, dr, rho


def _chunk_grads(q, k, v, do, bc, sc, ic, mt, rho, inv, dr, ew, fo, br, sr, ir, s, ds, nv, dnv):
    """Pass 4, one chunk (module docstring). Columns ``[C, 1]``: gates ``b, seg, i``, the row stabiliser
    ``m_t``, ``ρ``, ``1/den``, ``dr``, the write weights ``ε`` and the carry ``φ``; rows ``[1, C]``:
    ``b, seg, i``; ``s, ds [K, V]`` the state before the chunk and the gradient after it, ``nv, dnv [1, K]``
    likewise for the normaliser. Returns float32 ``dq, dk [C, K]``, ``dv [C, V]``, ``db, di [C, 1]``."""
    md = v.dtype
    c = q.shape[0]
    ok = (lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (sc == sr)
    strict = lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(jnp.int32, (c, c), 1)
    d = jnp.exp(jnp.where(ok, bc - br + ir, NEG) - mt)
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    dnum = do.astype(f32) * inv
    dnm, sm, dsm = dnum.astype(md), s.astype(md), ds.astype(md)
    att = _mm(q, k, _NT) * d
    da = jnp.where(strict, (_mm(dnm, v, _NT) + dr) * d, 0.0).astype(md)
    dd = (_rsum(dnum * vf) + dr) * jnp.exp(jnp.minimum(ic - mt, 0.0))  # the diagonal of dP ⊙ D
    dq_in, dk_in = _mm(da, k), _mm(da, q, _TN)
    dq_rd = rho * (_mm(dnm, sm, _NT) + dr * nv)
    dk_wr = ew * (_mm(v, dsm, _NT) + dnv)
    dq = dq_in + dd * kf + dq_rd
    dk = dk_in + dd * qf + dk_wr
    dv = _mm(att.astype(md), dnm, _TN) + ew * _mm(k, dsm)
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    writes = jnp.where(is_last, 0.0, _rsum(kf * dk_wr))  # the last token's own write cancels against the carry
    carry = jnp.sum(_rsum(s * ds), axis=0, keepdims=True) + jnp.sum(nv * dnv, axis=1, keepdims=True)
    end = _last(fo) * carry + jnp.sum(writes, axis=0, keepdims=True)
    col_m = _rsum(kf * dk_in)
    db = _rsum(qf * dq_in) - col_m + _rsum(qf * dq_rd) - writes + jnp.where(is_last, end, 0.0)
    di = col_m + dd * _rsum(qf * kf) + _rsum(kf * dk_wr)
    return dq, dk, dv, db, di


# ----------------------------------------------------------------------------- kernels


def _states_kernel(k_ref, v_ref, ew_ref, fo_ref, h0_ref, hs_ref, *, c, n):
    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        hs_ref[i] = s
        return _state_step(k_ref[sl, :], v_ref[sl, :], ew_ref[sl, :], fo_ref[sl, :], s)

    lax.fori_loop(0, n, body, h0_ref[...])


def _dstates_kernel(q_ref, do_ref, fs_ref, fo_ref, dht_ref, dhs_ref, dh0_ref, *, c, n):
    def body(j, ds):
        i = n - 1 - j
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        dhs_ref[i] = ds
        return _dstate_step(q_ref[sl, :], do_ref[sl, :], fs_ref[sl, :], fo_ref[sl, :], ds)

    dh0_ref[...] = lax.fori_loop(0, n, body, dht_ref[...])


def _states_kernel_tpu(k_ref, v_ref, ew_ref, fo_ref, h0_ref, hs_ref, s_scr):
    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = h0_ref[...]

    s = s_scr[...]
    hs_ref[...] = s
    s_scr[...] = _state_step(k_ref[...], v_ref[...], ew_ref[...], fo_ref[...], s)


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


def _rows_kernel(q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, ic_ref, mi_ref, br_ref, sr_ref, ir_ref, er_ref, s_ref,
                 n_ref, mt_ref, inv_ref, dr_ref, rho_ref):
    out = _rows(q_ref[...], k_ref[...], v_ref[...], do_ref[...], bc_ref[...], sc_ref[...], ic_ref[...], br_ref[...],
                sr_ref[...], ir_ref[...], er_ref[...], _last(mi_ref[...]), s_ref[...], n_ref[...])
    for ref, val in zip((mt_ref, inv_ref, dr_ref, rho_ref), out):
        ref[...] = val


def _grads_kernel(q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, ic_ref, mt_ref, rho_ref, inv_ref, dr_ref, ew_ref, fo_ref,
                  br_ref, sr_ref, ir_ref, s_ref, ds_ref, n_ref, dn_ref, dq_ref, dk_ref, dv_ref, db_ref, di_ref):
    out = _chunk_grads(*(r[...] for r in (q_ref, k_ref, v_ref, do_ref, bc_ref, sc_ref, ic_ref, mt_ref, rho_ref, inv_ref,
                                          dr_ref, ew_ref, fo_ref, br_ref, sr_ref, ir_ref, s_ref, ds_ref, n_ref, dn_ref)))
    for ref, val in zip((dq_ref, dk_ref, dv_ref, db_ref, di_ref), out):
        ref[...] = val.astype(ref.dtype)


# ----------------------------------------------------------------------------- driver


def _chunk_stabilisers(bt, st, it, et, kh, n0, m0, c):
    """XLA: per chunk the entering ``m``, the write weights ``ε [b, h, Tp]``, the carry ``φ [b, h, N]``,
    the exiting ``m⁺`` and the entering normaliser ``n' [b, h, N, K]``."""
    b, h, tp = bt.shape
    n = tp // c
    ch = lambda x: x.reshape(b, h, n, c)  # noqa: E731
    bb, ss, ii, ee = ch(bt), ch(st), ch(it), ch(et)
    b_end, s_end = bb[..., -1:], ss[..., -1:]
    live = ss == s_end
    m_loc = jnp.max(jnp.where(live, b_end - bb + ee, NEG), axis=-1)
    a = jnp.where(s_end[..., 0] == 0.0, b_end[..., 0], NEG)

    def step(m, xs):
        a_n, ml_n = xs
        m_new = jnp.maximum(a_n + m, ml_n)
        return m_new, (m, m_new)

    _, (m_in, m_out) = lax.scan(step, m0, (jnp.moveaxis(a, 2, 0), jnp.moveaxis(m_loc, 2, 0)))
    m_in, m_out = jnp.moveaxis(m_in, 0, 2), jnp.moveaxis(m_out, 0, 2)  # [b, h, N]
    fo = jnp.exp(a + m_in - m_out)
    ew = jnp.where(live, jnp.exp(jnp.minimum(b_end - bb + ii - m_out[..., None], 0.0)), 0.0)
    n_loc = jnp.einsum("bhnc,bhnck->bhnk", ew, kh.reshape(b, h, n, c, -1).astype(f32))

    def nstep(nv, xs):
        fo_n, nl_n = xs
        return fo_n[..., None] * nv + nl_n, nv

    _, n_in = lax.scan(nstep, n0, (jnp.moveaxis(fo, 2, 0), jnp.moveaxis(n_loc, 2, 0)))
    return m_in, ew.reshape(b, h, tp), fo, jnp.moveaxis(n_in, 0, 2)


def mlstm_bwd(qh, kh, vh, bt, st, it, et, C0, n0, m0, do, dCt, dnt, *, chunk, interpret, backend):
    """Gradients of ``kernel._core`` on its prepared heads-first inputs (``q, k [b, h, Tp, Kp]``,
    ``v [b, h, Tp, Vp]``, gates ``[b, h, Tp]``, state ``C0 [b, h, Kp, Vp], n0 [b, h, Kp], m0 [b, h]``) for
    the cotangents of ``o`` and of the final ``(C', n')``. Returns ``dq, dk, dv`` (input dtypes),
    ``db, di [b, h, Tp]`` and ``(dC0, dn0, dm0)``."""
    b, h, tp, kp = qh.shape
    vp, c = vh.shape[-1], chunk
    n = tp // c
    tpu = backend == "mosaic_tpu"
    md = vh.dtype
    do = do.astype(md)
    m_in, ew, fo, n_in = _chunk_stabilisers(bt, st, it, et, kh, n0, m0, c)
    tok = lambda x: jnp.repeat(x, c, axis=2)[..., None]  # noqa: E731  a per-chunk scalar on each of its tokens
    col = lambda x: x[..., None]  # noqa: E731
    row = lambda x: x.reshape(b, h, n, 1, c)  # noqa: E731
    fo_t, mi_t = tok(fo), tok(m_in)
    hs_shape = jax.ShapeDtypeStruct((b, h, n, kp, vp), f32)
    blk = lambda d, rev=False: chunk_block(c, d, n if rev else None)  # noqa: E731  reversed: the backward walk
    rblk = pl.BlockSpec((None, None, None, 1, c), lambda i, j, l: (i, j, l, 0, 0))
    state_n = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0))
    norm_n = pl.BlockSpec((None, None, None, 1, kp), lambda i, j, l: (i, j, l, 0, 0))
    whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
    par = tpu_params(interpret, "parallel", "parallel", "parallel") if tpu else triton_params(interpret, backend)
    # (1) the entering C' of every chunk
    if tpu:
        from jax.experimental.pallas import tpu as pltpu

        seq = tpu_params(interpret, "parallel", "parallel", "arbitrary")
        hs = pl.pallas_call(
            _states_kernel_tpu, grid=(b, h, n), in_specs=[blk(kp), blk(vp), blk(1), blk(1), whole],
            out_specs=state_n, out_shape=hs_shape, scratch_shapes=[pltpu.VMEM((kp, vp), f32)],
            interpret=interpret, compiler_params=seq, name="mlstm_chunk_bwd_states_tpu",
        )(kh, vh, col(ew), fo_t, C0)
    else:
        bv = min(vp, 64)
        full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))  # noqa: E731
        vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
        vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
        vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
        walk = triton_params(interpret, backend)
        hs = pl.pallas_call(
            functools.partial(_states_kernel, c=c, n=n), grid=(b, h, vp // bv),
            in_specs=[full(kp), vseq, full(1), full(1), vstate], out_specs=vstates, out_shape=hs_shape,
            interpret=interpret, compiler_params=walk, name="mlstm_chunk_bwd_states",
        )(kh, vh, col(ew), fo_t, C0)
    # (2) per row: the stabiliser, 1/den, dr and the readout weight (the chunk's forward again)
    ccol = jax.ShapeDtypeStruct((b, h, tp, 1), f32)
    mt, inv, dr, rho = pl.pallas_call(
        _rows_kernel, grid=(b, h, n),
        in_specs=[blk(kp), blk(kp), blk(vp), blk(vp), blk(1), blk(1), blk(1), blk(1), rblk, rblk, rblk, rblk,
                  state_n, norm_n],
        out_specs=[blk(1)] * 4, out_shape=[ccol] * 4, interpret=interpret, compiler_params=par,
        name="mlstm_chunk_bwd_rows" + ("_tpu" if tpu else ""),
    )(qh, kh, vh, do, col(bt), col(st), col(it), mi_t, row(bt), row(st), row(it), row(et), hs, n_in[:, :, :, None])
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
    else:
        dhs, dC0 = pl.pallas_call(
            functools.partial(_dstates_kernel, c=c, n=n), grid=(b, h, vp // bv),
            in_specs=[full(kp), vseq, full(1), full(1), vstate], out_specs=[vstates, vstate],
            out_shape=[hs_shape, jax.ShapeDtypeStruct((b, h, kp, vp), f32)], interpret=interpret,
            compiler_params=walk, name="mlstm_chunk_bwd_dstates",
        )(qh, do, fs, fo_t, dCt.astype(f32))
    r_n = jnp.einsum("bhnc,bhnck->bhnk", (rho * dr)[..., 0].reshape(b, h, n, c), qh.reshape(b, h, n, c, kp).astype(f32))

    def dnstep(dn, xs):  # dn: the gradient of n' after the chunk; returns the one before it
        fo_n, r = xs
        return fo_n[..., None] * dn + r, dn

    dn0, dn_after = lax.scan(dnstep, dnt.astype(f32), (jnp.moveaxis(fo, 2, 0), jnp.moveaxis(r_n, 2, 0)), reverse=True)
    dn_after = jnp.moveaxis(dn_after, 0, 2)[:, :, :, None]  # [b, h, N, 1, K]
    # (4) every chunk's gradients
    dq, dk, dv, db, di = pl.pallas_call(
        _grads_kernel, grid=(b, h, n),
        in_specs=[blk(kp), blk(kp), blk(vp), blk(vp)] + [blk(1)] * 9 + [rblk] * 3 + [state_n, state_n, norm_n, norm_n],
        out_specs=[blk(kp), blk(kp), blk(vp), blk(1), blk(1)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qh, kh, vh)] + [ccol, ccol],
        interpret=interpret, compiler_params=par, name="mlstm_chunk_bwd_grads" + ("_tpu" if tpu else ""),
    )(qh, kh, vh, do, col(bt), col(st), col(it), mt, rho, inv, dr, col(ew), fo_t, row(bt), row(st), row(it),
      hs, dhs, n_in[:, :, :, None], dn_after)
    dm0 = jnp.sum(dC0 * C0, axis=(2, 3)) + jnp.sum(dn0 * n0, axis=2)
    return dq, dk, dv, db[..., 0], di[..., 0], (dC0, dn0, dm0)
