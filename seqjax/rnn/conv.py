r"""Convolutional LSTM (Shi, Chen, Wang, Yeung, Wong, Woo; NeurIPS 2015, "Convolutional LSTM Network: A Machine
Learning Approach for Precipitation Nowcasting"): an LSTM whose input, states and gates are feature maps and whose
input-to-state and state-to-state maps are ``k×k`` convolutions (``*``):

.. math::
   [i, f, g, o]_t = W_x * x_t + W_h * h_{t-1} + b, \qquad
   c_t = σ(f_t) \odot c_{t-1} + σ(i_t) \odot \tanh(g_t), \qquad h_t = σ(o_t) \odot \tanh(c_t).

The paper's Hadamard peepholes (``W_{ci} \odot c``) are left out, as in the ConvLSTM baselines of later work
(ConvSSM's among them). As in :func:`seqjax.rnn.rnn`, the input convolution runs once for all frames (one
batched conv), then ``lax.scan`` runs the recurrent convolution frame by frame.

Shapes (channels last): ``x`` ``[batch, time, height, width, C]``; ``y`` ``[batch, time, height, width, F]``;
the state ``[batch, 2, height, width, F]`` float32 holds ``(h, c)`` (the ``[batch, S, ...]`` layout of
:mod:`seqjax.rnn`). Parameters: ``Wx`` ``[k, k, C, 4F]``, ``Wh`` ``[k, k, F, 4F]`` (HWIO), ``b`` ``[4F]``, gates
in the order ``i, f, g, o``.

:func:`conv2d` is the ``SAME``-padded, stride-1, channels-last 2-D convolution that the convolutional recurrences
(this one and ConvS5 in :mod:`seqjax.models.convssm`) share; it takes real or complex inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.types import AnyArray, Array, Float

__all__ = ["conv2d", "conv_lstm", "conv_lstm_step", "conv_lstm_init", "check_frames", "ConvLSTM"]

FRAMES = "[batch, time, height, width, channels]"


def conv2d(x: AnyArray, w: AnyArray) -> Array:
    """``SAME`` 2-D convolution of ``x`` ``[..., H, W, C_in]`` with the kernel ``w`` ``[k, k, C_in, C_out]``
    (HWIO): ``[..., H, W, C_out]`` (any leading axes, folded into the batch)."""
    lead = x.shape[:-3]
    y = lax.conv_general_dilated(x.reshape((-1,) + x.shape[-3:]), w, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(lead + y.shape[1:])


def check_frames(name: str, x, channels: int, *, step: bool = False) -> None:
    """``x`` ``[batch, time, height, width, channels]`` (``[batch, height, width, channels]`` for one frame),
    float, with ``channels`` channels."""
    legend = "[batch, height, width, channels]" if step else FRAMES
    _checks.check_ndim(name, x, 4 if step else 5, legend)
    _checks.check_dtype(name, x, "float")
    if np.shape(x)[-1] != channels:
        raise ValueError(f"{name} must have {channels} channels (last axis of {legend}), got shape {list(np.shape(x))}")


def conv_lstm_init(key, c_in: int, hidden: int, kernel: int = 3, *, forget_bias: float = 1.0) -> dict:
    """``{"Wx" [k, k, C, 4F], "Wh" [k, k, F, 4F], "b" [4F]}`` float32: He-normal-like scaling by the fan-in
    ``k² · channels``, the forget-gate bias at ``forget_bias``."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int (SAME padding), got {kernel}")
    return _init(key, c_in, hidden, kernel, float(forget_bias))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init(key, c_in, hidden, kernel, forget_bias):
    kx, kh = jax.random.split(key)
    wx = jax.random.normal(kx, (kernel, kernel, c_in, 4 * hidden), jnp.float32) / np.sqrt(kernel * kernel * c_in)
    wh = jax.random.normal(kh, (kernel, kernel, hidden, 4 * hidden), jnp.float32) / np.sqrt(kernel * kernel * hidden)
    b = jnp.zeros((4, hidden), jnp.float32).at[1].set(forget_bias).reshape(-1)
    return {"Wx": wx, "Wh": wh, "b": b}


def _check_params(params: dict, c_in: int):
    for name in ("Wx", "Wh", "b"):
        if name not in params:
            raise ValueError(f"params must contain {name!r}, got {sorted(params)}")
    _checks.check_ndim("params['Wx']", params["Wx"], 4, "[k, k, in channels, 4 * hidden]")
    k, _, _, g = np.shape(params["Wx"])
    if g % 4:
        raise ValueError(f"params['Wx'] must have 4 * hidden output channels, got {g}")
    f = g // 4
    _checks.check_shape("params['Wx']", params["Wx"], (k, k, c_in, g), "[k, k, in channels, 4 * hidden]")
    _checks.check_shape("params['Wh']", params["Wh"], (None, None, f, g), "[k, k, hidden, 4 * hidden]")
    _checks.check_shape("params['b']", params["b"], (g,), "[4 * hidden]")
    return f


