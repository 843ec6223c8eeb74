r"""Mosaic GPU bodies of the per-head GLA backward: its two serial passes (``backward.py``'s ``_states`` and
``_dstates``) and its chunk-parallel gradients (``_chunk_grads`` and ``_chunk_dv``).

Both passes are the same walk over the chunks, one forwards and one backwards, each a rank-``C`` update of a
float32 ``[Kp, 64]`` carry per chunk (gates as in ``backward.py``: ``f^s, f^e, a`` from ``b, seg, p``):

* the chunk states, forwards: ``H_n = S`` (the state *before* chunk ``n``), then ``S ← a S + Kᵀ (V ⊙ f^e)``;
* the state gradients, backwards: ``dH_n = dS`` (the gradient of the state *after* chunk ``n``), then
  ``dS ← a dS + Qᵀ (dO ⊙ f^s)``; the carry left at the start is ``dh0``.

Both are :func:`~pallas_kernels._mosaic_gpu.linear_walk` (grid, layouts and the interpreter's staging are stated
there), on the time-major arrays ``[b, Tp, h, d]`` in place; the per-row weights ``f^e, f^s`` and the per-chunk
carry ``a`` are elementwise in XLA. ``H`` and ``dH`` are written float32: the chunk-gradient kernel reads
``⟨S, dS'⟩`` from them for the decay gradient.

Matmul operands are bf16 with float32 accumulation (float32 inputs are rounded to bf16; the Triton bodies keep them
float32). Both head dims are padded to :func:`~pallas_kernels._mosaic_gpu.key_pad` (``kernel.py`` pads the per-head
inputs for this backend: exact, padded channels are zero) and ``C`` is a multiple of 64.

The chunk gradients (:func:`head_grads_mosaic_gpu`) are two chunk-parallel kernels, one warpgroup per program, the
chunk's inputs TMA'd into shared memory at once (no pipeline: nothing is carried between chunks):

* grid ``(batch, head, chunk, key block of 64 × value block of up to 128)`` (the Triton body's key blocks, fla's
  ``BK``; every output is linear in the products over the value axis, so the value blocks' shares add up to it):
  ``dO Vᵀ``, ``dO Sᵀ`` and ``V dS'ᵀ`` (``Vᵀ``, ``Sᵀ``, ``dS'ᵀ`` transposed shared-memory views; the float32 states
  copied to bf16 operands first), the masked and decayed ``dA`` in shared memory as the operand of ``dQ = dA K``
  and, through a transposed view, of ``dK = dAᵀ Q``; the rest elementwise and as row sums in registers (``db`` as
  ``backward._chunk_grads``: the diagonal and the last token's own write left out of both sides). ``db`` leaves per
  program, ``dQ, dK`` per value block, and XLA adds the shares;
* grid ``(batch, head, chunk, value block of 64)``: ``dV = (K Qᵀ ⊙ Dᵀ) dO + f^e ⊙ (K dS')``, the transposed intra-chunk
  matrix formed directly (no transpose of a register array).

The first holds the chunk's ``v, dO`` and its key block's ``S, dS'`` rows over its value block: 169 KiB of shared
memory at value blocks of 128 (105 at 64; the whole axis at 256 would ask for 297, over an H100's 227). Under the
interpreter the transposed operands are staged through shared memory, as in the walks.
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
    F32,
    SMEM_LIMIT,
    WG,
    block_program,
    copy_in,
    kernel,
    key_pad,
    linear_walk,
    loader,
    mma,
    operand_copy,
    smem,
    smem_bytes,
    transposed,
)
from pallas_kernels.gla_chunk.mosaic_gpu import gate_vectors, head_gates

__all__ = ["GRADS_V_BLOCK", "head_grads_mosaic_gpu", "head_walks_mosaic_gpu"]

#: The value columns a program of :func:`head_grads_mosaic_gpu`'s ``dQ, dK, db`` kernel takes: it holds the chunk's
#: ``v, dO`` and its key block's ``S, dS'`` rows over them in shared memory (169 KiB at 128; the whole axis at 256
#: would ask for 297, over an H100's 227).
GRADS_V_BLOCK = 128


def _weights(bc, seg, p, chunk):
    """The walks' per-row weights ``f^e`` (the state write: last document of the chunk only, the exponent masked
    before ``exp``) and ``f^s`` (the state read: first document of the chunk only), ``[b, h, Tp]``, and the per-chunk
    carry ``a = [seg_end = 0] e^{b_end} p_end``, ``[b, h, N]``, from the gates ``[b, Tp, h]``."""
    bc, seg, p = (jnp.transpose(x.astype(jnp.float32), (0, 2, 1)) for x in (bc, seg, p))
    b_end, s_end, p_end = (x[..., chunk - 1::chunk] for x in (bc, seg, p))  # [b, h, N]: each chunk's last entry
    rep = lambda x: jnp.repeat(x, chunk, axis=2)  # on each of the chunk's rows
    same = seg == rep(s_end)
    fe = jnp.where(same, jnp.exp(jnp.where(same, rep(b_end) - bc, 0.0)), 0.0) * (p * rep(p_end))
    fs = jnp.where(seg == 0, jnp.exp(bc), 0.0) * p
    a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end
    return fe, fs, a


def head_walks_mosaic_gpu(q, k, v, bc, seg, p, h0, do, dht, *, chunk, interpret):
    """The per-head backward's serial passes on Mosaic GPU. Padded inputs as ``backward.gla_head_bwd``'s, with both
    head dims at ``key_pad``: ``q, k [b, Tp, h, Kp]``, ``v, do [b, Tp, h, Vp]``, gates ``bc, seg, p [b, Tp, h]``
    float32, ``h0, dht [b, h, Kp, Vp]``. Returns ``H, dH [b, h, N, Kp, Vp]`` (the state before and the gradient of
    the state after every chunk) and ``dh0 [b, h, Kp, Vp]``, all float32. ``interpret``: Mosaic GPU's interpreter."""
    kp, vp = q.shape[-1], v.shape[-1]
    if chunk % 64 or kp != key_pad(kp) or vp != key_pad(vp):
        raise ValueError(f"the Mosaic GPU backward needs chunk_size a multiple of 64 and head dims padded to key_pad "
                         f"(a power of two >= 64), got chunk {chunk}, key dim {kp}, value dim {vp}")
    fe, fs, a = _weights(bc, seg, p, chunk)
    walk = functools.partial(linear_walk, a=a, chunk=chunk, interpret=interpret, time_major=True)
    hs, _ = walk(k, v, fe, init=h0, reverse=False)
    dhs, dh0 = walk(q, do, fs, init=dht, reverse=True)
    return hs, dhs, dh0


