r"""Causal softmax attention and sliding-window attention as registered mixers.

Softmax attention (Vaswani et al. 2017) is a recurrence whose state is every key and value seen so far;
sliding-window attention (Beltagy et al. 2020, "Longformer") keeps only the last ``window - 1``::

    o_t = sum_{j <= t, t - j < window, doc(j) = doc(t)} softmax_j(s q_t . k_j) v_j

The functional form :func:`causal_attention` takes that state as ``h0`` and returns it as ``h_last``
(:class:`KVState`: the keys, the values and which of them are still in the current document), so the
shared contract holds as for every mixer: split-and-carry and step-by-step decoding equal one parallel
run. Global attention's state grows with the length (its spec says ``growing_state``); the window keeps
sliding-window attention's at ``window - 1`` tokens. The computation is ``seqjax.ops.attention.attention``
(``impl="sequential"`` is its plain float32 reference, ``attention_reference``; ``"blocked"`` the
flash attention of ``seqjax.ops.flash``; ``"auto"`` the backend ``seqjax.ops.attention.choose_impl`` picks); RoPE, projections and the
decode caches (a KV cache, a ring buffer) belong to the layers ``seqjax.attention.Attention`` and
``SlidingWindowAttention``.

Shapes: ``q [b, t, heads, d]``, ``k, v [b, t, kv_heads, d]``; state ``k, v [b, s, kv_heads, d]`` in the
inputs' dtype, ``live [b, s]`` bool.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import _checks
from seqjax.attention.attention import Attention, SlidingWindowAttention
from seqjax.mixers.registry import MixerSpec, register
from seqjax.ops.attention import attention, make_mask
from seqjax.types import AnyArray, Array, Float, Operator, ResetsLike

__all__ = [
    "KVState", "causal_attention", "causal_attention_recurrent", "causal_attention_step",
    "causal_attention_materialize", "causal_attention_make_inputs",
]  # fmt: skip

IMPLS = ("auto", "sequential", "xla", "cudnn", "blocked", "splash")
_BACKEND = {"auto": None, "sequential": "reference", "xla": "xla", "cudnn": "cudnn", "blocked": "blocked", "splash": "splash"}


class KVState(NamedTuple):
    """Softmax attention's recurrent state: the keys and values later tokens may attend to."""

    k: Any  # [b, s, kv_heads, d]
    v: Any  # [b, s, kv_heads, d]
    live: Any  # [b, s] bool: in the current document (a reset after a key hides it)


