r"""Mosaic GPU body of the chunked GLA forward with per-head decay (the lowering jax 0.11 makes the default).

Same recurrence and chunk algebra as ``kernel.py``'s Triton body, written against Mosaic GPU's
one-warpgroup model (``plgpu.kernel``, Lane semantics):

* grid ``(batch, heads, value blocks)``; each program owns one head's ``[Kp, 64]`` state slice and walks
  the chunks of its sequence; the float32 state is the walk's carry, in registers in the ``WGMMA`` accumulator
  layout, and a bf16 copy in shared memory is the operand of the next chunk's readout;
* the chunks' ``q, k [C, Kp]``, ``v [C, 64]`` and gates (``b``, ``seg``, ``p``: heads-first rows of ``C`` floats)
  come through a TMA pipeline (``plgpu.emit_pipeline`` with the state as its carry; ``_mosaic_gpu.chunk_specs``):
  with two slots, chunk ``n + 1``'s copies are in flight while chunk ``n`` computes (one slot where two would
  pass the shared-memory budget, ``_mosaic_gpu.walk_stages``: at ``Kp = 256``, or ``C = 128`` from ``Kp = 128``;
  at ``C = 128, Kp = 256`` even one would not fit, and it raises);
  per chunk, three ``wgmma``\ s: ``Q Kᵀ`` (``[C, C]``, masked and decayed
  in registers: ``D = [s ≤ t, seg_s = seg_t] p_t p_s e^{b_t − b_s}``, the exponent masked before ``exp``),
  ``O = (Q S) ⊙ f + (Q Kᵀ ⊙ D) V`` (the decayed readout as a row scaling of ``Q S``, the intra-chunk matrix
  a register operand) and ``S ← a S + Kᵀ (V ⊙ e)`` (``Kᵀ`` a transposed shared-memory view);
* the output block goes back through shared memory with a TMA store.

``wgmma`` wants an ``M`` of 64 and the same swizzle on both operands: both head dims are padded to at least
64 (exact: padded channels are zero; value blocks of 64 columns), and ``C`` is a multiple of 64. Matmul
operands are bf16 with float32 accumulation: float32 inputs are rounded to bf16 (the Triton body keeps them
float32). Shared memory at ``C = 64, Kp = 128``: 154 KiB with two slots (an H100/H200 block may have 227).

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

from pallas_kernels import _mosaic_gpu as mg

__all__ = ["forward_mosaic_gpu", "forward_padded", "gate_vectors", "head_gates"]

_BF16 = jnp.bfloat16


def head_gates(bc, seg, p):
    """``[b, Tp, h]`` float32 gates as ``[b, h, 3, Tp]`` rows (``b, seg, p``): each chunk's gates are contiguous."""
    return jnp.transpose(jnp.stack([bc, seg, p], axis=2).astype(jnp.float32), (0, 3, 2, 1))


def gate_vectors(g_smem, c, interpret, *, transpose=False):
    """The chunk's gates as columns (indexed by the query / state row ``t``) and rows (by the key column ``s``), the
    ``[C, C]`` decay ``D_ts = [s ≤ t, seg_s = seg_t] p_t p_s e^{b_t − b_s}`` (the exponent masked before ``exp``;
    ``transpose``: ``Dᵀ``, rows the key ``s``), and ``f^s``, ``f^e`` ``[C]`` and ``a`` (``backward._state_factors``)."""
    load = mg.loader(interpret)
    col = lambda i: load(g_smem.at[i], mg.WG.reduce(1))
    row = lambda i: load(g_smem.at[i], mg.WG.reduce(0))
    idx = mg.iota(c, interpret)
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    bc, sc, pc = col(0), col(1), col(2)
    t, s = (1, 0) if transpose else (0, 1)  # the axes of the query and the key
    ok = (idx(t) >= idx(s)) & (full(sc, 0) == full(row(1), 1))
    diff = full(bc, 0) - full(row(0), 1)  # b_row − b_column: b_t − b_s, or b_s − b_t when transposed
    diff = -diff if transpose else diff
    dec = jnp.where(ok, jnp.exp(jnp.where(ok, diff, 0.0)), 0.0) * (full(pc, 0) * full(row(2), 1))
    b_end, s_end, p_end = g_smem[0, c - 1], g_smem[1, c - 1], g_smem[2, c - 1]
    fs = jnp.where(sc == 0, jnp.exp(bc), 0.0) * pc
    same = sc == s_end
    fe = jnp.where(same, jnp.exp(jnp.where(same, b_end - bc, 0.0)), 0.0) * (pc * p_end)
    a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end
    return dec, fs, fe, a, idx


