r"""Gated linear attention and its special cases: GLA, RetNet, plain linear attention.

All three are one recurrence on a matrix state ``S [b, h, k, v]`` (evaluated by the shared chunkwise
engine ``seqjax.ops.gla``; the special cases delegate, they do not fork):

.. math::  S_t = \mathrm{diag}(\alpha_t) S_{t-1} + k_t v_t^\top, \qquad o_t = S_t^\top (s\, q_t)

- **GLA** (Yang, Wang, Shen, Panda, Kim 2024, "Gated Linear Attention Transformers with
  Hardware-Efficient Training"): per-channel data-dependent ``α_t = σ(x_t W_1 W_2 + b)^{1/16}``, i.e.
  ``log α_t = logsigmoid(·) / 16`` from a rank-16 projection; output ``swish(x W_r) ⊙ RMSNorm_head(o)``.
- **RetNet** (Sun et al. 2023, "Retentive Network"): fixed per-head ``γ_h = 1 − 2^{−5−h}``.
- **Linear attention** (Katharopoulos et al. 2020): no decay, ``α = 1``.

Shapes: ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, GLA's ``log_decay [b, t, h, dk]`` (float32, ``≤ 0``),
state ``[b, h, dk, dv]`` float32. ``s = dk^{-1/2}`` by default (``scale=``). Outputs in ``v``'s dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels._util import platform as kernel_platform
from pallas_kernels.gla_chunk import gla_chunk_pallas
from seqjax import _checks, nn
from seqjax._platform import AUTO_BACKWARD, auto_pallas, kernel_call
from seqjax.layer import StateCache, plan, update
from seqjax.mixers._autodiff import primal_by
from seqjax.mixers.registry import MixerSpec, register
from seqjax.ops import context_parallel as cp
from seqjax.ops import gla as eng
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, ResetsLike, SegmentIds

__all__ = [
    "gla", "gla_recurrent", "gla_step", "gla_materialize",
    "retnet", "retnet_recurrent", "retnet_step", "retnet_decays",
    "linear_attention", "linear_attention_recurrent", "linear_attention_step",
    "gla_make_inputs", "retnet_make_inputs", "linear_attention_make_inputs", "elu_feature_map",
    "GLA", "RetNet", "LinearAttention",
]

IMPLS = ("auto", "sequential", "chunked", "pallas")


def _scale(q, scale):
    return (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale


def _run(q, k, v, g, *, h0, resets, impl, chunk_size, scale, sign=None):
    """Dispatch to the reference / chunked engine / Pallas kernel; returns ``(o in v.dtype, S_T)``."""
    _checks.check_choice("impl", impl, IMPLS)
    eng.check_gla_inputs(q, k, v, g, sign, h0, resets, chunk_size)
    qs = (q.astype(jnp.float32) * _scale(q, scale)).astype(q.dtype)
    if impl == "sequential":
        o, s = eng.recurrent_gla(qs, k, v, g, sign=sign, h0=h0, resets=resets)
    elif impl == "pallas" or (impl == "auto" and (g is None or g.ndim == 3) and auto_pallas(chunk_size)):
        backward = "pallas" if impl == "pallas" else AUTO_BACKWARD["gla"]
        o, s = kernel_call(
            lambda q, k, v, g, sign, h0, resets: gla_chunk_pallas(
                q, k, v, g, sign=sign, h0=h0, resets=resets, chunk_size=chunk_size, backward=backward),
            qs, k, v, g, sign, h0, resets, layouts="tttttst", out_layouts="ts")
    elif impl == "chunked" or kernel_platform() != "cpu":
        o, s = eng.chunk_gla(qs, k, v, g, sign=sign, h0=h0, resets=resets, chunk_size=chunk_size)
    else:  # CPU "auto": evaluate by the scan, differentiate through the chunked form
        o, s = primal_by(
            lambda q, k, v, g, sign, h0, resets: eng.recurrent_gla(q, k, v, g, sign=sign, h0=h0, resets=resets),
            lambda q, k, v, g, sign, h0, resets: eng.chunk_gla(
                q, k, v, g, sign=sign, h0=h0, resets=resets, chunk_size=chunk_size),
        )(qs, k, v, g, sign, h0, resets)
    return o.astype(v.dtype), s


# ----------------------------------------------------------------------------- GLA


def gla(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    log_decay: Float[AnyArray, "b t h k"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    impl="auto",
    chunk_size=64,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """GLA: ``S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T (s q_t)``.

    ``log_decay`` ``[b, t, h, dk]`` per channel. Returns ``(y [b, t, h, dv], S_T [b, h, dk, dv])``.
    ``impl``: ``"sequential"`` (the float32 ``lax.scan`` reference), ``"chunked"`` (``seqjax.ops.gla``),
    ``"pallas"``, or ``"auto"``: the Pallas kernel where ``seqjax._platform.auto_pallas`` says so, else the
    chunked form, except on the CPU, where ``"auto"`` evaluates the scan and differentiates through the chunked
    form (``seqjax.mixers._autodiff.primal_by``): the scan is the faster forward there, the chunked form the
    faster forward+backward (``benchmarks/results/cpu_mixers.md``), with per-channel, per-head (:func:`retnet`,
    Mamba-2) or no decay (:func:`linear_attention`) alike.
    """
    _checks.check_no_negative_eigen("gla", negative_eigen)
    _checks.check_ndim("log_decay", log_decay, 4, "[batch, time, heads, key_dim] (GLA's per-channel gate)")
    return _run(q, k, v, log_decay, h0=h0, resets=resets, impl=impl, chunk_size=chunk_size, scale=scale)


def gla_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    log_decay: Float[AnyArray, "b t h k"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Reference: float32 ``lax.scan`` of ``S_t = diag(α_t) S_{t-1} + k_t v_t^T; y_t = S_t^T s q_t``."""
    return gla(q, k, v, log_decay, h0=h0, resets=resets, impl="sequential", scale=scale, negative_eigen=negative_eigen)


