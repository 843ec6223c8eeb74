r"""Encoder–decoder models over seqjax layers: a Transformer (Vaswani et al. 2017) and hybrids whose layers are
registered recurrent mixers, with the decoder reading the source through cross-attention.

Encoder layer (pre-norm, over the source ``x`` ``[b, s, d]`` with ``src_mask`` ``[b, s]``)::

    x = x + mix(norm(x), src_mask);   x = x + SwiGLU(norm(x))

``mix`` is bidirectional: for ``encoder="attention"``, softmax self-attention over the real source tokens with
RoPE positions (the projections of :class:`seqjax.attention.Attention`, :func:`seqjax.ops.attention.attention`
with ``causal=False`` and the padding mask); for a registered mixer name (``"gla"``, ``"mamba2"``, ``"lru"``
...), two mixers, one over the source and one over each source reversed within its length
(:func:`reverse_within`, so padding stays after the real tokens), their outputs summed. The reversal needs
each row's real tokens first: ``src_mask`` must be a prefix mask (``True`` then ``False`` in every row, right
padding), checked with a ``ValueError`` whenever the mask's value is known in Python (outside ``jit``).

Decoder layer (over the shifted target ``y`` ``[b, t, d]``, causal)::

    y = y + self_mixer(norm(y));   y = y + cross(norm(y), K_l, V_l, src_mask);   y = y + SwiGLU(norm(y))

with ``self_mixer`` causal attention (``decoder="attention"``) or any registered mixer, and
:func:`cross_attention`, :math:`o_t = \sum_s \mathrm{softmax}_s(q_t\cdot k_s/\sqrt{d} + m_s)\, v_s`
(``m_s = -\infty`` at padding), over the encoder's output projected per layer to ``K_l, V_l``.

``model(src, tgt_in, src_mask)`` runs the decoder over the whole target at once (teacher forcing; ``tgt_in`` =
``[bos, y_0, …, y_{T-2}]``). ``model.generate(src, max_len, bos, src_mask)`` decodes greedily one token at a
time from the mixers' decode caches (``init_cache``: a KV cache for attention, the recurrent state for the
others) with the encoder memory computed once; teacher forcing on its own tokens gives its logits (tested).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks, mixers
from seqjax.attention.attention import Attention
from seqjax.models.blocks import SwiGLU, swiglu_hidden
from seqjax.nn import RMSNorm
from seqjax.ops.attention import attention
from seqjax.types import Array, Bool, Float, Int

__all__ = ["cross_attention", "reverse_within", "CrossAttention", "EncoderAttention", "BiMixer", "EncoderLayer",
           "DecoderLayer", "EncoderDecoder"]


def cross_attention(
    q: Float[Array, "b t h d"], k: Float[Array, "b s h d"], v: Float[Array, "b s h d"], src_mask: Bool[Array, "b s"]
) -> Float[Array, "b t h d"]:
    """Softmax attention of every query over the real source positions (no causal mask)."""
    _checks.check_ndim("q", q, 4, "[batch, tgt_time, heads, head_dim]")
    _checks.check_shape("src_mask", src_mask, k.shape[:2], "[batch, src_time]")
    return attention(q, k, v, mask=jnp.asarray(src_mask, bool)[:, None, None, :], causal=False)


def reverse_within(x: Float[Array, "b t ..."], lengths: Int[Array, " b"]) -> Float[Array, "b t ..."]:
    """Each row reversed over its first ``lengths[i]`` positions, the rest left in place (its own inverse)."""
    t = x.shape[1]
    i = jnp.arange(t)[None]
    idx = jnp.where(i < lengths[:, None], lengths[:, None] - 1 - i, i)
    return jnp.take_along_axis(x, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))), axis=1)


def _init(std):
    return nnx.initializers.normal(stddev=std)


class CrossAttention(nnx.Module):
    """Multi-head cross-attention: ``wq [embed, heads, head_dim]`` on the decoder, ``wk``/``wv`` on the
    encoder memory (:meth:`memory`, computed once per source), ``wo [heads, head_dim, embed]``; no positions."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        _checks.check_divisible("d_model", d_model, "num_heads", num_heads)
        hd, key = d_model // num_heads, rngs.params
        shape, std = (d_model, num_heads, hd), d_model**-0.5
        self.wq = nnx.Param(_init(std)(key(), shape), out_sharding=("embed", "heads", "head_dim"))
        self.wk = nnx.Param(_init(std)(key(), shape), out_sharding=("embed", "heads", "head_dim"))
        self.wv = nnx.Param(_init(std)(key(), shape), out_sharding=("embed", "heads", "head_dim"))
        self.wo = nnx.Param(_init(d_model**-0.5)(key(), (num_heads, hd, d_model)), out_sharding=("heads", "head_dim", "embed"))

    def memory(self, enc):
        """``(K, V)`` ``[b, s, heads, head_dim]`` of the encoder output ``enc`` ``[b, s, d]``."""
        return jnp.einsum("bsd,dhk->bshk", enc, self.wk[...]), jnp.einsum("bsd,dhk->bshk", enc, self.wv[...])

    def __call__(self, x, k, v, src_mask):
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        return jnp.einsum("bthk,hkd->btd", cross_attention(q, k, v, src_mask), self.wo[...])


