r"""Convolutional state space models: ConvS5 (Smith, De Mello, Kautz, Linderman, Byeon; NeurIPS 2023,
"Convolutional State Space Models for Long-Range Spatiotemporal Modeling"), and frame predictors built on it and
on its baseline, ConvLSTM (:mod:`seqjax.rnn.conv`).

**ConvS5.** A linear recurrence whose state is a tensor ``x_t`` ``[H, W, P]`` per example, driven by frames
``u_t`` ``[H, W, U]``, with convolutions ``*`` for the input and output maps and a *pointwise* (1×1) complex
diagonal transition ``Λ ∈ ℂ^P``, shared by every pixel:

.. math::
   x_t = \bar Λ \odot x_{t-1} + \bar B * u_t, \qquad y_t = 2\,\mathrm{Re}(\tilde C * x_t) + D * u_t,

discretised like S5 by a zero-order hold with a learnable step per state channel:
``\bar Λ = e^{ΛΔ}``, ``\bar B = ((\bar Λ - 1)/Λ) \tilde B`` (applied to the output channels of the ``k_B×k_B``
kernel, so ``\bar B`` is still a ``k_B×k_B`` kernel). Only one mode of each conjugate pair is kept (hence
``2 Re``). Because ``Λ`` is pointwise, ``\bar B * u_t`` can be computed for all frames at once and the time
recurrence is elementwise over ``(H, W, P)``: :func:`convs5` runs it with :func:`seqjax.scan.linear_scan`
(``impl="associative"`` is the paper's parallel scan); :func:`convs5_recurrent` is the ``lax.scan`` reference with
complex convolutions, written as the equation above; :func:`convs5_step` is one frame (RNN mode, for generation).

Initialisation (:func:`convs5_init`, as the official code): ``Λ`` the first ``P`` eigenvalues of HiPPO-N of size
``2P`` (:func:`seqjax.mixers._ssm.hippo_legs_normal`), ``\tilde B = V^{-1} B`` and ``\tilde C = C V`` for
He-normal real kernels ``B``, ``C`` rotated into its eigenbasis ``V``, ``log Δ ~ U[log dt_min, log dt_max]``,
``Re Λ`` clipped to ``≤ -10^{-4}`` in the module.

Shapes (channels last, time on axis 1): ``u`` ``[b, t, H, W, U]``; ``y`` ``[b, t, H, W, U_out]``;
``Lambda``, ``log_dt`` ``[P]``; ``B`` ``[k_B, k_B, U, P]`` complex64; ``C`` ``[k_C, k_C, P, U_out]`` complex64;
``D`` ``[k_D, k_D, U, U_out]`` float32 (kernels HWIO); the state ``[b, H, W, P]`` complex64.

**Frame prediction** (:class:`FramePredictor`): encoder convs (optionally downsampling) → layers of
``u ← LayerNorm(u + GELU(seq(u)))`` with ``seq`` a :class:`ConvS5` or a :class:`seqjax.rnn.conv.ConvLSTM` →
decoder (nearest upsample, convs, sigmoid). ``model(frames)`` predicts frame ``t+1`` from frames ``≤ t``
(teacher forcing; parallel over time for ConvS5); ``model.generate(context, n)`` conditions on ``k`` frames and
then predicts ``n`` frames, feeding its own predictions back, one frame per step with the state carried.
:func:`ssim` (Wang et al. 2004; 11×11 Gaussian window, σ = 1.5) scores predicted frames.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.mixers import _ssm
from seqjax.rnn.conv import ConvLSTM, check_frames, conv2d
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Complex, Float, Inexact

__all__ = ["convs5", "convs5_recurrent", "convs5_step", "convs5_init", "ConvS5", "FramePredictor", "BACKBONES",
           "ssim", "IMPLS"]

IMPLS = ("auto", "sequential", "associative", "chunked")
BACKBONES = ("convs5", "convlstm")


# ----------------------------------------------------------------------------- functional ConvS5


def _check_convs5(u, Lambda, log_dt, B, C, D, h0, step=False):
    _checks.check_ndim("Lambda", Lambda, 1, "[P]")
    _checks.check_dtype("Lambda", Lambda, "complex")
    p = np.shape(Lambda)[0]
    _checks.check_shape("log_dt", log_dt, (p,), "[P]")
    _checks.check_ndim("B", B, 4, "[k_B, k_B, U, P]")
    _checks.check_dtype("B", B, "complex")
    kb, _, c_in, _ = np.shape(B)
    _checks.check_shape("B", B, (kb, kb, c_in, p), "[k_B, k_B, U, P]")
    _checks.check_ndim("C", C, 4, "[k_C, k_C, P, U_out]")
    _checks.check_dtype("C", C, "complex")
    kc, _, _, c_out = np.shape(C)
    _checks.check_shape("C", C, (kc, kc, p, c_out), "[k_C, k_C, P, U_out]")
    _checks.check_ndim("D", D, 4, "[k_D, k_D, U, U_out]")
    kd = np.shape(D)[0]
    _checks.check_shape("D", D, (kd, kd, c_in, c_out), "[k_D, k_D, U, U_out]")
    _checks.check_dtype("D", D, "float")
    for name, k in (("B", kb), ("C", kc), ("D", kd)):
        if k % 2 == 0:
            raise ValueError(f"{name} must have an odd kernel size (SAME padding), got {k}")
    check_frames("u", u, c_in, step=step)
    if h0 is not None:
        b, hh, ww = (np.shape(u)[0], *np.shape(u)[(1 if step else 2):(3 if step else 4)])
        _checks.check_shape("h0", h0, (b, hh, ww, p), "[batch, height, width, P]")
        _checks.check_dtype("h0", h0, "inexact")


def _zoh(Lambda, log_dt, B):
    """``(ΔΛ [P], B̄ [k, k, U, P])`` of the zero-order hold."""
    lam = Lambda.astype(jnp.complex64)
    dt_l = jnp.exp(log_dt.astype(jnp.float32)) * lam
    return dt_l, ((jnp.exp(dt_l) - 1.0) / lam).reshape(1, 1, 1, -1) * B.astype(jnp.complex64)


def _skip(D, u):
    return conv2d(u.astype(jnp.float32), D.astype(jnp.float32))


def convs5_recurrent(
    u: Float[AnyArray, "b t hh ww c"],
    Lambda: Complex[AnyArray, " p"],
    log_dt: Float[AnyArray, " p"],
    B: Complex[AnyArray, "kb kb c p"],
    C: Complex[AnyArray, "kc kc p o"],
    D: Float[AnyArray, "kd kd c o"],
    *,
    h0: Inexact[AnyArray, "b hh ww p"] | None = None,
) -> tuple[Float[Array, "b t hh ww o"], Complex[Array, "b hh ww p"]]:
    """The reference: ``lax.scan`` of ``x_t = Λ̄ ⊙ x_{t-1} + B̄ * u_t``, ``y_t = 2 Re(C̃ * x_t) + D * u_t``,
    with complex convolutions. ``(y [b, t, H, W, U_out], x_last [b, H, W, P] complex64)``."""
    _check_convs5(u, Lambda, log_dt, B, C, D, h0)
    return _recurrent(u, Lambda, log_dt, B, C, D, h0)


@jax.jit
def _recurrent(u, Lambda, log_dt, B, C, D, h0):
    bsz, _, hh, ww, _ = u.shape
    dt_l, b_bar = _zoh(Lambda, log_dt, B)
    lam_bar = jnp.exp(dt_l).reshape(1, 1, 1, -1)
    c = C.astype(jnp.complex64)
    x = jnp.zeros((bsz, hh, ww, Lambda.shape[0]), jnp.complex64) if h0 is None else h0.astype(jnp.complex64)

    def step(x, u_t):
        x = lam_bar * x + conv2d(u_t.astype(jnp.complex64), b_bar)
        return x, 2.0 * jnp.real(conv2d(x, c)) + _skip(D, u_t)

    x, ys = lax.scan(step, x, jnp.moveaxis(u.astype(jnp.float32), 1, 0))
    return jnp.moveaxis(ys, 0, 1).astype(u.dtype), x


def _input_map(u32, b_bar):
    """``B̄ * u`` as one real convolution (real and imaginary kernels side by side), made complex."""
    p = b_bar.shape[-1]
    bu = conv2d(u32, jnp.concatenate([jnp.real(b_bar), jnp.imag(b_bar)], axis=-1))
    return lax.complex(bu[..., :p], bu[..., p:])


def _output_map(x, C, D, u32):
    """``2 Re(C̃ * x) + D * u`` with ``2 Re(C̃ * x) = 2 Re C̃ * Re x - 2 Im C̃ * Im x``: one real convolution over
    ``[Re x, Im x]``."""
    c = C.astype(jnp.complex64)
    c2 = jnp.concatenate([2.0 * jnp.real(c), -2.0 * jnp.imag(c)], axis=2)
    return conv2d(jnp.concatenate([jnp.real(x), jnp.imag(x)], axis=-1), c2) + _skip(D, u32)


@functools.partial(jax.jit, static_argnames=("impl",))
def _parallel(u, Lambda, log_dt, B, C, D, h0, impl):
    dt_l, b_bar = _zoh(Lambda, log_dt, B)
    u32 = u.astype(jnp.float32)
    xs, x_last = linear_scan(dt_l.reshape(1, 1, 1, 1, -1), _input_map(u32, b_bar), h0=h0, log_decay=True, impl=impl)
    return _output_map(xs, C, D, u32).astype(u.dtype), x_last


def convs5(
    u: Float[AnyArray, "b t hh ww c"],
    Lambda: Complex[AnyArray, " p"],
    log_dt: Float[AnyArray, " p"],
    B: Complex[AnyArray, "kb kb c p"],
    C: Complex[AnyArray, "kc kc p o"],
    D: Float[AnyArray, "kd kd c o"],
    *,
    h0: Inexact[AnyArray, "b hh ww p"] | None = None,
    impl: str = "auto",
) -> tuple[Float[Array, "b t hh ww o"], Complex[Array, "b hh ww p"]]:
    """ConvS5 over all frames at once: ``B̄ * u_t`` for every ``t`` in one convolution, the elementwise time
    recurrence by :func:`seqjax.scan.linear_scan` (``impl``: ``"associative"`` is the paper's parallel scan;
    ``"auto"`` the engine's choice for the platform), ``C̃ * x_t`` in one convolution.
    ``(y [b, t, H, W, U_out], x_last [b, H, W, P] complex64)``; ``h0`` ``[b, H, W, P]`` (zeros if ``None``)."""
    _checks.check_choice("impl", impl, IMPLS)
    _check_convs5(u, Lambda, log_dt, B, C, D, h0)
    return _parallel(u, Lambda, log_dt, B, C, D, h0, impl)


def convs5_step(
    h: Inexact[AnyArray, "b hh ww p"] | None,
    u: Float[AnyArray, "b hh ww c"],
    Lambda: Complex[AnyArray, " p"],
    log_dt: Float[AnyArray, " p"],
    B: Complex[AnyArray, "kb kb c p"],
    C: Complex[AnyArray, "kc kc p o"],
    D: Float[AnyArray, "kd kd c o"],
) -> tuple[Float[Array, "b hh ww o"], Complex[Array, "b hh ww p"]]:
    """One frame ``u`` ``[b, H, W, U]`` from the state ``h`` (``None``: zeros) -> ``(y [b, H, W, U_out], h)``."""
    _check_convs5(u, Lambda, log_dt, B, C, D, h, step=True)
    return _step(h, u, Lambda, log_dt, B, C, D)


@jax.jit
def _step(h, u, Lambda, log_dt, B, C, D):
    dt_l, b_bar = _zoh(Lambda, log_dt, B)
    u32 = u.astype(jnp.float32)
    x = _input_map(u32, b_bar)
    if h is not None:
        x = x + jnp.exp(dt_l).reshape(1, 1, 1, -1) * h.astype(jnp.complex64)
    return _output_map(x, C, D, u32).astype(u.dtype), x


def convs5_init(key, c_in: int, ssm_size: int, c_out: int | None = None, *, k_B: int = 3, k_C: int = 3, k_D: int = 1,
                dt_min: float = 1e-3, dt_max: float = 1e-1) -> dict:
    """``{Lambda, log_dt, B, C, D}`` (see the module docstring): HiPPO-N eigenvalues, He-normal kernels rotated
    into the eigenbasis, ``log Δ`` uniform in ``[log dt_min, log dt_max]``, ``D`` He-normal."""
    c_out = c_in if c_out is None else c_out
    for name, k in (("k_B", k_B), ("k_C", k_C), ("k_D", k_D)):
        if k < 1 or k % 2 == 0:
            raise ValueError(f"{name} must be a positive odd int (SAME padding), got {k}")
    if ssm_size < 1:
        raise ValueError(f"ssm_size must be >= 1, got {ssm_size}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    lam, v, _ = _ssm.hippo_legs_normal(2 * ssm_size)
    v = jnp.asarray(v[:, :ssm_size], jnp.complex64)  # one of each conjugate pair
    p = _init_random(key, v, c_in, c_out, k_B, k_C, k_D, float(np.log(dt_min)), float(np.log(dt_max)))
    return dict(Lambda=jnp.asarray(lam[:ssm_size], jnp.complex64), **p)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _init_random(key, v, c_in, c_out, k_B, k_C, k_D, log_min, log_max):
    n, p = v.shape
    kb, kc, kd, kt = jax.random.split(key, 4)
    he = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
    b = he(kb, (k_B, k_B, c_in, n), k_B * k_B * c_in).astype(jnp.complex64)
    c = he(kc, (k_C, k_C, n, c_out), k_C * k_C * n).astype(jnp.complex64)
    return dict(log_dt=jax.random.uniform(kt, (p,), jnp.float32, log_min, log_max),
                B=jnp.einsum("pn,hwun->hwup", jnp.conj(v).T, b), C=jnp.einsum("hwnu,np->hwpu", c, v),
                D=he(kd, (k_D, k_D, c_in, c_out), k_D * k_D * c_in))


class ConvS5(nnx.Module):
    """A ConvS5 layer ``U → U_out`` with ``P = ssm_size`` complex state channels; ``y, h = layer(u, h0=None)``
    (parallel over time), ``y_t, h = layer.step(h, u_t)`` (one frame). Complex parameters are stored as real
    pairs; ``Re Λ`` is clipped to ``≤ -1e-4`` when used."""

    def __init__(self, c_in: int, ssm_size: int, c_out: int | None = None, *, k_B: int = 3, k_C: int = 3, k_D: int = 1,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, impl: str = "auto", rngs: nnx.Rngs):
        _checks.check_choice("impl", impl, IMPLS)
        p = convs5_init(rngs.params(), c_in, ssm_size, c_out, k_B=k_B, k_C=k_C, k_D=k_D, dt_min=dt_min, dt_max=dt_max)
        self.impl, self.ssm_size = impl, ssm_size
        self.lambda_re = nnx.Param(jnp.real(p["Lambda"]), out_sharding=("state",))
        self.lambda_im = nnx.Param(jnp.imag(p["Lambda"]), out_sharding=("state",))
        self.log_dt = nnx.Param(p["log_dt"], out_sharding=("state",))
        self.b_re = nnx.Param(jnp.real(p["B"]), out_sharding=(None, None, "embed", "state"))
        self.b_im = nnx.Param(jnp.imag(p["B"]), out_sharding=(None, None, "embed", "state"))
        self.c_re = nnx.Param(jnp.real(p["C"]), out_sharding=(None, None, "state", "embed"))
        self.c_im = nnx.Param(jnp.imag(p["C"]), out_sharding=(None, None, "state", "embed"))
        self.D = nnx.Param(p["D"], out_sharding=(None, None, "embed", "embed"))

    def ssm_params(self) -> dict:
        lam = lax.complex(jnp.minimum(self.lambda_re[...], -1e-4), self.lambda_im[...])
        return dict(Lambda=lam, log_dt=self.log_dt[...], B=lax.complex(self.b_re[...], self.b_im[...]),
                    C=lax.complex(self.c_re[...], self.c_im[...]), D=self.D[...])

    def init_state(self, batch: int, height: int, width: int):
        return jnp.zeros((batch, height, width, self.ssm_size), jnp.complex64)

    def __call__(self, u, h0=None):
        return convs5(u, **self.ssm_params(), h0=h0, impl=self.impl)

    def step(self, h, u):
        return convs5_step(h, u, **self.ssm_params())


# ----------------------------------------------------------------------------- frame prediction


class _Block(nnx.Module):
    """``u ← LayerNorm(u + GELU(seq(u)))`` (post-norm, as ConvS5's layers)."""

    def __init__(self, backbone: str, d: int, ssm_size: int, kernel: int, impl: str, rngs: nnx.Rngs):
        self.seq = (ConvS5(d, ssm_size, d, k_B=kernel, k_C=kernel, impl=impl, rngs=rngs) if backbone == "convs5"
                    else ConvLSTM(d, d, kernel=kernel, rngs=rngs))
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, u, state=None):
        y, state = self.seq(u, state)
        return self.norm(u + jax.nn.gelu(y)), state

    def step(self, state, u):
        y, state = self.seq.step(state, u)
        return self.norm(u + jax.nn.gelu(y)), state


class FramePredictor(nnx.Module):
    """Next-frame predictor over ``frames`` ``[b, t, H, W, channels]`` in ``[0, 1]``.

    Args:
      backbone: ``"convs5"`` or ``"convlstm"``.
      channels: frame channels; d_model: latent channels; ssm_size: ConvS5's ``P`` (unused by ConvLSTM, whose
        hidden size is ``d_model``); num_layers: sequence layers; kernel: their ``k×k`` kernels;
      downsample: the encoder's stride (1 or 2; the decoder resizes back to the frame size, odd sizes included);
      impl: ConvS5's scan impl (``"auto" | "sequential" | "associative" | "chunked"``).
    """

    def __init__(self, backbone: str = "convs5", *, channels: int = 1, d_model: int = 32, ssm_size: int = 32,
                 num_layers: int = 2, kernel: int = 3, downsample: int = 2, impl: str = "auto", rngs: nnx.Rngs):
        _checks.check_choice("backbone", backbone, BACKBONES)
        _checks.check_choice("downsample", downsample, (1, 2))
        self.backbone, self.channels, self.downsample = backbone, channels, downsample
        conv = lambda i, o, s=1: nnx.Conv(i, o, (3, 3), strides=(s, s), padding="SAME", rngs=rngs)
        self.enc1, self.enc2 = conv(channels, d_model), conv(d_model, d_model, downsample)
        self.blocks = nnx.List([_Block(backbone, d_model, ssm_size, kernel, impl, rngs) for _ in range(num_layers)])
        self.dec1, self.dec2 = conv(d_model, d_model), conv(d_model, channels)

    def _check(self, frames, step=False):
        check_frames("frames" if not step else "frame", frames, self.channels, step=step)

    def _encode(self, f):
        return jax.nn.gelu(self.enc2(jax.nn.gelu(self.enc1(f.astype(jnp.float32)))))

    def _decode(self, z, hw):
        if self.downsample > 1:
            z = jax.image.resize(z, z.shape[:-3] + tuple(hw) + z.shape[-1:], "nearest")
        return jax.nn.sigmoid(self.dec2(jax.nn.gelu(self.dec1(z))))

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        s = self.downsample
        return -(-height // s), -(-width // s)

    def init_states(self, batch: int, height: int, width: int) -> list:
        hh, ww = self.latent_size(height, width)
        return [blk.seq.init_state(batch, hh, ww) for blk in self.blocks]

    def __call__(self, frames, states=None):
        """``(pred [b, t, H, W, C], states)``: ``pred[:, i]`` predicts frame ``i + 1`` from frames ``≤ i``."""
        self._check(frames)
        states = self.init_states(frames.shape[0], *frames.shape[2:4]) if states is None else states
        z, out = self._encode(frames), []
        for blk, s in zip(self.blocks, states):
            z, s = blk(z, s)
            out.append(s)
        return self._decode(z, frames.shape[2:4]), out

    def step(self, states, frame):
        """One frame ``[b, H, W, C]`` -> ``(prediction of the next frame, states)``."""
        self._check(frame, step=True)
        z, out = self._encode(frame), []
        for blk, s in zip(self.blocks, states):
            z, s = blk.step(s, z)
            out.append(s)
        return self._decode(z, frame.shape[1:3]), out

    def generate(self, context, n: int):
        """Condition on ``context`` ``[b, k, H, W, C]`` (parallel form), then predict ``n`` frames
        autoregressively (each prediction is the next input): ``[b, n, H, W, C]``."""
        self._check(context)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        pred, states = self(context)
        first = pred[:, -1]
        graphdef, params = nnx.split(self)

        def body(carry, _):
            states, frame = carry
            nxt, states = nnx.merge(graphdef, params).step(states, frame)
            return (states, nxt), nxt

        _, rest = lax.scan(body, (states, first), None, length=n - 1)
        return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)


# ----------------------------------------------------------------------------- metrics


def _gaussian_window(size: int, sigma: float):
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    return g / g.sum()


def ssim(x: Float[AnyArray, "*n hh ww c"], y: Float[AnyArray, "*n hh ww c"], *, data_range: float = 1.0,
         window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Float[Array, "*n"]:
    r"""Structural similarity (Wang, Bovik, Sheikh, Simoncelli 2004) of images ``[..., H, W, C]``, per image:

    .. math:: \mathrm{SSIM} = \frac{(2 μ_x μ_y + c_1)(2 σ_{xy} + c_2)}{(μ_x^2 + μ_y^2 + c_1)(σ_x^2 + σ_y^2 + c_2)},
              \quad c_i = (k_i L)^2,

    local statistics under a ``window × window`` Gaussian (σ = ``sigma``), valid positions only, averaged over
    positions and channels (the definition of ``tf.image.ssim``). ``window`` shrinks to the image size."""
    _checks.check_same_shape("x", x, "y", y)
    _checks.check_ndim("x", x, tuple(range(3, 8)), "[..., height, width, channels]")
    return _ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), float(data_range), int(window),
                 float(sigma), float(k1), float(k2))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _ssim(x, y, data_range, window, sigma, k1, k2):
    hh, ww, c = x.shape[-3:]
    g = jnp.asarray(_gaussian_window(min(window, hh, ww), sigma), jnp.float32)
    kern = jnp.tile(jnp.outer(g, g)[:, :, None, None], (1, 1, 1, c))  # depthwise [k, k, 1, C]

    def blur(a):
        lead = a.shape[:-3]
        out = lax.conv_general_dilated(a.reshape((-1,) + a.shape[-3:]), kern, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        return out.reshape(lead + out.shape[1:])

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    # second moments of the inputs less their image means (shift-invariant; less float32 cancellation)
    xc, yc = x - jnp.mean(x, axis=(-3, -2, -1), keepdims=True), y - jnp.mean(y, axis=(-3, -2, -1), keepdims=True)
    mxc, myc = blur(xc), blur(yc)
    vx, vy, cxy = blur(xc * xc) - mxc * mxc, blur(yc * yc) - myc * myc, blur(xc * yc) - mxc * myc
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(-3, -2, -1))
