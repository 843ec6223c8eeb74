r"""Mosaic GPU bodies of the per-head GLA backward's two serial passes (``backward.py``'s ``_states`` and ``_dstates``).

Both passes are the same walk over the chunks, one forwards and one backwards, each a rank-``C`` update of a
float32 ``[Kp, 64]`` carry per chunk (gates as in ``backward.py``: ``f^s, f^e, a`` from ``b, seg, p``):

* the chunk states, forwards: ``H_n = S`` (the state *before* chunk ``n``), then ``S ← a S + Kᵀ (V ⊙ f^e)``;
* the state gradients, backwards: ``dH_n = dS`` (the gradient of the state *after* chunk ``n``), then
  ``dS ← a dS + Qᵀ (dO ⊙ f^s)``; the carry left at the start is ``dh0``.

One body (:func:`_walk_kernel`) written against Mosaic GPU's one-warpgroup model (``plgpu.kernel``, Lane semantics),
as the forward (``mosaic_gpu.py``): grid ``(batch, heads, value blocks of 64)``; each program owns one head's
``[Kp, 64]`` slice and walks the chunks with a ``fori_loop``; the carry lives in registers in the ``WGMMA``
accumulator layout. Per chunk, TMA copies ``X [C, Kp]`` (``K`` or ``Q``), ``Y [C, 64]`` (``V`` or ``dO``) and the
chunk's gates (``b, seg, p``: heads-first rows of ``C`` floats) into shared memory; the carry goes out through
shared memory with a TMA store (float32: the chunk-gradient kernel reads ``⟨S, dS'⟩`` from it for the decay
gradient); the rows of ``Y`` are scaled in registers and stored as bf16, and one ``wgmma`` (``Xᵀ`` a transposed
shared-memory view, ``M = Kp``) adds the update. The arrays stay time-major ``[b, Tp, h, d]`` (strided TMA boxes).

Matmul operands are bf16 with float32 accumulation (float32 inputs are rounded to bf16; the Triton bodies keep them
float32). Both head dims are padded to :func:`~pallas_kernels._mosaic_gpu.key_pad` (``kernel.py`` pads the per-head
inputs for this backend: exact, padded channels are zero) and ``C`` is a multiple of 64.

The chunk-parallel gradient kernel (``dQ, dK, dV, db``) keeps its Triton body under ``backend="mosaic_gpu"``: it is
no serial pass, it reads ``H`` and ``dH`` from these walks as the Triton walks write them (float32
``[b, h, N, Kp, Vp]``), and its port (eight matmuls per chunk, six against a transposed operand, row sums for ``db``)
is a step of its own. Under Mosaic GPU's interpreter (no transposed shared-memory view for ``wgmma``) ``Xᵀ`` is
staged through shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic_gpu import interpret_params, key_pad, smem

__all__ = ["head_walks_mosaic_gpu"]

_BF16 = jnp.bfloat16
f32 = jnp.float32
_WG = plgpu.Layout.WGMMA


def _walk_kernel(x_ref, y_ref, g_ref, init_ref, hs_ref, last_ref, x_smem, y_smem, ys_smem, s32_smem, g_smem, xt_smem,
                 bars, *, chunk, n_chunks, bv, reverse, interpret):
    c = chunk
    load = (lambda ref, layout: ref[...]) if interpret else (lambda ref, layout: plgpu.load(ref, (), layout=layout))
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * bv, bv)

    plgpu.copy_gmem_to_smem(init_ref.at[ib, ih, :, cols], s32_smem, bars.at[0])
    plgpu.barrier_wait(bars.at[0])
    carry = load(s32_smem, _WG)

    def body(i, carry):
        n = n_chunks - 1 - i if reverse else i
        rows = pl.ds(n * c, c)
        plgpu.copy_gmem_to_smem(x_ref.at[ib, rows, ih], x_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(y_ref.at[ib, rows, ih, cols], y_smem, bars.at[2])
        plgpu.copy_gmem_to_smem(g_ref.at[ib, ih, :, rows], g_smem, bars.at[3])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's carry has left s32_smem
        s32_smem[...] = carry  # H_n (S before chunk n) or dH_n (dS after chunk n)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_smem, hs_ref.at[ib, ih, n, :, cols])
        for j in range(1, 4):
            plgpu.barrier_wait(bars.at[j])

        col = lambda j: load(g_smem.at[j], _WG.reduce(1))  # [C], indexed by the token
        bc, sc, pc = col(0), col(1), col(2)
        b_end, s_end, p_end = g_smem[0, c - 1], g_smem[1, c - 1], g_smem[2, c - 1]
        if reverse:  # f^s: the state read, first document of the chunk only
            scale = jnp.where(sc == 0, jnp.exp(bc), 0.0) * pc
        else:  # f^e: the state write, last document of the chunk only, the exponent masked before exp
            same = sc == s_end
            scale = jnp.where(same, jnp.exp(jnp.where(same, b_end - bc, 0.0)), 0.0) * (pc * p_end)
        ys = load(y_smem, _WG).astype(f32) * lax.broadcast_in_dim(scale, (c, bv), [0])
        ys_smem[...] = ys.astype(_BF16)
        if interpret:  # Mosaic GPU's interpreter: its wgmma takes no transposed view: a transposed copy stands in
            xt_smem[...] = x_smem[...].T
            xt = xt_smem
        else:
            xt = plgpu.transpose_ref(x_smem, (1, 0))
        plgpu.commit_smem()
        a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end

        def update(acc):
            plgpu.wgmma(acc, xt, ys_smem)
            return acc[...]

        return a * carry + pl.run_scoped(update, plgpu.ACC(carry.shape, f32))

    carry = lax.fori_loop(0, n_chunks, body, carry)
    plgpu.wait_smem_to_gmem(0)
    s32_smem[...] = carry
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s32_smem, last_ref.at[ib, ih, :, cols])
    plgpu.wait_smem_to_gmem(0)


def _walk(x, y, gates, init, *, chunk, reverse, interpret):
    bsz, tp, h, kp = x.shape
    vp = y.shape[-1]
    bv = 64
    kern = functools.partial(_walk_kernel, chunk=chunk, n_chunks=tp // chunk, bv=bv, reverse=reverse,
                             interpret=interpret)
    sm = functools.partial(smem, plain=interpret)
    scratch = [sm((chunk, kp)), sm((chunk, bv)), sm((chunk, bv)), sm((kp, bv), f32), plgpu.SMEM((3, chunk), f32),
               sm((kp, chunk)) if interpret else None, plgpu.Barrier(num_barriers=4)]
    out = [jax.ShapeDtypeStruct((bsz, h, tp // chunk, kp, vp), f32), jax.ShapeDtypeStruct((bsz, h, kp, vp), f32)]
    return plgpu.kernel(
        kern, out_type=out, scratch_types=scratch, grid=(bsz, h, vp // bv), grid_names=("b", "h", "v"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=interpret_params() if interpret else None,
    )(x.astype(_BF16), y.astype(_BF16), gates, init.astype(f32))


def head_walks_mosaic_gpu(q, k, v, bc, seg, p, h0, do, dht, *, chunk, interpret):
    """The per-head backward's serial passes on Mosaic GPU. Padded inputs as ``backward.gla_head_bwd``'s, with both
    head dims at ``key_pad``: ``q, k [b, Tp, h, Kp]``, ``v, do [b, Tp, h, Vp]``, gates ``bc, seg, p [b, Tp, h]``
    float32, ``h0, dht [b, h, Kp, Vp]``. Returns ``H, dH [b, h, N, Kp, Vp]`` (the state before and the gradient of
    the state after every chunk) and ``dh0 [b, h, Kp, Vp]``, all float32. ``interpret``: Mosaic GPU's interpreter."""
    kp, vp = q.shape[-1], v.shape[-1]
    if chunk % 64 or kp != key_pad(kp) or vp != key_pad(vp):
        raise ValueError(f"the Mosaic GPU backward needs chunk_size a multiple of 64 and head dims padded to key_pad "
                         f"(a power of two >= 64), got chunk {chunk}, key dim {kp}, value dim {vp}")
    gates = jnp.transpose(jnp.stack([bc, seg, p], axis=2).astype(f32), (0, 3, 2, 1))  # [b, h, 3, Tp]
    walk = functools.partial(_walk, gates=gates, chunk=chunk, interpret=bool(interpret))
    hs, _ = walk(k, v, init=h0, reverse=False)
    dhs, dh0 = walk(q, do, init=dht, reverse=True)
    return hs, dhs, dh0
