r"""Mosaic GPU bodies of the chunked delta rule's state pass, output kernel and backward state-gradient walk (the
lowering jax 0.11 makes the default).

Same chunk algebra as ``forward.py``'s Triton bodies (see ``kernel.py``), written against Mosaic GPU's one-warpgroup
model (``plgpu.kernel``, Lane semantics), after ``pallas_kernels/gla_chunk/mosaic_gpu.py``:

* :func:`chunk_states_mosaic_gpu`, the serial pass: grid ``(batch, heads, value blocks of 64)``; each program owns
  one head's ``[Kp, 64]`` state slice and walks the chunks; the float32 state is the walk's carry, in registers in
  the ``WGMMA`` accumulator layout, and a bf16 copy in shared memory is the operand of the next chunk's first
  matmul. The chunks' ``k, w [C, Kp]``, ``u [C, 64]`` and gates (``g, rev, seg``: heads-first rows of ``C`` floats)
  come through a TMA pipeline (below); per chunk, two ``wgmma``\ s:
  ``U' = U − W S`` and ``S ← γ_C S + Kᵀ (U' ⊙ e^{rev})`` (the decay to the chunk's end as a row scaling of ``U'``;
  ``Kᵀ`` a transposed shared-memory view). ``H`` (the state entering the chunk: the bf16 operand copy itself) and
  ``U'`` leave through shared memory with TMA stores, in bf16: they are only ever the output kernel's ``wgmma``
  operands.
* :func:`chunk_out_mosaic_gpu`, chunk-parallel: grid ``(batch, heads, chunks, value blocks of 128; of 64 for chunks
  above 64, to bound the registers)``, three ``wgmma``\ s: ``Q Kᵀ`` (``[C, C]``, masked and decayed in registers, the
  exponent masked before ``exp``), ``O = scale [(Q H) ⊙ γ + (Q Kᵀ ⊙ Γ) U']`` (the decayed readout as a row scaling
  of ``Q H``).
* :func:`chunk_dstates_mosaic_gpu`, the backward's serial pass (``backward.py``'s kernel 3; its kernel 2, the chunk
  states, is :func:`chunk_states_mosaic_gpu` again): the state pass's grid and carry, walking the chunks in reverse
  with the float32 ``dS`` slice ``[Kp, 64]`` as the carry and its bf16 copy in shared memory. The state-free term
  of ``dU'``, ``s (Q Kᵀ ⊙ Γ)ᵀ dO``, is formed for every chunk at once before the walk (``backward._dv_local``, as
  fla's ``chunk_bwd_dv_local``), so the serial loop holds only the state-side matmuls. The chunks'
  ``q, k, w [C, Kp]``, ``dO [C, 64]``, that term ``[C, 64]`` (bf16) and gates come through the TMA pipeline; per
  chunk, ``dU' = s (Q Kᵀ ⊙ Γ)ᵀ dO + e^{rev} ⊙ K dS⁺`` (one ``wgmma``) and ``dS ← γ_C dS⁺ + Qᵀ (s γ ⊙ dO) − Wᵀ dU'``
  (both products into one accumulator: ``−dU'`` and ``s γ ⊙ dO`` staged in shared memory as bf16, ``Qᵀ, Wᵀ``
  transposed views). ``dH`` (the bf16 operand copy) and ``−dU'`` (the bf16 operand staged for that update) leave
  with TMA stores each chunk: the gradient kernels (``backward_mosaic_gpu.py``) read them, as fla's ``bwd_dhu``
  hands ``dv2`` on.

The WY factors (``wy.py``'s kernel 1, forward and backward) have their Mosaic GPU body in ``wy_mosaic_gpu.py``
(``K Kᵀ`` and ``W``, ``U`` by ``wgmma``, the triangular inverse by float32 forward substitution in registers; the
Triton body where its shared memory would pass the budget, at ``C = 128`` with a head dim of 256). The backward's two
chunk-parallel gradient kernels (``backward.py`` 4a, 4b) have their Mosaic GPU bodies in ``backward_mosaic_gpu.py``;
they take ``H``, ``dH``, ``U'`` and ``−dU'`` from these walks in bf16.

``wgmma`` wants an ``M`` of 64 and the same swizzle on both operands: both head dims are padded to
:func:`~pallas_kernels._mosaic_gpu.key_pad` (``kernel.py`` pads them for this backend: exact, padded channels are
zero) and ``C`` is a multiple of 64. Matmul operands are bf16 with float32 accumulation: float32 inputs are rounded
to bf16 (the Triton bodies keep them float32 at ``HIGHEST``).

Both walks take their chunks' inputs through ``plgpu.emit_pipeline`` with the state as its carry
(``_mosaic_gpu.chunk_specs``, in walk order): with two slots, chunk ``n + 1``'s TMA copies are in flight while
chunk ``n``'s matmuls run; one slot where two would pass the shared-memory budget (``_mosaic_gpu.walk_stages``).

Checked without a GPU (``tests/test_pallas_mosaic_gpu_delta.py``): the kernels lower for CUDA through
``jax.export`` (the StableHLO holds three ``mosaic_gpu`` custom calls for the forward with the WY factors, eight
under ``jax.grad`` with the gradient kernels, and no Triton call), and
Mosaic GPU's own interpreter (``interpret=True`` here; it simulates TMA, barriers and ``wgmma`` on the CPU) runs them
against the XLA chunked form, outputs and gradients. That interpreter takes neither a transposed shared-memory view
nor a register operand for ``wgmma``, so under it ``Kᵀ``, ``Qᵀ``, ``Wᵀ`` and the intra-chunk matrix are staged
through shared memory. Shared memory of the backward walk: ``3 C Kp + 2 C 64`` bf16 and the ``[3, C]`` gates per
slot, plus ``2 C 64`` bf16 and the ``[Kp, 64]`` state gradient in bf16 and float32: 194 KiB at ``C = 64, Kp = 128``
(two slots), 210 KiB at ``C = 128, Kp = 128`` and 225 KiB at ``C = 64, Kp = 256`` (one slot; an H100 has 227 KiB).
The precomputed term comes in bf16 so that two slots still fit at ``C = 64, Kp = 128`` (float32: 210 KiB).
At ``C = 128, Kp = 256`` the walks would ask for more than that even with one slot: they raise a ``ValueError``
(``_mosaic_gpu.walk_stages``) that names the sizes, before lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic_gpu as mg

__all__ = ["check_shapes", "chunk_dstates_mosaic_gpu", "chunk_out_mosaic_gpu", "chunk_states_mosaic_gpu"]

_BF16 = jnp.bfloat16
f32 = jnp.float32


def check_shapes(c: int, kp: int, vp: int) -> None:
    """What ``wgmma`` needs of the prepared inputs: ``c`` a multiple of 64, both head dims padded to ``key_pad``."""
    if c % 64:
        raise ValueError(f"the Mosaic GPU delta-rule bodies need chunk_size a multiple of 64, got {c}")
    if kp != mg.key_pad(kp):
        raise ValueError(f"the Mosaic GPU delta-rule bodies need the key head dim (k.shape[-1]) padded to key_pad "
                         f"(a power of two >= 64), got {kp}")
    if vp != mg.key_pad(vp):
        raise ValueError(f"the Mosaic GPU delta-rule bodies need the value head dim (v.shape[-1]) padded to key_pad "
                         f"(a power of two >= 64), got {vp}")


def _helpers(interpret):
    """Loads and the gate vectors of one chunk from its ``[rows, C]`` shared-memory block, as columns (indexed by the
    query / state row ``t``) and rows (indexed by the key column ``s``)."""
    load = mg.loader(interpret)
    col = lambda g_smem, i: load(g_smem.at[i], mg.WG.reduce(1))
    row = lambda g_smem, i: load(g_smem.at[i], mg.WG.reduce(0))
    return load, col, row


def _states_kernel(k_ref, w_ref, u_ref, g_ref, h0_ref, hs_ref, ht_ref, un_ref, st_smem, s32_smem, un_smem, us_smem,
                   kt_smem, bar, *, chunk, n_chunks, bv, interpret):
    c = chunk
    load, col, _ = _helpers(interpret)
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * bv, bv)
    bcast = lambda x, d: lax.broadcast_in_dim(x, (c, d), [0])

    state = mg.load_state(h0_ref.at[ib, ih, :, cols], s32_smem, bar.at[0], interpret)
    st_smem[...] = state.astype(_BF16)
    plgpu.commit_smem()

    order = mg.walk_order(n_chunks, reverse=False)

    def body(step, k_smem, w_smem, u_smem, g_smem, state):
        n = order(step[0])
        rows = pl.ds(n * c, c)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's U' has left un_smem
        plgpu.copy_smem_to_gmem(st_smem, hs_ref.at[ib, ih, n, :, cols])  # H: the state entering chunk n, as bf16
        u_new = load(u_smem, mg.WG).astype(f32) - mg.mma(w_smem, st_smem, (c, bv))  # U' = U − W S
        un_smem[...] = u_new.astype(_BF16)
        g_end, s_end = g_smem[0, c - 1], g_smem[2, c - 1]
        to_end = jnp.where(col(g_smem, 2) == s_end, jnp.exp(col(g_smem, 1)), 0.0)  # e^{rev}, the chunk's last document
        us_smem[...] = (u_new * bcast(to_end, bv)).astype(_BF16)
        kt = mg.transposed(k_smem, kt_smem, interpret)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(un_smem, un_ref.at[ib, ih, rows, cols])
        total = jnp.where(s_end == 0, jnp.exp(g_end), 0.0)  # γ_C: zero across a reset inside the chunk
        state = total * state + mg.mma(kt, us_smem, state.shape)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # H's copy has read st_smem (U''s may still be in flight)
        st_smem[...] = state.astype(_BF16)
        plgpu.commit_smem()
        return state

    state = mg.walk_pipeline(body, (k_ref.at[ib, ih], w_ref.at[ib, ih], u_ref.at[ib, ih, :, cols]), g_ref.at[ib, ih], c=c,
                             order=order, n_chunks=n_chunks, own=(st_smem, s32_smem, un_smem, us_smem),
                             interpret=interpret, init=state)
    mg.store_state(state, s32_smem, ht_ref.at[ib, ih, :, cols])


def _gates(g, rev, seg):
    """``[b, h, Tp]`` float32 gates stacked heads-first as ``[b, h, 3, Tp]``: each chunk's gates are contiguous rows."""
    return jnp.stack([g, rev, seg], axis=2).astype(f32)


