"""Causal softmax attention for Transformer++ blocks (LLaMA / Yi): RoPE, grouped-query attention,
sliding windows, packed-sequence masks, optional QK-norm, a KV cache and a ring-buffer cache.

Math (per head ``n``, query position ``i``, key position ``j``)::

    o_i = sum_j softmax_j(q_i . k_j / sqrt(d) + mask_ij) v_j
    mask_ij = 0 if  j <= i  and  i - j < window  and  seg_i == seg_j  else -inf

Query head ``n`` reads key/value head ``n // (num_heads / num_kv_heads)`` (GQA, Ainslie et al. 2023).
RoPE (Su et al. 2021) rotates feature pairs ``(x_m, x_{m+d/2})`` by ``pos * theta^(-2m/d)``, with
``pos`` the position inside the token's document.

Layout: ``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]``; time on axis 1.

:func:`attention` is the functional form (``seqjax.ops.attention``, re-exported here). ``impl=None`` picks
the backend by platform, dtype, shapes and mask (``seqjax.ops.attention.choose_impl``): cuDNN's flash
attention on a GPU, the splash kernel on a TPU, blocked flash attention in plain JAX (``seqjax.ops.flash``)
for long sequences elsewhere, XLA's ``jax.nn.dot_product_attention`` otherwise; ``"reference"`` is a plain
float32 einsum softmax used by the tests. Training and prefill pass causality, the window and segment ids;
the decode caches and persistent tokens pass an explicit mask and take the XLA path.

Caches (:class:`Attention.init_cache`) are :class:`KVCache` NamedTuples of arrays::

    k, v   [b, S, kv_heads, d]   keys (already rotated) and values, slot = stream index % S
    pos    [S] int32             stream index of each slot (-1: empty)
    seg    [b, S] int32          segment id of each slot
    index  [] int32              tokens consumed so far (the next stream index)
    next_pos [b] int32           RoPE position of the next token (restarts per document)
    last_seg [b] int32           segment id of the last token

``S = max_len`` for global attention (write, then attend over all slots) and ``S = window`` for
sliding-window attention (:class:`SlidingWindowAttention`): a ring buffer (attend over ``[ring || new]``,
then write the last ``S`` tokens), so the memory of a windowed layer stays constant however long the
generation. Both are registered mixers (``"attention"``, ``"swa"``, ``seqjax.mixers.attention``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax import _checks
from seqjax.layer import plan
from seqjax.nn import RMSNorm
from seqjax.ops import context_parallel as cp
from seqjax.ops.attention import IMPLS, attention, attention_reference, make_mask

__all__ = [
    "rope",
    "positions_from_segment_ids",
    "attention",
    "attention_reference",
    "make_mask",
    "KVCache",
    "Attention",
    "SlidingWindowAttention",
]


def rope(x, positions, *, theta: float = 10000.0):
    """Rotary position embedding (rotate-half form) of ``x [b, t, h, d]`` at ``positions [b, t]``.

    ``y_m = x_m cos(p w_m) - x_{m+d/2} sin(p w_m)``, ``y_{m+d/2} = x_{m+d/2} cos(p w_m) + x_m sin(p w_m)``
    with ``w_m = theta^(-2m/d)``; computed in float32, returned in ``x.dtype``.
    """
    _checks.check_ndim("x", x, 4, "[batch, time, heads, head_dim]")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    positions = jnp.broadcast_to(jnp.asarray(positions), x.shape[:2])
    inv = theta ** (-np.arange(0, d // 2, dtype=np.float32) * 2.0 / d)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)[None, None, :]  # [b, t, d/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def positions_from_segment_ids(segment_ids, *, prev_seg=None, offset=None):
    """Position of each token inside its document: ``[b, t]`` int32.

    Positions restart at 0 at each change of segment id. ``prev_seg [b]`` / ``offset [b]`` continue a
    cached stream: tokens before the first change of id (relative to ``prev_seg``) start at ``offset``.
    """
    seg = jnp.asarray(segment_ids)
    b, t = seg.shape
    idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    if prev_seg is None:
        first = jnp.ones((b, 1), bool)
    else:
        first = (seg[:, :1] != prev_seg[:, None])
    starts = jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, -1), axis=1)
    base = jnp.zeros((b, 1), jnp.int32) if offset is None else offset[:, None].astype(jnp.int32)
    return jnp.where(start_idx >= 0, idx - start_idx, base + idx).astype(jnp.int32)


def _init(std):
    return nnx.initializers.normal(stddev=std)


class KVCache(NamedTuple):
    """An attention layer's decode cache (see the module docstring)."""

    k: Any  # [b, S, kv_heads, d]
    v: Any  # [b, S, kv_heads, d]
    pos: Any  # [S] int32, -1: empty
    seg: Any  # [b, S] int32
    index: Any  # [] int32
    next_pos: Any  # [b] int32
    last_seg: Any  # [b] int32


