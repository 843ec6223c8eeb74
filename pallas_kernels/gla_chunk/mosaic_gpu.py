r"""Mosaic GPU body of the chunked GLA forward with per-head decay (the lowering jax 0.11 makes the default).

Same recurrence and chunk algebra as ``kernel.py``'s Triton body, written against Mosaic GPU's
one-warpgroup model (``plgpu.kernel``, Lane semantics):

* grid ``(batch, heads, value blocks)``; each program owns one head's ``[Kp, 64]`` state slice and walks
  the chunks of its sequence with a ``fori_loop``; the float32 state is the loop carry, in registers in the
  ``WGMMA`` accumulator layout, and a bf16 copy in shared memory is the operand of the next chunk's readout;
* per chunk, TMA copies ``q, k [C, Kp]``, ``v [C, 64]`` and the chunk's gates (``b``, ``seg``, ``p``: heads-first
  rows of ``C`` floats) into shared memory, then three ``wgmma``\ s: ``Q Kᵀ`` (``[C, C]``, masked and decayed
  in registers: ``D = [s ≤ t, seg_s = seg_t] p_t p_s e^{b_t − b_s}``, the exponent masked before ``exp``),
  ``O = (Q S) ⊙ f + (Q Kᵀ ⊙ D) V`` (the decayed readout as a row scaling of ``Q S``, the intra-chunk matrix
  a register operand) and ``S ← a S + Kᵀ (V ⊙ e)`` (``Kᵀ`` a transposed shared-memory view);
* the output block goes back through shared memory with a TMA store.

``wgmma`` wants an ``M`` of 64 and the same swizzle on both operands: both head dims are padded to at least
64 (exact: padded channels are zero; value blocks of 64 columns), and ``C`` is a multiple of 64. Matmul
operands are bf16 with float32 accumulation: float32 inputs are rounded to bf16 (the Triton body keeps them
float32). One chunk at a time: the copies of chunk ``n + 1`` are not yet overlapped with chunk ``n``'s
matmuls (a two-slot TMA pipeline is the next step once a GPU has timed this body).

Checked without a GPU (``tests/test_pallas_mosaic_gpu.py``): the kernel lowers for CUDA through ``jax.export``
(the StableHLO holds the ``mosaic_gpu`` custom call), and Mosaic GPU's own interpreter (``interpret=True``
here; it simulates TMA, barriers and ``wgmma`` on the CPU) runs it against the XLA chunked form. That
interpreter takes neither a transposed shared-memory view nor a register operand for ``wgmma``, so under it
``Kᵀ`` and the intra-chunk matrix are staged through shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic_gpu import interpret_params, key_pad, smem

__all__ = ["forward_mosaic_gpu", "forward_padded"]

_BF16 = jnp.bfloat16


def _kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, ht_ref, q_smem, k_smem, v_smem, vs_smem, st_smem, o_smem,
            g_smem, s32_smem, kt_smem, att_smem, bars, *, chunk, n_chunks, bv, interpret):
    c = chunk
    # register layouts matter to the lowering only; Mosaic GPU's interpreter reads refs plainly
    load = (lambda ref, layout: ref[...]) if interpret else (lambda ref, layout: plgpu.load(ref, (), layout=layout))
    f32 = jnp.float32
    wg = plgpu.Layout.WGMMA
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * bv, bv)

    plgpu.copy_gmem_to_smem(h0_ref.at[ib, ih, :, cols], s32_smem, bars.at[0])
    plgpu.barrier_wait(bars.at[0])
    state = load(s32_smem, wg)
    st_smem[...] = state.astype(_BF16)
    plgpu.commit_smem()

    if interpret:
        iota = lambda d: lax.broadcasted_iota(jnp.int32, (c, c), d)
    else:
        iota = lambda d: plgpu.broadcasted_iota(jnp.int32, (c, c), d, layout=wg)
    causal = iota(0) >= iota(1)

    def body(n, state):
        rows = pl.ds(n * c, c)
        plgpu.copy_gmem_to_smem(q_ref.at[ib, rows, ih], q_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(k_ref.at[ib, rows, ih], k_smem, bars.at[2])
        plgpu.copy_gmem_to_smem(v_ref.at[ib, rows, ih, cols], v_smem, bars.at[3])
        plgpu.copy_gmem_to_smem(g_ref.at[ib, ih, :, rows], g_smem, bars.at[4])
        for i in range(1, 5):
            plgpu.barrier_wait(bars.at[i])

        if interpret:  # Mosaic GPU's interpreter: its wgmma takes no transposed view: a transposed copy stands in for one
            kt_smem[...] = k_smem[...].T
            kt = kt_smem
        else:
            kt = plgpu.transpose_ref(k_smem, (1, 0))
        col = lambda i: load(g_smem.at[i], wg.reduce(1))  # [C], indexed by the query row t
        row = lambda i: load(g_smem.at[i], wg.reduce(0))  # [C], indexed by the key column s
        bc, sc, pc = col(0), col(1), col(2)
        full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
        ok = causal & (full(sc, 0) == full(row(1), 1))
        dec = jnp.where(ok, jnp.exp(jnp.where(ok, full(bc, 0) - full(row(0), 1), 0.0)), 0.0)
        dec = dec * (full(pc, 0) * full(row(2), 1))

        def qk(acc):
            plgpu.wgmma(acc, q_smem, kt)
            return acc[...]

        att = (pl.run_scoped(qk, plgpu.ACC((c, c), f32)) * dec).astype(_BF16)

        def readout(acc):
            plgpu.wgmma(acc, q_smem, st_smem)
            return acc[...]

        fs = jnp.where(sc == 0, jnp.exp(bc), 0.0) * pc
        inter = pl.run_scoped(readout, plgpu.ACC((c, bv), f32)) * lax.broadcast_in_dim(fs, (c, bv), [0])

        if interpret:  # and takes its left operand from shared memory only
            att_smem[...] = att
            att = att_smem

        def intra(acc):
            plgpu.wgmma(acc, att, v_smem)
            return acc[...]

        o = inter + pl.run_scoped(intra, plgpu.ACC((c, bv), f32))

        plgpu.wait_smem_to_gmem(0)  # the previous chunk's output has left o_smem
        o_smem[...] = o
        b_end, s_end, p_end = g_smem[0, c - 1], g_smem[1, c - 1], g_smem[2, c - 1]
        same = sc == s_end
        fe = jnp.where(same, jnp.exp(jnp.where(same, b_end - bc, 0.0)), 0.0) * (pc * p_end)
        vs = load(v_smem, wg).astype(f32) * lax.broadcast_in_dim(fe, (c, bv), [0])
        vs_smem[...] = vs.astype(_BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[ib, rows, ih, cols])
        a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end

        def update(acc):
            plgpu.wgmma(acc, kt, vs_smem)
            return acc[...]

        state = a * state + pl.run_scoped(update, plgpu.ACC(state.shape, f32))
        st_smem[...] = state.astype(_BF16)
        plgpu.commit_smem()
        return state

    state = lax.fori_loop(0, n_chunks, body, state)
    plgpu.wait_smem_to_gmem(0)
    s32_smem[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s32_smem, ht_ref.at[ib, ih, :, cols])
    plgpu.wait_smem_to_gmem(0)


def forward_mosaic_gpu(q, k, v, bc, seg, p, h0, *, chunk, interpret=None):
    """Per-head decay on Mosaic GPU. Padded inputs: ``q, k [b, Tp, h, Kp]`` (``Kp = key_pad(dk)``),
    ``v [b, Tp, h, Vp]``, float32 gates ``[b, Tp, h]``, ``h0 [b, h, Kp, Vp]`` float32. Returns
    ``(o [b, Tp, h, Vp] float32, S_T [b, h, Kp, Vp] float32)``."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    if kp < 64 or chunk % 64:
        raise ValueError(f"the Mosaic GPU body needs key dim >= 64 and chunk a multiple of 64, got {kp}, {chunk}")
    bv = min(vp, 64)
    gates = jnp.stack([bc, seg, p], axis=2).astype(jnp.float32)  # [b, Tp, 3, h]
    gates = jnp.transpose(gates, (0, 3, 2, 1))  # [b, h, 3, Tp]: each chunk's gates are contiguous rows
    interp = interpret is not None and interpret is not False
    kern = functools.partial(_kernel, chunk=chunk, n_chunks=tp // chunk, bv=bv, interpret=interp)
    sm = functools.partial(smem, plain=interp)
    scratch = [sm((chunk, kp)), sm((chunk, kp)), sm((chunk, bv)), sm((chunk, bv)), sm((kp, bv)),
               sm((chunk, bv), jnp.float32), plgpu.SMEM((3, chunk), jnp.float32),
               sm((kp, bv), jnp.float32), sm((kp, chunk)) if interp else None,
               sm((chunk, chunk)) if interp else None, plgpu.Barrier(num_barriers=5)]
    return plgpu.kernel(
        kern,
        out_type=[jax.ShapeDtypeStruct((bsz, tp, h, vp), jnp.float32), jax.ShapeDtypeStruct((bsz, h, kp, vp), jnp.float32)],
        scratch_types=scratch,
        grid=(bsz, h, vp // bv),
        grid_names=("b", "h", "v"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=interpret,
    )(q.astype(_BF16), k.astype(_BF16), v.astype(_BF16), gates, h0.astype(jnp.float32))


def forward_padded(q, k, v, bc, seg, p, h0, *, chunk, interpret):
    """The Mosaic GPU forward on ``kernel.py``'s padded layout (head dims powers of two >= 16): pads both head
    dims on to ``key_pad`` (zeros: exact; every bf16 operand then has 128-byte rows, the one swizzle ``wgmma``
    wants on both sides) and slices the outputs back. ``interpret=True`` runs Mosaic GPU's interpreter."""
    kp0, vp0 = q.shape[-1], v.shape[-1]
    kp, vp = key_pad(kp0), key_pad(vp0)
    pad = lambda x, n: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])
    h0 = jnp.pad(h0, [(0, 0), (0, 0), (0, kp - kp0), (0, vp - vp0)])
    if interpret:
        interpret = interpret_params()
    o, s = forward_mosaic_gpu(pad(q, kp), pad(k, kp), pad(v, vp), bc, seg, p, h0, chunk=chunk, interpret=interpret or None)
    return o[..., :vp0], s[:, :, :kp0, :vp0]
