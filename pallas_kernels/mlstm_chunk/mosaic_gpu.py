r"""Mosaic GPU bodies of the chunkwise mLSTM: the forward's serial state pass and chunk-parallel outputs, and the
backward's state-gradient walk (the state pass's body, run backwards).

Same chunk algebra as ``forward.py``'s Triton bodies (see ``kernel.py``), written against Mosaic GPU's
one-warpgroup model (``plgpu.kernel``, Lane semantics), as ``pallas_kernels/gla_chunk/mosaic_gpu.py``:

* ``states_mosaic_gpu`` (``chunk_states``): grid ``(batch, heads, value blocks of 64)``; each program owns one
  head's ``[Kp, 64]`` slice of ``C'`` and walks the chunks with a ``fori_loop``, the float32 state the loop carry
  in registers in the ``WGMMA`` accumulator layout. Per chunk: the entering ``C'`` goes out through shared
  memory (TMA store), TMA copies ``k [C, Kp]``, ``v [C, 64]`` and the chunk's gate rows (``ε``, ``φ``) in, the
  value rows are scaled by the write weights in registers (``(K ⊙ ε)ᵀ V = Kᵀ (ε ⊙ V)``) and one ``wgmma``
  (``Kᵀ`` a transposed shared-memory view) gives ``C'⁺ = φ C' + Kᵀ (ε ⊙ V)``.
* ``dstates_mosaic_gpu`` (``backward.py``, pass 3): the same body walking the chunks last to first,
  ``dC' = φ dC'⁺ + Qᵀ (fs ⊙ dO)`` with ``fs = ρ / den`` the readout weights, writing the float32 ``dC'`` after every
  chunk for the Triton chunk-gradient kernel. The backward's states (pass 1) are ``states_mosaic_gpu`` with
  float32 states out.
* ``out_mosaic_gpu`` (``mlstm_chunk_out``): grid ``(batch, heads, chunks, value blocks of 64)``, every chunk at
  once. TMA copies ``q, k``, the value block, the entering ``C'`` block (bf16), ``n'`` and the chunk's gates;
  the row stabiliser ``m_t = max(max_s w_ts, b_t + m)``, ``D = e^{w − m_t}`` and ``ρ = e^{b + m − m_t}`` in
  registers (``[C, C]``, ``WGMMA`` layout; gates as columns and rows of it), three ``wgmma``\ s (``Q Kᵀ``,
  ``(Q Kᵀ ⊙ D) V``, ``Q C'``), the normaliser ``(Q Kᵀ ⊙ D) 1 + ρ ⊙ Q n'`` as row sums in registers, and the
  output ``num / max(|r|, e^{−m_t})`` back through shared memory.

``wgmma`` wants an ``M`` of 64 and the same swizzle on both operands: both head dims are padded to
``key_pad`` (``>= 64``; zeros, exact) and ``C`` is a multiple of 64. Matmul operands are bf16 with float32
accumulation (float32 inputs are rounded to bf16; the entering states ``C'`` are kept in bf16 between the two
kernels, as the Triton body keeps them in the input dtype). One chunk at a time: copies are not yet
overlapped with the matmuls.

Mosaic GPU's interpreter (``interpret=True``; ``tests/test_pallas_mosaic_gpu_mlstm.py``) takes neither a
transposed shared-memory view nor a register operand for ``wgmma``: under it ``Kᵀ`` and ``Q Kᵀ ⊙ D`` are staged
through shared memory, which the compiled bodies do not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic_gpu import interpret_params, key_pad, smem

__all__ = ["dstates_mosaic_gpu", "out_mosaic_gpu", "states_mosaic_gpu"]

_BF16 = jnp.bfloat16
_F32 = jnp.float32
_NEG = -1e30  # forward.NEG
_BV = 64  # value columns per program


def _loader(interpret):
    """Register layouts matter to the lowering only; Mosaic GPU's interpreter reads refs plainly."""
    if interpret:
        return lambda ref, layout: ref[...]
    return lambda ref, layout: plgpu.load(ref, (), layout=layout)


