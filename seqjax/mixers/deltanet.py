r"""The delta-rule family: DeltaNet, Gated DeltaNet, DeltaProduct (+ negative-eigenvalue variants).

Per head, state ``S_t`` ``[dk, dv]``, L2-normalised keys (``||k_t|| = 1``):

* **DeltaNet** (Schlag et al. 2021; chunked: Yang et al. 2024, "Parallelizing Linear Transformers
  with the Delta Rule over Sequence Length"):
  ``S_t = (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``.
* **Gated DeltaNet** (Yang et al. 2025, "Gated Delta Networks"): a per-head scalar decay in front,
  ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``alpha_t = exp(log_alpha_t)``;
  the layer makes it Mamba-2 style, ``log alpha = -softplus(a + dt_bias) exp(A_log)``.
* **DeltaProduct** (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via
  Householder Products"): each token applies ``n_h`` generalised Householder steps
  ``S <- (I - beta_{t,j} k_{t,j} k_{t,j}ᵀ) S + beta_{t,j} k_{t,j} v_{t,j}ᵀ`` (``j = 1..n_h``; the
  optional gate ``alpha_t`` once per token) and reads ``o_t = scale S_tᵀ q_t`` after the last one.
  The chunked form runs the ``n_h`` steps as consecutive micro-tokens.

**Negative eigenvalues** (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues"): ``I - beta k kᵀ`` has eigenvalue ``1 - beta``; ``beta in (0, 1)`` keeps it in
``(0, 1)``, ``beta in (0, 2)`` extends it to ``(-1, 1)`` which lets the recurrence track parity.
The functional forms accept any ``beta`` in ``[0, 2]``; with ``negative_eigen=True`` they read
``beta`` as the gate ``sigma in [0, 1]`` and use ``2 beta`` (so the layers' ``beta = sigmoid(.)``
becomes ``2 sigmoid(.)``, as in fla's ``allow_neg_eigval``).

Shapes: ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``beta, log_alpha [b, t, h]``; DeltaProduct
``k [b, t, h, n_h, dk]``, ``v [b, t, h, n_h, dv]``, ``beta [b, t, h, n_h]``; state ``[b, h, dk, dv]``
float32. The engine (reference scan, WY/UT chunked form, step, materialize) is ``seqjax.ops.delta``, the
``impl=`` dispatch (:func:`delta_rule`) ``seqjax.mixers._delta_rule``. This module holds DeltaNet's functional
forms, the NNX layers and the registration of the whole family; Gated DeltaNet's and DeltaProduct's functional
forms are in ``seqjax.mixers.gated_deltanet`` and ``seqjax.mixers.deltaproduct`` (and importable from here).

**Layers** (after fla's): ``x [b, t, d_model]`` -> q/k/v projections -> depthwise causal short convs + SiLU ->
L2-normalised q and k -> ``beta = sigmoid(W_beta x)`` (``2 sigmoid`` with ``negative_eigen=True``, applied by
the functional form) -> (gated) delta rule -> per-head output norm (RMSNorm, or ``RMSNorm(o * silu(g))`` with
an output gate) -> output projection. Gated variants use Mamba-2's decay,
``log alpha = -softplus(W_a x + dt_bias) exp(A_log)``. ``q`` is scaled by ``dk^{-1/2}`` as in fla.
The decode cache is a :class:`DeltaCache` (the state ``[b, h, dk, dv]`` float32 and the short convs' states).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax.layer import plan, update
from seqjax.mixers._delta_rule import IMPLS, delta_rule, effective_beta
from seqjax.mixers.deltaproduct import deltaproduct, deltaproduct_materialize, deltaproduct_recurrent, deltaproduct_step
from seqjax.mixers.gated_deltanet import (
    gated_deltanet,
    gated_deltanet_materialize,
    gated_deltanet_recurrent,
    gated_deltanet_step,
)
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import GatedRMSNorm, Linear, RMSNorm, ShortConv, l2_normalize
from seqjax.ops import context_parallel as cp
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, ResetsLike, SegmentIds

__all__ = [
    "IMPLS", "delta_rule",
    "deltanet", "deltanet_recurrent", "deltanet_step", "deltanet_materialize",
    "gated_deltanet", "gated_deltanet_recurrent", "gated_deltanet_step", "gated_deltanet_materialize",
    "deltaproduct", "deltaproduct_recurrent", "deltaproduct_step", "deltaproduct_materialize",
    "deltanet_make_inputs", "gated_deltanet_make_inputs", "deltaproduct_make_inputs",
    "DeltaCache", "DeltaRuleLayer", "DeltaNet", "GatedDeltaNet", "DeltaProduct",
    "DeltaNetNegEig", "GatedDeltaNetNegEig", "DeltaProductNegEig",
]  # fmt: skip


# ----------------------------------------------------------------------------- DeltaNet


def deltanet(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """DeltaNet, parallel form: ``(o [b, t, h, dv], h_last [b, h, dk, dv])``. ``impl``: ``"auto"`` (see
    ``seqjax.mixers._delta_rule.delta_rule``), ``"sequential"`` (the reference), ``"chunked"`` (WY/UT), ``"pallas"``."""
    return gated_deltanet(q, k, v, beta, None, h0=h0, impl=impl, resets=resets, negative_eigen=negative_eigen,
                          scale=scale, chunk_size=chunk_size)  # no decay: alpha = 1


def deltanet_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Reference: ``S_t = (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``."""
    return gated_deltanet_recurrent(q, k, v, beta, None, h0=h0, resets=resets, negative_eigen=negative_eigen, scale=scale)


