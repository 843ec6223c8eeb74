r"""S5, one MIMO diagonal state-space system over all channels.

**S5** (Smith, Warrington, Linderman; ICLR 2023, "Simplified State Space Layers for Sequence
Modeling"). One MIMO system over all ``H`` channels with ``P`` complex modes, the eigenbasis of HiPPO-N
(:func:`seqjax.mixers._ssm.hippo_legs_normal`), per-mode ``Δ_p``, ZOH, parallel (associative) scan:

.. math::
   \bar Λ = e^{Δ Λ}, \ \bar B = (\bar Λ - 1) Λ^{-1} B, \qquad
   h_t = \bar Λ \odot h_{t-1} + \bar B x_t, \quad y_t = 2\,\mathrm{Re}(C h_t) + D \odot x_t

(conjugate symmetry: only one mode of each conjugate pair is kept, hence the factor 2 and a real
output). Shapes: ``x`` ``[b, t, H]``; ``Lambda``, ``log_dt`` ``[P]``; ``B`` ``[P, H]``; ``C``
``[H, P]`` complex64; ``D`` ``[H]``; state ``[b, P]`` complex64. S5 mixes channels, so its operator is
MIMO: ``s5_materialize`` gives ``M [b, T, T, H, H]`` with ``y_t = Σ_s M[t, s] x_s``.

The S4D sibling (SISO channels, Vandermonde kernel) is ``seqjax.mixers.s4d``.
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
from seqjax.nn import Linear
from seqjax.types import AnyArray, Array, Cache, Complex, Float, Hidden, Inexact, ResetsLike, SegmentIds

__all__ = ["s5", "s5_recurrent", "s5_step", "s5_materialize", "s5_make_inputs", "s5_init", "S5"]

S5_IMPLS = ("auto", "sequential", "associative", "chunked")


def _check_s5_inputs(x, Lambda, log_dt, B, C, D, h0, resets, negative_eigen, step=False):
    h = x.shape[-1]
    _checks.check_ndim("Lambda", Lambda, 1, "[modes]")
    p = Lambda.shape[0]
    _checks.check_dtype("Lambda", Lambda, "complex")
    _checks.check_shape("log_dt", log_dt, (p,), "[modes]")
    _checks.check_shape("B", B, (p, h), "[modes, channels]")
    _checks.check_shape("C", C, (h, p), "[channels, modes]")
    _checks.check_dtype("B", B, "complex")
    _checks.check_dtype("C", C, "complex")
    _checks.check_shape("D", D, (h,), "[channels]")
    _ssm.check_ssm_inputs("s5", x, h0, resets, negative_eigen, step, (p,))


def _s5_zoh(Lambda, log_dt, B):
    dt_l = jnp.exp(log_dt.astype(jnp.float32)) * Lambda.astype(jnp.complex64)
    b_bar = ((jnp.exp(dt_l) - 1.0) / Lambda.astype(jnp.complex64))[:, None] * B.astype(jnp.complex64)
    return dt_l, b_bar


def s5_recurrent(
    x: Float[AnyArray, "b t d"],
    Lambda: Complex[AnyArray, " n"],
    log_dt: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Inexact[AnyArray, "b n"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Complex[Array, "b n"]]:
    """The reference: ``lax.scan`` of ``h_t = Λ̄ h_{t-1} + B̄ x_t``, ``y_t = 2 Re(C h_t) + D x_t``."""
    _check_s5_inputs(x, Lambda, log_dt, B, C, D, h0, resets, negative_eigen)
    return _s5_recurrent(x, Lambda, log_dt, B, C, D, h0, resets)


@jax.jit
def _s5_recurrent(x, Lambda, log_dt, B, C, D, h0, resets):
    return _ssm.diag_ssm_recurrent(x, *_s5_zoh(Lambda, log_dt, B), C, D, h0, resets, out_scale=2.0)


@functools.partial(jax.jit, static_argnames=("impl",))
def _s5_scan(x, Lambda, log_dt, B, C, D, h0, resets, impl):
    return _ssm.diag_ssm_scan(x, *_s5_zoh(Lambda, log_dt, B), C, D, h0, resets, out_scale=2.0, impl=impl)


def s5(
    x: Float[AnyArray, "b t d"],
    Lambda: Complex[AnyArray, " n"],
    log_dt: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Inexact[AnyArray, "b n"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Complex[Array, "b n"]]:
    """S5, functional: ``(y [b, t, H], h_last [b, P] complex64)``; ``impl`` is a scan-engine impl
    (S5's own is ``"associative"``)."""
    _checks.check_choice("impl", impl, S5_IMPLS)
    _check_s5_inputs(x, Lambda, log_dt, B, C, D, h0, resets, negative_eigen)
    return _s5_scan(x, Lambda, log_dt, B, C, D, h0, _ssm.resets_or_none(resets), impl)


def s5_materialize(
    x: Float[AnyArray, "b t d"],
    Lambda: Complex[AnyArray, " n"],
    log_dt: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> Float[Array, "b t t d d"]:
    """``M [b, T, T, H_out, H_in]``: ``M[t, s] = 2 Re(C diag(Λ̄^{t-s}) B̄)`` for ``s ≤ t``, ``+ diag(D)`` at ``s = t``."""
    _check_s5_inputs(x, Lambda, log_dt, B, C, D, None, None, negative_eigen)
    dt_l, b_bar = _s5_zoh(Lambda, log_dt, B)
    return _ssm.mimo_toeplitz(x, dt_l, 2.0 * C.astype(jnp.complex64), b_bar, D)


def s5_step(
    h: Inexact[AnyArray, "b n"] | None,
    x: Float[AnyArray, "b d"],
    Lambda: Complex[AnyArray, " n"],
    log_dt: Float[AnyArray, " n"],
    B: Complex[AnyArray, "n d"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b d"], Complex[Array, "b n"]]:
    """One token: ``x`` ``[b, H]``, ``h`` ``[b, P]`` (``None``: zeros) -> ``(y [b, H], h)``."""
    _check_s5_inputs(x, Lambda, log_dt, B, C, D, h, None, negative_eigen, step=True)
    y, h = _s5_recurrent(x[:, None], Lambda, log_dt, B, C, D, h, None)
    return y[:, 0], h


def s5_init(modes: int, channels: int, key):
    """HiPPO-N eigenbasis, conjugate-symmetric: ``(Lambda [modes], B̃ = V^H B [modes, H], V)`` from a
    HiPPO-N of size ``2 modes`` (one eigenvalue of each conjugate pair kept)."""
    lam, v, _ = _ssm.hippo_legs_normal(2 * modes)
    lam, v = lam[:modes], v[:, :modes]
    # jnp on the random part, so the init also traces (stacked / abstract initialisation)
    b = jax.random.normal(key, (2 * modes, channels)) / np.sqrt(channels)
    vh = jnp.asarray(v.conj().T, jnp.complex64)
    return jnp.asarray(lam, jnp.complex64), vh @ b.astype(jnp.complex64), v


def s5_make_inputs(key, batch, time, channels=3, modes=4):
    kx, kd, kb, kc, kdd = jax.random.split(key, 5)
    lam, b, _ = s5_init(modes, channels, kb)
    return dict(
        x=jax.random.normal(kx, (batch, time, channels)),
        Lambda=lam,
        log_dt=jax.random.uniform(kd, (modes,), minval=np.log(1e-2), maxval=np.log(1.0)),
        B=b,
        C=_ssm.complex_normal(kc, (channels, modes), 1 / np.sqrt(modes)),
        D=jax.random.normal(kdd, (channels,)),
    )


class S5(nnx.Module):
    """S5 layer: one MIMO SSM over ``d_model`` channels with ``state_size`` complex modes (HiPPO-N
    eigenbasis), then GELU and an output projection."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_size: int = 16, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, impl: str = "auto", dtype=jnp.float32):
        _checks.check_choice("impl", impl, S5_IMPLS)
        self.impl, self.dtype, self.state_size = impl, dtype, state_size
        lam, b, v = s5_init(state_size, d_model, rngs.params())
        c = jax.random.normal(rngs.params(), (d_model, 2 * state_size)) * np.sqrt(0.5 / state_size)
        c = c.astype(jnp.complex64) @ jnp.asarray(v, jnp.complex64)
        self.log_lambda_real = nnx.Param(jnp.log(-jnp.real(lam)), out_sharding=("state",))
        self.lambda_imag = nnx.Param(jnp.imag(lam), out_sharding=("state",))
        self.b_re, self.b_im = _ssm.complex_params(jnp.real(b), jnp.imag(b), ("state", "mlp"))
        self.c_re, self.c_im = _ssm.complex_params(jnp.real(c), jnp.imag(c), ("mlp", "state"))
        log_dt = jax.random.uniform(rngs.params(), (state_size,), minval=np.log(dt_min), maxval=np.log(dt_max))
        self.log_dt = nnx.Param(log_dt, out_sharding=("state",))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,)), out_sharding=("mlp",))
        self.out_proj = Linear(d_model, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def ssm_params(self):
        lam = -jnp.exp(self.log_lambda_real[...]) + 1j * self.lambda_imag[...]
        return dict(Lambda=lam, log_dt=self.log_dt[...], B=self.b_re[...] + 1j * self.b_im[...],
                    C=self.c_re[...] + 1j * self.c_im[...], D=self.D[...])

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, h = s5(x.astype(self.dtype), **self.ssm_params(), h0=p.h0, impl=self.impl, resets=p.resets)
        return self.out_proj(jax.nn.gelu(y)).astype(x.dtype), update(cache, state=h)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> StateCache:
        del max_len
        return StateCache(jnp.zeros((batch_size, self.state_size), jnp.complex64))


register(MixerSpec(
    name="s5", fn=s5, recurrent=s5_recurrent, step=s5_step, make_inputs=s5_make_inputs, layer=S5,
    materialize=s5_materialize, value_arg="x", params=("Lambda", "log_dt", "B", "C", "D"),
    impls=("sequential", "associative", "chunked"), paper="https://arxiv.org/abs/2208.04933",
    doc="S5 (Smith et al. 2023): MIMO complex diagonal SSM (HiPPO-N eigenbasis), associative scan",
))
