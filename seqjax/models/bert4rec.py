r"""BERT4Rec (Sun et al. 2019): a bidirectional Transformer over item-id sequences trained with the Cloze
objective, beside its causal (SASRec-style, Kang & McAuley 2018) and recurrent (GRU4Rec-style, Hidasi et al.
2016) baselines.

Items are ids ``1..N``, ``0`` is padding and ``N + 1`` the ``[mask]`` token; the vocabulary is ``V = N + 2``
(``seqjax.tasks.recsys``). Sequences are right-padded ``[b, t]``.

Transformer (:func:`transformer`), BERT's post-norm layers with learned positions:

.. math::  h^0 = \mathrm{LN}(E[v] + P),\qquad
           h' = \mathrm{LN}(h + \mathrm{MHA}(h)),\qquad h^{l+1} = \mathrm{LN}(h' + W_2\,\mathrm{GELU}(W_1 h' + b_1) + b_2)

The attention is ``seqjax.ops.attention.attention`` with an explicit mask: query ``i`` sees key ``j`` when ``j``
is a real item (padding is never attended) and, for the causal model, ``j <= i``; every query also sees itself,
so a padding row stays finite (its output is never read). Bidirectional (``causal=False``): position ``t``
depends on every real item, before and after it.

Output (:func:`item_logits`), with the input embedding ``E`` shared as the output layer, as in the paper:

.. math::  P(v \mid h) = \mathrm{softmax}\big(\mathrm{LN}(\mathrm{GELU}(h W^P + b^P))\,E^\top + b^O\big)

over the items (padding and ``[mask]`` get ``-inf``). BERT4Rec trains on Cloze-masked histories and scores a
``[mask]`` appended to the history; the causal model is the same network with a causal mask, trained to predict
the next item at every position and read at the last one. GRU4Rec-style (:func:`gru_hidden`): the embeddings
through one ``seqjax.rnn`` GRU (right padding never reaches a real position), the same shared-embedding output.

Losses: :func:`softmax_loss` (cross-entropy over all items at the scored positions; the Cloze loss and the
next-item loss) and :func:`bce_loss` (SASRec's binary cross-entropy with one sampled negative per position).
:class:`Bert4Rec` (``causal=False``/``True``) and :class:`GRU4Rec` own the parameters; the functions take
them as dicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax import _checks
from seqjax.ops.attention import attention
from seqjax.rnn import cells as _cells
from seqjax.rnn.functional import rnn
from seqjax.types import Array, Float, Int

__all__ = ["PAD", "Bert4Rec", "GRU4Rec", "transformer", "gru_hidden", "item_logits", "attention_mask",
           "softmax_loss", "bce_loss", "gather_last", "check_items"]

PAD = 0
IGNORE = -1  # an unscored target (seqjax.tasks.IGNORE)


def check_items(items, vocab: int, max_len: int | None = None) -> None:
    """``items`` ``[b, t]`` int ids in ``[0, vocab)``, ``t <= max_len``: ValueError before tracing (the ids are
    checked when their values are known)."""
    _checks.check_ndim("items", items, 2, "[batch, time]")
    _checks.check_dtype("items", items, "int")
    if max_len is not None and np.shape(items)[1] > max_len:
        raise ValueError(f"items has {np.shape(items)[1]} positions; the model's max_len is {max_len}")
    a = _checks.concrete_or_none(items)
    if a is not None and a.size and (a.min() < 0 or a.max() >= vocab):
        raise ValueError(f"items must be ids in [0, {vocab}) (0 padding, 1..{vocab - 2} items, {vocab - 1} the "
                         f"mask), got min {a.min()}, max {a.max()}")


def _layer_norm(x, p, eps: float = 1e-12):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    lead = (1,) * (x.ndim - 1)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"].reshape(lead + (-1,)) + p["bias"].reshape(lead + (-1,))


def _dropout(x, rate: float, key):
    if rate <= 0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _add(x, bias):
    return x + bias.reshape((1,) * (x.ndim - 1) + (-1,))


def attention_mask(items, *, causal: bool):
    """``[b, 1, t, t]`` bool: query ``i`` sees real key ``j`` (``j <= i`` if ``causal``) and always itself."""
    t = items.shape[1]
    m = (items != PAD)[:, None, None, :]
    if causal:
        m = m & jnp.tril(jnp.ones((t, t), bool))[None, None]
    return m | jnp.eye(t, dtype=bool)[None, None]


def transformer(params: dict, items: Int[Array, "b t"], *, causal: bool, num_heads: int, dropout: float = 0.0,
                key=None) -> Float[Array, "b t d"]:
    """Hidden states ``[b, t, d]`` of the post-norm Transformer (module docstring); ``dropout`` with ``key``."""
    check_items(items, params["item"].shape[0], params["pos"].shape[0])
    b, t = items.shape
    keys = list(jax.random.split(key, 2 * len(params["blocks"]) + 1)) if key is not None else [None] * (2 * len(params["blocks"]) + 1)
    x = params["item"][items] + params["pos"][:t][None]
    x = _dropout(_layer_norm(x, params["ln0"]), dropout, keys.pop())
    mask = attention_mask(items, causal=causal)
    for blk in params["blocks"]:
        d = x.shape[-1]
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, blk[w]) + blk["b" + w[1]].reshape(1, 1, num_heads, -1)
                   for w in ("wq", "wk", "wv"))
        o = attention(q, k, v, mask=mask, causal=causal)
        o = jnp.einsum("bthk,hkd->btd", o, blk["wo"]).reshape(b, t, d)
        x = _layer_norm(x + _dropout(_add(o, blk["bo"]), dropout, keys.pop()), blk["ln1"])
        f = _add(jax.nn.gelu(_add(x @ blk["w1"], blk["b1"])) @ blk["w2"], blk["b2"])
        x = _layer_norm(x + _dropout(f, dropout, keys.pop()), blk["ln2"])
    return x


def gru_hidden(params: dict, items: Int[Array, "b t"], *, dropout: float = 0.0, key=None) -> Float[Array, "b t d"]:
    """GRU4Rec-style hidden states ``[b, t, d]``: embeddings (padding zeroed) through one GRU."""
    check_items(items, params["item"].shape[0])
    x = jnp.where((items != PAD)[..., None], params["item"][items], 0.0)
    y, _ = rnn("gru", params["gru"], _dropout(x, dropout, key))
    return y


def item_logits(params: dict, h: Float[Array, "... d"]) -> Float[Array, "... V"]:
    """Scores of every vocabulary entry from hidden states ``h`` through the shared-embedding head
    (padding and ``[mask]`` at ``-inf``)."""
    hd = params["head"]
    z = jax.nn.gelu(_add(h @ hd["w"], hd["b"]))
    z = _layer_norm(z, hd["ln"])
    logits = _add(z @ params["item"].T, hd["out_b"])
    v = logits.shape[-1]
    special = (jnp.arange(v) == PAD) | (jnp.arange(v) == v - 1)
    return jnp.where(special.reshape((1,) * (logits.ndim - 1) + (v,)), -jnp.inf, logits)


def gather_last(h, lengths):
    """``h[i, lengths[i] - 1]``: the hidden state at each row's last real position (``[b, t, d] -> [b, d]``)."""
    idx = jnp.clip(jnp.asarray(lengths) - 1, 0, h.shape[1] - 1)
    return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]


