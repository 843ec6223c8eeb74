"""Residual blocks of the language models: SwiGLU MLP and the pre-norm residual layer.

``Layer``:  ``x = x + mixer(norm1(x)); x = x + mlp(norm2(x))`` (Transformer++ / LLaMA / Yi), with any
sequence mixer in place of attention (Mamba-2, GLA, DeltaNet ... from ``seqjax.mixers``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import sharding
from seqjax.nn import RMSNorm

__all__ = ["SwiGLU", "Layer", "swiglu_hidden"]


def swiglu_hidden(d_model: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: ``mlp_ratio * 2/3 * d_model`` rounded up to a multiple of 8 (LLaMA keeps
    the parameter count of a ``mlp_ratio`` GELU MLP); 0 means no MLP."""
    if mlp_ratio <= 0:
        return 0
    return 8 * math.ceil(mlp_ratio * 2.0 / 3.0 * d_model / 8)


class SwiGLU(nnx.Module):
    """``y = W_down (silu(x W_gate) * (x W_up))`` (Shazeer 2020). Kernels ``[embed, mlp]`` / ``[mlp, embed]``."""

    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        init = nnx.initializers.normal
        key = rngs.params
        self.w_gate = nnx.Param(init(d_model**-0.5)(key(), (d_model, hidden)), out_sharding=("embed", "mlp"))
        self.w_up = nnx.Param(init(d_model**-0.5)(key(), (d_model, hidden)), out_sharding=("embed", "mlp"))
        self.w_down = nnx.Param(init(hidden**-0.5)(key(), (hidden, d_model)), out_sharding=("mlp", "embed"))

    def __call__(self, x):
        dt = self.dtype
        xc = x.astype(dt)
        g = xc @ self.w_gate[...].astype(dt)
        u = xc @ self.w_up[...].astype(dt)
        h = sharding.constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
        return (h @ self.w_down[...].astype(dt)).astype(x.dtype)


class Layer(nnx.Module):
    """Pre-norm residual layer around one sequence mixer and a SwiGLU MLP.

    ``mixer`` keeps the sequence-layer protocol (``seqjax.layer``): ``y, cache = mixer(x, segment_ids=...,
    cache=...)``; a mixer whose spec says ``takes_positions`` (attention, RoPE) also receives ``positions``.
    """

    def __init__(self, d_model: int, mixer: nnx.Module, mlp_hidden: int, *, takes_positions: bool, dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(d_model)
        self.mixer = mixer
        self.takes_positions = takes_positions
        self.norm2 = RMSNorm(d_model) if mlp_hidden else None
        self.mlp = SwiGLU(d_model, mlp_hidden, dtype=dtype, rngs=rngs) if mlp_hidden else None

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        kw = {"positions": positions} if self.takes_positions else {}
        y, cache = self.mixer(self.norm1(x), segment_ids=segment_ids, cache=cache, **kw)
        x = x + y.astype(x.dtype)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return sharding.constrain(x, ("batch", "length", "embed")), cache

    def init_cache(self, batch_size: int, max_len: int):
        return self.mixer.init_cache(batch_size, max_len)
