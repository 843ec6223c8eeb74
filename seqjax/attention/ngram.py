"""n-gram heads (Akyürek, Wang, Kim, Andreas 2024, "In-Context Language Learning"): hard-wired
induction heads of order ``n``.

Position ``i`` attends uniformly to every position ``s = j + shift`` (``s <= i``) whose preceding
``n``-gram matches the one ending at ``i``::

    A_is = prod_{m=0}^{n-1} [x_{i-m} == x_{j-m}]      (j = s - shift, every index >= 0, same document)
    y_i  = sum_s A_is h_s / max(1, sum_s A_is)

and the layer returns ``W_0 y + W_1 h`` (the paper's ``t0(h_ngram) + t1(h)``). With ``shift = 1`` the
head copies the state of the token that followed each earlier occurrence of the current ``n``-gram.

Shapes: ``tokens [b, t]`` int, ``h [b, t, d]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax.nn import Linear

__all__ = ["ngram_mask", "ngram_head", "NgramHead"]


def ngram_mask(tokens, *, ngram: int = 1, shift: int = 1, segment_ids=None):
    """``[b, t, t]`` bool: ``A[i, s]`` of the module docstring."""
    _checks.check_ndim("tokens", tokens, 2, "[batch, time]")
    if ngram < 1 or shift < 1:
        raise ValueError(f"ngram and shift must be >= 1, got ngram={ngram}, shift={shift}")
    x = jnp.asarray(tokens)
    b, t = x.shape
    seg = jnp.zeros_like(x) if segment_ids is None else jnp.asarray(segment_ids)
    eq = (x[:, :, None] == x[:, None, :]) & (seg[:, :, None] == seg[:, None, :])  # [b, i, j]
    match = eq
    for m in range(1, ngram):  # x_{i-m} == x_{j-m}, both indices in range
        shifted = jnp.zeros_like(eq).at[:, m:, m:].set(eq[:, :-m, :-m])
        match = match & shifted
    # attend to s = j + shift: A[i, s] = match[i, s - shift], s <= i
    a = jnp.zeros_like(match).at[:, :, shift:].set(match[:, :, : t - shift])
    i = jnp.arange(t)
    causal = i[None, :, None] >= i[None, None, :]
    same = seg[:, :, None] == seg[:, None, :]
    return a & causal & same


def ngram_head(tokens, h, *, ngram: int = 1, shift: int = 1, segment_ids=None):
    """Uniform average of ``h [b, t, d]`` over the n-gram matches -> ``[b, t, d]`` (0 where none)."""
    _checks.check_ndim("h", h, 3, "[batch, time, dim]")
    a = ngram_mask(tokens, ngram=ngram, shift=shift, segment_ids=segment_ids).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1.0)
    y = jnp.einsum("bts,bsd->btd", a / count, h.astype(jnp.float32))
    return y.astype(h.dtype)


class NgramHead(nnx.Module):
    """``y = W_0 ngram_head(tokens, h) + W_1 h`` (insert after any layer of an LM)."""

    def __init__(self, d_model: int, *, ngram: int = 1, shift: int = 1, rngs: nnx.Rngs):
        self.ngram, self.shift = ngram, shift
        self.w0 = Linear(d_model, d_model, axes=("embed", "embed"), rngs=rngs)
        self.w1 = Linear(d_model, d_model, axes=("embed", "embed"), rngs=rngs)

    def __call__(self, h, tokens, *, segment_ids=None):
        y = ngram_head(tokens, h, ngram=self.ngram, shift=self.shift, segment_ids=segment_ids)
        return self.w0(y) + self.w1(h)
