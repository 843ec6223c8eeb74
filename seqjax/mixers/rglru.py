r"""RG-LRU, the gated real diagonal recurrence of Griffin.

**RG-LRU** (De, Smith, Fernando et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local
Attention for Efficient Language Models"). Per channel, with input gate ``i_t = σ(gate_x_t)`` and
recurrence gate ``r_t = σ(gate_a_t)``:

.. math::
   \log a_t = -c\, r_t\, \mathrm{softplus}(Λ) \ (c = 8), \qquad
   h_t = a_t \odot h_{t-1} + \sqrt{1 - a_t^2} \odot (i_t \odot x_t).

``sqrt(1 - a^2)`` goes through :func:`sqrt_bounded` whose derivative is capped at 1000 (as in
recurrentgemma), so ``a → 1`` never yields an infinite gradient. At a document start the multiplier
is skipped (the input enters unnormalised) and ``a`` is zeroed; ``h0=None`` means the sequence starts
a document at ``t = 0`` (recurrentgemma's ``segment_pos == 0``). Shapes: ``x``, ``gate_x``, ``gate_a``
``[b, t, d]``; ``a_param`` ``[d]``; state ``[b, d]`` float32.

The LRU (complex diagonal, dense ``B``, ``C``) is ``seqjax.mixers.lru``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.layer import plan, update
from seqjax.mixers import _ssm
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import Linear, ShortConv
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, ResetsLike, SegmentIds

__all__ = ["rglru", "rglru_recurrent", "rglru_step", "rglru_materialize", "rglru_make_inputs", "rglru_a_init",
           "sqrt_bounded", "RGLRUCache", "RGLRU"]

IMPLS = ("auto", "sequential", "associative", "chunked")
RGLRU_C = 8.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded(x, max_grad=1000.0):
    """``sqrt(x)`` whose derivative ``1 / (2 sqrt(x))`` is capped at ``max_grad`` (near ``x = 0``)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x, max_grad):
    return jnp.sqrt(x), x


def _sqrt_bwd(max_grad, x, g):
    return (0.5 * g / jnp.sqrt(jnp.maximum(x, 1.0 / (4.0 * max_grad**2))),)


sqrt_bounded.defvjp(_sqrt_fwd, _sqrt_bwd)


def _check_rglru_inputs(x, gate_x, gate_a, a_param, h0, resets, negative_eigen, step=False):
    _ssm.check_ssm_inputs("rglru", x, h0, resets, negative_eigen, step, (x.shape[-1],))
    _checks.check_same_shape("x", x, "gate_x", gate_x)
    _checks.check_same_shape("x", x, "gate_a", gate_a)
    _checks.check_shape("a_param", a_param, (x.shape[-1],), "[channels]")


def _rglru_coeffs(x, gate_x, gate_a, a_param, starts):
    """``(log a, b)``: ``log a = -c σ(gate_a) softplus(Λ)``; ``b = sqrt(1 - a²) σ(gate_x) x``, the
    multiplier skipped at document starts."""
    log_a = -RGLRU_C * jax.nn.sigmoid(gate_a.astype(jnp.float32)) * jax.nn.softplus(a_param.astype(jnp.float32))[None, None]
    mult = sqrt_bounded(-jnp.expm1(2.0 * log_a))
    mult = jnp.where(starts[..., None], 1.0, mult)
    return log_a, mult * jax.nn.sigmoid(gate_x.astype(jnp.float32)) * x.astype(jnp.float32)


def _starts(x, h0, resets):
    t = x.shape[1]
    starts = jnp.zeros(x.shape[:2], bool) if resets is None else jnp.asarray(resets, bool)
    if h0 is None:  # a fresh sequence starts a document
        starts = starts | (jnp.arange(t) == 0)[None]
    return starts