def _check_causal_attention_inputs(q, k, v, h0, resets, window):
    _checks.check_ndim("q", q, 4, "[batch, time, heads, head_dim]")
    b, t, h, d = q.shape
    _checks.check_ndim("k", k, 4, "[batch, time, kv_heads, head_dim]")
    _checks.check_shape("k", k, (b, t, None, d), "[batch, time, kv_heads, head_dim]")
    _checks.check_same_shape("k", k, "v", v)
    if h % k.shape[2]:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({k.shape[2]})")
    if h0 is not None:
        if not isinstance(h0, KVState):
            raise ValueError("h0 must be a KVState(k, v, live)")
        _checks.check_shape("h0.k", h0.k, (b, None, k.shape[2], d), "[batch, steps, kv_heads, head_dim]")
        _checks.check_same_shape("h0.k", h0.k, "h0.v", h0.v)
        _checks.check_shape("h0.live", h0.live, h0.k.shape[:2], "[batch, steps]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")
    if window is not None and not (isinstance(window, (int, np.integer)) and window >= 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


def causal_attention(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b t kvh d"],
    v: Float[AnyArray, "b t kvh d"],
    *,
    h0: KVState | None = None,
    resets: ResetsLike | None = None,
    impl="auto",
    window=None,
    scale=None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h d"], KVState]:
    """Causal (windowed, packed) softmax attention continuing from the keys and values in ``h0``.

    Returns ``(y [b, t, heads, d] in q's dtype, KVState)``: ``h_last`` holds ``h0``'s keys and values
    followed by this call's (the last ``window - 1`` of them with a window).
    """
    _checks.check_no_negative_eigen("attention", negative_eigen)
    _checks.check_choice("impl", impl, IMPLS)
    _check_causal_attention_inputs(q, k, v, h0, resets, window)
    b, t = q.shape[:2]
    if h0 is None:
        h0 = KVState(k[:, :0], v[:, :0], jnp.zeros((b, 0), bool))
    s = h0.k.shape[1]
    keys = jnp.concatenate([h0.k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([h0.v.astype(v.dtype), v], axis=1)
    # documents: 0 up to this call's first reset; h0's keys outside the current document match none
    doc = jnp.zeros((b, t), jnp.int32) if resets is None else jnp.cumsum(jnp.asarray(resets, jnp.int32), axis=1)
    k_doc = jnp.concatenate([jnp.where(h0.live, 0, -1), doc], axis=1)
    y = attention(q, keys, values, segment_ids=doc, kv_segment_ids=k_doc, window=window, scale=scale,
                  impl=_BACKEND[impl])
    keep = s + t if window is None else min(s + t, window - 1)
    live = k_doc == doc[:, -1:]
    return y, KVState(keys[:, s + t - keep :], values[:, s + t - keep :], live[:, s + t - keep :])


def causal_attention_recurrent(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b t kvh d"],
    v: Float[AnyArray, "b t kvh d"],
    *,
    h0: KVState | None = None,
    resets: ResetsLike | None = None,
    window=None,
    scale=None,
) -> tuple[Float[Array, "b t h d"], KVState]:
    """The reference: the plain float32 softmax (``seqjax.ops.attention.attention_reference``)."""
    return causal_attention(q, k, v, h0=h0, resets=resets, impl="sequential", window=window, scale=scale)


def causal_attention_step(
    h: KVState | None,
    q: Float[AnyArray, "b h d"],
    k: Float[AnyArray, "b kvh d"],
    v: Float[AnyArray, "b kvh d"],
    *,
    window=None,
    scale=None,
) -> tuple[Float[Array, "b h d"], KVState]:
    """One token (``q [b, heads, d]``, ``k, v [b, kv_heads, d]``) attending to the keys in ``h`` and itself."""
    y, h = causal_attention_recurrent(q[:, None], k[:, None], v[:, None], h0=h, window=window, scale=scale)
    return y[:, 0], h


def causal_attention_materialize(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b t kvh d"],
    v: Float[AnyArray, "b t kvh d"],
    *,
    window=None,
    scale=None,
) -> Operator:
    """``[b, heads, T, T]``: the causal (windowed) softmax probabilities, ``y = M v`` per head (``h0`` empty;
    with GQA, ``v`` repeated to the query heads)."""
    del v
    b, t, h, d = q.shape
    kr = jnp.repeat(k.astype(jnp.float32), h // k.shape[2], axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * (d**-0.5 if scale is None else scale)
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    return jax.nn.softmax(jnp.where(make_mask(idx, idx, window=window), logits, -jnp.inf), axis=-1)


def causal_attention_make_inputs(key, batch, time, *, heads=2, kv_heads=None, head_dim=8):
    kq, kk, kv = jax.random.split(key, 3)
    kvh = kv_heads or heads
    return dict(
        q=jax.random.normal(kq, (batch, time, heads, head_dim)),
        k=jax.random.normal(kk, (batch, time, kvh, head_dim)),
        v=jax.random.normal(kv, (batch, time, kvh, head_dim)),
    )


_ATTENTION_CONFIG = ("num_heads", "num_kv_heads", "rope_theta", "qk_norm")
register(MixerSpec(
    name="attention", fn=causal_attention, recurrent=causal_attention_recurrent, step=causal_attention_step,
    make_inputs=causal_attention_make_inputs, layer=Attention, materialize=causal_attention_materialize,
    value_arg="v", impls=("sequential", "xla", "blocked"), context_parallel=True, growing_state=True, quadratic=True,
    lm_config=_ATTENTION_CONFIG, takes_positions=True, paper="https://arxiv.org/abs/1706.03762",
    doc="Causal softmax attention (Vaswani et al. 2017) with RoPE, GQA, QK-norm; a KV cache",
))
register(MixerSpec(
    name="swa", fn=causal_attention, recurrent=causal_attention_recurrent, step=causal_attention_step,
    make_inputs=causal_attention_make_inputs, layer=SlidingWindowAttention,
    materialize=causal_attention_materialize, value_arg="v", impls=("sequential", "xla", "blocked"),
    options={"window": 8}, quadratic=True, lm_config=_ATTENTION_CONFIG + ("window",), takes_positions=True,
    paper="https://arxiv.org/abs/2004.05150",
    doc="Sliding-window softmax attention (Beltagy et al. 2020); a window-slot ring buffer",
))
