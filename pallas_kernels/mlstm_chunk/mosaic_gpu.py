r"""Mosaic GPU bodies of the chunkwise mLSTM: the forward's serial state pass and chunk-parallel outputs, and the
backward's state-gradient walk (the state pass's body, run backwards); the backward's chunk-parallel passes are in
``backward_mosaic_gpu.py``.

Same chunk algebra as ``forward.py``'s Triton bodies (see ``kernel.py``), written against Mosaic GPU's
one-warpgroup model (``plgpu.kernel``, Lane semantics), as ``pallas_kernels/gla_chunk/mosaic_gpu.py``:

* ``states_mosaic_gpu`` (``chunk_states``): the serial state pass ``C'⁺ = φ C' + Kᵀ (ε ⊙ V)`` (``(K ⊙ ε)ᵀ V``, the
  write weights ``ε`` as a row scaling of ``V``), writing the ``C'`` entering every chunk.
* ``dstates_mosaic_gpu`` (``backward.py``, pass 3): the same walk from the last chunk to the first,
  ``dC' = φ dC'⁺ + Qᵀ (fs ⊙ dO)`` with ``fs = ρ / den`` the readout weights, writing the float32 ``dC'`` after every
  chunk for the chunk-gradient kernels. The backward's states (pass 1) are ``states_mosaic_gpu`` with
  float32 states out.

  Both are :func:`~pallas_kernels._mosaic_gpu.linear_walk` on the heads-first arrays (its docstring gives the grid,
  the layouts and the interpreter's staging).
* ``out_mosaic_gpu`` (``mlstm_chunk_out``): grid ``(batch, heads, chunks, value blocks of 64)``, every chunk at
  once. TMA copies ``q, k``, the value block, the entering ``C'`` block (bf16), ``n'`` and the chunk's gates;
  the row stabiliser ``m_t = max(max_s w_ts, b_t + m)``, ``D = e^{w − m_t}`` and ``ρ = e^{b + m − m_t}`` in
  registers (``readout_weights``, shared with the backward's rows kernel; ``[C, C]``, ``WGMMA`` layout; gates as
  columns and rows of it), three ``wgmma``\ s (``Q Kᵀ``, ``(Q Kᵀ ⊙ D) V``, ``Q C'``), the normaliser
  ``(Q Kᵀ ⊙ D) 1 + ρ ⊙ Q n'`` as row sums in registers, and the output ``num / max(|r|, e^{−m_t})`` back through
  shared memory.

``wgmma`` wants an ``M`` of 64 and the same swizzle on both operands: both head dims are padded to
``key_pad`` (``>= 64``; zeros, exact) and ``C`` is a multiple of 64. Matmul operands are bf16 with float32
accumulation (float32 inputs are rounded to bf16; the entering states ``C'`` are kept in bf16 between the two
kernels, as the Triton body keeps them in the input dtype). The two walks take their chunks through
``linear_walk``'s TMA pipeline (two slots, the next chunk's copies in flight while this one's matmul runs; one
where two would not fit, as at ``C = 128, Kp = 256``); the output kernel has one chunk per program.

Mosaic GPU's interpreter (``interpret=True``; ``tests/test_pallas_mosaic_gpu_mlstm.py``) takes neither a
transposed shared-memory view nor a register operand for ``wgmma``: under it the output kernel's ``Kᵀ`` and
``Q Kᵀ ⊙ D`` are staged through shared memory, which the compiled body does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic_gpu as mg

__all__ = ["dstates_mosaic_gpu", "out_mosaic_gpu", "readout_gates", "readout_weights", "states_mosaic_gpu"]

_BF16 = jnp.bfloat16
_F32 = jnp.float32
_NEG = -1e30  # forward.NEG


def _check(kp, vp, chunk, what):
    for name, d in (("key dim", kp), ("value dim", vp)):
        if d != mg.key_pad(d):
            raise ValueError(f"{what}: the Mosaic GPU body needs the {name} padded to key_pad (a power of two >= 64), "
                             f"got {d}")
    if chunk % 64:
        raise ValueError(f"{what}: the Mosaic GPU body needs chunk a multiple of 64, got {chunk}")


def states_mosaic_gpu(kh, vh, ew, fo, C0, *, c, dtype=_BF16, interpret=False):
    """``forward.chunk_states`` on Mosaic GPU: heads-first ``kh [b, h, Tp, Kp]``, ``vh [b, h, Tp, Vp]`` (head dims
    padded to ``key_pad``), write weights ``ε [b, h, Tp]``, carries ``φ [b, h, N]``, ``C0 [b, h, Kp, Vp]``.
    Returns the ``C'`` entering every chunk ``[b, h, N, Kp, Vp]`` in ``dtype`` and the final one float32.
    ``interpret=True`` runs Mosaic GPU's interpreter."""
    _check(kh.shape[-1], vh.shape[-1], c, "chunk_states")
    return mg.linear_walk(kh, vh, ew, fo, C0, chunk=c, reverse=False, interpret=interpret, out_dtype=dtype)