# ----------------------------------------------------------------------------- the chunk gradients


def _grads_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, h_ref, dh_ref, dq_ref, dk_ref, db_ref, q_smem, k_smem, v_smem,
                  do_smem, s32_smem, ds32_smem, g_smem, sb_smem, dsb_smem, da_smem, dq_smem, dk_smem, db_smem,
                  vt_smem, st_smem, dst_smem, dat_smem, bars, *, chunk, nv, interpret):
    """One chunk, one key block of 64 and one value block of ``V / nv`` columns per program (grid ``(batch, head,
    chunk, key block · nv + value block)``): that value block's share of ``dQ, dK`` of the key block and of ``db``
    (``backward._chunk_grads``, whose terms this follows one for one; each is linear in the products over the
    value axis, so the shares add up exactly)."""
    c, bk = chunk, 64
    bv = v_smem.shape[1]
    load = loader(interpret)
    ib, ih, n, z, rows, kcols, vcols = block_program(c, bk, bv, nv)
    vb = z % nv
    copy_in(bars, 0, (q_ref.at[ib, rows, ih, kcols], q_smem), (k_ref.at[ib, rows, ih, kcols], k_smem),
            (v_ref.at[ib, rows, ih, vcols], v_smem), (do_ref.at[ib, rows, ih, vcols], do_smem),
            (h_ref.at[ib, ih, n, kcols, vcols], s32_smem), (dh_ref.at[ib, ih, n, kcols, vcols], ds32_smem),
            (g_ref.at[ib, ih, :, rows], g_smem))
    s, ds = operand_copy(s32_smem, sb_smem, interpret), operand_copy(ds32_smem, dsb_smem, interpret)
    carry = jnp.sum(jnp.sum(s * ds, axis=1), axis=0)  # ⟨S, dS'⟩ over this key block's rows
    dof, vf = load(do_smem, WG).astype(F32), load(v_smem, WG).astype(F32)
    diag = jnp.sum(dof * vf, axis=1)  # D_tt = 1
    vt, st, dst = (transposed(x, xt, interpret) for x, xt in ((v_smem, vt_smem), (sb_smem, st_smem),
                                                              (dsb_smem, dst_smem)))
    plgpu.commit_smem()
    dp = mma(do_smem, vt, (c, c))  # dO Vᵀ
    dec, fs, fe, a, idx = gate_vectors(g_smem, c, interpret)  # here: [C, C] float32 values live only for dA
    da_smem[...] = jnp.where(idx(0) > idx(1), dp * dec, 0.0).astype(BF16)  # strictly below the diagonal
    dos, vds = mma(do_smem, st, (c, bk)), mma(v_smem, dst, (c, bk))  # dO Sᵀ, V dS'ᵀ
    dat = transposed(da_smem, dat_smem, interpret)
    plgpu.commit_smem()
    dq_in, dk_in = mma(da_smem, k_smem, (c, bk)), mma(dat, q_smem, (c, bk))
    qf, kf = load(q_smem, WG).astype(F32), load(k_smem, WG).astype(F32)
    cb = lambda x: lax.broadcast_in_dim(x, (c, bk), [0])
    dq_st, dk_st = cb(fs) * dos, cb(fe) * vds
    dq_smem[...] = (dq_in + dq_st + cb(diag) * kf).astype(dq_smem.dtype)
    dk_smem[...] = (dk_in + dk_st + cb(diag) * qf).astype(dk_smem.dtype)
    # db: as backward._chunk_grads, the diagonal of M and the last token's own write left out of both sides
    last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1 if interpret else (
        plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=WG.reduce(1)) == c - 1)
    writes = jnp.where(last, 0.0, jnp.sum(kf * dk_st, axis=1))
    end = a * carry + jnp.sum(writes)
    db_smem[...] = jnp.sum(qf * (dq_in + dq_st), axis=1) - jnp.sum(kf * dk_in, axis=1) - writes + jnp.where(last, end, 0.0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[vb, ib, rows, ih, kcols])
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[vb, ib, rows, ih, kcols])
    plgpu.copy_smem_to_gmem(db_smem, db_ref.at[z, ib, ih, rows])
    plgpu.wait_smem_to_gmem(0)


