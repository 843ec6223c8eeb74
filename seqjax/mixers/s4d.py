r"""Diagonal state-space models: S4D here; S5, its MIMO sibling, in ``seqjax.mixers.s5`` (re-exported here).

**S4D** (Gu, Gupta, Goel, Ré; NeurIPS 2022, "On the Parameterization and Initialization of Diagonal
State Space Models"). Per channel ``c`` (``H`` channels), ``N`` complex modes (conjugate pairs kept
once), zero-order-hold discretisation with ``Δ_c = exp(log_dt_c)``:

.. math::
   \bar A = e^{Δ A}, \quad \bar B = (\bar A - 1) A^{-1} B, \qquad
   h_t = \bar A \odot h_{t-1} + \bar B x_t, \quad y_t = 2\,\mathrm{Re}(C \cdot h_t) + D x_t.

Convolution mode: the Vandermonde kernel ``K_{c,l} = 2 Re Σ_n C_n \bar B_n \bar A_n^l`` applied by FFT
(``impl="conv"``); recurrent mode: :func:`seqjax.scan.linear_scan` over complex states. Init: S4D-Lin
``A_n = -1/2 + iπn`` or S4D-Inv ``A_n = -1/2 + i N/π (N/(2n+1) - 1)``.
Shapes: ``x`` ``[b, t, H]``; ``log_dt`` ``[H]``; ``A, B, C`` ``[H, N]`` complex64; ``D`` ``[H]``; state
``[b, H, N]`` complex64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.layer import StateCache, plan, update
from seqjax.mixers import _ssm
from seqjax.mixers.registry import MixerSpec, register
from seqjax.mixers.s5 import S5, s5, s5_make_inputs, s5_materialize, s5_recurrent, s5_step
from seqjax.mixers.s5 import S5_IMPLS as S5_IMPLS
from seqjax.mixers.s5 import s5_init as s5_init
from seqjax.nn import Linear
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Complex, Float, Hidden, Inexact, ResetsLike, SegmentIds

__all__ = ["s4d", "s4d_recurrent", "s4d_step", "s4d_kernel", "s4d_materialize", "s4d_make_inputs", "s4d_init", "S4D",
           "s5", "s5_recurrent", "s5_step", "s5_materialize", "s5_make_inputs", "S5"]

S4D_IMPLS = ("auto", "sequential", "associative", "chunked", "conv")


def _check_s4d_inputs(x, log_dt, A, B, C, D, h0, resets, negative_eigen, step=False):
    h = x.shape[-1]
    _checks.check_ndim("A", A, 2, "[channels, modes]")
    n = A.shape[1]
    for nm, v in (("A", A), ("B", B), ("C", C)):
        _checks.check_shape(nm, v, (h, n), "[channels, modes]")
        _checks.check_dtype(nm, v, "complex")
    _checks.check_shape("log_dt", log_dt, (h,), "[channels]")
    _checks.check_shape("D", D, (h,), "[channels]")
    _ssm.check_ssm_inputs("s4d", x, h0, resets, negative_eigen, step, (h, n))


def _zoh(log_dt, A, B):
    """``(Δ A, \bar B)`` of the zero-order hold (``Δ`` broadcast over ``A``'s last axis)."""
    dt_a = jnp.exp(log_dt.astype(jnp.float32))[:, None] * A.astype(jnp.complex64)
    b_bar = (jnp.exp(dt_a) - 1.0) / A.astype(jnp.complex64) * B.astype(jnp.complex64)
    return dt_a, b_bar


# ----------------------------------------------------------------------------- S4D


def s4d_recurrent(
    x: Float[AnyArray, "b t d"],
    log_dt: Float[AnyArray, " d"],
    A: Complex[AnyArray, "d n"],
    B: Complex[AnyArray, "d n"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Inexact[AnyArray, "b d n"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Complex[Array, "b d n"]]:
    """The reference: ``lax.scan`` of ``h_t = Ā h_{t-1} + B̄ x_t``, ``y_t = 2 Re(C·h_t) + D x_t``."""
    _check_s4d_inputs(x, log_dt, A, B, C, D, h0, resets, negative_eigen)
    return _s4d_recurrent(x, log_dt, A, B, C, D, h0, resets)


@jax.jit
def _s4d_recurrent(x, log_dt, A, B, C, D, h0, resets):
    bsz, t, h = x.shape
    dt_a, b_bar = _zoh(log_dt, A, B)
    a_bar = jnp.exp(dt_a)
    state = jnp.zeros((bsz, *A.shape), jnp.complex64) if h0 is None else h0.astype(jnp.complex64)
    keep = jnp.ones((bsz, t), bool) if resets is None else ~jnp.asarray(resets, bool)

    def step(state, inp):
        x_t, keep_t = inp
        state = jnp.where(keep_t[:, None, None], a_bar[None] * state, 0.0) + b_bar[None] * x_t[:, :, None]
        y_t = 2.0 * jnp.real(jnp.einsum("hn,bhn->bh", C.astype(jnp.complex64), state))
        return state, y_t + D.astype(jnp.float32)[None] * x_t

    state, ys = lax.scan(step, state, (jnp.moveaxis(x.astype(jnp.float32), 1, 0), keep.T))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state


@functools.partial(jax.jit, static_argnames=("impl",))
def _s4d_scan(x, log_dt, A, B, C, D, h0, resets, impl):
    dt_a, b_bar = _zoh(log_dt, A, B)
    bu = b_bar[None, None] * x.astype(jnp.float32)[..., None]  # [b, t, H, N]
    hs, h_last = linear_scan(dt_a[None, None], bu, h0=h0, resets=resets, log_decay=True, impl=impl)
    y = 2.0 * jnp.real(jnp.einsum("hn,bthn->bth", C.astype(jnp.complex64), hs))
    return (y + D.astype(jnp.float32)[None, None] * x.astype(jnp.float32)).astype(x.dtype), h_last


def _vandermonde(dt_a, powers):
    return jnp.exp(dt_a[..., None] * powers.astype(jnp.float32)[None, None])  # [H, N, len(powers)]


def s4d_kernel(log_dt, A, B, C, length):
    r"""The convolution kernel ``K [H, length]``, ``K_{c,l} = 2 Re Σ_n C_n \bar B_n \bar A_n^l``."""
    dt_a, b_bar = _zoh(log_dt, A, B)
    vand = _vandermonde(dt_a, jnp.arange(length))
    return 2.0 * jnp.real(jnp.einsum("hn,hnl->hl", C.astype(jnp.complex64) * b_bar, vand))


@jax.jit
def _s4d_conv(x, log_dt, A, B, C, D, h0, resets):
    t = x.shape[1]
    dt_a, b_bar = _zoh(log_dt, A, B)
    c = C.astype(jnp.complex64)
    vand = _vandermonde(dt_a, jnp.arange(t))  # Ā^l
    kernel = 2.0 * jnp.real(jnp.einsum("hn,hnl->hl", c * b_bar, vand))
    x32 = x.astype(jnp.float32)
    y = _ssm.causal_conv(x32, kernel, resets) + D.astype(jnp.float32)[None, None] * x32
    xs = x32 if resets is None else jnp.where(_ssm.document_masks(resets, t)[1][..., None], x32, 0.0)
    h_last = jnp.einsum("hnl,blh->bhn", jnp.flip(vand, -1) * b_bar[..., None], xs.astype(jnp.complex64))
    if h0 is not None:
        h0 = h0.astype(jnp.complex64)
        powers = _vandermonde(dt_a, jnp.arange(1, t + 1))  # Ā^{t'+1}
        g = 2.0 * jnp.real(jnp.einsum("hn,bhn,hnt->bth", c, h0, powers))
        h0_last = powers[None, ..., -1] * h0
        if resets is not None:
            first = _ssm.document_masks(resets, t)[0]
            g = jnp.where(first[..., None], g, 0.0)
            h0_last = jnp.where(first[:, -1, None, None], h0_last, 0.0)
        y = y + g
        h_last = h_last + h0_last
    return y.astype(x.dtype), h_last


def s4d(
    x: Float[AnyArray, "b t d"],
    log_dt: Float[AnyArray, " d"],
    A: Complex[AnyArray, "d n"],
    B: Complex[AnyArray, "d n"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Inexact[AnyArray, "b d n"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Complex[Array, "b d n"]]:
    """S4D, functional: ``(y [b, t, H], h_last [b, H, N] complex64)``.

    ``impl``: a scan-engine impl (``"sequential" | "associative" | "chunked"``), ``"conv"`` (Vandermonde
    kernel + FFT), or ``"auto"`` (the convolution from ``t >= 256`` without resets, else the engine's
    choice).
    """
    _checks.check_choice("impl", impl, S4D_IMPLS)
    _check_s4d_inputs(x, log_dt, A, B, C, D, h0, resets, negative_eigen)
    resets = _ssm.resets_or_none(resets)
    if impl == "auto" and resets is None and x.shape[1] >= 256:
        impl = "conv"
    if impl == "conv":
        return _s4d_conv(x, log_dt, A, B, C, D, h0, resets)
    return _s4d_scan(x, log_dt, A, B, C, D, h0, resets, impl)


def s4d_step(
    h: Inexact[AnyArray, "b d n"] | None,
    x: Float[AnyArray, "b d"],
    log_dt: Float[AnyArray, " d"],
    A: Complex[AnyArray, "d n"],
    B: Complex[AnyArray, "d n"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b d"], Complex[Array, "b d n"]]:
    """One token: ``x`` ``[b, H]``, ``h`` ``[b, H, N]`` (``None``: zeros) -> ``(y [b, H], h)``."""
    _check_s4d_inputs(x, log_dt, A, B, C, D, h, None, negative_eigen, step=True)
    y, h = _s4d_recurrent(x[:, None], log_dt, A, B, C, D, h, None)
    return y[:, 0], h


def s4d_materialize(
    x: Float[AnyArray, "b t d"],
    log_dt: Float[AnyArray, " d"],
    A: Complex[AnyArray, "d n"],
    B: Complex[AnyArray, "d n"],
    C: Complex[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> Float[Array, "b d t t"]:
    """``[b, H, T, T]``: the Toeplitz operator of the kernel, ``+ D`` on the diagonal."""
    _check_s4d_inputs(x, log_dt, A, B, C, D, None, None, negative_eigen)
    t = x.shape[1]
    kernel = s4d_kernel(log_dt, A, B, C, t)
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    m = jnp.where(lag >= 0, kernel[:, jnp.clip(lag, 0, t - 1)], 0.0)
    m = m + D.astype(jnp.float32)[:, None, None] * jnp.eye(t, dtype=jnp.float32)[None]
    return jnp.broadcast_to(m[None], (x.shape[0], *m.shape))


def s4d_init(channels: int, modes: int, kind: str = "inv"):
    """S4D-Lin (``kind="lin"``) or S4D-Inv (``"inv"``) ``A`` ``[channels, modes]`` complex64."""
    _checks.check_choice("kind", kind, ("lin", "inv"))
    n = np.arange(modes)
    imag = np.pi * n if kind == "lin" else modes / np.pi * (modes / (2 * n + 1) - 1)
    a = -0.5 + 1j * imag
    return jnp.asarray(np.broadcast_to(a, (channels, modes)), jnp.complex64)


def s4d_make_inputs(key, batch, time, channels=3, modes=4):
    kx, kd, kb, kc, kdd = jax.random.split(key, 5)
    return dict(
        x=jax.random.normal(kx, (batch, time, channels)),
        log_dt=jax.random.uniform(kd, (channels,), minval=np.log(1e-2), maxval=np.log(1.0)),
        A=s4d_init(channels, modes, "lin"),
        B=_ssm.complex_normal(kb, (channels, modes)),
        C=_ssm.complex_normal(kc, (channels, modes), 1 / np.sqrt(modes)),
        D=jax.random.normal(kdd, (channels,)),
    )


class S4D(nnx.Module):
    """S4D layer: ``d_model`` SISO channels (S4D-Inv/Lin init, learnable ``log(-Re A)``, ``Im A``,
    ``B``, ``C``, ``Δ``), then GELU and an output projection. Complex parameters are stored as real
    pairs."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_size: int = 16, init: str = "inv",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, impl: str = "auto", dtype=jnp.float32):
        _checks.check_choice("impl", impl, S4D_IMPLS)
        self.impl, self.dtype, self.d_model, self.state_size = impl, dtype, d_model, state_size
        a = s4d_init(d_model, state_size, init)
        ax = ("mlp", "state")
        self.log_a_real = nnx.Param(jnp.log(-jnp.real(a)), out_sharding=ax)
        self.a_imag = nnx.Param(jnp.imag(a), out_sharding=ax)
        self.b_re, self.b_im = _ssm.complex_params(jnp.ones((d_model, state_size)), jnp.zeros((d_model, state_size)), ax)
        c = _ssm.complex_normal(rngs.params(), (d_model, state_size))
        self.c_re, self.c_im = _ssm.complex_params(jnp.real(c), jnp.imag(c), ax)
        log_dt = jax.random.uniform(rngs.params(), (d_model,), minval=np.log(dt_min), maxval=np.log(dt_max))
        self.log_dt = nnx.Param(log_dt, out_sharding=("mlp",))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,)), out_sharding=("mlp",))
        self.out_proj = Linear(d_model, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def ssm_params(self):
        a = -jnp.exp(self.log_a_real[...]) + 1j * self.a_imag[...]
        b = self.b_re[...] + 1j * self.b_im[...]
        c = self.c_re[...] + 1j * self.c_im[...]
        return dict(log_dt=self.log_dt[...], A=a, B=b, C=c, D=self.D[...])

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, h = s4d(x.astype(self.dtype), **self.ssm_params(), h0=p.h0, impl=self.impl, resets=p.resets)
        return self.out_proj(jax.nn.gelu(y)).astype(x.dtype), update(cache, state=h)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> StateCache:
        del max_len
        return StateCache(jnp.zeros((batch_size, self.d_model, self.state_size), jnp.complex64))

register(MixerSpec(
    name="s4d", fn=s4d, recurrent=s4d_recurrent, step=s4d_step, make_inputs=s4d_make_inputs, layer=S4D,
    materialize=s4d_materialize, value_arg="x", params=("log_dt", "A", "B", "C", "D"),
    impls=("sequential", "associative", "chunked", "conv"), paper="https://arxiv.org/abs/2206.11893",
    doc="S4D (Gu et al. 2022): diagonal complex SSM, ZOH; scan engine or Vandermonde kernel + FFT",
))
