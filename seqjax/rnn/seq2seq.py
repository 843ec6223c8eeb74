r"""Sequence-to-sequence encoder–decoder with attention (Sutskever et al. 2014; Luong et al. 2015).

Encoder: a (stacked, optionally bidirectional) RNN over the source ``x`` ``[b, s, d_in]`` (continuous
inputs, so the pointer-network and read-process-write baselines can feed coordinates; embed tokens
before calling). Decoder: an RNN over embedded target tokens, started from a bridge of the encoder's
final state, :math:`h^{dec}_{0} = \tanh(W_{br} h^{enc}_{last})` (the other state components start at 0).
Attention (Luong "general", applied after the decoder step):

.. math::  a_{t,s} = \mathrm{softmax}_s\big(h^{dec}_t{}^\top W_a\, e_s\big),\quad c_t = \sum_s a_{t,s} e_s,\quad
           \tilde h_t = \tanh(W_c [h^{dec}_t; c_t]),\quad \mathrm{logits}_t = W_o \tilde h_t.

``attention=False`` is the plain encoder–decoder of Sutskever et al.: no attention parameters, the decoder
state alone carries the source, :math:`\mathrm{logits}_t = W_o h^{dec}_t`.

Teacher forcing: ``model(x, tgt_in)`` with ``tgt_in = [bos, y_0, …, y_{T-2}]`` runs the decoder over the
whole target at once (the input projection is one matmul; the attention is parallel over ``t``).
``model.generate(x, max_len, bos)`` decodes greedily token by token with the same weights, carrying the
decoder state; feeding its tokens back with teacher forcing reproduces its logits exactly (tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.nn import Linear
from seqjax.rnn.functional import rnn
from seqjax.rnn.layers import RNN
from seqjax.rnn.wrappers import StackedRNN

__all__ = ["Seq2Seq"]


class Seq2Seq(nnx.Module):
    """``logits = model(x, tgt_in, src_mask=None)``: ``x`` ``[b, s, d_in]``, ``tgt_in`` ``[b, t]`` int,
    ``src_mask`` ``[b, s]`` bool (``True`` = real token), ``logits`` ``[b, t, vocab]``."""

    def __init__(self, d_in: int, vocab: int, *, hidden: int = 64, d_emb: int = 32, enc_layers: int = 1,
                 bidirectional: bool = True, kind: str = "lstm", attention: bool = True, rngs: nnx.Rngs, **kw):
        self.encoder = StackedRNN(kind, d_in, hidden, enc_layers, bidirectional=bidirectional, rngs=rngs, **kw)
        d_enc = self.encoder.out_features
        self.embed = nnx.Embed(vocab, d_emb, rngs=rngs)
        self.decoder = RNN(kind, d_emb, hidden, rngs=rngs, **kw)
        self.bridge = Linear(d_enc, hidden, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.att = Linear(hidden, d_enc, axes=("mlp", "embed"), rngs=rngs) if attention else None
        self.combine = Linear(hidden + d_enc, hidden, axes=("embed", "mlp"), rngs=rngs) if attention else None
        self.out = Linear(hidden, vocab, axes=("mlp", "vocab"), use_bias=True, rngs=rngs)
        self.vocab, self.hidden, self.bidirectional = vocab, hidden, bidirectional

    def encode(self, x):
        """``(enc [b, s, d_enc], decoder h0 [b, S, hidden])``."""
        _checks.check_ndim("x", x, 3, "[batch, src_time, d_in]")
        enc, h_last = self.encoder(x)
        top = h_last[-1]
        last = jnp.concatenate([top[0][:, 0], top[1][:, 0]], -1) if self.bidirectional else top[:, 0]
        h0 = self.decoder.init_state(x.shape[0]).at[:, 0].set(jnp.tanh(self.bridge(last)))
        return enc, h0

    def _attend(self, dec, enc, src_mask):
        if self.att is None:
            return self.out(dec)
        scores = jnp.einsum("btd,bsd->bts", self.att(dec), enc)
        if src_mask is not None:
            scores = jnp.where(src_mask[:, None, :], scores, -1e30)
        ctx = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), enc)
        return self.out(jnp.tanh(self.combine(jnp.concatenate([dec, ctx], -1))))

    def __call__(self, x, tgt_in, src_mask=None):
        _checks.check_ndim("tgt_in", tgt_in, 2, "[batch, tgt_time]")
        if src_mask is not None:
            _checks.check_shape("src_mask", src_mask, x.shape[:2], "[batch, src_time]")
        enc, h0 = self.encode(x)
        dec, _ = self.decoder(self.embed(tgt_in), h0)
        return self._attend(dec, enc, src_mask)

    def generate(self, x, max_len: int, bos: int, src_mask=None):
        """Greedy decoding: ``(tokens [b, max_len] int32, logits [b, max_len, vocab])``."""
        enc, h0 = self.encode(x)
        params = self.decoder.param_dict()
        kind = self.decoder.kind

        def body(carry, _):
            tok, h = carry
            dec, h = rnn(kind, params, self.embed(tok[:, None]), h0=h)
            logits = self._attend(dec, enc, src_mask)[:, 0]
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            return (nxt, h), (nxt, logits)

        tok0 = jnp.full((x.shape[0],), bos, jnp.int32)
        _, (toks, logits) = lax.scan(body, (tok0, h0), None, length=max_len)
        return jnp.moveaxis(toks, 0, 1), jnp.moveaxis(logits, 0, 1)
