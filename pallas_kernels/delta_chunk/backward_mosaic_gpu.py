r"""Mosaic GPU bodies of the chunked delta rule's chunk-parallel gradient kernels (``backward.py``'s 4a, fla's
``bwd_dqkwg``, and 4b, fla's ``prepare_wy_repr_bwd``; the Triton bodies are ``backward._chunk_grads_states`` and
``backward._chunk_grads_wy``, whose terms these follow one for one).

4a, through the outputs, the attention and the states. Per chunk, with ``U' = U − W S`` and ``H`` from the state
pass, ``dH`` and ``−dU'`` from the state-gradient walk (``mosaic_gpu.py``; the walk forms ``dU'`` for its own update
and writes it, as fla's ``bwd_dhu`` writes ``dv2``), all bf16, and ``dÕ = s dO``:

.. math::
    dW = −dU' S^\top, \quad dQ = γ ⊙ (dÕ S^\top) + (dÕ U'^\top ⊙ Γ) K, \quad
    dK \mathrel{+}= (dÕ U'^\top ⊙ Γ)^\top Q + e^{rev} ⊙ (U' dS^{+\top})

(``Γ``'s diagonal, ``Γ_tt = 1``, taken out of the matrix and added as ``Σ_v dÕ ⊙ U'`` times ``K`` and ``Q``), and
the shares of the log-decay gradients: for ``g``, the row sums of ``Q ⊙ dQ`` minus those of ``K ⊙ dK`` over the
attention terms *without their diagonals* (``backward.py``'s docstring), ``γ``'s readout term and ``γ_C ⟨S, dS⁺⟩``
at the last token; for ``rev``, ``e^{rev} ⊙`` the row sums of ``K ⊙ (U' dS⁺ᵀ)``.
:func:`chunk_grads_mosaic_gpu`: grid ``(batch, heads, chunks, key block of 64 × value block of up to 128)``, one
warpgroup per program. Every output is linear in the products over the value axis (``dÕ U'ᵀ``, ``dÕ Sᵀ``,
``U' dS⁺ᵀ``, ``dU' Sᵀ``, ``Σ_v dÕ ⊙ U'``, ``⟨S, dS⁺⟩``), so each program writes its value block's share and XLA adds
them, as ``gla_chunk/backward_mosaic_gpu.py``'s ``dQ, dK, db`` kernel. Six ``wgmma``\ s per program: ``−dU' Sᵀ``,
``dO U'ᵀ`` (``[C, C]``, masked strictly below the diagonal within a document and decayed in registers, the exponent
masked before ``exp``, then stored bf16 in shared memory), ``dO Sᵀ``, ``U' dS⁺ᵀ`` (``Sᵀ``, ``U'ᵀ``, ``dS⁺ᵀ``
transposed shared-memory views), and that matrix times ``K`` and, through a transposed view, times ``Q``. The
``[C, 64]`` float32 shares of ``dW``, ``dQ``, ``dK`` leave through shared memory with TMA stores (three buffers where
they fit, else one, reused once its store has read it), the ``[C]`` shares of ``dg``, ``drev`` likewise. Shared
memory (:func:`_plan`): 153 KiB at ``C = 64`` from value dims of 128 (value blocks of 128), 163 KiB at ``C = 128``
(value blocks of 64, one output buffer).

4b, through ``W = X (βγ ⊙ K)``, ``U = X (β ⊙ V)`` and ``X = (I + A)^{-1}`` (``X`` from the WY factors' backward
call, ``wy_mosaic_gpu.py``): :func:`chunk_grads_wy_mosaic_gpu`, grid
``(batch, heads, chunks)``, the chunk's ``k, dW`` and ``v, −dU'`` in shared memory as tiles of 64 columns and ``X``
(``[C, C]``). Per value tile ``dv = β ⊙ Xᵀ dU'`` (``Xᵀ`` a transposed view) and its ``dβ`` share;
``dX = (dW Kᵀ) ⊙ βγ_s + (dU' Vᵀ) ⊙ β_s``, each a sum of ``wgmma``\ s over the tiles into one accumulator (the raw
tiles, ``Kᵀ, Vᵀ`` transposed views; the scalings of the key and value rows applied to the columns of the products
in registers); ``dA = −Xᵀ dX Xᵀ`` (masked and decayed strictly below the diagonal as ``Γ``) through two ``[C, C]``
bf16 work buffers; then per key tile ``dk = βγ ⊙ Xᵀ dW + β ⊙ (dA K) + (β ⊙ dA)ᵀ K`` and the row sums of ``dβ`` and
``dg``. ``dk`` (float32) and ``dg`` come without 4a's terms, which XLA adds. Shared memory (:func:`wy_grads_fit`):
``2 C (Kp + Vp)`` bf16 plus three ``[C, C]`` bf16 matrices and two output tiles, 177 KiB at ``C = 64`` and head dims
of 256 (185 with float32 inputs); at ``C = 128`` it passes ``_mosaic_gpu.SMEM_BUDGET`` and ``backward.py`` runs 4b
on Triton.

Both take the chunk's inputs by TMA into shared memory at once (no pipeline: nothing is carried between chunks).
Matmul operands are bf16 with float32 accumulation, as the other Mosaic GPU bodies: float32 inputs are rounded to
bf16 (``X`` too, which the Triton body keeps float32 at ``HIGHEST``), and ``H``, ``dH``, ``U'`` and ``dU'`` come bf16
from the walks. Mosaic GPU's interpreter takes neither a transposed shared-memory view nor a register operand for
``wgmma``: under it the transposed operands are staged through shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic_gpu as mg
from pallas_kernels.delta_chunk.mosaic_gpu import _gates, _helpers, check_shapes

__all__ = ["chunk_grads_mosaic_gpu", "chunk_grads_wy_mosaic_gpu", "wy_grads_fit"]

_BF16 = jnp.bfloat16
f32 = jnp.float32
BK = 64  # key columns per program


def _buffers(c, bv, n_out, interpret):
    """The kernel's shared-memory buffers as compiled: ``q, k`` key-block columns, ``U', dO, −dU'`` value-block columns,
    the ``S, dS⁺`` block, the gates, the masked ``[C, C]`` matrix, ``n_out`` float32 output tiles, the ``dg, drev``
    rows."""
    sm = functools.partial(mg.smem, plain=interpret)
    return [sm((c, BK)), sm((c, BK)), sm((c, bv)), sm((c, bv)), sm((c, bv)), sm((BK, bv)), sm((BK, bv)),
            plgpu.SMEM((3, c), f32), sm((c, c)), *(sm((c, BK), f32) for _ in range(n_out)), plgpu.SMEM((c,), f32),
            plgpu.SMEM((c,), f32)]


def _plan(c, vp):
    """``(value block, output buffers)``: the widest value block (128 or 64) and then the most output buffers (three
    or one) whose shared memory fits ``_mosaic_gpu.SMEM_BUDGET`` (which leaves room for Mosaic GPU's padding of each
    buffer and the barriers); raises where none does."""
    for bv in (128, 64):
        for n_out in (3, 1):
            if bv <= vp and mg.smem_bytes(_buffers(c, bv, n_out, False)) <= mg.SMEM_BUDGET:
                return bv, n_out
    raise ValueError(f"the Mosaic GPU delta-rule gradient kernel at chunk_size {c} needs "
                     f"{mg.smem_bytes(_buffers(c, 64, 1, False)) // 1024} KiB of shared memory, over the "
                     f"{mg.SMEM_BUDGET // 1024} KiB it budgets: use a smaller chunk_size, or backend='triton'")


def _grads_kernel(q_ref, k_ref, un_ref, do_ref, ndu_ref, g_ref, h_ref, dh_ref, dw_ref, dq_ref, dk_ref, dg_ref, dr_ref,
                  *scratch, chunk, nv, n_out, scale, interpret):
    """One chunk, one key block of 64 and one value block per program (grid ``(batch, heads, chunk, key block · nv +
    value block)``): that value block's share of ``dW, dQ, dK`` of the key block and of ``dg, drev``
    (``backward._chunk_grads_states``, whose terms this follows one for one)."""
    (q_smem, k_smem, un_smem, do_smem, ndu_smem, s_smem, ds_smem, g_smem, dqk_smem), rest = scratch[:9], scratch[9:]
    outs, (dg_smem, dr_smem, st_smem, unt_smem, dst_smem, dqkt_smem, bars) = rest[:n_out], rest[n_out:]
    c, bk = chunk, BK
    bv = un_smem.shape[1]
    load, col, row = _helpers(interpret)
    ib, ih, n, z, rows, kcols, vcols = mg.block_program(c, bk, bv, nv)
    vb = z % nv
    mg.copy_in(bars, 0, (q_ref.at[ib, ih, rows, kcols], q_smem), (k_ref.at[ib, ih, rows, kcols], k_smem),
               (un_ref.at[ib, ih, rows, vcols], un_smem), (do_ref.at[ib, ih, rows, vcols], do_smem),
               (ndu_ref.at[ib, ih, rows, vcols], ndu_smem), (h_ref.at[ib, ih, n, kcols, vcols], s_smem),
               (dh_ref.at[ib, ih, n, kcols, vcols], ds_smem), (g_ref.at[ib, ih, :, rows], g_smem))
    st, unt, dst = (mg.transposed(x, xt, interpret) for x, xt in ((s_smem, st_smem), (un_smem, unt_smem),
                                                                 (ds_smem, dst_smem)))
    plgpu.commit_smem()

    def emit(i, x, dst_ref):  # a [C, 64] float32 share through output buffer i % n_out, once its last store read it
        buf = outs[i % n_out]
        if i >= n_out:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        buf[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, dst_ref)

    emit(0, mg.mma(ndu_smem, st, (c, bk)), dw_ref.at[vb, ib, ih, rows, kcols])  # dW = −dU' Sᵀ
    # gates: Γ strictly below the diagonal within a document (the exponent masked before exp), γ, γ_C, e^{rev}
    idx = mg.iota(c, interpret)
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    cb = lambda x: lax.broadcast_in_dim(x, (c, bk), [0])
    gc, rc, sc = col(g_smem, 0), col(g_smem, 1), col(g_smem, 2)
    g_end, s_end = g_smem[0, c - 1], g_smem[2, c - 1]
    ok = (idx(0) > idx(1)) & (full(sc, 0) == full(row(g_smem, 2), 1))
    dec = jnp.where(ok, jnp.exp(jnp.where(ok, full(gc, 0) - full(row(g_smem, 0), 1), 0.0)), 0.0)
    gamma = jnp.where(sc == 0, jnp.exp(gc), 0.0)  # decay from the chunk's start, first document only
    total = jnp.where(s_end == 0, jnp.exp(g_end), 0.0)  # γ_C: zero across a reset inside the chunk
    to_end = jnp.where(sc == s_end, jnp.exp(rc), 0.0)  # e^{rev}, the chunk's last document
    dqk_smem[...] = (scale * mg.mma(do_smem, unt, (c, c)) * dec).astype(_BF16)  # dÕ U'ᵀ ⊙ Γ, strictly lower
    dqkt = mg.transposed(dqk_smem, dqkt_smem, interpret)
    diag = scale * jnp.sum(load(do_smem, mg.WG).astype(f32) * load(un_smem, mg.WG).astype(f32), axis=1)  # Σ_v dÕ ⊙ U'
    s, ds = load(s_smem, mg.WG).astype(f32), load(ds_smem, mg.WG).astype(f32)
    carry = jnp.sum(jnp.sum(s * ds, axis=1), axis=0)  # ⟨S, dS⁺⟩ over this key block's rows and value block
    qf, kf = load(q_smem, mg.WG).astype(f32), load(k_smem, mg.WG).astype(f32)
    plgpu.commit_smem()
    # dq: the readout and the intra-chunk attention, their diagonal (Γ_tt = 1) apart
    dq_in, rd = mg.mma(dqk_smem, k_smem, (c, bk)), scale * mg.mma(do_smem, st, (c, bk))  # (dÕ U'ᵀ ⊙ Γ) K, dÕ Sᵀ
    emit(1, cb(gamma) * rd + dq_in + cb(diag) * kf, dq_ref.at[vb, ib, ih, rows, kcols])
    dg = jnp.sum(qf * dq_in, axis=1) + gamma * jnp.sum(qf * rd, axis=1)
    dk_in, ke = mg.mma(dqkt, q_smem, (c, bk)), mg.mma(un_smem, dst, (c, bk))  # (dÕ U'ᵀ ⊙ Γ)ᵀ Q, U' dS⁺ᵀ
    emit(2, dk_in + cb(diag) * qf + cb(to_end) * ke, dk_ref.at[vb, ib, ih, rows, kcols])
    last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1 if interpret else (
        plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=mg.WG.reduce(1)) == c - 1)
    dg_smem[...] = dg - jnp.sum(kf * dk_in, axis=1) + jnp.where(last, total * carry, 0.0)
    dr_smem[...] = to_end * jnp.sum(kf * ke, axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dg_smem, dg_ref.at[z, ib, ih, rows])
    plgpu.copy_smem_to_gmem(dr_smem, dr_ref.at[z, ib, ih, rows])
    plgpu.wait_smem_to_gmem(0)


def chunk_grads_mosaic_gpu(qh, kh, un, do, ndu, g, rev, seg, hs, dhs, *, c, scale, interpret):
    """Kernel 4a on Mosaic GPU: ``q, k [b, h, Tp, Kp]``, ``U', dO, −dU' [b, h, Tp, Vp]``, gates ``g, rev, seg
    [b, h, Tp]`` float32, ``H, dH [b, h, N, Kp, Vp]`` (:func:`check_shapes`). Returns ``dq`` (``q``'s dtype),
    ``dk`` (these terms, float32), ``dW`` (the input dtype), and ``dg``, ``drev`` (these terms) ``[b, h, Tp, 1]``
    float32, as the Triton kernel's outputs after XLA's sum over the key blocks."""
    b, h, tp, kp = qh.shape
    vp, n = un.shape[-1], tp // c
    check_shapes(c, kp, vp)
    bv, n_out = _plan(c, vp)
    nk, nv = kp // BK, vp // bv
    buffers = _buffers(c, bv, n_out, interpret)
    sm = functools.partial(mg.smem, plain=interpret)
    stage = lambda shape: sm(shape) if interpret else None  # the interpreter's transposed copies
    scratch = [*buffers, stage((bv, BK)), stage((bv, c)), stage((bv, BK)), stage((c, c)), plgpu.Barrier(num_barriers=8)]
    share = jax.ShapeDtypeStruct((nv, b, h, tp, kp), f32)
    part = jax.ShapeDtypeStruct((nk * nv, b, h, tp), f32)
    kern = functools.partial(_grads_kernel, chunk=c, nv=nv, n_out=n_out, scale=scale, interpret=bool(interpret))
    call = mg.kernel(kern, [share, share, share, part, part], scratch, (b, h, n, nk * nv), ("b", "h", "n", "kv"),
                     interpret)
    dw, dq, dk, dg, dr = call(qh.astype(_BF16), kh.astype(_BF16), un.astype(_BF16), do.astype(_BF16),
                              ndu.astype(_BF16), _gates(g, rev, seg), hs.astype(_BF16), dhs.astype(_BF16))
    dw, dq, dk = (jnp.sum(x, axis=0) for x in (dw, dq, dk))
    dg, dr = (jnp.sum(x, axis=0)[..., None] for x in (dg, dr))
    return dq.astype(qh.dtype), dk, dw.astype(kh.dtype), dg, dr


# ----------------------------------------------------------------------------- 4b: through W, U and X


def _wy_buffers(c, kp, vp, dv_dtype, interpret=False):
    """Kernel 4b's shared-memory buffers as compiled: ``k, dW`` and ``v, −dU'`` as ``[tiles, C, 64]``, ``X``, two
    ``[C, C]`` work matrices (``dX`` then ``dA``; ``Xᵀ dX`` then ``β ⊙ dA``), the gate rows, a ``dk`` and a ``dv`` output
    tile, the ``dβ, dg`` rows."""
    sm = functools.partial(mg.smem, plain=interpret)
    return [sm((kp // BK, c, BK)), sm((kp // BK, c, BK)), sm((vp // BK, c, BK)), sm((vp // BK, c, BK)), sm((c, c)),
            sm((c, c)), sm((c, c)), plgpu.SMEM((3, c), f32), sm((c, BK), f32), sm((c, BK), dv_dtype),
            plgpu.SMEM((c,), f32), plgpu.SMEM((c,), f32)]


def wy_grads_fit(c: int, kp: int, vp: int, dv_dtype=_BF16) -> bool:
    """Whether :func:`chunk_grads_wy_mosaic_gpu` fits ``_mosaic_gpu.SMEM_BUDGET`` (``C = 64`` up to head dims of 256;
    not ``C = 128``, whose ``[C, C]`` matrices and ``[C, K]`` tiles ask for more: there 4b stays on Triton)."""
    return mg.smem_bytes(_wy_buffers(c, kp, vp, dv_dtype)) <= mg.SMEM_BUDGET


def _wy_kernel(k_ref, v_ref, x_ref, ndu_ref, dw_ref, g_ref, dk_ref, dv_ref, db_ref, dg_ref, k_smem, dw_smem, v_smem,
               ndu_smem, x_smem, a_smem, b_smem, g_smem, dk_smem, dv_smem, db_smem, dg_smem, xt_smem, kt_smem, vt_smem,
               bt_smem, bars, *, chunk, nk, nv, interpret):
    """One chunk per program: ``dv``, the rest of ``dk`` and ``dg``, and ``dβ`` (``backward._chunk_grads_wy``, whose
    terms this follows; ``dk`` and ``dg`` without 4a's terms, which XLA adds)."""
    c, bk = chunk, BK
    load, col, row = _helpers(interpret)
    ib, ih, n = (lax.axis_index(a) for a in ("b", "h", "n"))
    rows = pl.ds(n * c, c)
    tile = lambda ref, j: ref.at[ib, ih, rows, pl.ds(j * bk, bk)]
    mg.copy_in(bars, 0, (x_ref.at[ib, ih, rows], x_smem), (g_ref.at[ib, ih, :, rows], g_smem),
               *((tile(r, j), s.at[j]) for r, s in ((k_ref, k_smem), (dw_ref, dw_smem)) for j in range(nk)),
               *((tile(r, j), s.at[j]) for r, s in ((v_ref, v_smem), (ndu_ref, ndu_smem)) for j in range(nv)))
    xt = mg.transposed(x_smem, xt_smem, interpret)
    stage = lambda ref, j: ref.at[j] if interpret else None
    kt = [mg.transposed(k_smem.at[j], stage(kt_smem, j), interpret) for j in range(nk)]
    vt = [mg.transposed(v_smem.at[j], stage(vt_smem, j), interpret) for j in range(nv)]
    plgpu.commit_smem()
    idx = mg.iota(c, interpret)
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    cb = lambda x: lax.broadcast_in_dim(x, (c, bk), [0])
    bc, gc, sc = col(g_smem, 0), col(g_smem, 1), col(g_smem, 2)
    br, gr, sr = row(g_smem, 0), row(g_smem, 1), row(g_smem, 2)
    gamma, gam_r = jnp.where(sc == 0, jnp.exp(gc), 0.0), jnp.where(sr == 0, jnp.exp(gr), 0.0)
    bg = bc * gamma

    def emit(buf, x, dst_ref):  # an output tile through buf, once its last store has read it
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        buf[...] = x.astype(buf.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, dst_ref)

    # dv = β ⊙ Xᵀ dU' and its dβ share, per value tile
    db = []
    for j in range(nv):
        dvb = -mg.mma(xt, ndu_smem.at[j], (c, bk))
        emit(dv_smem, cb(bc) * dvb, tile(dv_ref, j))
        db.append(jnp.sum(load(v_smem.at[j], mg.WG).astype(f32) * dvb, axis=1))
    # dX = dW (βγ ⊙ K)ᵀ + dU' (β ⊙ V)ᵀ: the products of the raw tiles, their columns scaled in registers
    dx = (mg.mma_sum([(dw_smem.at[j], kt[j]) for j in range(nk)], (c, c)) * full(br * gam_r, 1)
          - mg.mma_sum([(ndu_smem.at[j], vt[j]) for j in range(nv)], (c, c)) * full(br, 1))
    a_smem[...] = dx.astype(_BF16)
    plgpu.commit_smem()
    b_smem[...] = mg.mma(xt, a_smem, (c, c)).astype(_BF16)  # Xᵀ dX
    plgpu.commit_smem()
    ok = (idx(0) > idx(1)) & (full(sc, 0) == full(sr, 1))
    dec = jnp.where(ok, jnp.exp(jnp.where(ok, full(gc, 0) - full(gr, 1), 0.0)), 0.0)
    da = -mg.mma(b_smem, xt, (c, c)) * dec  # dA ⊙ Γ, strictly lower: −Xᵀ dX Xᵀ
    plgpu.commit_smem()  # a warpgroup barrier: every warp has waited on the wgmma reading b_smem before it is rewritten
    a_smem[...] = da.astype(_BF16)
    b_smem[...] = (full(bc, 0) * da).astype(_BF16)  # β ⊙ (dA ⊙ Γ)
    bt = mg.transposed(b_smem, bt_smem, interpret)
    plgpu.commit_smem()
    # per key tile: dk = βγ ⊙ Xᵀ dW + (β ⊙ dA) K + (β ⊙ dA)ᵀ K, and the row sums of dβ and dg
    dg = []
    for j in range(nk):
        dkb = mg.mma(xt, dw_smem.at[j], (c, bk))
        kdam = mg.mma(a_smem, k_smem.at[j], (c, bk))
        kdat = mg.mma(bt, k_smem.at[j], (c, bk))
        kf = load(k_smem.at[j], mg.WG).astype(f32)
        emit(dk_smem, cb(bg) * dkb + cb(bc) * kdam + kdat, tile(dk_ref, j))
        kdkb, kkdam = jnp.sum(kf * dkb, axis=1), jnp.sum(kf * kdam, axis=1)
        db.append(kkdam + gamma * kdkb)
        dg.append(bc * kkdam - jnp.sum(kf * kdat, axis=1) + bg * kdkb)
    db_smem[...] = functools.reduce(jnp.add, db)
    dg_smem[...] = functools.reduce(jnp.add, dg)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(db_smem, db_ref.at[ib, ih, rows])
    plgpu.copy_smem_to_gmem(dg_smem, dg_ref.at[ib, ih, rows])
    plgpu.wait_smem_to_gmem(0)


def chunk_grads_wy_mosaic_gpu(kh, vh, x, ndu, dw, beta, g, seg, *, c, interpret):
    """Kernel 4b on Mosaic GPU: ``k, dW [b, h, Tp, Kp]``, ``v, −dU' [b, h, Tp, Vp]``, ``X [b, h, Tp, C]`` (the WY
    inverse), ``β, g, seg [b, h, Tp]`` float32 (:func:`check_shapes`; shared memory: :func:`wy_grads_fit`). Returns
    ``dk`` (these terms, float32), ``dv`` (``v``'s dtype), ``dβ`` and ``dg`` (these terms) ``[b, h, Tp]`` float32."""
    b, h, tp, kp = kh.shape
    vp = vh.shape[-1]
    check_shapes(c, kp, vp)
    if not wy_grads_fit(c, kp, vp, vh.dtype):
        raise ValueError(f"the Mosaic GPU delta-rule gradient kernel through W, U, X at chunk_size {c} and head dims "
                         f"{kp}, {vp} passes the {mg.SMEM_BUDGET // 1024} KiB shared-memory budget: backward.py runs "
                         "the Triton body there")
    nk, nv = kp // BK, vp // BK
    interpret = bool(interpret)
    sm = functools.partial(mg.smem, plain=interpret)
    buffers = _wy_buffers(c, kp, vp, vh.dtype, interpret)
    stage = lambda shape: sm(shape) if interpret else None  # the interpreter's transposed copies
    scratch = [*buffers, stage((c, c)), stage((nk, BK, c)), stage((nv, BK, c)), stage((c, c)),
               plgpu.Barrier(num_barriers=2 + 2 * (nk + nv))]
    row = jax.ShapeDtypeStruct((b, h, tp), f32)
    out = [jax.ShapeDtypeStruct(kh.shape, f32), jax.ShapeDtypeStruct(vh.shape, vh.dtype), row, row]
    kern = functools.partial(_wy_kernel, chunk=c, nk=nk, nv=nv, interpret=interpret)
    call = mg.kernel(kern, out, scratch, (b, h, tp // c), ("b", "h", "n"), interpret)
    gates = jnp.stack([beta, g, seg], axis=2).astype(f32)
    return call(kh.astype(_BF16), vh.astype(_BF16), x.astype(_BF16), ndu.astype(_BF16), dw.astype(_BF16), gates)