def rglru_recurrent(
    x: Float[AnyArray, "b t d"],
    gate_x: Float[AnyArray, "b t d"],
    gate_a: Float[AnyArray, "b t d"],
    a_param: Float[AnyArray, " d"],
    *,
    h0: Float[AnyArray, "b d"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
    """The reference: ``lax.scan`` of ``h_t = a_t h_{t-1} + sqrt(1 - a_t²) (i_t x_t)``; ``y = h``."""
    _check_rglru_inputs(x, gate_x, gate_a, a_param, h0, resets, negative_eigen)
    return _rglru_recurrent(x, gate_x, gate_a, a_param, h0, _starts(x, h0, resets))


@jax.jit
def _rglru_recurrent(x, gate_x, gate_a, a_param, h0, starts):
    log_a, b = _rglru_coeffs(x, gate_x, gate_a, a_param, starts)
    a = jnp.where(starts[..., None], 0.0, jnp.exp(log_a))
    state = jnp.zeros((x.shape[0], x.shape[2]), jnp.float32) if h0 is None else h0.astype(jnp.float32)

    def step(state, ab):
        state = ab[0] * state + ab[1]
        return state, state

    state, hs = lax.scan(step, state, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1).astype(x.dtype), state


@functools.partial(jax.jit, static_argnames=("impl",))
def _rglru_scan(x, gate_x, gate_a, a_param, h0, starts, impl):
    log_a, b = _rglru_coeffs(x, gate_x, gate_a, a_param, starts)
    hs, h_last = linear_scan(log_a, b, h0=h0, resets=starts, log_decay=True, impl=impl)
    return hs.astype(x.dtype), h_last


def rglru(
    x: Float[AnyArray, "b t d"],
    gate_x: Float[AnyArray, "b t d"],
    gate_a: Float[AnyArray, "b t d"],
    a_param: Float[AnyArray, " d"],
    *,
    h0: Float[AnyArray, "b d"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
    """RG-LRU, functional: ``(y [b, t, d], h_last [b, d])``; ``gate_x``, ``gate_a`` are gate logits."""
    _checks.check_choice("impl", impl, IMPLS)
    _check_rglru_inputs(x, gate_x, gate_a, a_param, h0, resets, negative_eigen)
    return _rglru_scan(x, gate_x, gate_a, a_param, h0, _starts(x, h0, resets), impl)


def rglru_step(
    h: Float[AnyArray, "b d"] | None,
    x: Float[AnyArray, "b d"],
    gate_x: Float[AnyArray, "b d"],
    gate_a: Float[AnyArray, "b d"],
    a_param: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b d"], Float[Array, "b d"]]:
    """One token: ``x``, gates ``[b, d]``; ``h`` ``[b, d]`` (``None``: a document starts here)."""
    _check_rglru_inputs(x, gate_x, gate_a, a_param, h, None, negative_eigen, step=True)
    y, h = _rglru_recurrent(x[:, None], gate_x[:, None], gate_a[:, None], a_param, h,
                            _starts(x[:, None], h, None))
    return y[:, 0], h


def rglru_materialize(
    x: Float[AnyArray, "b t d"],
    gate_x: Float[AnyArray, "b t d"],
    gate_a: Float[AnyArray, "b t d"],
    a_param: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> Float[Array, "b d t t"]:
    """``[b, d, T, T]``: ``M_{ts} = (Π_{s<r<=t} a_r) sqrt(1 - a_s²) i_s`` (multiplier 1 at ``s = 0``),
    from log-space cumulative decays (masked before ``exp``, so strong decays never overflow)."""
    _check_rglru_inputs(x, gate_x, gate_a, a_param, None, None, negative_eigen)
    starts = _starts(x, None, None)
    log_a, _ = _rglru_coeffs(x, gate_x, gate_a, a_param, starts)
    _, w = _rglru_coeffs(jnp.ones_like(x, jnp.float32), gate_x, gate_a, a_param, starts)
    cum = jnp.cumsum(jnp.moveaxis(log_a, 1, 2), axis=-1)  # [b, d, T]
    diff = cum[..., :, None] - cum[..., None, :]
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    return decay * jnp.moveaxis(w, 1, 2)[:, :, None, :]


def rglru_make_inputs(key, batch, time, channels=5):
    kx, k1, k2, k3 = jax.random.split(key, 4)
    return dict(
        x=jax.random.normal(kx, (batch, time, channels)),
        gate_x=jax.random.normal(k1, (batch, time, channels)),
        gate_a=jax.random.normal(k2, (batch, time, channels)),
        a_param=jax.random.uniform(k3, (channels,), minval=-6.0, maxval=1.0),
    )


def rglru_a_init(key, width, min_rad=0.9, max_rad=0.999):
    """Λ with ``a^(1/c) = sqrt(u)``, ``u`` uniform in ``[min_rad², max_rad²]`` at ``r = 1`` (as recurrentgemma)."""
    u = jax.random.uniform(key, (width,), minval=min_rad**2, maxval=max_rad**2)
    return jnp.log(jnp.expm1(-0.5 * jnp.log(u)))  # softplus^{-1}(-log(u) / 2)


class RGLRUCache(NamedTuple):
    state: Any  # [b, width] float32
    conv: Any  # [b, conv_width - 1, width]
    pos: Any  # [b] int32: tokens consumed (position 0 starts a document)


class RGLRU(nnx.Module):
    """Griffin's recurrent block: ``gelu(W_y x) ⊙ RG-LRU(conv1d(W_x x))``, then ``W_out``. The gates are
    block-diagonal linear maps (``num_heads`` blocks) of the conv output. Cache: the state, the conv
    state and the position (position 0 is a document start)."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, width: int | None = None, num_heads: int = 1,
                 conv_width: int = 4, impl: str = "auto", dtype=jnp.float32):
        width = width or d_model
        _checks.check_divisible("width", width, "num_heads", num_heads)
        _checks.check_choice("impl", impl, IMPLS)
        self.impl, self.dtype, self.width, self.num_heads = impl, dtype, width, num_heads
        self.linear_y = Linear(d_model, width, rngs=rngs, dtype=dtype)
        self.linear_x = Linear(d_model, width, rngs=rngs, dtype=dtype)
        self.conv = ShortConv(width, conv_width, rngs=rngs)
        bw = width // num_heads
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
        ax = ("heads", None, None)
        self.gate_x_w = nnx.Param(init(rngs.params(), (num_heads, bw, bw)), out_sharding=ax)
        self.gate_a_w = nnx.Param(init(rngs.params(), (num_heads, bw, bw)), out_sharding=ax)
        self.gate_x_b = nnx.Param(jnp.zeros((num_heads, bw)), out_sharding=("heads", None))
        self.gate_a_b = nnx.Param(jnp.zeros((num_heads, bw)), out_sharding=("heads", None))
        self.a_param = nnx.Param(rglru_a_init(rngs.params(), width), out_sharding=("mlp",))
        self.linear_out = Linear(width, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def _gate(self, x, w, b):
        xh = x.reshape(*x.shape[:-1], self.num_heads, -1)
        g = jnp.einsum("bthi,hij->bthj", xh, w[...].astype(x.dtype)) + b[...].astype(x.dtype)[None, None]
        return g.reshape(x.shape)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        bsz, t, _ = x.shape
        x = x.astype(self.dtype)
        y_branch = jax.nn.gelu(self.linear_y(x))
        xb, conv_state = self.conv(self.linear_x(x), state=None if cache is None else cache.conv,
                                   segment_ids=segment_ids)
        # a fresh cache starts a document (the input enters unnormalised there)
        p = plan(x, segment_ids=segment_ids, cache=cache, fresh=None if cache is None else cache.pos == 0)
        h, h_last = rglru(xb, self._gate(xb, self.gate_x_w, self.gate_x_b),
                          self._gate(xb, self.gate_a_w, self.gate_a_b), self.a_param[...],
                          h0=p.h0, impl=self.impl, resets=p.resets)
        out = self.linear_out(h * y_branch)
        return out, update(cache, state=h_last, conv=conv_state, pos=None if cache is None else cache.pos + t)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> RGLRUCache:
        del max_len
        return RGLRUCache(jnp.zeros((batch_size, self.width), jnp.float32),
                          self.conv.init_state(batch_size, self.dtype), jnp.zeros((batch_size,), jnp.int32))

register(MixerSpec(
    name="rglru", fn=rglru, recurrent=rglru_recurrent, step=rglru_step, make_inputs=rglru_make_inputs,
    layer=RGLRU, materialize=rglru_materialize, value_arg="x", params=("a_param",),
    impls=("sequential", "associative", "chunked"), pallas=("tpu",), paper="https://arxiv.org/abs/2402.19427",
    doc="RG-LRU (Griffin, De et al. 2024): gated real diagonal recurrence, sqrt(1-a²) with bounded gradient",
))