def _interp(interpret):
    return interpret is not None and interpret is not False


def _check(kp, vp, chunk, what):
    for name, d in (("key dim", kp), ("value dim", vp)):
        if d != key_pad(d):
            raise ValueError(f"{what}: the Mosaic GPU body needs the {name} padded to key_pad (a power of two >= 64), "
                             f"got {d}")
    if chunk % 64:
        raise ValueError(f"{what}: the Mosaic GPU body needs chunk a multiple of 64, got {chunk}")


def _walk_kernel(k_ref, v_ref, g_ref, h0_ref, hs_ref, ht_ref, k_smem, v_smem, vs_smem, g_smem, s32_smem, hs_smem,
                 kt_smem, bars, *, chunk, n_chunks, reverse, interpret):
    """``S ← φ S + Kᵀ (ε ⊙ V)`` over the chunks, first to last or (``reverse``) last to first, writing the ``S`` that
    meets each chunk before its update; ``g`` holds ``ε`` and ``φ`` on each token."""
    c = chunk
    load = _loader(interpret)
    wg = plgpu.Layout.WGMMA
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * _BV, _BV)

    plgpu.copy_gmem_to_smem(h0_ref.at[ib, ih, :, cols], s32_smem, bars.at[0])
    plgpu.barrier_wait(bars.at[0])
    state = load(s32_smem, wg)

    def body(j, state):
        n = n_chunks - 1 - j if reverse else j
        rows = pl.ds(n * c, c)
        plgpu.copy_gmem_to_smem(k_ref.at[ib, ih, rows], k_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(v_ref.at[ib, ih, rows, cols], v_smem, bars.at[2])
        plgpu.copy_gmem_to_smem(g_ref.at[ib, ih, :, rows], g_smem, bars.at[3])
        plgpu.wait_smem_to_gmem(0)  # the previous chunk's state has left hs_smem
        hs_smem[...] = state.astype(hs_smem.dtype)  # the state meeting chunk n
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hs_smem, hs_ref.at[ib, ih, n, :, cols])
        for i in range(1, 4):
            plgpu.barrier_wait(bars.at[i])

        if interpret:  # Mosaic GPU's interpreter: its wgmma takes no transposed view
            kt_smem[...] = k_smem[...].T
            kt = kt_smem
        else:
            kt = plgpu.transpose_ref(k_smem, (1, 0))
        ew = load(g_smem.at[0], wg.reduce(1))  # [C], indexed by the token row
        vs = load(v_smem, wg).astype(_F32) * lax.broadcast_in_dim(ew, (c, _BV), [0])
        vs_smem[...] = vs.astype(_BF16)
        plgpu.commit_smem()

        def update(acc):
            plgpu.wgmma(acc, kt, vs_smem)
            return acc[...]

        return g_smem[1, c - 1] * state + pl.run_scoped(update, plgpu.ACC(state.shape, _F32))

    state = lax.fori_loop(0, n_chunks, body, state)
    plgpu.wait_smem_to_gmem(0)
    s32_smem[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s32_smem, ht_ref.at[ib, ih, :, cols])
    plgpu.wait_smem_to_gmem(0)