def gla_step(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    log_decay: Float[AnyArray, "b h k"],
    *,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    """One token: ``q, k [b, h, dk]``, ``v [b, h, dv]``, ``log_decay [b, h, dk]`` -> ``(y_t, S)``."""
    _checks.check_no_negative_eigen("gla", negative_eigen)
    y, s = eng.step_gla(h, q * _scale(q, scale), k, v, log_decay)
    return y.astype(v.dtype), s


def _materialize(q, k, g, scale):
    """``M[b, h, t, s] = s q_t^T diag(exp(G_t − G_s)) k_s`` for ``s ≤ t`` (``G`` cumulative log decay)."""
    b, t, h, dk = q.shape
    q = q.astype(jnp.float32) * _scale(q, scale)
    g = jnp.zeros((b, t, h, 1), jnp.float32) if g is None else g.astype(jnp.float32)
    g = g if g.ndim == 4 else g[..., None]
    cg = jnp.cumsum(g, axis=1)
    causal = jnp.tril(jnp.ones((t, t), bool)).reshape(1, t, t, 1, 1)
    diff = jnp.where(causal, cg[:, :, None] - cg[:, None, :], 0.0)  # [b, t, s, h, k]
    d = jnp.where(causal, jnp.exp(diff), 0.0)
    return jnp.einsum("bthk,bshk,btshk->bhts", q, k.astype(jnp.float32), d)


def gla_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    log_decay: Float[AnyArray, "b t h k"],
    *,
    scale=None,
    negative_eigen=False,
) -> Operator:
    """GLA as a ``[b, h, T, T]`` operator on ``v`` (``h0 = 0``)."""
    del v
    _checks.check_no_negative_eigen("gla", negative_eigen)
    return _materialize(q, k, log_decay, scale)


def _qkv(key, batch, time, heads, dk, dv):
    kq, kk, kv = jax.random.split(key, 3)
    return dict(
        q=jax.random.normal(kq, (batch, time, heads, dk)),
        k=jax.random.normal(kk, (batch, time, heads, dk)),
        v=jax.random.normal(kv, (batch, time, heads, dv)),
    )


def gla_make_inputs(key, batch, time, heads=2, dk=7, dv=5):
    k1, k2 = jax.random.split(key)
    # strong and weak per-channel decays: exp(log_decay) spans ~(0.02, 1)
    g = jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(k2, (batch, time, heads, dk)))
    return dict(**_qkv(k1, batch, time, heads, dk, dv), log_decay=g)


# ----------------------------------------------------------------------------- RetNet / linear attention


def retnet_decays(heads: int):
    """RetNet's fixed per-head log decays ``log γ_h``, ``γ_h = 1 − 2^{−5−h}`` (``[heads]`` float32)."""
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - np.arange(heads)))), jnp.float32)


def _retnet_g(q):
    b, t, h, _ = q.shape
    return jnp.broadcast_to(retnet_decays(h)[None, None, :], (b, t, h))


