r"""Linear recurrent units: LRU and Griffin's RG-LRU.

**LRU** (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu, De; ICML 2023, "Resurrecting Recurrent
Neural Networks for Long Sequences"). A complex diagonal recurrence with exponential parametrisation
and normalised input:

.. math::
   λ = \exp(-e^{ν} + i e^{θ}), \quad γ = \sqrt{1 - |λ|^2}, \qquad
   h_t = λ \odot h_{t-1} + γ \odot (B x_t), \quad y_t = \mathrm{Re}(C h_t) + D \odot x_t.

Ring init: ``|λ|`` uniform on the ring ``[r_min, r_max]`` (in ``|λ|^2``), phase uniform in
``[0, max_phase]``. Shapes: ``x`` ``[b, t, H]``; ``nu_log``, ``theta_log`` ``[N]``; ``B`` ``[N, H]``,
``C`` ``[H, N]`` complex64; ``D`` ``[H]``; state ``[b, N]`` complex64. LRU mixes channels (``B``,
``C`` are dense), so its operator is MIMO: ``lru_materialize`` gives ``M [b, T, T, H, H]`` with
``y_t = Σ_s M[t, s] x_s``, ``M[t, s] = Re(C diag(λ^{t-s}) γ B)`` for ``s ≤ t`` plus ``diag(D)`` at ``s = t``.

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
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.layer import StateCache, plan, update
from seqjax.mixers import _ssm
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import Linear, ShortConv
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Complex, Float, Hidden, Inexact, ResetsLike, SegmentIds

__all__ = ["lru", "lru_recurrent", "lru_step", "lru_materialize", "lru_make_inputs", "lru_ring_init", "LRU",
           "rglru", "rglru_recurrent", "rglru_step", "rglru_materialize", "rglru_make_inputs", "sqrt_bounded",
           "RGLRUCache", "RGLRU"]

IMPLS = ("auto", "sequential", "associative", "chunked")
RGLRU_C = 8.0


# ----------------------------------------------------------------------------- LRU


def _check_lru_inputs(x, nu_log, theta_log, B, C, D, h0, resets, negative_eigen, step=False):
    h = x.shape[-1]
    _checks.check_ndim("nu_log", nu_log, 1, "[state]")
    n = nu_log.shape[0]
    _checks.check_shape("theta_log", theta_log, (n,), "[state]")
    _checks.check_shape("B", B, (n, h), "[state, channels]")
    _checks.check_shape("C", C, (h, n), "[channels, state]")
    _checks.check_dtype("B", B, "complex")
    _checks.check_dtype("C", C, "complex")
    _checks.check_shape("D", D, (h,), "[channels]")
    _ssm.check_ssm_inputs("lru", x, h0, resets, negative_eigen, step, (n,))


def _lru_coeffs(nu_log, theta_log, B):
    """``(log λ [N] complex, γ B [N, H])``; ``γ = sqrt(-expm1(-2 e^ν))`` is exact for ``|λ| → 1``."""
    nu = jnp.exp(nu_log.astype(jnp.float32))
    log_lam = -nu + 1j * jnp.exp(theta_log.astype(jnp.float32))
    gamma = jnp.sqrt(-jnp.expm1(-2.0 * nu))
    return log_lam.astype(jnp.complex64), gamma[:, None] * B.astype(jnp.complex64)


def _lru_out(C, D, hs, x):
    y = jnp.real(jnp.einsum("hn,...n->...h", C.astype(jnp.complex64), hs))
    d = D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return y + d * x.astype(jnp.float32)


def lru_recurrent(
    x: Float[AnyArray, "b t d"],
    nu_log: Float[AnyArray, " n"],
    theta_log: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Inexact[AnyArray, "b n"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Complex[Array, "b n"]]:
    """The reference: ``lax.scan`` of ``h_t = λ h_{t-1} + γ B x_t``, ``y_t = Re(C h_t) + D x_t``."""
    _check_lru_inputs(x, nu_log, theta_log, B, C, D, h0, resets, negative_eigen)
    return _lru_recurrent(x, nu_log, theta_log, B, C, D, h0, resets)


@jax.jit
def _lru_recurrent(x, nu_log, theta_log, B, C, D, h0, resets):
    bsz, t, _ = x.shape
    log_lam, gb = _lru_coeffs(nu_log, theta_log, B)
    lam = jnp.exp(log_lam)
    state = jnp.zeros((bsz, nu_log.shape[0]), jnp.complex64) if h0 is None else h0.astype(jnp.complex64)
    keep = jnp.ones((bsz, t), bool) if resets is None else ~jnp.asarray(resets, bool)

    def step(state, inp):
        x_t, keep_t = inp
        state = jnp.where(keep_t[:, None], lam[None] * state, 0.0)
        state = state + jnp.einsum("nh,bh->bn", gb, x_t.astype(jnp.complex64))
        return state, _lru_out(C, D, state, x_t)

    state, ys = lax.scan(step, state, (jnp.moveaxis(x.astype(jnp.float32), 1, 0), keep.T))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state


@functools.partial(jax.jit, static_argnames=("impl",))
def _lru_scan(x, nu_log, theta_log, B, C, D, h0, resets, impl):
    log_lam, gb = _lru_coeffs(nu_log, theta_log, B)
    bu = jnp.einsum("nh,bth->btn", gb, x.astype(jnp.complex64))
    hs, h_last = linear_scan(log_lam[None, None], bu, h0=h0, resets=resets, log_decay=True, impl=impl)
    return _lru_out(C, D, hs, x).astype(x.dtype), h_last


def lru(
    x: Float[AnyArray, "b t d"],
    nu_log: Float[AnyArray, " n"],
    theta_log: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Inexact[AnyArray, "b n"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Complex[Array, "b n"]]:
    """LRU, functional: ``(y [b, t, H], h_last [b, N] complex64)`` through the scan engine."""
    _checks.check_choice("impl", impl, IMPLS)
    _check_lru_inputs(x, nu_log, theta_log, B, C, D, h0, resets, negative_eigen)
    return _lru_scan(x, nu_log, theta_log, B, C, D, h0, _ssm.resets_or_none(resets), impl)


def lru_materialize(
    x: Float[AnyArray, "b t d"],
    nu_log: Float[AnyArray, " n"],
    theta_log: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> Float[Array, "b t t d d"]:
    """``M [b, T, T, H_out, H_in]``: the MIMO operator ``y_t = Σ_s M[t, s] x_s`` (``h0 = 0``)."""
    _check_lru_inputs(x, nu_log, theta_log, B, C, D, None, None, negative_eigen)
    log_lam, gb = _lru_coeffs(nu_log, theta_log, B)
    return _ssm.mimo_toeplitz(x, log_lam, C.astype(jnp.complex64), gb, D)


def lru_step(
    h: Inexact[AnyArray, "b n"] | None,
    x: Float[AnyArray, "b d"],
    nu_log: Float[AnyArray, " n"],
    theta_log: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b d"], Complex[Array, "b n"]]:
    """One token: ``x`` ``[b, H]``, ``h`` ``[b, N]`` (``None``: zeros) -> ``(y [b, H], h)``."""
    _check_lru_inputs(x, nu_log, theta_log, B, C, D, h, None, negative_eigen, step=True)
    y, h = _lru_recurrent(x[:, None], nu_log, theta_log, B, C, D, h, None)
    return y[:, 0], h


def lru_ring_init(key, n, r_min=0.0, r_max=1.0, max_phase=2 * np.pi):
    """``(nu_log, theta_log)`` ``[n]``: ``|λ|^2`` uniform in ``[r_min^2, r_max^2]``, phase uniform in
    ``[0, max_phase]`` (the paper's Lemma 3.2 init)."""
    k1, k2 = jax.random.split(key)
    u1, u2 = jax.random.uniform(k1, (n,)), jax.random.uniform(k2, (n,))
    nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    return nu_log, jnp.log(max_phase * u2)


def _cnormal(key, shape, scale):
    kr, ki = jax.random.split(key)
    return (scale * (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape))).astype(jnp.complex64)