def chunk_states_mosaic_gpu(kh, w, u, g, rev, seg, h0p, *, c, interpret):
    """The serial pass on Mosaic GPU (``forward.chunk_states``'s contract, ``with_u_new=True``): ``k, w [b, h, Tp, Kp]``,
    ``u [b, h, Tp, Vp]``, gates ``g, rev, seg [b, h, Tp]`` float32, ``h0 [b, h, Kp, Vp]`` float32, head dims padded
    to ``key_pad`` and ``c`` a multiple of 64 (:func:`check_shapes`). Returns ``H [b, h, N, Kp, Vp]`` bf16, the final
    state ``[b, h, Kp, Vp]`` float32 and ``U' [b, h, Tp, Vp]`` bf16. ``interpret``: Mosaic GPU's interpreter."""
    b, h, tp, kp = kh.shape
    vp = u.shape[-1]
    check_shapes(c, kp, vp)
    bv = 64
    sm = functools.partial(mg.smem, plain=interpret)
    scratch = [sm((kp, bv)), sm((kp, bv), f32), sm((c, bv)), sm((c, bv)), sm((kp, c)) if interpret else None,
               plgpu.Barrier(num_barriers=1)]
    kern = functools.partial(_states_kernel, chunk=c, n_chunks=tp // c, bv=bv, interpret=interpret)
    out = [jax.ShapeDtypeStruct((b, h, tp // c, kp, vp), _BF16), jax.ShapeDtypeStruct((b, h, kp, vp), f32),
           jax.ShapeDtypeStruct((b, h, tp, vp), _BF16)]
    call = mg.kernel(kern, out, scratch, (b, h, vp // bv), ("b", "h", "v"), interpret)
    return call(kh.astype(_BF16), w.astype(_BF16), u, _gates(g, rev, seg), h0p.astype(f32))


def _out_kernel(q_ref, k_ref, un_ref, g_ref, h_ref, o_ref, q_smem, k_smem, un_smem, h_smem, g_smem, o_smem, kt_smem,
                att_smem, bars, *, chunk, bv, scale, interpret):
    c = chunk
    _, col, row = _helpers(interpret)
    ib, ih, n, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("v")
    rows, cols = pl.ds(n * c, c), pl.ds(iv * bv, bv)
    mg.copy_in(bars, 0, (q_ref.at[ib, ih, rows], q_smem), (k_ref.at[ib, ih, rows], k_smem), (un_ref.at[ib, ih, rows, cols], un_smem),
               (h_ref.at[ib, ih, n, :, cols], h_smem), (g_ref.at[ib, ih, :, rows], g_smem))

    idx = mg.iota(c, interpret)
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    gc, sc = col(g_smem, 0), col(g_smem, 2)
    ok = (idx(0) >= idx(1)) & (full(sc, 0) == full(row(g_smem, 2), 1))
    dec = jnp.where(ok, jnp.exp(jnp.where(ok, full(gc, 0) - full(row(g_smem, 0), 1), 0.0)), 0.0)  # Γ
    kt = mg.transposed(k_smem, kt_smem, interpret)
    if interpret:
        plgpu.commit_smem()
    att = (mg.mma(q_smem, kt, (c, c)) * dec).astype(_BF16)
    gamma = jnp.where(sc == 0, jnp.exp(gc), 0.0)  # decay from the chunk's start, first document only
    inter = mg.mma(q_smem, h_smem, (c, bv)) * lax.broadcast_in_dim(gamma, (c, bv), [0])
    if interpret:  # the interpreter's wgmma takes its left operand from shared memory only
        att_smem[...] = att
        plgpu.commit_smem()
        att = att_smem
    o = scale * (inter + mg.mma(att, un_smem, (c, bv)))
    o_smem[...] = o.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[ib, ih, rows, cols])
    plgpu.wait_smem_to_gmem(0)


def chunk_out_mosaic_gpu(qh, kh, un, g, rev, seg, hs, *, c, scale, dtype, interpret):
    """``O = scale [(γ ⊙ Q) H + (Q Kᵀ ⊙ Γ) U']`` for every chunk at once on Mosaic GPU: ``q, k [b, h, Tp, Kp]``,
    ``U' [b, h, Tp, Vp]`` and ``H [b, h, N, Kp, Vp]`` from :func:`chunk_states_mosaic_gpu`, gates ``g, rev, seg``
    float32 ``[b, h, Tp]`` (stacked as the state pass stacks them: XLA builds the array once). Returns ``O [b, h, Tp, Vp]`` in ``dtype``."""
    b, h, tp, kp = qh.shape
    vp = un.shape[-1]
    check_shapes(c, kp, vp)
    bv = min(vp, 128 if c == 64 else 64)  # registers: the [C, bv] float32 accumulators live beside the [C, C] matrix
    kern = functools.partial(_out_kernel, chunk=c, bv=bv, scale=scale, interpret=interpret)
    sm = functools.partial(mg.smem, plain=interpret)
    scratch = [sm((c, kp)), sm((c, kp)), sm((c, bv)), sm((kp, bv)), plgpu.SMEM((3, c), f32), sm((c, bv), dtype),
               sm((kp, c)) if interpret else None, sm((c, c)) if interpret else None, plgpu.Barrier(num_barriers=5)]
    out = jax.ShapeDtypeStruct((b, h, tp, vp), dtype)
    call = mg.kernel(kern, out, scratch, (b, h, tp // c, vp // bv), ("b", "h", "n", "v"), interpret)
    return call(qh.astype(_BF16), kh.astype(_BF16), un.astype(_BF16), _gates(g, rev, seg), hs.astype(_BF16))


def _dstates_kernel(q_ref, k_ref, w_ref, do_ref, dvl_ref, g_ref, dht_ref, dhs_ref, dh0_ref, ndu_ref, dos_smem, du_smem, ds_smem,
                    s32_smem, qt_smem, wt_smem, bar, *, chunk, n_chunks, bv, scale, interpret):
    c = chunk
    load, col, _ = _helpers(interpret)
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * bv, bv)
    bcast = lambda x, d: lax.broadcast_in_dim(x, (c, d), [0])

    dstate = mg.load_state(dht_ref.at[ib, ih, :, cols], s32_smem, bar.at[0], interpret)
    ds_smem[...] = dstate.astype(_BF16)
    plgpu.commit_smem()
    order = mg.walk_order(n_chunks, reverse=True)

    def body(step, q_smem, k_smem, w_smem, do_smem, dvl_smem, g_smem, dstate):
        n = order(step[0])
        rows = pl.ds(n * c, c)
        plgpu.copy_smem_to_gmem(ds_smem, dhs_ref.at[ib, ih, n, :, cols])  # dH: the gradient of the state after chunk n
        gc, rc, sc = col(g_smem, 0), col(g_smem, 1), col(g_smem, 2)
        g_end, s_end = g_smem[0, c - 1], g_smem[2, c - 1]
        local = load(dvl_smem, mg.WG).astype(f32)  # s (Q Kᵀ ⊙ Γ)ᵀ dO, formed before the walk
        qt = mg.transposed(q_smem, qt_smem, interpret)
        wt = mg.transposed(w_smem, wt_smem, interpret)
        if interpret:
            plgpu.commit_smem()
        to_end = jnp.where(sc == s_end, jnp.exp(rc), 0.0)  # e^{rev}, the chunk's last document
        # dU' = s (Q Kᵀ ⊙ Γ)ᵀ dO + e^{rev} ⊙ K dS⁺
        du = local + bcast(to_end, bv) * mg.mma(k_smem, ds_smem, (c, bv))
        gamma = jnp.where(sc == 0, jnp.exp(gc), 0.0)  # decay from the chunk's start, first document only
        du_smem[...] = (-du).astype(_BF16)
        dos_smem[...] = (load(do_smem, mg.WG).astype(f32) * bcast(scale * gamma, bv)).astype(_BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(du_smem, ndu_ref.at[ib, ih, rows, cols])  # −dU', for the gradient kernels
        total = jnp.where(s_end == 0, jnp.exp(g_end), 0.0)  # γ_C: zero across a reset inside the chunk

        def step(acc):  # Qᵀ (s γ ⊙ dO) − Wᵀ dU', one accumulator
            plgpu.wgmma(acc, qt, dos_smem)
            plgpu.wgmma(acc, wt, du_smem)
            return acc[...]

        dstate = total * dstate + pl.run_scoped(step, plgpu.ACC(dstate.shape, f32))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dH's and −dU''s copies have read ds_smem and du_smem
        ds_smem[...] = dstate.astype(_BF16)
        plgpu.commit_smem()
        return dstate

    dstate = mg.walk_pipeline(body, (q_ref.at[ib, ih], k_ref.at[ib, ih], w_ref.at[ib, ih], do_ref.at[ib, ih, :, cols],
                                     dvl_ref.at[ib, ih, :, cols]),
                              g_ref.at[ib, ih], c=c, order=order, n_chunks=n_chunks,
                              own=(dos_smem, du_smem, ds_smem, s32_smem), interpret=interpret, init=dstate)
    mg.store_state(dstate, s32_smem, dh0_ref.at[ib, ih, :, cols])


def chunk_dstates_mosaic_gpu(qh, kh, w, do, local, g, rev, seg, dht, *, c, scale, interpret):
    """The backward's serial pass on Mosaic GPU (``backward.py``'s kernel 3): walking the chunks backwards,
    ``dS = γ_C dS⁺ + (γ ⊙ Q)ᵀ dÕ − Wᵀ dU'`` with ``dU' = local + e^{rev} ⊙ K dS⁺`` (``dÕ = scale dO``).
    ``q, k, w [b, h, Tp, Kp]``, ``dO [b, h, Tp, Vp]``, ``local [b, h, Tp, Vp]`` the state-free term
    ``(Q Kᵀ ⊙ Γ)ᵀ dÕ`` of every chunk (``backward._dv_local``, formed chunk-parallel before the walk, as fla's
    ``chunk_bwd_dv_local``; taken in bf16), gates ``g, rev, seg [b, h, Tp]`` float32, ``dS_T [b, h, Kp, Vp]`` float32
    (:func:`check_shapes`). Returns ``dH [b, h, N, Kp, Vp]`` bf16 (the gradient of the state after every chunk: only
    ever a matmul operand of the gradient kernels, and the bf16 copy this pass multiplies by), ``dh0 [b, h, Kp,
    Vp]`` float32 and ``−dU' [b, h, Tp, Vp]`` bf16 (the negated gradient of ``U'``, as this pass multiplies by it).
    Grid ``(batch, heads, value blocks of 64)``, as :func:`chunk_states_mosaic_gpu`."""
    b, h, tp, kp = qh.shape
    vp = do.shape[-1]
    check_shapes(c, kp, vp)
    bv = 64
    sm = functools.partial(mg.smem, plain=interpret)
    staging = [sm((kp, c)), sm((kp, c))] if interpret else [None] * 2  # the interpreter's transposes
    scratch = [sm((c, bv)), sm((c, bv)), sm((kp, bv)), sm((kp, bv), f32), *staging, plgpu.Barrier(num_barriers=1)]
    kern = functools.partial(_dstates_kernel, chunk=c, n_chunks=tp // c, bv=bv, scale=scale, interpret=interpret)
    out = [jax.ShapeDtypeStruct((b, h, tp // c, kp, vp), _BF16), jax.ShapeDtypeStruct((b, h, kp, vp), f32),
           jax.ShapeDtypeStruct((b, h, tp, vp), _BF16)]
    call = mg.kernel(kern, out, scratch, (b, h, vp // bv), ("b", "h", "v"), interpret)
    return call(qh.astype(_BF16), kh.astype(_BF16), w.astype(_BF16), do.astype(_BF16), local.astype(_BF16),
                _gates(g, rev, seg), dht.astype(f32))
