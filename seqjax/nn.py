"""Small building blocks shared by mixers and models: projections with logical axis names, norms,
the causal short convolution (with packed-sequence masking and a decode cache).

Every parameter is created float32 and annotated with logical axis names
(``nnx.with_partitioning``) from ``seqjax.types.LOGICAL_AXES``; ``seqjax.sharding`` maps them to mesh
axes. Modules take ``dtype`` (compute) and ``param_dtype`` (storage, float32 by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks

__all__ = [
    "Linear",
    "RMSNorm",
    "GatedRMSNorm",
    "ShortConv",
    "causal_conv1d",
    "l2_normalize",
    "resets_from_segment_ids",
]


def resets_from_segment_ids(segment_ids):
    """``[b, t]`` segment ids -> ``[b, t]`` bool, ``True`` at each document's first token."""
    if segment_ids is None:
        return None
    _checks.check_ndim("segment_ids", segment_ids, 2, "[batch, time]")
    s = jnp.asarray(segment_ids)
    first = jnp.ones_like(s[:, :1], dtype=bool)
    return jnp.concatenate([first, s[:, 1:] != s[:, :-1]], axis=1)


def l2_normalize(x, axis=-1, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=axis, keepdims=True) + eps)).astype(x.dtype)


def Linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    use_bias: bool = False,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init=None,
) -> nnx.Linear:
    """``nnx.Linear`` whose kernel carries logical axis names ``axes`` (in, out)."""
    kernel_init = kernel_init or nnx.initializers.lecun_normal()
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "embed", param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Mamba-2's gated norm: ``RMSNorm(x * silu(z))`` per group of ``group_size`` channels."""

    def __init__(self, dim: int, *, group_size: int | None = None, eps: float = 1e-6, param_dtype=jnp.float32):
        group_size = group_size or dim
        _checks.check_divisible("dim", dim, "group_size", group_size)
        self.group_size = group_size
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))

    def __call__(self, x, z=None):
        x32 = x.astype(jnp.float32)
        if z is not None:
            x32 = x32 * jax.nn.silu(z.astype(jnp.float32))
        shape = x32.shape
        g = x32.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
        return (g.reshape(shape) * self.scale[...].reshape((1,) * (len(shape) - 1) + (-1,))).astype(x.dtype)


def causal_conv1d(x, w, bias=None, *, state=None, segment_ids=None):
    """Depthwise causal convolution over time.

    ``y_t = sum_{j=0}^{K-1} w[j] * x_{t-K+1+j}`` (+ bias), per channel.

    Args:
      x: ``[b, t, d]``.
      w: ``[K, d]`` taps; ``w[-1]`` multiplies the current token.
      state: ``[b, K-1, d]``, the previous ``K-1`` inputs (zeros if ``None``) — the decode cache.
      segment_ids: ``[b, t]``; taps never reach across a document boundary (nor into ``state``
        from a token whose document started inside this block).

    Returns:
      ``(y [b, t, d], new_state [b, K-1, d])``.
    """
    _checks.check_ndim("x", x, 3, "[batch, time, channels]")
    _checks.check_ndim("w", w, 2, "[taps, channels]")
    k, d = w.shape
    b, t, dx = x.shape
    if dx != d:
        raise ValueError(f"w must have shape [taps, {dx}] to match x's channels, got {list(w.shape)}")
    if state is None:
        state = jnp.zeros((b, k - 1, d), x.dtype)
    _checks.check_shape("state", state, (b, k - 1, d), "[batch, taps-1, channels]")
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [b, K-1+t, d]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        # the cached prefix belongs to the block's first document
        segp = jnp.concatenate([jnp.repeat(seg[:, :1], k - 1, axis=1), seg], axis=1)
    y = jnp.zeros((b, t, d), jnp.float32)
    for j in range(k):
        tap = xp[:, j : j + t].astype(jnp.float32)
        if segment_ids is not None:
            tap = jnp.where((segp[:, j : j + t] == seg)[..., None], tap, 0.0)
        y = y + tap * w[j].astype(jnp.float32)[None, None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, None, :]
    new_state = xp[:, xp.shape[1] - (k - 1) :] if k > 1 else state
    return y.astype(x.dtype), new_state


class ShortConv(nnx.Module):
    """Depthwise causal conv1d layer (Mamba, Mamba-2, DeltaNet's q/k/v convs)."""

    def __init__(self, dim: int, kernel_size: int = 4, *, use_bias: bool = True, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.kernel_size = kernel_size
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0, out_axis=())
        self.w = nnx.Param(
            init(rngs.params(), (kernel_size, dim), param_dtype) * jnp.sqrt(kernel_size) / kernel_size,
            out_sharding=("conv", "embed"),
        )
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",)) if use_bias else None

    def __call__(self, x, *, state=None, segment_ids=None):
        bias = None if self.bias is None else self.bias[...]
        return causal_conv1d(x, self.w[...], bias, state=state, segment_ids=segment_ids)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.kernel_size - 1, self.w.shape[1]), dtype)


def split_heads(x, num_heads: int):
    """``[b, t, h*d] -> [b, t, h, d]``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x):
    """``[b, t, h, d] -> [b, t, h*d]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def rms_rel_err(x, y) -> float:
    """RMS-relative error ``||x - y|| / ||y||`` (fla's comparison), as a Python float."""
    x = jnp.asarray(x, jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
    y = jnp.asarray(y, x.dtype)
    num = jnp.sqrt(jnp.mean(jnp.abs(x - y) ** 2))
    den = jnp.sqrt(jnp.mean(jnp.abs(y) ** 2))
    return float(num / jnp.maximum(den, 1e-12))