def deltanet_step(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    beta: Float[AnyArray, "b h"],
    *,
    negative_eigen=False,
    scale=1.0,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    """One token (``q, k [b, h, dk]``, ``v [b, h, dv]``, ``beta [b, h]``) -> ``(o_t, h)``."""
    return gated_deltanet_step(h, q, k, v, beta, None, negative_eigen=negative_eigen, scale=scale)


def deltanet_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    *,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
) -> Operator:
    """``M [b, h, T, T]`` with ``o = M v``: ``M[t, s] = scale q_tᵀ (prod_{r=s+1..t} (I - beta_r k_r k_rᵀ)) beta_s k_s``."""
    return gated_deltanet_materialize(q, k, v, beta, None, resets=resets, negative_eigen=negative_eigen, scale=scale)


# ----------------------------------------------------------------------------- layers


class DeltaCache(NamedTuple):
    state: Any  # [b, h, dk, dv] float32
    conv_q: Any  # [b, K-1, h * dk] (None without short convs)
    conv_k: Any  # [b, K-1, h * n_h * dk]
    conv_v: Any  # [b, K-1, h * n_h * dv]


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
        def conv(dim):
            return ShortConv(dim, conv_size, use_bias=False, rngs=rngs, param_dtype=param_dtype)

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

    def init_cache(self, batch_size: int, max_len: int | None = None) -> DeltaCache:
        del max_len  # O(1) state
        h, n, dk, dv = self.num_heads, self.n, self.dk, self.dv
        convs = [None] * 3
        if self.conv_size > 1:
            convs = [jnp.zeros((batch_size, self.conv_size - 1, dim), self.dtype) for dim in (h * dk, h * n * dk, h * n * dv)]
        return DeltaCache(jnp.zeros((batch_size, h, dk, dv), jnp.float32), *convs)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        b, t, _ = x.shape
        h, n, dk, dv = self.num_heads, self.n, self.dk, self.dv
        c = DeltaCache(None, None, None, None) if cache is None else cache
        conv_states = {}

        def short_conv(name, y):
            if self.conv_size > 1:
                y, conv_states[name] = getattr(self, f"{name}_conv")(
                    y, state=getattr(c, f"conv_{name}"), segment_ids=segment_ids)
            return jax.nn.silu(y)

        q = l2_normalize(short_conv("q", self.q_proj(x)).reshape(b, t, h, dk))
        k = l2_normalize(short_conv("k", self.k_proj(x)).reshape(b, t, h, n, dk))
        v = short_conv("v", self.v_proj(x)).reshape(b, t, h, n, dv)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32)).reshape(b, t, h, n)
        p = plan(x, segment_ids=segment_ids, cache=cache, context_parallel=n == 1)
        kw = dict(
            h0=p.h0,
            resets=p.resets,
            negative_eigen=self.negative_eigen,
            scale=dk**-0.5,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        log_alpha = None
        if self.gated:
            dt = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...][None, None])
            log_alpha = -dt * jnp.exp(self.A_log[...])[None, None]
        if p.decode:  # one token: the step form (the chunked form would pad it to a whole chunk)
            la = None if log_alpha is None else log_alpha[:, 0]
            step_kw = dict(negative_eigen=self.negative_eigen, scale=kw["scale"])
            if n > 1:
                o, state = deltaproduct_step(p.h0, q[:, 0], k[:, 0], v[:, 0], beta[:, 0], la, **step_kw)
            else:  # DeltaNet is Gated DeltaNet without a decay (log_alpha None)
                o, state = gated_deltanet_step(p.h0, q[:, 0], k[:, 0, :, 0], v[:, 0, :, 0], beta[:, 0, :, 0], la, **step_kw)
            o = o[:, None]
        elif p.mesh is not None:  # time split over the mesh's `context` axis: dense shard transitions
            o, state = cp.delta_context_parallel(q, k[:, :, :, 0], v[:, :, :, 0], effective_beta(beta[..., 0], self.negative_eigen),
                                                 log_alpha, mesh=p.mesh, resets=p.resets, scale=kw["scale"],
                                                 chunk_size=self.chunk_size)
        elif n > 1:
            o, state = deltaproduct(q, k, v, beta, log_alpha, **kw)
        else:
            o, state = gated_deltanet(q, k[:, :, :, 0], v[:, :, :, 0], beta[..., 0], log_alpha, **kw)
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).reshape(b, t, h, dv))
        else:
            o = self.o_norm(o)
        y = self.o_proj(o.reshape(b, t, h * dv).astype(self.dtype))
        convs = {f"conv_{n}": conv_states.get(n) for n in ("q", "k", "v")}
        return y.astype(x.dtype), update(cache, state=state, **convs)