def softmax_loss(logits, targets):
    """Mean cross-entropy over the positions with ``targets != IGNORE`` (the Cloze and next-item losses)."""
    keep = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, targets, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def bce_loss(logits, targets, negatives):
    """SASRec's loss: ``-log σ(s_pos) - log(1 - σ(s_neg))`` with one negative id per scored position
    (``negatives`` ``[b, t]``), averaged over the positions with ``targets != IGNORE``."""
    keep = targets != IGNORE
    pos = jnp.take_along_axis(logits, jnp.where(keep, targets, 1)[..., None], -1)[..., 0]
    neg = jnp.take_along_axis(logits, negatives[..., None], -1)[..., 0]
    nll = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def _normal(rngs, shape, std=0.02):
    return nnx.Param(std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32))


def _ln(d):
    return {"scale": nnx.Param(jnp.ones((d,), jnp.float32)), "bias": nnx.Param(jnp.zeros((d,), jnp.float32))}


def _values(tree):
    return jax.tree.map(lambda p: p[...], tree, is_leaf=lambda p: isinstance(p, nnx.Variable))


class _Head(nnx.Module):
    def __init__(self, d: int, vocab: int, *, rngs: nnx.Rngs):
        self.w = _normal(rngs, (d, d))
        self.b = nnx.Param(jnp.zeros((d,), jnp.float32))
        self.ln = nnx.data(_ln(d))
        self.out_b = nnx.Param(jnp.zeros((vocab,), jnp.float32))

    def param_dict(self):
        return {"w": self.w[...], "b": self.b[...], "ln": _values(self.ln), "out_b": self.out_b[...]}