def dstates_mosaic_gpu(qh, do, fs, fo, dCt, *, c, interpret=False):
    """The backward's state-gradient walk on Mosaic GPU (``backward.py``, pass 3): ``dC' = φ dC'⁺ + Qᵀ (fs ⊙ dO)``
    from the last chunk to the first, the state pass's body run backwards with ``q`` for ``k``, ``dO`` for ``v`` and
    the readout weights ``fs = ρ / den [b, h, Tp]`` for ``ε``. ``qh [b, h, Tp, Kp]``, ``do [b, h, Tp, Vp]`` (head dims
    padded to ``key_pad``), carries ``φ [b, h, N]``, ``dCt [b, h, Kp, Vp]`` the final state's cotangent. Returns the
    ``dC'`` after every chunk ``[b, h, N, Kp, Vp]`` and the one before the first (``dC0``), float32."""
    _check(qh.shape[-1], do.shape[-1], c, "mlstm_chunk_bwd_dstates")
    return mg.linear_walk(qh, do, fs, fo, dCt, chunk=c, reverse=True, interpret=interpret, out_dtype=_F32)


def readout_gates(bt, st, it, et, m_in, c):
    """The readout's gates as ``[b, h, 5, Tp]`` float32 rows, each chunk's contiguous: ``b, seg, i, e`` and the
    entering stabiliser ``m`` on each of the chunk's tokens (the rows :func:`readout_weights` reads)."""
    return jnp.stack([bt, st, it, et, jnp.repeat(m_in, c, axis=2)], axis=2).astype(_F32)


def readout_weights(g_smem, c, interpret):
    """A chunk's readout weights from its :func:`readout_gates` rows in shared memory ``[5, C]``: the row stabiliser
    ``m_t = max(max_s w_ts, b_t + m)`` (``w_ts = b_t − b_s + e_s``, causal, one document), ``D = e^{w − m_t}`` (``[C, C]``,
    ``i`` for ``e``; the ``WGMMA`` layout when compiled) and ``ρ = e^{b + m − m_t}`` (``[C]``, indexed by the row ``t``).
    Returns ``(D, m_t, ρ)``."""
    load = mg.loader(interpret)
    idx = mg.iota(c, interpret)
    col = lambda i: load(g_smem.at[i], mg.WG.reduce(1))  # [C], indexed by the query row t
    row = lambda i: load(g_smem.at[i], mg.WG.reduce(0))  # [C], indexed by the key column s
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    bc, sc, mc = col(0), col(1), col(4)
    ok = (idx(0) >= idx(1)) & (full(sc, 0) == full(row(1), 1))
    diff = full(bc, 0) - full(row(0), 1)
    m_intra = jnp.max(jnp.where(ok, diff + full(row(3), 1), _NEG), axis=1)
    inter = jnp.where(sc == 0.0, bc + mc, _NEG)
    m_t = jnp.maximum(m_intra, inter)
    d = jnp.exp(jnp.where(ok, diff + full(row(2), 1), _NEG) - full(m_t, 0))
    return d, m_t, jnp.exp(inter - m_t)


def _out_kernel(q_ref, k_ref, v_ref, g_ref, hs_ref, n_ref, o_ref, q_smem, k_smem, v_smem, s_smem, n_smem, g_smem,
                o_smem, kt_smem, att_smem, bars, *, chunk, interpret):
    c = chunk
    kp = q_smem.shape[-1]
    load = mg.loader(interpret)
    ib, ih, il, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("v")
    rows, cols = pl.ds(il * c, c), pl.ds(iv * mg.BV, mg.BV)
    mg.copy_in(bars, 0, (q_ref.at[ib, ih, rows], q_smem), (k_ref.at[ib, ih, rows], k_smem), (v_ref.at[ib, ih, rows, cols], v_smem),
               (hs_ref.at[ib, ih, il, :, cols], s_smem), (n_ref.at[ib, ih, il], n_smem), (g_ref.at[ib, ih, :, rows], g_smem))

    kt = mg.transposed(k_smem, kt_smem, interpret)
    d, m_t, rho = readout_weights(g_smem, c, interpret)
    att = mg.mma(q_smem, kt, (c, c)) * d
    qn = jnp.sum(load(q_smem, mg.WG).astype(_F32) * lax.broadcast_in_dim(load(n_smem, mg.WG.reduce(0)), (c, kp), [1]), axis=1)
    raw = jnp.sum(att, axis=1) + rho * qn
    den = jnp.maximum(jnp.abs(raw), jnp.exp(-m_t))
    att = att.astype(_BF16)
    if interpret:  # and takes its left operand from shared memory only
        att_smem[...] = att
        plgpu.commit_smem()
        att = att_smem

    cb = lambda x: lax.broadcast_in_dim(x, (c, mg.BV), [0])
    num = mg.mma(att, v_smem, (c, mg.BV)) + mg.mma(q_smem, s_smem, (c, mg.BV)) * cb(rho)
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
    gates = readout_gates(bt, st, it, et, m_in, c)
    sm = functools.partial(mg.smem, plain=interp)
    scratch = [sm((c, kp)), sm((c, kp)), sm((c, mg.BV)), sm((kp, mg.BV)), plgpu.SMEM((kp,), _F32), plgpu.SMEM((5, c), _F32),
               sm((c, mg.BV), _F32), sm((kp, c)) if interp else None, sm((c, c)) if interp else None,
               plgpu.Barrier(num_barriers=6)]
    call = mg.kernel(functools.partial(_out_kernel, chunk=c, interpret=interp), jax.ShapeDtypeStruct((b, h, tp, vp), _F32),
                     scratch, (b, h, n, vp // mg.BV), ("b", "h", "n", "v"), interp)
    return call(qh.astype(_BF16), kh.astype(_BF16), vh.astype(_BF16), gates, hs.astype(_BF16), n_in.astype(_F32))
