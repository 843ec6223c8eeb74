"""TCNCA: temporal convolution network with chunked attention (Terzić et al., NeurIPS 2023 workshop).

MEGA's EMA is replaced by a dilated causal TCN, whose output feeds softmax attention restricted to
non-overlapping chunks (the simplified TCNCA: no extra multiplicative / additive interactions)::

    u^(0) = x,   u^(l+1) = u^(l) + silu(conv_{dil = 2^l}(u^(l)))            (depthwise, causal)
    q = u W_q,  k = u W_k,  v = x W_v
    o_i = sum_{j in chunk(i), j <= i} softmax_j(q_i . k_j / sqrt(d)) v_j      (chunks of length c)
    y = (o * sigmoid(x W_g)) W_o

The TCN gives every token a receptive field of ``1 + (K-1)(2^L - 1)`` tokens at O(T) cost, so the
chunk-local attention still sees context beyond its chunk through ``q`` and ``k``.

Shapes: ``x [b, t, d]``; conv taps ``w [K, d]``; ``q, k, v [b, t, h, d_h]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax.attention.attention import attention
from seqjax.nn import Linear, merge_heads, split_heads

__all__ = ["dilated_causal_conv", "chunked_attention", "TCNCA"]


def dilated_causal_conv(x, w, *, dilation: int = 1):
    """Depthwise causal conv ``y_t = sum_{m=0}^{K-1} w[K-1-m] * x_{t - m*dilation}`` of ``x [b, t, d]``."""
    _checks.check_ndim("x", x, 3, "[batch, time, channels]")
    _checks.check_ndim("w", w, 2, "[taps, channels]")
    k = w.shape[0]
    pad = (k - 1) * dilation
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32),
        w.astype(jnp.float32)[:, None, :],  # [K, 1, d] (spatial, in/group, out)
        window_strides=(1,),
        padding=[(pad, 0)],
        rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST,
    )
    return y.astype(x.dtype)


def chunked_attention(q, k, v, *, chunk: int, impl=None):
    """Causal softmax attention inside non-overlapping chunks of length ``chunk``.

    ``q [b, t, h, d]``, ``k, v [b, t, kvh, d]`` -> ``[b, t, h, d]``; ``t`` need not divide ``chunk``.
    """
    _checks.check_ndim("q", q, 4, "[batch, time, heads, head_dim]")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t = q.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t

    def blocks(a):
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return a.reshape(b * n, chunk, *a.shape[2:])

    o = attention(blocks(q), blocks(k), blocks(v), impl=impl)
    return o.reshape(b, n * chunk, *q.shape[2:])[:, :t]


class TCNCA(nnx.Module):
    """The TCNCA token mixer: ``y, None = layer(x)`` with ``x, y [b, t, d_model]``."""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        chunk: int = 64,
        kernel_size: int = 3,
        num_conv_layers: int = 4,
        rngs: nnx.Rngs,
    ):
        _checks.check_divisible("d_model", d_model, "num_heads", num_heads)
        self.num_heads, self.chunk = num_heads, chunk
        init = nnx.initializers.normal(kernel_size**-0.5)
        self.conv_w = nnx.Param(
            init(rngs.params(), (num_conv_layers, kernel_size, d_model)), out_sharding=("layers", "conv", "embed")
        )
        self.wq = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wk = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wv = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wg = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wo = Linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs)

    def tcn(self, x):
        u = x
        for i in range(self.conv_w.shape[0]):
            u = u + jax.nn.silu(dilated_causal_conv(u, self.conv_w[i], dilation=2**i))
        return u

    def __call__(self, x, *, segment_ids=None, cache=None):
        if segment_ids is not None or cache is not None:
            raise ValueError("TCNCA supports neither segment_ids nor a decode cache")
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        u = self.tcn(x)
        h = self.num_heads
        q, k, v = split_heads(self.wq(u), h), split_heads(self.wk(u), h), split_heads(self.wv(x), h)
        o = merge_heads(chunked_attention(q, k, v, chunk=self.chunk))
        return self.wo(o * jax.nn.sigmoid(self.wg(x))), None