class _Block(nnx.Module):
    def __init__(self, d: int, heads: int, ffn: int, *, rngs: nnx.Rngs):
        _checks.check_divisible("d", d, "heads", heads)
        k = d // heads
        self.p = nnx.data({
            "wq": _normal(rngs, (d, heads, k)), "wk": _normal(rngs, (d, heads, k)), "wv": _normal(rngs, (d, heads, k)),
            "bq": nnx.Param(jnp.zeros((heads, k))), "bk": nnx.Param(jnp.zeros((heads, k))),
            "bv": nnx.Param(jnp.zeros((heads, k))),
            "wo": _normal(rngs, (heads, k, d)), "bo": nnx.Param(jnp.zeros((d,))),
            "w1": _normal(rngs, (d, ffn)), "b1": nnx.Param(jnp.zeros((ffn,))),
            "w2": _normal(rngs, (ffn, d)), "b2": nnx.Param(jnp.zeros((d,))),
            "ln1": _ln(d), "ln2": _ln(d),
        })

    def param_dict(self):
        return _values(self.p)


class Bert4Rec(nnx.Module):
    """``h = model(items, dropout_key=None)`` ``[b, t, d]``; ``model.logits(h)`` ``[..., V]``.

    ``causal=False``: BERT4Rec (bidirectional, Cloze); ``causal=True``: the SASRec-style baseline, the same
    network under a causal mask. The paper's ML-1m model: ``d=64``, 2 layers, 2 heads, ``max_len=200``,
    dropout 0.1, GELU feed-forward of width ``4d``, truncated-normal(0.02) initialisation.
    """

    def __init__(self, num_items: int, max_len: int, *, d: int = 64, layers: int = 2, heads: int = 2,
                 causal: bool = False, dropout: float = 0.1, rngs: nnx.Rngs):
        vocab = num_items + 2
        self.num_items, self.max_len, self.heads, self.causal, self.dropout = num_items, max_len, heads, causal, dropout
        self.item = _normal(rngs, (vocab, d))
        self.pos = _normal(rngs, (max_len, d))
        self.ln0 = nnx.data(_ln(d))
        self.blocks = nnx.List([_Block(d, heads, 4 * d, rngs=rngs) for _ in range(layers)])
        self.head = _Head(d, vocab, rngs=rngs)

    def param_dict(self) -> dict:
        return {"item": self.item[...], "pos": self.pos[...], "ln0": _values(self.ln0),
                "blocks": [b.param_dict() for b in self.blocks], "head": self.head.param_dict()}

    def __call__(self, items, *, dropout_key=None):
        return transformer(self.param_dict(), items, causal=self.causal, num_heads=self.heads,
                           dropout=self.dropout if dropout_key is not None else 0.0, key=dropout_key)

    def logits(self, h):
        return item_logits(self.param_dict(), h)


class GRU4Rec(nnx.Module):
    """``h = model(items, dropout_key=None)`` ``[b, t, d]`` from one ``seqjax.rnn`` GRU; ``model.logits(h)``."""

    causal = True

    def __init__(self, num_items: int, *, d: int = 64, dropout: float = 0.1, rngs: nnx.Rngs):
        vocab = num_items + 2
        self.num_items, self.dropout = num_items, dropout
        self.item = _normal(rngs, (vocab, d))
        self.gru = nnx.data({k: nnx.Param(v) for k, v in _cells.init_params("gru", rngs.params(), d, d).items()})
        self.head = _Head(d, vocab, rngs=rngs)

    def param_dict(self) -> dict:
        return {"item": self.item[...], "gru": _values(self.gru), "head": self.head.param_dict()}

    def __call__(self, items, *, dropout_key=None):
        return gru_hidden(self.param_dict(), items, dropout=self.dropout if dropout_key is not None else 0.0,
                          key=dropout_key)

    def logits(self, h):
        return item_logits(self.param_dict(), h)
