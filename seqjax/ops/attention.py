r"""Softmax attention as a function: the mask, the plain float32 reference and the backend call.

Math (per head ``n``, query position ``i``, key position ``j``)::

    o_i = sum_j softmax_j(q_i . k_j / sqrt(d) + mask_ij) v_j
    mask_ij = 0 if  j <= i  and  i - j < window  and  seg_i == seg_j  else -inf

Query head ``n`` reads key/value head ``n // (num_heads / num_kv_heads)`` (GQA, Ainslie et al. 2023).
Layout: ``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]``; time on axis 1.

:func:`attention` calls ``jax.nn.dot_product_attention`` (``impl=None`` / ``"xla"`` / ``"cudnn"``) and, with
``impl="reference"``, :func:`attention_reference`, a plain float32 einsum softmax used by the tests. Without
masks beyond causality/window it passes ``is_causal`` and ``local_window_size`` so that cuDNN's flash
attention can skip the masked blocks; packed sequences and caches use an explicit mask. The layer (RoPE,
projections, caches) is ``seqjax.attention.Attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import _checks
from seqjax.types import AnyArray, Array, Float, Shaped

__all__ = ["make_mask", "attention_reference", "attention"]


def make_mask(q_idx, k_idx, *, q_seg=None, k_seg=None, window=None, causal=True):
    """Boolean mask ``[b, 1, t, s]`` (True = attend) from stream indices and segment ids.

    ``q_idx [b|1, t]`` / ``k_idx [b|1, s]`` are stream indices (``k_idx < 0`` marks an empty cache slot).
    """
    qi, ki = q_idx[:, :, None], k_idx[:, None, :]
    m = ki >= 0
    if causal:
        m = m & (ki <= qi)
    if window is not None:
        m = m & (qi - ki < window)
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    return m[:, None]


def attention_reference(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b s kvh d"],
    v: Float[AnyArray, "b s kvh d"],
    mask: Shaped[AnyArray, "#b 1 t s"] | None = None,
    *,
    scale=None,
) -> Float[Array, "b t h d"]:
    """Plain float32 softmax attention (the test reference). ``mask [b|1, 1, t, s]`` bool."""
    h, kvh, d = q.shape[2], k.shape[2], q.shape[3]
    g = h // kvh
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kr = jnp.repeat(k.astype(jnp.float32), g, axis=2)
    vr = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * scale
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)
    return jnp.einsum("bhts,bshd->bthd", p, vr).astype(q.dtype)


def attention(q, k, v, *, segment_ids=None, window=None, causal=True, mask=None, scale=None, impl=None):
    """Causal (optionally windowed, packed) softmax attention over one sequence block.

    Args:
      q: ``[b, t, heads, d]``; k, v: ``[b, t, kv_heads, d]`` with ``heads % kv_heads == 0``.
      segment_ids: ``[b, t]`` int; tokens attend only within their own document.
      window: sliding window ``w``: token ``i`` sees ``i-w < j <= i``.
      mask: an explicit ``[b|1, 1, t, s]`` bool mask replacing the causal / window / segment mask.
      impl: ``None`` / ``"xla"`` / ``"cudnn"`` (``jax.nn.dot_product_attention``) or ``"reference"``.

    Returns ``[b, t, heads, d]`` in ``q.dtype``.
    """
    _checks.check_ndim("q", q, 4, "[batch, time, heads, head_dim]")
    _checks.check_ndim("k", k, 4, "[batch, time, kv_heads, head_dim]")
    _checks.check_same_shape("k", k, "v", v)
    _checks.check_choice("impl", impl, (None, "xla", "cudnn", "reference"))
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
    t, s = q.shape[1], k.shape[1]
    if mask is None and (segment_ids is not None or impl == "reference" or not causal):
        if segment_ids is not None:
            _checks.check_shape("segment_ids", segment_ids, (q.shape[0], t), "[batch, time]")
        idx = jnp.arange(s, dtype=jnp.int32)[None]
        seg = None if segment_ids is None else jnp.asarray(segment_ids)
        mask = make_mask(idx[:, s - t :], idx, q_seg=seg, k_seg=seg, window=window, causal=causal)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl == "reference":
        return attention_reference(q, k, v, mask, scale=scale)
    if mask is None:  # plain causal (+ window): let the backend skip masked blocks
        lws = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=lws, implementation=impl
        )
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, t, s))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