def retnet(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    impl="auto",
    chunk_size=64,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Retention: ``S_t = γ_h S_{t-1} + k_t v_t^T``, ``y_t = S_t^T s q_t`` (GLA with a fixed per-head decay)."""
    _checks.check_no_negative_eigen("retnet", negative_eigen)
    _checks.check_ndim("q", q, 4, "[batch, time, heads, key_dim]")
    return _run(q, k, v, _retnet_g(q), h0=h0, resets=resets, impl=impl, chunk_size=chunk_size, scale=scale)


def retnet_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    return retnet(q, k, v, h0=h0, resets=resets, impl="sequential", scale=scale, negative_eigen=negative_eigen)


def retnet_step(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    *,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    _checks.check_no_negative_eigen("retnet", negative_eigen)
    b, hh, _ = q.shape
    g = jnp.broadcast_to(retnet_decays(hh)[None], (b, hh))
    y, s = eng.step_gla(h, q * _scale(q, scale), k, v, g)
    return y.astype(v.dtype), s


def retnet_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    scale=None,
    negative_eigen=False,
) -> Operator:
    del v, negative_eigen
    return _materialize(q, k, _retnet_g(q), scale)


def linear_attention(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    impl="auto",
    chunk_size=64,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Linear attention: ``S_t = S_{t-1} + k_t v_t^T``, ``y_t = S_t^T s q_t`` (GLA with decay 1)."""
    _checks.check_no_negative_eigen("linear_attention", negative_eigen)
    return _run(q, k, v, None, h0=h0, resets=resets, impl=impl, chunk_size=chunk_size, scale=scale)


def linear_attention_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    return linear_attention(q, k, v, h0=h0, resets=resets, impl="sequential", scale=scale, negative_eigen=negative_eigen)


def linear_attention_step(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    *,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    _checks.check_no_negative_eigen("linear_attention", negative_eigen)
    y, s = eng.step_gla(h, q * _scale(q, scale), k, v, None)
    return y.astype(v.dtype), s


def linear_attention_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    scale=None,
    negative_eigen=False,
) -> Operator:
    del v, negative_eigen
    return _materialize(q, k, None, scale)


def retnet_make_inputs(key, batch, time, heads=2, dk=7, dv=5):
    return _qkv(key, batch, time, heads, dk, dv)


def linear_attention_make_inputs(key, batch, time, heads=2, dk=7, dv=5):
    return _qkv(key, batch, time, heads, dk, dv)


# ----------------------------------------------------------------------------- layers


def elu_feature_map(x):
    """Katharopoulos et al.'s feature map ``elu(x) + 1`` (positive)."""
    return jax.nn.elu(x) + 1.0


class _GatedLinearAttentionLayer(nnx.Module):
    """Shared NNX layer: q/k/v projections, a decay (per subclass: :meth:`_log_decay`), per-head RMSNorm,
    swish output gate. Cache: ``StateCache(S [b, h, dk, dv])``."""

    def __init__(self, d_model, *, num_heads=2, expand_k=0.5, expand_v=1.0, chunk_size=64, impl="auto",
                 feature_map=None, rngs: nnx.Rngs, dtype=jnp.float32):
        kd, vd = int(d_model * expand_k), int(d_model * expand_v)
        _checks.check_divisible("key_dim", kd, "num_heads", num_heads)
        _checks.check_divisible("value_dim", vd, "num_heads", num_heads)
        self.num_heads, self.head_k, self.head_v = num_heads, kd // num_heads, vd // num_heads
        self.chunk_size, self.impl, self.feature_map, self.dtype = chunk_size, impl, feature_map, dtype

        def lin(i, o, axes):
            return nn.Linear(i, o, axes=axes, rngs=rngs, dtype=dtype)

        self.q_proj = lin(d_model, kd, ("embed", "heads"))
        self.k_proj = lin(d_model, kd, ("embed", "heads"))
        self.v_proj = lin(d_model, vd, ("embed", "heads"))
        self.g_proj = lin(d_model, vd, ("embed", "heads"))  # output gate
        self.o_norm = nn.RMSNorm(self.head_v, axis_name="head_dim")
        self.o_proj = lin(vd, d_model, ("heads", "embed"))

    def _log_decay(self, x, q):
        """The log decay: per channel ``[b, t, h, dk]``, per head ``[b, t, h]``, or ``None`` (no decay)."""
        return None

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        h = self.num_heads
        q = nn.split_heads(self.q_proj(x), h)
        k = nn.split_heads(self.k_proj(x), h)
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        v = nn.split_heads(self.v_proj(x), h)
        g = self._log_decay(x, q)
        p = plan(x, segment_ids=segment_ids, cache=cache, context_parallel=True)
        if p.decode:
            y, s = eng.step_gla(p.h0, q[:, 0] * _scale(q, None), k[:, 0], v[:, 0], None if g is None else g[:, 0])
            y = y.astype(v.dtype)[:, None]
        elif p.mesh is not None:  # the chunked engine per shard, then one all-gather
            qs = (q.astype(jnp.float32) * _scale(q, None)).astype(q.dtype)
            g = jnp.zeros(q.shape[:3], jnp.float32) if g is None else g
            y, s = cp.gla_context_parallel(qs, k, v, g, mesh=p.mesh, resets=p.resets,
                                           local_fn=cp.chunked_local(self.chunk_size))
            y = y.astype(v.dtype)
        else:
            y, s = _run(q, k, v, g, h0=p.h0, resets=p.resets, impl=self.impl, chunk_size=self.chunk_size, scale=None)
        y = self.o_norm(y) * jax.nn.silu(nn.split_heads(self.g_proj(x), h).astype(jnp.float32)).astype(y.dtype)
        return self.o_proj(nn.merge_heads(y)), update(cache, state=s)

    def init_cache(self, batch_size, max_len=None):
        del max_len
        return StateCache(jnp.zeros((batch_size, self.num_heads, self.head_k, self.head_v), jnp.float32))


class GLA(_GatedLinearAttentionLayer):
    """GLA layer (Yang et al. 2024): low-rank per-channel gate ``logsigmoid(x W_1 W_2 + b) / 16``."""

    def __init__(self, d_model, *, gate_low_rank=16, gate_logit_normalizer=16.0, rngs: nnx.Rngs, **kw):
        super().__init__(d_model, rngs=rngs, **kw)
        kd = self.num_heads * self.head_k
        self.gk_proj1 = nn.Linear(d_model, gate_low_rank, axes=("embed", None), rngs=rngs, dtype=self.dtype)
        self.gk_proj2 = nn.Linear(gate_low_rank, kd, axes=(None, "heads"), use_bias=True, rngs=rngs, dtype=self.dtype)
        self.gate_logit_normalizer = gate_logit_normalizer

    def _log_decay(self, x, q):
        logits = self.gk_proj2(self.gk_proj1(x)).astype(jnp.float32)
        return nn.split_heads(jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer, self.num_heads)


class RetNet(_GatedLinearAttentionLayer):
    """Multi-scale retention layer (Sun et al. 2023) without xPos: fixed per-head decays."""

    def _log_decay(self, x, q):
        return _retnet_g(q)


class LinearAttention(_GatedLinearAttentionLayer):
    """Linear attention layer (Katharopoulos et al. 2020) with the ``elu + 1`` feature map."""

    def __init__(self, d_model, *, feature_map=elu_feature_map, rngs: nnx.Rngs, **kw):
        super().__init__(d_model, feature_map=feature_map, rngs=rngs, **kw)


register(MixerSpec(
    name="gla", fn=gla, recurrent=gla_recurrent, step=gla_step, make_inputs=gla_make_inputs, layer=GLA,
    materialize=gla_materialize, value_arg="v", impls=("sequential", "chunked"), pallas=("gpu", "tpu"),
    context_parallel=True, paper="https://arxiv.org/abs/2312.06635", doc="Gated linear attention (Yang et al. 2024)",
))
register(MixerSpec(
    name="retnet", fn=retnet, recurrent=retnet_recurrent, step=retnet_step, make_inputs=retnet_make_inputs,
    layer=RetNet, materialize=retnet_materialize, value_arg="v", impls=("sequential", "chunked"),
    pallas=("gpu", "tpu"), context_parallel=True, paper="https://arxiv.org/abs/2307.08621",
    doc="Retention (Sun et al. 2023)",
))
register(MixerSpec(
    name="linear_attention", fn=linear_attention, recurrent=linear_attention_recurrent, step=linear_attention_step,
    make_inputs=linear_attention_make_inputs, layer=LinearAttention, materialize=linear_attention_materialize,
    value_arg="v", impls=("sequential", "chunked"), pallas=("gpu", "tpu"), context_parallel=True,
    paper="https://arxiv.org/abs/2006.16236", doc="Linear attention (Katharopoulos et al. 2020)",
))