def _dv_kernel(q_ref, k_ref, do_ref, g_ref, dh_ref, dv_ref, q_smem, k_smem, do_smem, ds32_smem, g_smem, dsb_smem,
               att_smem, dv_smem, qt_smem, bars, *, chunk, bv, interpret):
    """One chunk and one block of ``bv`` value columns per program: ``dV = (Q Kᵀ ⊙ D)ᵀ dO + f^e ⊙ (K dS')``
    (``backward._chunk_dv``), the transposed intra-chunk matrix formed directly as ``(K Qᵀ) ⊙ Dᵀ``."""
    c = chunk
    ib, ih, n, iv = (lax.axis_index(a) for a in ("b", "h", "n", "v"))
    rows, vcols = pl.ds(n * c, c), pl.ds(iv * bv, bv)
    copy_in(bars, 0, (q_ref.at[ib, rows, ih], q_smem), (k_ref.at[ib, rows, ih], k_smem),
            (do_ref.at[ib, rows, ih, vcols], do_smem), (dh_ref.at[ib, ih, n, :, vcols], ds32_smem),
            (g_ref.at[ib, ih, :, rows], g_smem))
    dec_t, _, fe, _, _ = gate_vectors(g_smem, c, interpret, transpose=True)
    operand_copy(ds32_smem, dsb_smem, interpret)
    qt = transposed(q_smem, qt_smem, interpret)
    plgpu.commit_smem()
    att_t = (mma(k_smem, qt, (c, c)) * dec_t).astype(BF16)  # (Q Kᵀ ⊙ D)ᵀ = (K Qᵀ) ⊙ Dᵀ
    if interpret:  # the interpreter's wgmma takes its left operand from shared memory only
        att_smem[...] = att_t
        plgpu.commit_smem()
        att_t = att_smem
    kds = mma(k_smem, dsb_smem, (c, bv))
    dv = mma(att_t, do_smem, (c, bv)) + lax.broadcast_in_dim(fe, (c, bv), [0]) * kds
    dv_smem[...] = dv.astype(dv_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[ib, rows, ih, vcols])
    plgpu.wait_smem_to_gmem(0)