class Attention(nnx.Module):
    """Multi-head causal self-attention with RoPE, GQA, optional sliding window and QK-norm.

    ``y, cache = layer(x, segment_ids=None, positions=None, cache=None)`` with ``x, y [b, t, d_model]``
    (the sequence-layer protocol of ``seqjax.layer`` plus ``positions``). Positions default to the position inside each
    document (from ``segment_ids``, continued from the cache while decoding).

    Parameters (float32, logical axes): ``wq [embed, heads, head_dim]``, ``wk``/``wv
    [embed, kv_heads, head_dim]``, ``wo [heads, head_dim, embed]``. ``num_persistent > 0`` adds
    learned persistent-memory tokens ``[n, embed]`` (Titans): their keys / values (no RoPE) are
    visible to every query, past the window and across documents.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window: int | None = None,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        dtype=jnp.float32,
        impl: str | None = None,
        num_persistent: int = 0,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_kv_heads or num_heads
        _checks.check_divisible("num_heads", num_heads, "num_kv_heads", num_kv_heads)
        if head_dim is None:
            _checks.check_divisible("d_model", d_model, "num_heads", num_heads)
            head_dim = d_model // num_heads
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive int or None, got {window}")
        _checks.check_choice("impl", impl, IMPLS)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.window, self.rope_theta, self.dtype, self.impl = window, rope_theta, jnp.dtype(dtype), impl
        # caches and persistent tokens need an explicit mask, which only the XLA / reference paths take
        self.mask_impl = impl if impl in ("xla", "cudnn", "reference") else None
        std_in, std_out = d_model**-0.5, (num_heads * head_dim) ** -0.5
        key = rngs.params
        self.wq = nnx.Param(_init(std_in)(key(), (d_model, num_heads, head_dim)), out_sharding=("embed", "heads", "head_dim"))
        self.wk = nnx.Param(_init(std_in)(key(), (d_model, num_kv_heads, head_dim)), out_sharding=("embed", "kv_heads", "head_dim"))
        self.wv = nnx.Param(_init(std_in)(key(), (d_model, num_kv_heads, head_dim)), out_sharding=("embed", "kv_heads", "head_dim"))
        self.wo = nnx.Param(_init(std_out)(key(), (num_heads, head_dim, d_model)), out_sharding=("heads", "head_dim", "embed"))
        # persistent memory (Titans): learned tokens every query sees, whatever the window / document
        self.persistent = (
            nnx.Param(_init(1.0)(key(), (num_persistent, d_model)), out_sharding=(None, "embed")) if num_persistent else None
        )
        self.q_norm = RMSNorm(head_dim, axis_name="head_dim") if qk_norm else None
        self.k_norm = RMSNorm(head_dim, axis_name="head_dim") if qk_norm else None

    # -- pieces (also used by recipes.py) ---------------------------------------------------------
    def qkv(self, x, positions):
        """Projected, normed and rotated ``q [b,t,h,d]``, ``k, v [b,t,kvh,d]`` in the compute dtype."""
        dt = self.dtype
        xc = x.astype(dt)
        q = jnp.einsum("btd,dhk->bthk", xc, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", xc, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", xc, self.wv[...].astype(dt))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, positions, theta=self.rope_theta)
        k = rope(k, positions, theta=self.rope_theta)
        return q, k, v

    def with_persistent(self, k, v, mask):
        """Prepend the persistent tokens' keys / values (no RoPE), visible to every query."""
        if self.persistent is None:
            return k, v, mask
        dt, b, t = self.dtype, k.shape[0], mask.shape[2]
        p = self.persistent[...].astype(dt)
        pk = jnp.einsum("nd,dhk->nhk", p, self.wk[...].astype(dt))
        pv = jnp.einsum("nd,dhk->nhk", p, self.wv[...].astype(dt))
        if self.k_norm is not None:
            pk = self.k_norm(pk)
        n = p.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(pk[None], (b, *pk.shape)).astype(k.dtype), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(pv[None], (b, *pv.shape)).astype(v.dtype), v], axis=1)
        mask = jnp.broadcast_to(mask, (b, 1, t, mask.shape[3]))
        mask = jnp.concatenate([jnp.ones((b, 1, t, n), bool), mask], axis=3)
        return k, v, mask

    def out(self, o):
        dt = self.dtype
        return jnp.einsum("bthk,hkd->btd", o.astype(dt), self.wo[...].astype(dt))

    # -- forward -------------------------------------------------------------------------------
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        b, t, _ = x.shape
        if cache is None:
            if positions is None:
                seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
                positions = positions_from_segment_ids(seg)
            q, k, v = self.qkv(x, positions)
            mesh = plan(x, cache=cache, context_parallel=self.persistent is None and self.window is None).mesh
            if mesh is not None:
                # time is split over the mesh's `context` axis: queries stay local, K/V are all-gathered
                o = cp.attention_context_parallel(q, k, v, mesh=mesh, segment_ids=segment_ids, impl=self.impl)
            elif self.persistent is None:
                o = attention(q, k, v, segment_ids=segment_ids, window=self.window, impl=self.impl)
            else:
                idx = jnp.arange(t, dtype=jnp.int32)[None]
                mask = make_mask(idx, idx, q_seg=segment_ids, k_seg=segment_ids, window=self.window)
                kk, vv, mask = self.with_persistent(k, v, mask)
                o = attention(q, kk, vv, mask=mask, impl=self.mask_impl)
            return self.out(o).astype(x.dtype), None

        index = cache.index
        seg = (
            jnp.broadcast_to(cache.last_seg[:, None], (b, t))
            if segment_ids is None
            else jnp.asarray(segment_ids, jnp.int32)
        )
        if positions is None:
            positions = positions_from_segment_ids(seg, prev_seg=cache.last_seg, offset=cache.next_pos)
        q, k, v = self.qkv(x, positions)
        q_idx = (index + jnp.arange(t, dtype=jnp.int32))[None]
        size = cache.k.shape[1]
        kc, vc = cache.k.astype(k.dtype), cache.v.astype(v.dtype)
        if self.window is None:  # global: write, then attend over all slots
            kc = jax.lax.dynamic_update_slice(kc, k, (0, index, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v, (0, index, 0, 0))
            kpos = jax.lax.dynamic_update_slice(cache.pos, q_idx[0], (index,))
            kseg = jax.lax.dynamic_update_slice(cache.seg, seg, (0, index))
            mask = make_mask(q_idx, kpos[None], q_seg=seg, k_seg=kseg)
            kk, vv, mask = self.with_persistent(kc, vc, mask)
            o = attention(q, kk, vv, mask=mask, impl=self.mask_impl)
        else:  # ring buffer: attend over [ring || new], then keep the last `size` tokens
            k_all, v_all = jnp.concatenate([kc, k], 1), jnp.concatenate([vc, v], 1)
            pos_all = jnp.concatenate([cache.pos, q_idx[0]])
            seg_all = jnp.concatenate([cache.seg, seg], 1)
            mask = make_mask(q_idx, pos_all[None], q_seg=seg, k_seg=seg_all, window=self.window)
            k_all, v_all, mask = self.with_persistent(k_all, v_all, mask)
            o = attention(q, k_all, v_all, mask=mask, impl=self.mask_impl)
            m = min(t, size)
            slots = (index + t - m + jnp.arange(m, dtype=jnp.int32)) % size
            kc = kc.at[:, slots].set(k[:, t - m :])
            vc = vc.at[:, slots].set(v[:, t - m :])
            kpos = cache.pos.at[slots].set(q_idx[0, t - m :])
            kseg = cache.seg.at[:, slots].set(seg[:, t - m :])
        new = KVCache(
            k=kc.astype(cache.k.dtype),
            v=vc.astype(cache.v.dtype),
            pos=kpos,
            seg=kseg,
            index=index + t,
            next_pos=positions[:, -1] + 1,
            last_seg=seg[:, -1],
        )
        return self.out(o).astype(x.dtype), new

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache: ``max_len`` slots (global) or a ``min(window, max_len)`` ring buffer."""
        size = max_len if self.window is None else min(self.window, max_len)
        dtype = self.dtype if dtype is None else dtype
        kv = (batch_size, size, self.num_kv_heads, self.head_dim)
        return KVCache(
            k=jnp.zeros(kv, dtype),
            v=jnp.zeros(kv, dtype),
            pos=jnp.full((size,), -1, jnp.int32),
            seg=jnp.zeros((batch_size, size), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch_size,), jnp.int32),
            last_seg=jnp.zeros((batch_size,), jnp.int32),
        )


class SlidingWindowAttention(Attention):
    """Attention over the last ``window`` tokens (Beltagy et al. 2020); its decode cache is a ring buffer of
    ``window`` slots. ``window`` has no default: in the LM it is ``LMConfig.window``."""

    def __init__(self, d_model: int, *, window: int | None = None, **kw):
        if window is None:
            raise ValueError('sliding-window attention needs a window (LMConfig.window for "swa" layers)')
        super().__init__(d_model, window=window, **kw)
