r"""Long-term Recurrent Convolutional Networks, LRCN (Donahue et al., CVPR 2015 / TPAMI 2017): a per-frame CNN
:math:`\phi` feeding an LSTM, trained end to end, with two kinds of output.

.. math::  f_t = \phi(x_t),\qquad (h_t, c_t) = \mathrm{LSTM}(f_t, (h_{t-1}, c_{t-1})),\qquad
           z^{(k)}_t = W_k h_t + b_k .

- **Clip classification** (the paper's activity recognition): a prediction at every step, averaged over the clip,
  :math:`p^{(k)}(y \mid x_{1:T}) = \tfrac1T \sum_t \mathrm{softmax}(z^{(k)}_t)` (:func:`average_predictions`),
  one head ``k`` per label (e.g. digit class and motion direction). Training scores every step.
- **Description** (frames → tokens): an LSTM decoder over embedded caption tokens, started from
  :math:`\tanh(W_{br} c)` and reading :math:`c` beside each token, where the clip code :math:`c = h_T` is the
  encoder's last output. Teacher forcing in training (:meth:`LRCN.caption_logits` with
  ``tgt_in = [<bos>, y_0, …]``); greedy decoding with the same weights (:meth:`LRCN.generate`).

``recurrent=False`` is the paper's single-frame baseline built from the same parts: no LSTM, the step outputs
are :math:`z^{(k)}_t = W_k f_t` (each from one frame) and the clip code is the frame average
:math:`c = \tfrac1T\sum_t f_t`; nothing in it knows the order of the frames.

:math:`\phi` (:func:`frame_features`): ``3×3`` convolutions of stride 2, ``SAME`` padding, ReLU, then the flattened
map through a dense ReLU layer (the paper's fc6 role). Every frame is encoded on its own (time folds into the
batch), and the LSTM is causal, so the step output at ``t`` depends on frames ``≤ t`` only (tested).

Shapes: ``frames`` ``[batch, time, size, size, channels]`` float; step logits ``[batch, time, classes_k]``; caption
tokens ``[batch, L]`` int. :class:`LRCN` owns the parameters (``nnx.Conv`` kernels ``[3, 3, in, out]``, seqjax's
LSTM from :mod:`seqjax.rnn`); the functions take them as arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jaxtyping import Array, Float

from seqjax import _checks
from seqjax.nn import Linear
from seqjax.rnn.functional import rnn
from seqjax.rnn.layers import RNN

__all__ = ["LRCN", "CaptionDecoder", "frame_features", "average_predictions", "feature_map_size"]


def feature_map_size(size: int, layers: int) -> int:
    """The side of the map after ``layers`` stride-2 ``SAME`` convolutions: ``⌈size / 2^layers⌉``."""
    for _ in range(layers):
        size = math.ceil(size / 2)
    return size


def frame_features(convs, fc, frames: Float[Array, "b t h w c"]) -> Float[Array, "b t f"]:
    """:math:`\\phi(x_t)` for every frame: ``convs`` a sequence of ``(kernel [3, 3, in, out], bias [out])``,
    each a stride-2 ``SAME`` convolution and ReLU; ``fc`` ``(w [flat, F], b [F])`` a dense ReLU layer on the
    flattened map. Frames are encoded independently (time folds into the batch)."""
    b, t = frames.shape[:2]
    x = frames.reshape((b * t,) + frames.shape[2:]).astype(jnp.float32)
    for kernel, bias in convs:
        x = lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + bias.reshape(1, 1, 1, -1))
    w, bias = fc
    return jax.nn.relu(x.reshape(b, t, -1) @ w + bias.reshape(1, 1, -1))


def average_predictions(logits: Float[Array, "b t c"]) -> Float[Array, "b c"]:
    """The clip's log-probabilities from step logits: :math:`\\log \\tfrac1T \\sum_t \\mathrm{softmax}(z_t)`."""
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=1) - jnp.log(logits.shape[1])