def lru_make_inputs(key, batch, time, channels=3, state=5):
    kx, kr, kb, kc, kd = jax.random.split(key, 5)
    nu_log, theta_log = lru_ring_init(kr, state, r_min=0.3, r_max=0.99, max_phase=np.pi)
    return dict(
        x=jax.random.normal(kx, (batch, time, channels)),
        nu_log=nu_log, theta_log=theta_log,
        B=_cnormal(kb, (state, channels), 1 / np.sqrt(2 * channels)),
        C=_cnormal(kc, (channels, state), 1 / np.sqrt(state)),
        D=jax.random.normal(kd, (channels,)),
    )


class LRU(nnx.Module):
    """LRU layer: the recurrence over ``d_model`` channels with ``state_size`` complex modes (ring
    init), then GELU and an output projection. Complex ``B``, ``C`` are stored as real pairs."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_size: int = 32, r_min: float = 0.0,
                 r_max: float = 1.0, max_phase: float = 2 * np.pi, impl: str = "auto", dtype=jnp.float32):
        _checks.check_choice("impl", impl, IMPLS)
        self.impl, self.dtype, self.state_size = impl, dtype, state_size
        nu_log, theta_log = lru_ring_init(rngs.params(), state_size, r_min, r_max, max_phase)
        self.nu_log = nnx.Param(nu_log, out_sharding=("state",))
        self.theta_log = nnx.Param(theta_log, out_sharding=("state",))
        b = _cnormal(rngs.params(), (state_size, d_model), 1 / np.sqrt(2 * d_model))
        c = _cnormal(rngs.params(), (d_model, state_size), 1 / np.sqrt(state_size))
        self.b_re = nnx.Param(jnp.real(b), out_sharding=("state", "mlp"))
        self.b_im = nnx.Param(jnp.imag(b), out_sharding=("state", "mlp"))
        self.c_re = nnx.Param(jnp.real(c), out_sharding=("mlp", "state"))
        self.c_im = nnx.Param(jnp.imag(c), out_sharding=("mlp", "state"))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,)), out_sharding=("mlp",))
        self.out_proj = Linear(d_model, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, h = lru(x.astype(self.dtype), self.nu_log[...], self.theta_log[...],
                   self.b_re[...] + 1j * self.b_im[...], self.c_re[...] + 1j * self.c_im[...], self.D[...],
                   h0=p.h0, impl=self.impl, resets=p.resets)
        return self.out_proj(jax.nn.gelu(y)).astype(x.dtype), update(cache, state=h)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> StateCache:
        del max_len
        return StateCache(jnp.zeros((batch_size, self.state_size), jnp.complex64))


# ----------------------------------------------------------------------------- RG-LRU


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
    name="lru", fn=lru, recurrent=lru_recurrent, step=lru_step, make_inputs=lru_make_inputs, layer=LRU,
    materialize=lru_materialize, value_arg="x", params=("nu_log", "theta_log", "B", "C", "D"),
    impls=("sequential", "associative", "chunked"), paper="https://arxiv.org/abs/2303.06349",
    doc="LRU (Orvieto et al. 2023): complex diagonal, exponential parametrisation, γ normalisation",
))
register(MixerSpec(
    name="rglru", fn=rglru, recurrent=rglru_recurrent, step=rglru_step, make_inputs=rglru_make_inputs,
    layer=RGLRU, materialize=rglru_materialize, value_arg="x", params=("a_param",),
    impls=("sequential", "associative", "chunked"), pallas=("tpu",), paper="https://arxiv.org/abs/2402.19427",
    doc="RG-LRU (Griffin, De et al. 2024): gated real diagonal recurrence, sqrt(1-a²) with bounded gradient",
))
