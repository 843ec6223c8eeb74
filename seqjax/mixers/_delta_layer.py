"""NNX layers of the delta-rule family (DeltaNet, Gated DeltaNet, DeltaProduct), after fla's layers.

``x [b, t, d_model]`` -> q/k/v projections -> depthwise causal short convs + SiLU -> L2-normalised
q and k -> ``beta = sigmoid(W_beta x)`` (``2 sigmoid`` with ``negative_eigen=True``, applied by the
functional form) -> (gated) delta rule -> per-head output norm (RMSNorm, or ``RMSNorm(o * silu(g))``
with an output gate) -> output projection. Gated variants use Mamba-2's decay,
``log alpha = -softplus(W_a x + dt_bias) exp(A_log)``. ``q`` is scaled by ``dk^{-1/2}`` as in fla.

The decode cache is ``{"state": [b, h, dk, dv] float32, "conv_q"/"conv_k"/"conv_v": [b, K-1, .]}``.
With a cache, the block is taken to continue the cached document (no reset at its first token).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax import sharding as shd
from seqjax.nn import GatedRMSNorm, Linear, RMSNorm, ShortConv, l2_normalize, resets_from_segment_ids

__all__ = ["DeltaRuleLayer", "DeltaNet", "GatedDeltaNet", "DeltaProduct"]


class DeltaRuleLayer(nnx.Module):
    """Delta-rule token mixer: DeltaNet (``gated=False, num_householder=1``), Gated DeltaNet
    (``gated=True``), DeltaProduct (``num_householder > 1``)."""

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        num_heads: int = 2,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        gated: bool = False,
        num_householder: int = 1,
        negative_eigen: bool = False,
        use_output_gate: bool | None = None,
        conv_size: int = 4,
        impl: str = "auto",
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        head_dim = head_dim or d_model // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got d_model={d_model}, num_heads={num_heads}")
        if not isinstance(negative_eigen, bool):
            raise ValueError(f"negative_eigen must be a bool, got {negative_eigen!r}")
        if num_householder < 1:
            raise ValueError(f"num_householder must be >= 1, got {num_householder}")
        h, n = num_heads, num_householder
        self.num_heads, self.dk, self.dv, self.n = h, head_dim, int(head_dim * expand_v), n
        self.gated, self.negative_eigen, self.impl, self.chunk_size = gated, negative_eigen, impl, chunk_size
        self.dtype = dtype
        use_output_gate = gated if use_output_gate is None else use_output_gate

        def lin(i, o, axes=("embed", "heads")):
            return Linear(i, o, axes=axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        dk, dv = self.dk, self.dv
        self.q_proj = lin(d_model, h * dk)
        self.k_proj = lin(d_model, h * n * dk)
        self.v_proj = lin(d_model, h * n * dv)
        self.b_proj = lin(d_model, h * n)
        conv = lambda dim: ShortConv(dim, conv_size, use_bias=False, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.conv_size = conv_size
        if conv_size > 1:
            self.q_conv, self.k_conv, self.v_conv = conv(h * dk), conv(h * n * dk), conv(h * n * dv)
        if gated:
            self.a_proj = lin(d_model, h)
            a = jax.random.uniform(rngs.params(), (h,), param_dtype, 1.0, 16.0)
            self.A_log = nnx.Param(jnp.log(a), out_sharding=("heads",))
            dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), param_dtype, math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), out_sharding=("heads",))  # softplus^-1(dt)
        self.g_proj = lin(d_model, h * dv) if use_output_gate else None
        self.o_norm = GatedRMSNorm(dv, eps=norm_eps) if use_output_gate else RMSNorm(dv, eps=norm_eps, axis_name="head_dim")
        self.o_proj = lin(h * dv, d_model, axes=("heads", "embed"))

    def init_cache(self, batch_size: int, max_len: int | None = None):
        del max_len  # O(1) state
        h, n, dk, dv = self.num_heads, self.n, self.dk, self.dv
        cache = {"state": jnp.zeros((batch_size, h, dk, dv), jnp.float32)}
        if self.conv_size > 1:
            k1 = self.conv_size - 1
            for name, dim in (("q", h * dk), ("k", h * n * dk), ("v", h * n * dv)):
                cache[f"conv_{name}"] = jnp.zeros((batch_size, k1, dim), self.dtype)
        return cache

    def __call__(self, x, *, segment_ids=None, cache=None):
        from seqjax.mixers import deltanet as F  # the functional forms (import cycle otherwise)

        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        b, t, _ = x.shape
        h, n, dk, dv = self.num_heads, self.n, self.dk, self.dv
        resets = resets_from_segment_ids(segment_ids)
        if resets is not None and cache is not None:
            resets = resets.at[:, 0].set(False)
        new_cache = None if cache is None else {}

        def short_conv(name, y):
            if self.conv_size > 1:
                state = None if cache is None else cache[f"conv_{name}"]
                y, state = getattr(self, f"{name}_conv")(y, state=state, segment_ids=segment_ids)
                if new_cache is not None:
                    new_cache[f"conv_{name}"] = state
            return jax.nn.silu(y)

        q = l2_normalize(short_conv("q", self.q_proj(x)).reshape(b, t, h, dk))
        k = l2_normalize(short_conv("k", self.k_proj(x)).reshape(b, t, h, n, dk))
        v = short_conv("v", self.v_proj(x)).reshape(b, t, h, n, dv)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32)).reshape(b, t, h, n)
        kw = dict(
            h0=None if cache is None else cache["state"],
            resets=resets,
            negative_eigen=self.negative_eigen,
            scale=dk**-0.5,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        log_alpha = None
        if self.gated:
            dt = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...][None, None])
            log_alpha = -dt * jnp.exp(self.A_log[...])[None, None]
        mesh = shd.context_mesh(t) if cache is None and n == 1 else None
        if mesh is not None:  # time split over the mesh's `context` axis: dense shard transitions
            from seqjax.train.context_parallel import delta_context_parallel

            o, state = delta_context_parallel(q, k[:, :, :, 0], v[:, :, :, 0], F._beta(beta[..., 0], self.negative_eigen),
                                              log_alpha, mesh=mesh, resets=resets, scale=kw["scale"],
                                              chunk_size=self.chunk_size)
        elif n > 1:
            o, state = F.deltaproduct(q, k, v, beta, log_alpha, **kw)
        elif self.gated:
            o, state = F.gated_deltanet(q, k[:, :, :, 0], v[:, :, :, 0], beta[..., 0], log_alpha, **kw)
        else:
            o, state = F.deltanet(q, k[:, :, :, 0], v[:, :, :, 0], beta[..., 0], **kw)
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).reshape(b, t, h, dv))
        else:
            o = self.o_norm(o)
        y = self.o_proj(o.reshape(b, t, h * dv).astype(self.dtype))
        if new_cache is not None:
            new_cache["state"] = state
        return y.astype(x.dtype), new_cache


def _variant(name, doc, **defaults):
    def __init__(self, d_model: int, *, rngs: nnx.Rngs, **kw):
        DeltaRuleLayer.__init__(self, d_model, rngs=rngs, **{**defaults, **kw})

    return type(name, (DeltaRuleLayer,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


DeltaNet = _variant("DeltaNet", "DeltaNet layer (Yang et al. 2024).")
GatedDeltaNet = _variant("GatedDeltaNet", "Gated DeltaNet layer (Yang et al. 2025).", gated=True)
DeltaProduct = _variant(
    "DeltaProduct", "Gated DeltaProduct layer, 2 Householder steps/token (Siems et al. 2025).", gated=True, num_householder=2
)
DeltaNetNegEig = _variant("DeltaNetNegEig", "DeltaNet with beta in (0, 2).", negative_eigen=True)
GatedDeltaNetNegEig = _variant(
    "GatedDeltaNetNegEig", "Gated DeltaNet with beta in (0, 2).", gated=True, negative_eigen=True
)
DeltaProductNegEig = _variant(
    "DeltaProductNegEig", "DeltaProduct with beta in (0, 2).", gated=True, num_householder=2, negative_eigen=True
)