def _cell(params, state, xp_t):
    """One frame from the input-conv preactivations ``xp_t`` ``[b, H, W, 4F]``; ``state`` ``[b, 2, H, W, F]``."""
    h, c = state[:, 0], state[:, 1]
    z = xp_t + conv2d(h, params["Wh"])
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return jnp.stack([h, c], axis=1)


@jax.jit
def _conv_lstm(params, x, h0):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    xp = conv2d(x.astype(jnp.float32), params["Wx"]) + params["b"].reshape(1, 1, 1, 1, -1)  # [b, t, H, W, 4F], one conv for all frames

    def step(state, xp_t):
        state = _cell(params, state, xp_t)
        return state, state[:, 0]

    state, ys = lax.scan(step, h0, jnp.moveaxis(xp, 1, 0))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state


def _state0(x, h0, f, step):
    b, (hh, ww) = np.shape(x)[0], np.shape(x)[(1 if step else 2):(3 if step else 4)]
    if h0 is None:
        return jnp.zeros((b, 2, hh, ww, f), jnp.float32)
    _checks.check_shape("h0", h0, (b, 2, hh, ww, f), "[batch, 2 (h, c), height, width, hidden]")
    _checks.check_dtype("h0", h0, "float")
    return jnp.asarray(h0, jnp.float32)


def conv_lstm(
    params: dict,
    x: Float[AnyArray, "b t hh ww c"],
    *,
    h0: Float[AnyArray, "b 2 hh ww f"] | None = None,
) -> tuple[Float[Array, "b t hh ww f"], Float[Array, "b 2 hh ww f"]]:
    """ConvLSTM over ``x`` ``[b, t, H, W, C]``: ``(y [b, t, H, W, F], state [b, 2, H, W, F])``, ``y`` the ``h``
    maps in ``x``'s dtype, the state ``(h, c)`` after the last frame (``h0``: zeros if ``None``)."""
    c_in = np.shape(x)[-1] if np.ndim(x) else 0
    f = _check_params(params, c_in)
    check_frames("x", x, c_in)
    return _conv_lstm(params, x, _state0(x, h0, f, step=False))


def conv_lstm_step(
    params: dict,
    state: Float[AnyArray, "b 2 hh ww f"] | None,
    x: Float[AnyArray, "b hh ww c"],
) -> tuple[Float[Array, "b hh ww f"], Float[Array, "b 2 hh ww f"]]:
    """One frame ``x`` ``[b, H, W, C]`` from ``state`` (``None``: zeros) -> ``(h [b, H, W, F], state)``."""
    c_in = np.shape(x)[-1] if np.ndim(x) else 0
    f = _check_params(params, c_in)
    check_frames("x", x, c_in, step=True)
    return _conv_lstm_step(params, _state0(x, state, f, step=True), x)


@jax.jit
def _conv_lstm_step(params, state, x):
    y, state = _conv_lstm(params, x[:, None], state)
    return y[:, 0], state


class ConvLSTM(nnx.Module):
    """One ConvLSTM layer ``C → F`` with ``k×k`` kernels; ``y, state = layer(x [b, t, H, W, C], h0=None)``;
    ``layer.step(state, x_t)`` for one frame."""

    def __init__(self, c_in: int, hidden: int, *, kernel: int = 3, forget_bias: float = 1.0, rngs: nnx.Rngs):
        p = conv_lstm_init(rngs.params(), c_in, hidden, kernel, forget_bias=forget_bias)
        self.c_in, self.hidden = c_in, hidden
        self.Wx = nnx.Param(p["Wx"], out_sharding=(None, None, "embed", "mlp"))
        self.Wh = nnx.Param(p["Wh"], out_sharding=(None, None, "mlp", "mlp"))
        self.b = nnx.Param(p["b"], out_sharding=("mlp",))

    def param_dict(self) -> dict:
        return {"Wx": self.Wx[...], "Wh": self.Wh[...], "b": self.b[...]}

    def init_state(self, batch: int, height: int, width: int):
        return jnp.zeros((batch, 2, height, width, self.hidden), jnp.float32)

    def __call__(self, x, h0=None):
        return conv_lstm(self.param_dict(), x, h0=h0)

    def step(self, state, x):
        return conv_lstm_step(self.param_dict(), state, x)