class EncoderAttention(nnx.Module):
    """Bidirectional self-attention over the real source tokens: the projections and RoPE of
    :class:`seqjax.attention.Attention`, without its causal mask."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.attn = Attention(d_model, num_heads=num_heads, rngs=rngs)

    def __call__(self, x, src_mask):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])
        q, k, v = self.attn.qkv(x, pos)
        o = attention(q, k, v, mask=src_mask[:, None, None, :], causal=False)
        return self.attn.out(o).astype(x.dtype)


def _mixer(name: str, d_model: int, num_heads: int, rngs: nnx.Rngs):
    spec = mixers.get(name)
    if spec.layer is None or not spec.causal:
        raise ValueError(f"mixer {name!r} has no causal NNX layer")
    kw = {"num_heads": num_heads} if "num_heads" in spec.lm_config else {}
    return spec.layer(d_model, rngs=rngs, dtype=jnp.float32, **kw)


class BiMixer(nnx.Module):
    """A registered mixer read both ways: ``fwd(x) + R(bwd(R(x)))`` with ``R`` :func:`reverse_within` the
    source lengths."""

    def __init__(self, name: str, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.fwd = _mixer(name, d_model, num_heads, rngs)
        self.bwd = _mixer(name, d_model, num_heads, rngs)

    def __call__(self, x, src_mask):
        lengths = jnp.sum(src_mask, -1)
        yb, _ = self.bwd(reverse_within(x, lengths))
        yf, _ = self.fwd(x)
        return yf + reverse_within(yb, lengths)


class EncoderLayer(nnx.Module):
    def __init__(self, d_model: int, mix: nnx.Module, mlp_hidden: int, *, rngs: nnx.Rngs):
        self.norm1, self.mix = RMSNorm(d_model), mix
        self.norm2, self.mlp = RMSNorm(d_model), SwiGLU(d_model, mlp_hidden, rngs=rngs)

    def __call__(self, x, src_mask):
        x = x + self.mix(self.norm1(x), src_mask)
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nnx.Module):
    """Causal self-mixer, cross-attention to the encoder memory, SwiGLU; each pre-norm and residual."""

    def __init__(self, d_model: int, mixer: nnx.Module, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs):
        self.norm1, self.mixer = RMSNorm(d_model), mixer
        self.norm2, self.cross = RMSNorm(d_model), CrossAttention(d_model, num_heads, rngs=rngs)
        self.norm3, self.mlp = RMSNorm(d_model), SwiGLU(d_model, mlp_hidden, rngs=rngs)

    def __call__(self, y, memory, src_mask, cache=None):
        h, cache = self.mixer(self.norm1(y), cache=cache)
        y = y + h.astype(y.dtype)
        y = y + self.cross(self.norm2(y), *memory, src_mask)
        return y + self.mlp(self.norm3(y)), cache


class EncoderDecoder(nnx.Module):
    """``logits = model(src [b, s] int, tgt_in [b, t] int, src_mask [b, s] bool | None)`` ``[b, t, tgt_vocab]``.

    ``encoder`` / ``decoder``: ``"attention"`` (the Transformer) or a registered mixer name (a hybrid).
    ``src_mask=None`` means every source position is real; otherwise it must be a prefix mask (``True`` at the
    real tokens, then ``False`` at the right padding, in every row), which is checked when its value is concrete.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, *, d_model: int = 64, num_heads: int = 4, enc_layers: int = 2,
                 dec_layers: int = 2, encoder: str = "attention", decoder: str = "attention", mlp_ratio: float = 4.0,
                 rngs: nnx.Rngs):
        registered = mixers.names()
        for arg, name in (("encoder", encoder), ("decoder", decoder)):
            if name not in registered:
                raise ValueError(f"{arg}={name!r} is not a registered mixer; known: {registered}")
        hidden = swiglu_hidden(d_model, mlp_ratio)
        self.src_embed = nnx.Param(_init(1.0)(rngs.params(), (src_vocab, d_model)), out_sharding=("vocab", "embed"))
        self.tgt_embed = nnx.Param(_init(1.0)(rngs.params(), (tgt_vocab, d_model)), out_sharding=("vocab", "embed"))

        def enc_mix():
            if encoder == "attention":
                return EncoderAttention(d_model, num_heads, rngs=rngs)
            return BiMixer(encoder, d_model, num_heads, rngs=rngs)

        self.enc = nnx.List([EncoderLayer(d_model, enc_mix(), hidden, rngs=rngs) for _ in range(enc_layers)])
        self.enc_norm = RMSNorm(d_model)
        self.dec = nnx.List([DecoderLayer(d_model, _mixer(decoder, d_model, num_heads, rngs), num_heads, hidden, rngs=rngs)
                             for _ in range(dec_layers)])
        self.dec_norm = RMSNorm(d_model)
        self.head = nnx.Param(_init(d_model**-0.5)(rngs.params(), (d_model, tgt_vocab)), out_sharding=("embed", "vocab"))
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab

    def _mask(self, src, src_mask):
        _checks.check_ndim("src", src, 2, "[batch, src_time] token ids")
        _checks.check_dtype("src", src, "int")
        if src_mask is None:
            return jnp.ones(src.shape, bool)
        _checks.check_shape("src_mask", src_mask, src.shape, "[batch, src_time]")
        m = _checks.concrete_or_none(src_mask)
        if m is not None:
            m = m.astype(bool)
            gaps = np.flatnonzero(np.any(m[:, 1:] & ~m[:, :-1], axis=1))
            if gaps.size:
                raise ValueError(f"src_mask must be a prefix mask (True at the real tokens, then False at the right padding), "
                                 f"but row {int(gaps[0])} is {m[gaps[0]].astype(int).tolist()}")
        return jnp.asarray(src_mask, bool)

    def encode(self, src, src_mask=None):
        """``(memory, src_mask)``: per decoder layer ``(K, V)`` ``[b, s, heads, head_dim]`` of the encoder output."""
        src_mask = self._mask(src, src_mask)
        x = self.src_embed[...][src]
        for layer in self.enc:
            x = layer(x, src_mask)
        enc = self.enc_norm(x)
        return [layer.cross.memory(enc) for layer in self.dec], src_mask

    def decode(self, tgt_in, memory, src_mask, caches=None):
        """``(logits [b, t, tgt_vocab] float32, caches)`` of the decoder over ``tgt_in`` ``[b, t]``."""
        y = self.tgt_embed[...][tgt_in]
        out = []
        for i, layer in enumerate(self.dec):
            y, c = layer(y, memory[i], src_mask, None if caches is None else caches[i])
            out.append(c)
        logits = (self.dec_norm(y) @ self.head[...]).astype(jnp.float32)
        return logits, (None if caches is None else tuple(out))

    def __call__(self, src, tgt_in, src_mask=None):
        _checks.check_ndim("tgt_in", tgt_in, 2, "[batch, tgt_time] token ids")
        memory, src_mask = self.encode(src, src_mask)
        return self.decode(tgt_in, memory, src_mask)[0]

    def init_cache(self, batch_size: int, max_len: int):
        return tuple(layer.mixer.init_cache(batch_size, max_len) for layer in self.dec)

    def generate(self, src, max_len: int, bos: int, src_mask=None):
        """Greedy decoding: ``(tokens [b, max_len] int32, logits [b, max_len, tgt_vocab])``."""
        memory, src_mask = self.encode(src, src_mask)
        b = src.shape[0]

        def body(carry, _):
            tok, caches = carry
            logits, caches = self.decode(tok[:, None], memory, src_mask, caches)
            nxt = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
            return (nxt, caches), (nxt, logits[:, 0])

        tok0 = jnp.full((b,), bos, jnp.int32)
        _, (toks, logits) = lax.scan(body, (tok0, self.init_cache(b, max_len)), None, length=max_len)
        return jnp.moveaxis(toks, 0, 1), jnp.moveaxis(logits, 0, 1)