def _walk(kh, vh, w, fo, s0, *, c, dtype, reverse, interpret, what):
    b, h, tp, kp = kh.shape
    vp, n = vh.shape[-1], tp // c
    _check(kp, vp, c, what)
    interp = bool(interpret)
    gates = jnp.stack([w, jnp.repeat(fo, c, axis=2)], axis=2).astype(_F32)  # [b, h, 2, Tp]: ε, φ on each token
    sm = functools.partial(smem, plain=interp)
    scratch = [sm((c, kp)), sm((c, _BV)), sm((c, _BV)), plgpu.SMEM((2, c), _F32), sm((kp, _BV), _F32),
               sm((kp, _BV), dtype), sm((kp, c)) if interp else None, plgpu.Barrier(num_barriers=4)]
    return plgpu.kernel(
        functools.partial(_walk_kernel, chunk=c, n_chunks=n, reverse=reverse, interpret=interp),
        out_type=[jax.ShapeDtypeStruct((b, h, n, kp, vp), dtype), jax.ShapeDtypeStruct((b, h, kp, vp), _F32)],
        scratch_types=scratch, grid=(b, h, vp // _BV), grid_names=("b", "h", "v"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=interpret_params() if interp else None,
    )(kh.astype(_BF16), vh.astype(_BF16), gates, s0.astype(_F32))


def states_mosaic_gpu(kh, vh, ew, fo, C0, *, c, dtype=_BF16, interpret=False):
    """``forward.chunk_states`` on Mosaic GPU: heads-first ``kh [b, h, Tp, Kp]``, ``vh [b, h, Tp, Vp]`` (head dims
    padded to ``key_pad``), write weights ``ε [b, h, Tp]``, carries ``φ [b, h, N]``, ``C0 [b, h, Kp, Vp]``.
    Returns the ``C'`` entering every chunk ``[b, h, N, Kp, Vp]`` in ``dtype`` and the final one float32.
    ``interpret=True`` runs Mosaic GPU's interpreter."""
    return _walk(kh, vh, ew, fo, C0, c=c, dtype=dtype, reverse=False, interpret=interpret, what="chunk_states")


def dstates_mosaic_gpu(qh, do, fs, fo, dCt, *, c, interpret=False):
    """The backward's state-gradient walk on Mosaic GPU (``backward.py``, pass 3): ``dC' = φ dC'⁺ + Qᵀ (fs ⊙ dO)``
    from the last chunk to the first, the state pass's body run backwards with ``q`` for ``k``, ``dO`` for ``v`` and
    the readout weights ``fs = ρ / den [b, h, Tp]`` for ``ε``. ``qh [b, h, Tp, Kp]``, ``do [b, h, Tp, Vp]`` (head dims
    padded to ``key_pad``), carries ``φ [b, h, N]``, ``dCt [b, h, Kp, Vp]`` the final state's cotangent. Returns the
    ``dC'`` after every chunk ``[b, h, N, Kp, Vp]`` and the one before the first (``dC0``), float32."""
    return _walk(qh, do, fs, fo, dCt, c=c, dtype=_F32, reverse=True, interpret=interpret,
                 what="mlstm_chunk_bwd_dstates")


def _out_kernel(q_ref, k_ref, v_ref, g_ref, hs_ref, n_ref, o_ref, q_smem, k_smem, v_smem, s_smem, n_smem, g_smem,
                o_smem, kt_smem, att_smem, bars, *, chunk, interpret):
    c = chunk
    kp = q_smem.shape[-1]
    load = _loader(interpret)
    wg = plgpu.Layout.WGMMA
    ib, ih, il, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("v")
    rows, cols = pl.ds(il * c, c), pl.ds(iv * _BV, _BV)
    plgpu.copy_gmem_to_smem(q_ref.at[ib, ih, rows], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(k_ref.at[ib, ih, rows], k_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(v_ref.at[ib, ih, rows, cols], v_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(hs_ref.at[ib, ih, il, :, cols], s_smem, bars.at[3])
    plgpu.copy_gmem_to_smem(n_ref.at[ib, ih, il], n_smem, bars.at[4])
    plgpu.copy_gmem_to_smem(g_ref.at[ib, ih, :, rows], g_smem, bars.at[5])
    for i in range(6):
        plgpu.barrier_wait(bars.at[i])

    if interpret:
        iota = lambda d: lax.broadcasted_iota(jnp.int32, (c, c), d)
        kt_smem[...] = k_smem[...].T
        kt = kt_smem
    else:
        iota = lambda d: plgpu.broadcasted_iota(jnp.int32, (c, c), d, layout=wg)
        kt = plgpu.transpose_ref(k_smem, (1, 0))
    col = lambda i: load(g_smem.at[i], wg.reduce(1))  # [C], indexed by the query row t
    row = lambda i: load(g_smem.at[i], wg.reduce(0))  # [C], indexed by the key column s
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    bc, sc, mc = col(0), col(1), col(4)
    ok = (iota(0) >= iota(1)) & (full(sc, 0) == full(row(1), 1))
    diff = full(bc, 0) - full(row(0), 1)
    m_intra = jnp.max(jnp.where(ok, diff + full(row(3), 1), _NEG), axis=1)
    inter = jnp.where(sc == 0.0, bc + mc, _NEG)
    m_t = jnp.maximum(m_intra, inter)
    d = jnp.exp(jnp.where(ok, diff + full(row(2), 1), _NEG) - full(m_t, 0))
    rho = jnp.exp(inter - m_t)

    def qk(acc):
        plgpu.wgmma(acc, q_smem, kt)
        return acc[...]

    att = pl.run_scoped(qk, plgpu.ACC((c, c), _F32)) * d
    qn = jnp.sum(load(q_smem, wg).astype(_F32) * lax.broadcast_in_dim(load(n_smem, wg.reduce(0)), (c, kp), [1]), axis=1)
    raw = jnp.sum(att, axis=1) + rho * qn
    den = jnp.maximum(jnp.abs(raw), jnp.exp(-m_t))
    att = att.astype(_BF16)
    if interpret:  # and takes its left operand from shared memory only
        att_smem[...] = att
        plgpu.commit_smem()
        att = att_smem

    def readout(acc):
        plgpu.wgmma(acc, q_smem, s_smem)
        return acc[...]

    def intra(acc):
        plgpu.wgmma(acc, att, v_smem)
        return acc[...]

    cb = lambda x: lax.broadcast_in_dim(x, (c, _BV), [0])
    num = pl.run_scoped(intra, plgpu.ACC((c, _BV), _F32)) + pl.run_scoped(readout, plgpu.ACC((c, _BV), _F32)) * cb(rho)
    o_smem[...] = num / cb(den)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[ib, ih, rows, cols])
    plgpu.wait_smem_to_gmem(0)


def out_mosaic_gpu(qh, kh, vh, bt, st, it, et, m_in, hs, n_in, *, c, interpret=False):
    """``mlstm_chunk_out`` on Mosaic GPU: heads-first ``qh, kh [b, h, Tp, Kp]``, ``vh [b, h, Tp, Vp]`` (head dims
    padded to ``key_pad``), gates ``b, seg, i, e [b, h, Tp]``, entering stabilisers ``m [b, h, N]``, states
    ``C' [b, h, N, Kp, Vp]`` (bf16) and normalisers ``n' [b, h, N, Kp]``. Returns ``o [b, h, Tp, Vp]`` float32."""
    b, h, tp, kp = qh.shape
    vp, n = vh.shape[-1], tp // c
    _check(kp, vp, c, "mlstm_chunk_out")
    interp = bool(interpret)
    gates = jnp.stack([bt, st, it, et, jnp.repeat(m_in, c, axis=2)], axis=2).astype(_F32)  # [b, h, 5, Tp]
    sm = functools.partial(smem, plain=interp)
    scratch = [sm((c, kp)), sm((c, kp)), sm((c, _BV)), sm((kp, _BV)), plgpu.SMEM((kp,), _F32), plgpu.SMEM((5, c), _F32),
               sm((c, _BV), _F32), sm((kp, c)) if interp else None, sm((c, c)) if interp else None,
               plgpu.Barrier(num_barriers=6)]
    return plgpu.kernel(
        functools.partial(_out_kernel, chunk=c, interpret=interp),
        out_type=jax.ShapeDtypeStruct((b, h, tp, vp), _F32),
        scratch_types=scratch, grid=(b, h, n, vp // _BV), grid_names=("b", "h", "n", "v"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=interpret_params() if interp else None,
    )(qh.astype(_BF16), kh.astype(_BF16), vh.astype(_BF16), gates, hs.astype(_BF16), n_in.astype(_F32))