class DeltaNet(DeltaRuleLayer):
    """DeltaNet layer (Yang et al. 2024)."""


class GatedDeltaNet(DeltaRuleLayer):
    """Gated DeltaNet layer (Yang et al. 2025)."""

    def __init__(self, d_model: int, *, gated: bool = True, **kw):
        super().__init__(d_model, gated=gated, **kw)


class DeltaProduct(DeltaRuleLayer):
    """Gated DeltaProduct layer, 2 Householder steps per token (Siems et al. 2025)."""

    def __init__(self, d_model: int, *, gated: bool = True, num_householder: int = 2, **kw):
        super().__init__(d_model, gated=gated, num_householder=num_householder, **kw)


class DeltaNetNegEig(DeltaNet):
    """DeltaNet with beta in (0, 2) (Grazzi et al. 2025)."""

    def __init__(self, d_model: int, *, negative_eigen: bool = True, **kw):
        super().__init__(d_model, negative_eigen=negative_eigen, **kw)


class GatedDeltaNetNegEig(GatedDeltaNet):
    """Gated DeltaNet with beta in (0, 2) (Grazzi et al. 2025)."""

    def __init__(self, d_model: int, *, negative_eigen: bool = True, **kw):
        super().__init__(d_model, negative_eigen=negative_eigen, **kw)


class DeltaProductNegEig(DeltaProduct):
    """DeltaProduct with beta in (0, 2) (Grazzi et al. 2025)."""

    def __init__(self, d_model: int, *, negative_eigen: bool = True, **kw):
        super().__init__(d_model, negative_eigen=negative_eigen, **kw)


# ----------------------------------------------------------------------------- test inputs + registry


def deltanet_make_inputs(key, batch, time, *, heads=2, dk=7, dv=5, gated=False, householder=None, decay=(-6.0, 0.0)):
    """Random inputs: unit keys, ``beta = sigmoid(N(0,1))``, ``log_alpha = -exp(U(decay))`` if gated;
    ``householder=n`` gives DeltaProduct shapes with ``n`` triples per token."""
    kq, kk, kv, kb, ka = jax.random.split(key, 5)
    hh = () if householder is None else (householder,)
    out = {
        "q": jax.random.normal(kq, (batch, time, heads, dk)),
        "k": l2_normalize(jax.random.normal(kk, (batch, time, heads, *hh, dk))),
        "v": jax.random.normal(kv, (batch, time, heads, *hh, dv)),
        "beta": jax.nn.sigmoid(jax.random.normal(kb, (batch, time, heads, *hh))),
    }
    if gated:
        out["log_alpha"] = -jnp.exp(jax.random.uniform(ka, (batch, time, heads), minval=decay[0], maxval=decay[1]))
    return out