class CaptionDecoder(nnx.Module):
    """An LSTM over embedded tokens conditioned on a clip code ``ctx`` ``[b, d_ctx]``: state from
    ``tanh(W_br ctx)``, input ``[embed(token); ctx]`` at every step, logits ``W_o h_t``."""

    def __init__(self, d_ctx: int, vocab: int, *, hidden: int = 64, d_emb: int = 32, kind: str = "lstm",
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d_emb, rngs=rngs)
        self.rnn = RNN(kind, d_emb + d_ctx, hidden, rngs=rngs)
        self.bridge = Linear(d_ctx, hidden, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.out = Linear(hidden, vocab, axes=("mlp", "vocab"), use_bias=True, rngs=rngs)
        self.vocab = vocab

    def _inputs(self, tokens, ctx):
        e = self.embed(tokens)
        return jnp.concatenate([e, jnp.broadcast_to(ctx[:, None].astype(e.dtype), e.shape[:2] + ctx.shape[-1:])], -1)

    def _h0(self, ctx):
        return self.rnn.init_state(ctx.shape[0]).at[:, 0].set(jnp.tanh(self.bridge(ctx)))

    def __call__(self, ctx, tgt_in):
        """Teacher forcing: ``tgt_in`` ``[b, L]`` int → logits ``[b, L, vocab]``."""
        y, _ = self.rnn(self._inputs(tgt_in, ctx), self._h0(ctx))
        return self.out(y)

    def generate(self, ctx, max_len: int, bos: int):
        """Greedy decoding: ``(tokens [b, max_len] int32, logits [b, max_len, vocab])``."""
        params, kind = self.rnn.param_dict(), self.rnn.kind

        def body(carry, _):
            tok, h = carry
            y, h = rnn(kind, params, self._inputs(tok[:, None], ctx), h0=h)
            logits = self.out(y[:, 0])
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            return (nxt, h), (nxt, logits)

        tok0 = jnp.full((ctx.shape[0],), bos, jnp.int32)
        _, (toks, logits) = lax.scan(body, (tok0, self._h0(ctx)), None, length=max_len)
        return jnp.moveaxis(toks, 0, 1), jnp.moveaxis(logits, 0, 1)


class LRCN(nnx.Module):
    """LRCN (``recurrent=True``) or its single-frame baseline (``recurrent=False``); see the module docstring.

    Args:
      classes: the class count of each clip-classification head (e.g. ``(10, 8)``: digit, direction).
      vocab: caption vocabulary size (0 = no description decoder).
      size, channels: the frames' side and channel count (checked on every call).
      conv: output channels of the stride-2 convolutions; features: the width of :math:`\\phi`'s output.
      hidden: LSTM width (encoder and decoder); d_emb: token embedding width; kind: the seqjax RNN cell.
    """

    def __init__(self, classes=(10, 8), *, vocab: int = 0, size: int = 32, channels: int = 1, conv=(16, 32, 32),
                 features: int = 64, hidden: int = 64, d_emb: int = 32, recurrent: bool = True, kind: str = "lstm",
                 rngs: nnx.Rngs):
        chans = (channels, *conv)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, padding="SAME", rngs=rngs) for a, b in zip(chans, chans[1:])])
        side = feature_map_size(size, len(conv))
        self.fc = Linear(side * side * chans[-1], features, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.rnn = RNN(kind, features, hidden, rngs=rngs) if recurrent else None
        d = hidden if recurrent else features
        self.heads = nnx.List([Linear(d, c, axes=("mlp", None), use_bias=True, rngs=rngs) for c in classes])
        self.decoder = CaptionDecoder(d, vocab, hidden=hidden, d_emb=d_emb, kind=kind, rngs=rngs) if vocab else None
        self.size, self.channels, self.recurrent, self.classes = size, channels, recurrent, tuple(classes)

    def _check(self, frames):
        legend = f"[batch, time, {self.size}, {self.size}, {self.channels}]"
        _checks.check_ndim("frames", frames, 5, legend)
        _checks.check_shape("frames", frames, (None, None, self.size, self.size, self.channels), legend)
        _checks.check_dtype("frames", frames, "float")

    def features(self, frames):
        """:math:`f_t = \\phi(x_t)` ``[b, t, features]``."""
        self._check(frames)
        convs = [(c.kernel[...], c.bias[...]) for c in self.convs]
        return frame_features(convs, (self.fc.kernel[...], self.fc.bias[...]), frames)

    def encode(self, frames):
        """``(states [b, t, d], ctx [b, d])``: the LSTM outputs and the last one (baseline: the frame features and
        their mean)."""
        f = self.features(frames)
        if self.rnn is None:
            return f, f.mean(1)
        y, _ = self.rnn(f)
        return y, y[:, -1]

    def __call__(self, frames):
        """Step logits, one ``[b, t, classes_k]`` array per head."""
        states, _ = self.encode(frames)
        return tuple(head(states) for head in self.heads)

    def clip_logits(self, frames):
        """Clip log-probabilities (the average of the step predictions), one ``[b, classes_k]`` per head."""
        return tuple(average_predictions(z) for z in self(frames))

    def _need_decoder(self):
        if self.decoder is None:
            raise ValueError("this LRCN has no description decoder: build it with vocab > 0")

    def caption_logits(self, frames, tgt_in):
        """Teacher forcing: ``tgt_in`` ``[b, L]`` int (``[<bos>, y_0, …, y_{L-2}]``) → ``[b, L, vocab]``."""
        self._need_decoder()
        _checks.check_ndim("tgt_in", tgt_in, 2, "[batch, caption length]")
        _checks.check_dtype("tgt_in", tgt_in, "int")
        if np.shape(tgt_in)[0] != np.shape(frames)[0]:
            raise ValueError(f"tgt_in must have the batch of frames ({np.shape(frames)[0]}), got shape {list(np.shape(tgt_in))}")
        _, ctx = self.encode(frames)
        return self.decoder(ctx, tgt_in)

    def generate(self, frames, max_len: int, bos: int):
        """Greedy description: ``(tokens [b, max_len] int32, logits [b, max_len, vocab])``."""
        self._need_decoder()
        _, ctx = self.encode(frames)
        return self.decoder.generate(ctx, max_len, bos)