def _kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, ht_ref, vs_smem, st_smem, o_smem, s32_smem, kt_smem, att_smem, bar,
            *, chunk, n_chunks, bv, interpret):
    c = chunk
    load = mg.loader(interpret)
    f32 = jnp.float32
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * bv, bv)

    state = mg.load_state(h0_ref.at[ib, ih, :, cols], s32_smem, bar.at[0], interpret)
    st_smem[...] = state.astype(_BF16)
    plgpu.commit_smem()

    def body(step, q_smem, k_smem, v_smem, g_smem, state):
        rows = pl.ds(step[0] * c, c)
        kt = mg.transposed(k_smem, kt_smem, interpret)
        dec, fs, fe, a, _ = gate_vectors(g_smem, c, interpret)
        att = (mg.mma(q_smem, kt, (c, c)) * dec).astype(_BF16)
        inter = mg.mma(q_smem, st_smem, (c, bv)) * lax.broadcast_in_dim(fs, (c, bv), [0])

        if interpret:  # and takes its left operand from shared memory only
            att_smem[...] = att
            att = att_smem
        o = inter + mg.mma(att, v_smem, (c, bv))

        plgpu.wait_smem_to_gmem(0)  # the previous chunk's output has left o_smem
        o_smem[...] = o
        vs = load(v_smem, mg.WG).astype(f32) * lax.broadcast_in_dim(fe, (c, bv), [0])
        vs_smem[...] = vs.astype(_BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[ib, rows, ih, cols])
        state = a * state + mg.mma(kt, vs_smem, state.shape)
        st_smem[...] = state.astype(_BF16)
        plgpu.commit_smem()
        return state

    state = mg.walk_pipeline(body, (q_ref.at[ib, :, ih], k_ref.at[ib, :, ih], v_ref.at[ib, :, ih, cols]),
                             g_ref.at[ib, ih], c=c, order=mg.walk_order(n_chunks, False), n_chunks=n_chunks,
                             own=(vs_smem, st_smem, o_smem, s32_smem), interpret=interpret, init=state)
    mg.store_state(state, s32_smem, ht_ref.at[ib, ih, :, cols])


def forward_mosaic_gpu(q, k, v, bc, seg, p, h0, *, chunk, interpret=None):
    """Per-head decay on Mosaic GPU. Padded inputs: ``q, k [b, Tp, h, Kp]`` (``Kp = key_pad(dk)``),
    ``v [b, Tp, h, Vp]``, float32 gates ``[b, Tp, h]``, ``h0 [b, h, Kp, Vp]`` float32. Returns
    ``(o [b, Tp, h, Vp] float32, S_T [b, h, Kp, Vp] float32)``."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    if kp < 64 or chunk % 64:
        raise ValueError(f"the Mosaic GPU body needs key dim >= 64 and chunk a multiple of 64, got {kp}, {chunk}")
    bv = min(vp, 64)
    gates = head_gates(bc, seg, p)
    interp = bool(interpret)
    sm = functools.partial(mg.smem, plain=interp)
    scratch = [sm((chunk, bv)), sm((kp, bv)), sm((chunk, bv), jnp.float32), sm((kp, bv), jnp.float32),
               sm((kp, chunk)) if interp else None, sm((chunk, chunk)) if interp else None, plgpu.Barrier(num_barriers=1)]
    kern = functools.partial(_kernel, chunk=chunk, n_chunks=tp // chunk, bv=bv, interpret=interp)
    out = [jax.ShapeDtypeStruct((bsz, tp, h, vp), jnp.float32), jax.ShapeDtypeStruct((bsz, h, kp, vp), jnp.float32)]
    call = mg.kernel(kern, out, scratch, (bsz, h, vp // bv), ("b", "h", "v"), interp)
    return call(q.astype(_BF16), k.astype(_BF16), v.astype(_BF16), gates, h0.astype(jnp.float32))


def forward_padded(q, k, v, bc, seg, p, h0, *, chunk, interpret):
    """The Mosaic GPU forward on ``kernel.py``'s padded layout (head dims powers of two >= 16): pads both head
    dims on to ``key_pad`` (zeros: exact; every bf16 operand then has 128-byte rows, the one swizzle ``wgmma``
    wants on both sides) and slices the outputs back. ``interpret=True`` runs Mosaic GPU's interpreter."""
    kp0, vp0 = q.shape[-1], v.shape[-1]
    kp, vp = mg.key_pad(kp0), mg.key_pad(vp0)
    pad = lambda x, n: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])
    h0 = jnp.pad(h0, [(0, 0), (0, 0), (0, kp - kp0), (0, vp - vp0)])
    o, s = forward_mosaic_gpu(pad(q, kp), pad(k, kp), pad(v, vp), bc, seg, p, h0, chunk=chunk, interpret=interpret)
    return o[..., :vp0], s[:, :, :kp0, :vp0]
