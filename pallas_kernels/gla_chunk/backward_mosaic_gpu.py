r"""Mosaic GPU bodies of the per-head GLA backward's two serial passes (``backward.py``'s ``_states`` and ``_dstates``).

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

The chunk-parallel gradient kernel (``dQ, dK, dV, db``) keeps its Triton body under ``backend="mosaic_gpu"``: it is
no serial pass, it reads ``H`` and ``dH`` from these walks as the Triton walks write them (float32
``[b, h, N, Kp, Vp]``), and its port (eight matmuls per chunk, six against a transposed operand, row sums for ``db``)
is a step of its own.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels._mosaic_gpu import key_pad, linear_walk

__all__ = ["head_walks_mosaic_gpu"]


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
