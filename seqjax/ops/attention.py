r"""Softmax attention as a function: the mask, the plain float32 reference and the backend choice.

Math (per head ``n``, query position ``i``, key position ``j``)::

    o_i = sum_j softmax_j(q_i . k_j / sqrt(d) + mask_ij) v_j
    mask_ij = 0 if  j <= i  and  i - j < window  and  seg_i == seg_j  else -inf

Query head ``n`` reads key/value head ``n // (num_heads / num_kv_heads)`` (GQA, Ainslie et al. 2023).
Layout: ``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]``; time on axis 1.

:func:`attention` runs one of five backends (``impl=``):

- ``"cudnn"``: cuDNN's flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``), GPU only;
- ``"splash"``: the TPU's splash attention kernel (``seqjax.ops.splash``; interpret mode elsewhere);
- ``"blocked"``: flash attention in plain JAX (``seqjax.ops.flash``): blocked online softmax, recomputing
  backward, no ``[b, h, t, s]`` buffer; any platform;
- ``"xla"``: ``jax.nn.dot_product_attention``'s XLA path, which materialises the float32 scores;
- ``"reference"``: :func:`attention_reference`, a plain float32 einsum softmax used by the tests.

``impl=None`` takes :func:`choose_impl`'s pick for the platform, dtype, shapes and mask. Only ``"xla"`` and
``"reference"`` take an explicit ``mask`` (caches); the others take causality, ``window`` and ``segment_ids``.
The layer (RoPE, projections, caches) is ``seqjax.attention.Attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import _checks
from seqjax import sharding as _sharding
from seqjax.ops.flash import flash_attention
from seqjax.ops.splash import splash_attention
from seqjax.types import AnyArray, Array, Float, Shaped

__all__ = ["make_mask", "attention_reference", "attention", "choose_impl", "platform", "IMPLS", "BLOCKED_MIN_LEN"]

IMPLS = (None, "xla", "cudnn", "reference", "blocked", "splash")
BLOCKED_MIN_LEN = 512  # from here on the blocked form beats XLA forward+backward on the CPU (benchmarks/results/cpu_attention.md)
SPLASH_MIN_LEN = 512  # shorter sequences keep XLA on a TPU (scores of at most 512 x 512 per head)
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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


def platform() -> str:
    """The platform attention is traced for: that of the devices of the innermost
    ``seqjax.sharding.use_rules`` mesh (a TPU topology compiled from a CPU host), else ``jax.default_backend()``."""
    mesh = _sharding.current()[0]
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def cudnn_allowed(dtype, head_dim: int) -> bool:
    """cuDNN's fused attention: bf16 / fp16 and a head dim <= 128 that is a multiple of 8."""
    return jnp.dtype(dtype) in CUDNN_DTYPES and head_dim <= 128 and head_dim % 8 == 0


def choose_impl(
    platform: str,
    dtype,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    *,
    causal: bool = True,
    window: bool = False,
    segments: bool = False,
    offset: bool = False,
    explicit_mask: bool = False,
) -> str:
    """The backend ``impl=None`` runs (a pure function of what it is given).

    - an explicit mask (decode caches, persistent tokens): ``"xla"``;
    - GPU: ``"cudnn"`` for self-attention (``t == s``, no query offset) without segment ids when
      :func:`cudnn_allowed`; otherwise ``"blocked"`` from :data:`BLOCKED_MIN_LEN` on, else ``"xla"``;
    - TPU: ``"splash"`` for self-attention from :data:`SPLASH_MIN_LEN` on (causal, window, segments; with a
      query offset only under context parallelism, which builds its kernel per shard), else ``"xla"`` or
      ``"blocked"`` by length;
    - elsewhere (CPU): ``"blocked"`` from :data:`BLOCKED_MIN_LEN` on, else ``"xla"``.
    """
    t, s, d = q_shape[1], k_shape[1], q_shape[3]
    if explicit_mask:
        return "xla"
    self_attn = t == s and not offset
    if platform == "gpu" and self_attn and not segments and cudnn_allowed(dtype, d) and (causal or not window):
        return "cudnn"
    if platform == "tpu" and self_attn and max(t, s) >= SPLASH_MIN_LEN:
        return "splash"
    return "blocked" if max(t, s) >= BLOCKED_MIN_LEN else "xla"


def attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, window=None, causal=True, mask=None, scale=None,
              impl=None):
    """Causal (optionally windowed, packed) softmax attention over one sequence block.

    Args:
      q: ``[b, t, heads, d]``; k, v: ``[b, s, kv_heads, d]`` with ``heads % kv_heads == 0``; the queries are
        the last ``t`` of the ``s`` positions.
      segment_ids: ``[b, t]`` int; tokens attend only within their own document. ``kv_segment_ids [b, s]``
        are the keys' (default ``segment_ids``, which then needs ``s == t``).
      window: sliding window ``w``: token ``i`` sees ``i-w < j <= i``.
      mask: an explicit ``[b|1, 1, t, s]`` bool mask replacing the causal / window / segment mask
        (``impl`` ``None``, ``"xla"``, ``"cudnn"`` or ``"reference"``).
      impl: ``None`` (:func:`choose_impl`), ``"xla"``, ``"cudnn"``, ``"blocked"``, ``"splash"`` or ``"reference"``.

    Returns ``[b, t, heads, d]`` in ``q.dtype``.
    """
    _checks.check_qkv(q, k, v)
    _checks.check_choice("impl", impl, IMPLS)
    t, s = q.shape[1], k.shape[1]
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got window={window}")
    _checks.check_segment_ids(segment_ids, kv_segment_ids, q.shape[0], t, s)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    if impl is None:
        impl = choose_impl(platform(), q.dtype, q.shape, k.shape, causal=causal, window=window is not None,
                           segments=segment_ids is not None, explicit_mask=mask is not None)
    if mask is not None and impl in ("blocked", "splash"):
        raise ValueError(f"impl={impl!r} takes causal / window / segment_ids, not an explicit mask")
    if impl == "blocked":
        return flash_attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                               kv_segment_ids=kv_segment_ids, q_offset=s - t, scale=scale)
    if impl == "splash":
        return splash_attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                                kv_segment_ids=kv_segment_ids, scale=scale)
    # jax.nn.dot_product_attention's is_causal / local_window_size align the mask top-left (query i sees
    # keys j <= i); the queries here are the last t of the s positions, so that fast path needs t == s
    if mask is None and (segment_ids is not None or impl == "reference" or not causal or t != s):
        idx = jnp.arange(s, dtype=jnp.int32)[None]
        seg = None if segment_ids is None else jnp.asarray(segment_ids)
        kseg = None if segment_ids is None else jnp.asarray(kv_segment_ids)
        mask = make_mask(idx[:, s - t :], idx, q_seg=seg, k_seg=kseg, window=window, causal=causal)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl == "reference":
        return attention_reference(q, k, v, mask, scale=scale)
    if mask is None:  # plain causal (+ window) self-attention: let the backend skip masked blocks
        lws = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=lws, implementation=impl
        )
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, t, s))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