def head_grads_mosaic_gpu(q, k, v, do, bc, seg, p, hs, dhs, *, chunk, interpret):
    """Every chunk's ``dQ, dK, dV`` and decay gradient on Mosaic GPU (``backward.py``'s third kernel): inputs as
    :func:`head_walks_mosaic_gpu`'s, ``H, dH [b, h, N, Kp, Vp]`` float32 from it. Two chunk-parallel kernels, as the
    Triton body's two parts: grid ``(batch, head, chunk, key block of 64 × value block of up to 128)`` for the value
    block's shares of ``dQ, dK`` and ``db`` (added in XLA; one value block up to value dims of 128, whose ``dQ, dK``
    are written in the input dtype, float32 shares past it), and ``(batch, head, chunk, value block of 64)`` for
    ``dV``. Returns ``dq, dk, dv`` in the input dtype and ``db [b, Tp, h]`` float32."""
    bsz, tp, h, kp = q.shape
    vp, n, c = v.shape[-1], tp // chunk, chunk
    nk, bv = kp // 64, 64
    vb = min(vp, GRADS_V_BLOCK)
    nv = vp // vb
    gates = head_gates(bc, seg, p)
    dtq, dtv = q.dtype, v.dtype
    dts = dtq if nv == 1 else F32  # the shares of dQ, dK: summed in float32 past one value block
    q, k, v, do = (x.astype(BF16) for x in (q, k, v, do))
    sm = functools.partial(smem, plain=interpret)
    f32 = lambda shape: plgpu.SMEM(shape, F32)
    stage = lambda shape: sm(shape) if interpret else None  # the interpreter's transposed copies
    buffers = [sm((c, 64)), sm((c, 64)), sm((c, vb)), sm((c, vb)), sm((64, vb), F32), sm((64, vb), F32), f32((3, c)),
               sm((64, vb)), sm((64, vb)), sm((c, c)), sm((c, 64), dts), sm((c, 64), dts), f32((c,))]
    out = [jax.ShapeDtypeStruct((nv, *q.shape), dts), jax.ShapeDtypeStruct((nv, *k.shape), dts),
           jax.ShapeDtypeStruct((nk * nv, bsz, h, tp), F32)]
    assert smem_bytes(buffers) <= SMEM_LIMIT, smem_bytes(buffers)  # 169 KiB at value blocks of 128
    scratch = [*buffers, stage((vb, c)), stage((vb, 64)), stage((vb, 64)), stage((c, c)), plgpu.Barrier(num_barriers=7)]
    grads = kernel(functools.partial(_grads_kernel, chunk=c, nv=nv, interpret=interpret), out, scratch,
                   (bsz, h, n, nk * nv), ("b", "h", "n", "kv"), interpret)
    dq, dk, db = grads(q, k, v, do, gates, hs.astype(F32), dhs.astype(F32))
    scratch = [sm((c, kp)), sm((c, kp)), sm((c, bv)), sm((kp, bv), F32), f32((3, c)), sm((kp, bv)), sm((c, c)),
               sm((c, bv), dtv), stage((kp, c)), plgpu.Barrier(num_barriers=5)]
    dv = kernel(functools.partial(_dv_kernel, chunk=c, bv=bv, interpret=interpret),
                jax.ShapeDtypeStruct(v.shape, dtv), scratch, (bsz, h, n, vp // bv), ("b", "h", "n", "v"), interpret)(
        q, k, do, gates, dhs.astype(F32))
    dq, dk = (jnp.sum(x, axis=0).astype(dtq) for x in (dq, dk))
    return dq, dk, dv, jnp.moveaxis(jnp.sum(db, axis=0), 1, 2)
