r"""Linear recurrent units: LRU here; Griffin's RG-LRU in ``seqjax.mixers.rglru`` (re-exported here).

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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax import _checks
from seqjax.layer import StateCache, plan, update
from seqjax.mixers import _ssm
from seqjax.mixers.registry import MixerSpec, register
from seqjax.mixers.rglru import (
    RGLRU,
    RGLRUCache,
    rglru,
    rglru_make_inputs,
    rglru_materialize,
    rglru_recurrent,
    rglru_step,
    sqrt_bounded,
)
from seqjax.mixers.rglru import RGLRU_C as RGLRU_C
from seqjax.mixers.rglru import rglru_a_init as rglru_a_init
from seqjax.nn import Linear
from seqjax.types import AnyArray, Array, Cache, Complex, Float, Hidden, Inexact, ResetsLike, SegmentIds

__all__ = ["lru", "lru_recurrent", "lru_step", "lru_materialize", "lru_make_inputs", "lru_ring_init", "LRU",
           "rglru", "rglru_recurrent", "rglru_step", "rglru_materialize", "rglru_make_inputs", "sqrt_bounded",
           "RGLRUCache", "RGLRU"]

IMPLS = ("auto", "sequential", "associative", "chunked")


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
    return _ssm.diag_ssm_recurrent(x, *_lru_coeffs(nu_log, theta_log, B), C, D, h0, resets, out_scale=1.0)


@functools.partial(jax.jit, static_argnames=("impl",))
def _lru_scan(x, nu_log, theta_log, B, C, D, h0, resets, impl):
    return _ssm.diag_ssm_scan(x, *_lru_coeffs(nu_log, theta_log, B), C, D, h0, resets, out_scale=1.0, impl=impl)


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
        self.b_re, self.b_im = _ssm.complex_params(jnp.real(b), jnp.imag(b), ("state", "mlp"))
        self.c_re, self.c_im = _ssm.complex_params(jnp.real(c), jnp.imag(c), ("mlp", "state"))
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

register(MixerSpec(
    name="lru", fn=lru, recurrent=lru_recurrent, step=lru_step, make_inputs=lru_make_inputs, layer=LRU,
    materialize=lru_materialize, value_arg="x", params=("nu_log", "theta_log", "B", "C", "D"),
    impls=("sequential", "associative", "chunked"), paper="https://arxiv.org/abs/2303.06349",
    doc="LRU (Orvieto et al. 2023): complex diagonal, exponential parametrisation, γ normalisation",
))