def gated_deltanet_make_inputs(key, batch, time, **kw):
    return deltanet_make_inputs(key, batch, time, **{"gated": True, **kw})


def deltaproduct_make_inputs(key, batch, time, **kw):
    return deltanet_make_inputs(key, batch, time, **{"gated": True, "householder": 2, **kw})


_NEGEIG = "https://arxiv.org/abs/2411.12537"
register(MixerSpec(
    name="deltanet", fn=deltanet, recurrent=deltanet_recurrent, step=deltanet_step,
    make_inputs=deltanet_make_inputs, layer=DeltaNet, materialize=deltanet_materialize, value_arg="v",
    impls=("sequential", "chunked"), pallas=("gpu", "tpu"), context_parallel=True, negative_eigen=True,
    paper="https://arxiv.org/abs/2406.06484", doc="DeltaNet (Yang et al. 2024)",
))
register(MixerSpec(
    name="deltanet_negeig", fn=deltanet, recurrent=deltanet_recurrent, step=deltanet_step,
    make_inputs=deltanet_make_inputs, layer=DeltaNetNegEig, materialize=deltanet_materialize, value_arg="v",
    impls=("sequential", "chunked"), pallas=("gpu", "tpu"), context_parallel=True,
    options={"negative_eigen": True}, negative_eigen=True, paper=_NEGEIG,
    doc="DeltaNet (Yang et al. 2024), beta in (0, 2) (Grazzi et al. 2025)",
))
register(MixerSpec(
    name="gated_deltanet", fn=gated_deltanet, recurrent=gated_deltanet_recurrent, step=gated_deltanet_step,
    make_inputs=gated_deltanet_make_inputs, layer=GatedDeltaNet, materialize=gated_deltanet_materialize,
    value_arg="v", impls=("sequential", "chunked"), pallas=("gpu", "tpu"), context_parallel=True,
    negative_eigen=True, paper="https://arxiv.org/abs/2412.06464", doc="Gated DeltaNet (Yang et al. 2025)",
))
register(MixerSpec(
    name="gated_deltanet_negeig", fn=gated_deltanet, recurrent=gated_deltanet_recurrent,
    step=gated_deltanet_step, make_inputs=gated_deltanet_make_inputs, layer=GatedDeltaNetNegEig,
    materialize=gated_deltanet_materialize, value_arg="v", impls=("sequential", "chunked"), pallas=("gpu", "tpu"),
    context_parallel=True, options={"negative_eigen": True}, negative_eigen=True, paper=_NEGEIG,
    doc="Gated DeltaNet (Yang et al. 2025), beta in (0, 2) (Grazzi et al. 2025)",
))
register(MixerSpec(
    name="deltaproduct", fn=deltaproduct, recurrent=deltaproduct_recurrent, step=deltaproduct_step,
    make_inputs=deltaproduct_make_inputs, layer=DeltaProduct, materialize=deltaproduct_materialize,
    value_arg="v", impls=("sequential", "chunked"), pallas=("gpu", "tpu"), negative_eigen=True,
    paper="https://arxiv.org/abs/2502.10297", doc="gated DeltaProduct, n_h = 2 (Siems et al. 2025)",
))
register(MixerSpec(
    name="deltaproduct_negeig", fn=deltaproduct, recurrent=deltaproduct_recurrent, step=deltaproduct_step,
    make_inputs=deltaproduct_make_inputs, layer=DeltaProductNegEig, materialize=deltaproduct_materialize,
    value_arg="v", impls=("sequential", "chunked"), pallas=("gpu", "tpu"), options={"negative_eigen": True},
    negative_eigen=True, paper=_NEGEIG, doc="gated DeltaProduct, n_h = 2 (Siems et al. 2025), beta in (0, 2) (Grazzi et al. 2025)",
))
