r"""Mosaic GPU bodies of the chunkwise mLSTM backward's chunk-parallel passes (``backward.py``, passes 2 and 4), one
warpgroup per program, the chunk's inputs TMA'd into shared memory at once (nothing is carried between chunks):

* :func:`rows_mosaic_gpu` (pass 2, the chunk's forward recomputed): grid ``(batch, head, chunk, value block of
  64)``, as the forward's output kernel (``mosaic_gpu.py``, whose :func:`~.mosaic_gpu.readout_weights` it shares):
  ``m_t``, ``D``, ``ρ`` in registers, ``Q Kᵀ`` (``Kᵀ`` a transposed view), ``num = (Q Kᵀ ⊙ D) V + ρ ⊙ Q C'`` and the
  raw normaliser ``r``; it writes each row's ``Σ_v dO ⊙ num`` over its value block beside ``r, m_t, ρ``. The
  value blocks' shares of ``Σ_v dO ⊙ num`` add up in XLA, where ``1/den`` and ``dr`` follow elementwise
  (``backward._row_grads``). The float32 ``C'`` block is copied to a bf16 operand in shared memory.
* :func:`grads_mosaic_gpu` (pass 4), two kernels, as the Triton body's two parts:

  - grid ``(batch, head, chunk, key block of 64 × value block of up to 128)``: the value block's share of the key
    block's ``dq, dk`` and of ``db, di`` (``backward._chunk_grads``, term for term). Every output is linear in the
    contractions over the value axis (``dO Vᵀ``, its diagonal, ``dO Sᵀ``, ``V dS'ᵀ``, ``⟨S, dS'⟩``), so the value
    blocks' shares add up to it in XLA; the normaliser's column (``dr``, ``dn'``) is one more value column, taken by
    the first value block's share only. ``dnum = dO / den`` is never formed: ``1/den`` scales the rows of the
    products. The masked, decayed ``dA = [s < t] (dnum Vᵀ + dr) ⊙ D`` goes to shared memory as the operand of
    ``dQ = dA K`` and, through a transposed view, of ``dK = dAᵀ Q``. ``db`` leaves out the diagonal of
    ``M = dP ⊙ Q Kᵀ ⊙ D`` and the last token's own write on both sides, as ``backward.py`` states; the carry's
    normaliser part ``φ ⟨n', dn'⁺⟩`` at the chunk's last token is added in XLA.
  - grid ``(batch, head, chunk, value block of 64)``: ``dv = (Q Kᵀ ⊙ D)ᵀ dnum + ε ⊙ K dS'`` (``backward._chunk_dv``),
    the transposed intra-chunk matrix formed directly as ``(K Qᵀ) ⊙ Dᵀ`` with ``1/den`` folded into its columns.

``dq, dk`` are written in the input dtype up to value dims of 128 (one value block), as float32 shares past it.
Shared memory at head dims of 256 (the largest): the rows kernel 179 KiB, the first gradient kernel 187 KiB (value
blocks of 128, float32 ``dq, dk`` shares), the ``dv`` kernel 186 KiB (float32 ``v``; 178 at bf16); an H100/H200
block may have 227. Both head dims are padded to :func:`~pallas_kernels._mosaic_gpu.key_pad` and ``C`` is a
multiple of 64; matmul operands are bf16 with float32 accumulation. Under Mosaic GPU's interpreter the transposed
operands and the register operands of ``wgmma`` are staged through shared memory, as in ``mosaic_gpu.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic_gpu import (
    BF16,
    BV,
    F32,
    SMEM_LIMIT,
    WG,
    block_program,
    copy_in,
    iota,
    kernel,
    key_pad,
    loader,
    mma,
    operand_copy,
    smem,
    smem_bytes,
    transposed,
)
from pallas_kernels.mlstm_chunk.mosaic_gpu import readout_gates, readout_weights

__all__ = ["GRADS_V_BLOCK", "grads_mosaic_gpu", "rows_mosaic_gpu"]

#: The value columns a program of the ``dq, dk, db, di`` kernel takes (its ``v, dO`` and its key block's ``S, dS'``
#: rows over them sit in shared memory: 187 KiB at 128).
GRADS_V_BLOCK = 128
_NEG = -1e30  # forward.NEG
# the rows of the gradient kernels' gates, [b, h, 9, Tp]
_B, _SEG, _I, _MT, _RHO, _INV, _DR, _EW, _FO = range(9)


def _check(kp, vp, chunk):
    if chunk % 64 or kp != key_pad(kp) or vp != key_pad(vp):
        raise ValueError(f"the Mosaic GPU mLSTM backward needs chunk a multiple of 64 and head dims padded to key_pad "
                         f"(a power of two >= 64), got chunk {chunk}, key dim {kp}, value dim {vp}")


def _staged(x, x_smem, interpret):
    """A bf16 register array as ``wgmma``'s left operand: itself, or (the interpreter's ``wgmma`` takes shared memory
    only) a committed copy in ``x_smem``."""
    if not interpret:
        return x
    x_smem[...] = x
    plgpu.commit_smem()
    return x_smem


# ----------------------------------------------------------------------------- pass 2: the rows


def _rows_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, hs_ref, n_ref, out_ref, q_smem, k_smem, v_smem, do_smem, s32_smem,
                 n_smem, g_smem, sb_smem, o_smem, kt_smem, att_smem, bars, *, chunk, interpret):
    c = chunk
    kp = q_smem.shape[-1]
    load = loader(interpret)
    ib, ih, il, iv = (lax.axis_index(a) for a in ("b", "h", "n", "v"))
    rows, cols = pl.ds(il * c, c), pl.ds(iv * BV, BV)
    copy_in(bars, 0, (q_ref.at[ib, ih, rows], q_smem), (k_ref.at[ib, ih, rows], k_smem),
            (v_ref.at[ib, ih, rows, cols], v_smem), (do_ref.at[ib, ih, rows, cols], do_smem),
            (hs_ref.at[ib, ih, il, :, cols], s32_smem), (n_ref.at[ib, ih, il], n_smem), (g_ref.at[ib, ih, :, rows], g_smem))
    operand_copy(s32_smem, sb_smem, interpret)
    kt = transposed(k_smem, kt_smem, interpret)
    plgpu.commit_smem()
    d, m_t, rho = readout_weights(g_smem, c, interpret)
    att = mma(q_smem, kt, (c, c)) * d
    qn = jnp.sum(load(q_smem, WG).astype(F32) * lax.broadcast_in_dim(load(n_smem, WG.reduce(0)), (c, kp), [1]), axis=1)
    raw = jnp.sum(att, axis=1) + rho * qn
    att = _staged(att.astype(v_smem.dtype), att_smem, interpret)
    num = mma(att, v_smem, (c, BV)) + mma(q_smem, sb_smem, (c, BV)) * lax.broadcast_in_dim(rho, (c, BV), [0])
    o_smem.at[0][...] = jnp.sum(load(do_smem, WG).astype(F32) * num, axis=1)  # Σ_v dO ⊙ num over this value block
    o_smem.at[1][...] = raw
    o_smem.at[2][...] = m_t
    o_smem.at[3][...] = rho
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[iv, ib, ih, :, rows])
    plgpu.wait_smem_to_gmem(0)


def rows_mosaic_gpu(qh, kh, vh, do, bt, st, it, et, m_in, hs, n_in, *, c, interpret=False):
    """Pass 2 on Mosaic GPU: heads-first ``qh, kh [b, h, Tp, Kp]``, ``vh, do [b, h, Tp, Vp]`` (head dims padded to
    ``key_pad``), gates ``b, seg, i, e [b, h, Tp]``, entering stabilisers ``m [b, h, N]``, the entering states
    ``C' [b, h, N, Kp, Vp]`` (float32) and normalisers ``n' [b, h, N, Kp]``. Returns ``(Σ_v dO ⊙ num, r, m_t, ρ)``,
    each ``[b, h, Tp]`` float32."""
    b, h, tp, kp = qh.shape
    vp, n = vh.shape[-1], tp // c
    _check(kp, vp, c)
    interp = bool(interpret)
    nv = vp // BV
    sm = functools.partial(smem, plain=interp)
    buffers = [sm((c, kp)), sm((c, kp)), sm((c, BV)), sm((c, BV)), sm((kp, BV), F32), plgpu.SMEM((kp,), F32),
               plgpu.SMEM((5, c), F32), sm((kp, BV)), plgpu.SMEM((4, c), F32)]
    assert interp or smem_bytes(buffers) <= SMEM_LIMIT, smem_bytes(buffers)  # 179 KiB at Kp = 256
    scratch = [*buffers, sm((kp, c)) if interp else None, sm((c, c)) if interp else None, plgpu.Barrier(num_barriers=7)]
    out = jax.ShapeDtypeStruct((nv, b, h, 4, tp), F32)
    call = kernel(functools.partial(_rows_kernel, chunk=c, interpret=interp), out, scratch, (b, h, n, nv),
                  ("b", "h", "n", "v"), interp)
    out = call(qh.astype(BF16), kh.astype(BF16), vh.astype(BF16), do.astype(BF16), readout_gates(bt, st, it, et, m_in, c),
               hs.astype(F32), n_in.astype(F32))
    return jnp.sum(out[:, :, :, 0], axis=0), out[0, :, :, 1], out[0, :, :, 2], out[0, :, :, 3]


# ----------------------------------------------------------------------------- pass 4: the chunk gradients


def _decay(g_smem, c, interpret, *, transpose=False):
    """``D_ts = [s ≤ t, seg_s = seg_t] e^{b_t − b_s + i_s − m_t}`` ``[C, C]`` from the gradient gates (``m_t`` from
    pass 2); ``transpose``: ``Dᵀ``, rows the key ``s``. Returns ``D`` and the index helper."""
    load = loader(interpret)
    idx = iota(c, interpret)
    qd, kd = (1, 0) if transpose else (0, 1)  # the axes of the query t and the key s
    vec = lambda i, d: lax.broadcast_in_dim(load(g_smem.at[i], WG.reduce(1 - d)), (c, c), [d])
    ok = (idx(qd) >= idx(kd)) & (vec(_SEG, qd) == vec(_SEG, kd))
    return jnp.exp(jnp.where(ok, vec(_B, qd) - vec(_B, kd) + vec(_I, kd), _NEG) - vec(_MT, qd)), idx


def _grads_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, h_ref, dh_ref, n_ref, dn_ref, dq_ref, dk_ref, db_ref, di_ref,
                  q_smem, k_smem, v_smem, do_smem, s32_smem, ds32_smem, g_smem, n_smem, dn_smem, sb_smem, dsb_smem,
                  da_smem, dq_smem, dk_smem, db_smem, di_smem, vt_smem, st_smem, dst_smem, dat_smem, bars, *, chunk, nv,
                  interpret):
    """One chunk, one key block of 64 and one value block of ``V / nv`` columns per program (grid ``(batch, head,
    chunk, key block · nv + value block)``): that value block's share of ``dq, dk`` of the key block and of
    ``db, di`` (``backward._chunk_grads``, term for term)."""
    c, bk = chunk, 64
    bv = v_smem.shape[1]
    load = loader(interpret)
    ib, ih, n, z, rows, kcols, vcols = block_program(c, bk, bv, nv)
    vb = z % nv
    copy_in(bars, 0, (q_ref.at[ib, ih, rows, kcols], q_smem), (k_ref.at[ib, ih, rows, kcols], k_smem),
            (v_ref.at[ib, ih, rows, vcols], v_smem), (do_ref.at[ib, ih, rows, vcols], do_smem),
            (h_ref.at[ib, ih, n, kcols, vcols], s32_smem), (dh_ref.at[ib, ih, n, kcols, vcols], ds32_smem),
            (g_ref.at[ib, ih, :, rows], g_smem), (n_ref.at[ib, ih, n, kcols], n_smem), (dn_ref.at[ib, ih, n, kcols], dn_smem))
    s, ds = operand_copy(s32_smem, sb_smem, interpret), operand_copy(ds32_smem, dsb_smem, interpret)
    carry = jnp.sum(jnp.sum(s * ds, axis=1), axis=0)  # ⟨S, dS'⟩ over this key block's rows and value block's columns
    col = lambda i: load(g_smem.at[i], WG.reduce(1))  # [C], indexed by the row t
    first = jnp.where(vb == 0, 1.0, 0.0)  # the normaliser's column: in the first value block's share only
    inv, dr = col(_INV), col(_DR) * first
    diag = inv * jnp.sum(load(do_smem, WG).astype(F32) * load(v_smem, WG).astype(F32), axis=1)  # Σ_v dnum ⊙ v
    vt, st, dst = (transposed(x, xt, interpret) for x, xt in ((v_smem, vt_smem), (sb_smem, st_smem), (dsb_smem, dst_smem)))
    plgpu.commit_smem()
    cc = lambda x: lax.broadcast_in_dim(x, (c, c), [0])
    d, idx = _decay(g_smem, c, interpret)
    dp = cc(inv) * mma(do_smem, vt, (c, c)) + cc(dr)  # dnum Vᵀ + dr 1ᵀ
    da_smem[...] = jnp.where(idx(0) > idx(1), dp * d, 0.0).astype(da_smem.dtype)  # strictly below the diagonal
    dos, vds = mma(do_smem, st, (c, bk)), mma(v_smem, dst, (c, bk))  # dO Sᵀ, V dS'ᵀ
    dat = transposed(da_smem, dat_smem, interpret)
    plgpu.commit_smem()
    dq_in, dk_in = mma(da_smem, k_smem, (c, bk)), mma(dat, q_smem, (c, bk))
    qf, kf = load(q_smem, WG).astype(F32), load(k_smem, WG).astype(F32)
    cb = lambda x: lax.broadcast_in_dim(x, (c, bk), [0])
    rb = lambda ref: lax.broadcast_in_dim(load(ref, WG.reduce(0)) * first, (c, bk), [1])  # n', dn'⁺ of the key block
    dd = (diag + dr) * jnp.exp(jnp.minimum(col(_I) - col(_MT), 0.0))  # the diagonal of dP ⊙ D
    dq_rd = cb(col(_RHO)) * (cb(inv) * dos + cb(dr) * rb(n_smem))
    dk_wr = cb(col(_EW)) * (vds + rb(dn_smem))
    dq_smem[...] = (dq_in + cb(dd) * kf + dq_rd).astype(dq_smem.dtype)
    dk_smem[...] = (dk_in + cb(dd) * qf + dk_wr).astype(dk_smem.dtype)
    col_m, k_wr = jnp.sum(kf * dk_in, axis=1), jnp.sum(kf * dk_wr, axis=1)
    last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1 if interpret else (
        plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=WG.reduce(1)) == c - 1)
    writes = jnp.where(last, 0.0, k_wr)  # the last token's own write cancels against the carry
    end = g_smem[_FO, c - 1] * carry + jnp.sum(writes)
    db_smem[...] = jnp.sum(qf * (dq_in + dq_rd), axis=1) - col_m - writes + jnp.where(last, end, 0.0)
    di_smem[...] = col_m + dd * jnp.sum(qf * kf, axis=1) + k_wr
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[vb, ib, ih, rows, kcols])
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[vb, ib, ih, rows, kcols])
    plgpu.copy_smem_to_gmem(db_smem, db_ref.at[z, ib, ih, rows])
    plgpu.copy_smem_to_gmem(di_smem, di_ref.at[z, ib, ih, rows])
    plgpu.wait_smem_to_gmem(0)


def _dv_kernel(q_ref, k_ref, do_ref, g_ref, dh_ref, dv_ref, q_smem, k_smem, do_smem, ds32_smem, g_smem, dsb_smem,
               dv_smem, qt_smem, att_smem, bars, *, chunk, bv, interpret):
    """One chunk and one block of ``bv`` value columns per program: ``dv = (Q Kᵀ ⊙ D)ᵀ dnum + ε ⊙ K dS'``
    (``backward._chunk_dv``), the transposed intra-chunk matrix formed directly as ``(K Qᵀ) ⊙ Dᵀ``, with ``1/den`` (of
    the query ``t``, its columns) folded in so that ``dO`` is the right operand as it is."""
    c = chunk
    load = loader(interpret)
    ib, ih, n, iv = (lax.axis_index(a) for a in ("b", "h", "n", "v"))
    rows, vcols = pl.ds(n * c, c), pl.ds(iv * bv, bv)
    copy_in(bars, 0, (q_ref.at[ib, ih, rows], q_smem), (k_ref.at[ib, ih, rows], k_smem),
            (do_ref.at[ib, ih, rows, vcols], do_smem), (dh_ref.at[ib, ih, n, :, vcols], ds32_smem),
            (g_ref.at[ib, ih, :, rows], g_smem))
    operand_copy(ds32_smem, dsb_smem, interpret)
    qt = transposed(q_smem, qt_smem, interpret)
    plgpu.commit_smem()
    dec_t, _ = _decay(g_smem, c, interpret, transpose=True)
    inv_t = lax.broadcast_in_dim(load(g_smem.at[_INV], WG.reduce(0)), (c, c), [1])
    att_t = _staged((mma(k_smem, qt, (c, c)) * (dec_t * inv_t)).astype(k_smem.dtype), att_smem, interpret)
    kds = mma(k_smem, dsb_smem, (c, bv))
    dv = mma(att_t, do_smem, (c, bv)) + lax.broadcast_in_dim(load(g_smem.at[_EW], WG.reduce(1)), (c, bv), [0]) * kds
    dv_smem[...] = dv.astype(dv_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[ib, ih, rows, vcols])
    plgpu.wait_smem_to_gmem(0)


def grads_mosaic_gpu(qh, kh, vh, do, bt, st, it, mt, rho, inv, dr, ew, fo, hs, dhs, n_in, dn_after, *, c,
                     interpret=False):
    """Pass 4 on Mosaic GPU: every chunk's ``dq, dk, dv`` and log-gate gradients. Heads-first ``qh, kh [b, h, Tp, Kp]``,
    ``vh, do [b, h, Tp, Vp]`` (head dims padded to ``key_pad``); per row ``[b, h, Tp]``: gates ``b, seg, i``, pass 2's
    ``m_t, ρ, 1/den, dr`` and the write weights ``ε``; carries ``φ [b, h, N]``; the states before and state gradients
    after every chunk ``C', dC' [b, h, N, Kp, Vp]`` (float32), likewise ``n', dn' [b, h, N, Kp]``. Two kernels (module
    docstring). Returns ``dq, dk, dv`` in the input dtypes and ``db, di [b, h, Tp]`` float32."""
    b, h, tp, kp = qh.shape
    vp, n = vh.shape[-1], tp // c
    _check(kp, vp, c)
    interp = bool(interpret)
    nk, vb = kp // 64, min(vp, GRADS_V_BLOCK)
    nv = vp // vb
    dts = qh.dtype if nv == 1 else F32  # the shares of dq, dk: summed in float32 past one value block
    gates = jnp.stack([bt, st, it, mt, rho, inv, dr, ew, jnp.repeat(fo, c, axis=2)], axis=2).astype(F32)
    q, k, v, dob = (x.astype(BF16) for x in (qh, kh, vh, do))
    hs, dhs = hs.astype(F32), dhs.astype(F32)
    sm = functools.partial(smem, plain=interp)
    f32 = lambda *shape: plgpu.SMEM(shape, F32)
    stage = lambda shape: sm(shape) if interp else None  # the interpreter's transposed and register operands
    buffers = [sm((c, 64)), sm((c, 64)), sm((c, vb)), sm((c, vb)), sm((64, vb), F32), sm((64, vb), F32), f32(9, c),
               f32(64), f32(64), sm((64, vb)), sm((64, vb)), sm((c, c)), sm((c, 64), dts), sm((c, 64), dts), f32(c), f32(c)]
    assert interp or smem_bytes(buffers) <= SMEM_LIMIT, smem_bytes(buffers)  # 187 KiB at value blocks of 128
    scratch = [*buffers, stage((vb, c)), stage((vb, 64)), stage((vb, 64)), stage((c, c)), plgpu.Barrier(num_barriers=9)]
    part = jax.ShapeDtypeStruct((nk * nv, b, h, tp), F32)
    out = [jax.ShapeDtypeStruct((nv, *qh.shape), dts), jax.ShapeDtypeStruct((nv, *kh.shape), dts), part, part]
    grads = kernel(functools.partial(_grads_kernel, chunk=c, nv=nv, interpret=interp), out, scratch, (b, h, n, nk * nv),
                   ("b", "h", "n", "kv"), interp)
    dq, dk, db, di = grads(q, k, v, dob, gates, hs, dhs, n_in.astype(F32), dn_after.astype(F32))
    buffers = [sm((c, kp)), sm((c, kp)), sm((c, BV)), sm((kp, BV), F32), f32(9, c), sm((kp, BV)), sm((c, BV), vh.dtype)]
    assert interp or smem_bytes(buffers) <= SMEM_LIMIT, smem_bytes(buffers)  # 186 KiB at Kp = 256, float32 v
    scratch = [*buffers, stage((kp, c)), stage((c, c)), plgpu.Barrier(num_barriers=5)]
    dv = kernel(functools.partial(_dv_kernel, chunk=c, bv=BV, interpret=interp), jax.ShapeDtypeStruct(vh.shape, vh.dtype),
                scratch, (b, h, n, vp // BV), ("b", "h", "n", "v"), interp)(q, k, dob, gates, dhs)
    # the carry's normaliser part, φ ⟨n', dn'⁺⟩, at each chunk's last token
    nd = fo * jnp.einsum("bhnk,bhnk->bhn", n_in.astype(F32), dn_after.astype(F32), precision=lax.Precision.HIGHEST)
    db = jnp.sum(db, axis=0).reshape(b, h, n, c).at[..., c - 1].add(nd).reshape(b, h, tp)
    dq, dk = (jnp.sum(x, axis=0).astype(qh.dtype) for x in (dq, dk))
    return dq, dk, dv, db, jnp.sum(di, axis=0)
