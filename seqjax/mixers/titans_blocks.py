"""Titans blocks (Behrouz, Zhong, Mirrokni 2024): the neural long-term memory
(``seqjax.mixers.titans.NeuralMemory``) combined with attention and persistent memory tokens.

- **MAG** (memory as a gate): ``o = RMSNorm(SWA*(x)) * sigmoid(RMSNorm(M(x)))``, where ``SWA*`` is
  sliding-window attention whose keys also include ``N_p`` learned persistent tokens.
- **MAL** (memory as a layer): ``o = SWA*(M(x))``.
- **MAC** (memory as context): the sequence is cut into segments of ``C`` tokens. For segment ``s``
  with the memory ``M_{s-1}`` as left by the previous segments, each token ``i`` retrieves
  ``h_i = M*_{s-1}(q_i)`` (a read, no write); token ``j`` attends over the persistent tokens and over
  ``h_i`` and ``x_i`` for ``i <= j`` in its segment (the paper's ``[P || h || S]`` with the causal mask
  applied to the retrieved tokens too, so no token sees a later token's query); the attention output
  ``y`` is written into the memory (``M_s``) and ``o = y * sigmoid(RMSNorm(M_s(y)))``. Decoding keeps
  the segment's ``[h | x]`` keys / values (``C`` slots), the memory as the previous segments left it (for
  retrieval) and as written so far; prefill is the same token by token (a ``lax.scan``).

The blocks are registered mixers (``"titans_mag"``, ``"titans_mal"``, ``"titans_mac"``) with a layer only:
their functional parts are the registered ``"titans"`` memory and softmax attention.
``y, cache = layer(x, segment_ids=..., positions=..., cache=...)``; in the LM their options come from
``LMConfig.mixer_kwargs[name]`` (``window``, ``num_persistent``, ``chunk``, ``memory`` kwargs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax.attention.attention import Attention, positions_from_segment_ids
from seqjax.layer import update
from seqjax.mixers.registry import MixerSpec, register
from seqjax.mixers.titans import NeuralMemory
from seqjax.nn import Linear, RMSNorm, l2_normalize, merge_heads, split_heads
from seqjax.ops.attention import attention
from seqjax.types import Array, Cache, Hidden, Int, SegmentIds

__all__ = ["TitansCache", "MACCache", "MAG", "MAL", "MAC"]


class TitansCache(NamedTuple):
    """MAG's and MAL's decode cache: the attention's (a ring buffer with a window) and the memory's."""

    attn: Any
    memory: Any


class MACCache(NamedTuple):
    """MAC's decode cache: the current segment's keys / values of ``[h | x]`` (``chunk`` slots each), the slot
    index, and the memory twice: as the previous segments left it (read) and as written so far (write)."""

    kh: Any  # [b, chunk, kv_heads, head_dim]
    vh: Any
    kx: Any
    vx: Any
    slot: Any  # [] int32
    mem_start: Any  # NeuralMemory cache
    mem: Any  # NeuralMemory cache
    next_pos: Any  # [b] int32: the RoPE position of the next token


class _Titans(nnx.Module):
    """Attention with persistent tokens beside a neural memory (the parts MAG, MAL and MAC share)."""

    def __init__(self, d_model, *, num_heads=4, num_kv_heads=None, window=64, num_persistent=4, rope_theta=10000.0,
                 qk_norm=False, memory=None, dtype=jnp.float32, rngs: nnx.Rngs):
        self.attn = Attention(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, window=window,
                              num_persistent=num_persistent, rope_theta=rope_theta, qk_norm=qk_norm, dtype=dtype,
                              rngs=rngs)
        self.memory = NeuralMemory(d_model, rngs=rngs, **(memory or {}))

    def init_cache(self, batch_size: int, max_len: int) -> TitansCache:
        return TitansCache(self.attn.init_cache(batch_size, max_len), self.memory.init_cache(batch_size, max_len))


class MAG(_Titans):
    """Memory as a gate: ``RMSNorm(SWA*(x)) * sigmoid(RMSNorm(M(x)))``."""

    def __init__(self, d_model, **kw):
        super().__init__(d_model, **kw)
        self.norm_a, self.norm_m = RMSNorm(d_model), RMSNorm(d_model)

    def __call__(
        self,
        x: Hidden,
        *,
        segment_ids: SegmentIds | None = None,
        positions: Int[Array, "b t"] | None = None,
        cache: Cache = None,
    ) -> tuple[Hidden, Cache]:
        ca, cm = (None, None) if cache is None else cache
        ya, ca = self.attn(x, segment_ids=segment_ids, positions=positions, cache=ca)
        ym, cm = self.memory(x, segment_ids=segment_ids, cache=cm)
        y = self.norm_a(ya) * jax.nn.sigmoid(self.norm_m(ym))
        return y, update(cache, attn=ca, memory=cm)


class MAL(_Titans):
    """Memory as a layer: ``SWA*(M(x))``."""

    def __call__(
        self,
        x: Hidden,
        *,
        segment_ids: SegmentIds | None = None,
        positions: Int[Array, "b t"] | None = None,
        cache: Cache = None,
    ) -> tuple[Hidden, Cache]:
        ca, cm = (None, None) if cache is None else cache
        ym, cm = self.memory(x, segment_ids=segment_ids, cache=cm)
        y, ca = self.attn(ym, segment_ids=segment_ids, positions=positions, cache=ca)
        return y, update(cache, attn=ca, memory=cm)


class MAC(_Titans):
    """Memory as context (training form), segments of ``chunk`` tokens; see the module docstring."""

    def __init__(self, d_model, *, chunk: int = 64, window: int | None = None, rngs: nnx.Rngs, **kw):
        super().__init__(d_model, window=window, rngs=rngs, **kw)
        mem = self.memory
        self.chunk = chunk
        self.q_mem = Linear(d_model, mem.num_heads * mem.head_dim, axes=("embed", "heads"), rngs=rngs)
        self.norm_m = RMSNorm(d_model)

    def retrieve(self, mem_cache, x):
        """``h = M*(q)`` mapped back to ``d_model`` (through the memory's output norm / projection)."""
        q = l2_normalize(split_heads(self.q_mem(x), self.memory.num_heads))
        h = self.memory.retrieve(mem_cache, q)
        return self.memory.o_proj(self.memory.norm(merge_heads(h))).astype(x.dtype)

    def _segment(self, mem_cache, x, positions):
        """One segment ``x [b, c, d]`` -> ``(o, new memory cache)``."""
        attn, c = self.attn, x.shape[1]
        h = self.retrieve(mem_cache, x)
        q, kx, vx = attn.qkv(x, positions)
        _, kh, vh = attn.qkv(h, positions)
        i = jnp.arange(c)
        causal = (i[None, :] <= i[:, None])[None, None]  # [1, 1, c, c]
        mask = jnp.concatenate([causal, causal], axis=3)
        k, v, mask = attn.with_persistent(jnp.concatenate([kh, kx], 1), jnp.concatenate([vh, vx], 1), mask)
        y = attn.out(attention(q, k, v, mask=mask, impl=attn.impl)).astype(x.dtype)
        ym, mem_cache = self.memory(y, cache=mem_cache)
        return y * jax.nn.sigmoid(self.norm_m(ym)), mem_cache

    def _token(self, cache, x, pos):
        """Decode one token ``x [b, 1, d]`` at positions ``pos [b, 1]``: the training form's arithmetic for
        the token at slot ``cache.slot`` of its segment."""
        attn, c = self.attn, self.chunk
        h = self.retrieve(cache.mem_start, x)  # read from the memory as the previous segments left it
        q, kx, vx = attn.qkv(x, pos)
        _, kh, vh = attn.qkv(h, pos)
        slot = cache.slot

        def put(buf, new):
            return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), slot, axis=1)

        kh, vh, kx, vx = put(cache.kh, kh), put(cache.vh, vh), put(cache.kx, kx), put(cache.vx, vx)
        seen = (jnp.arange(c) <= slot)[None, None, None, :]  # the segment's tokens so far, [h | x] halves
        k, v, mask = attn.with_persistent(jnp.concatenate([kh, kx], 1), jnp.concatenate([vh, vx], 1),
                                  jnp.concatenate([seen, seen], axis=3))
        y = attn.out(attention(q, k, v, mask=mask, impl=attn.impl)).astype(x.dtype)
        ym, mem = self.memory(y, cache=cache.mem)  # write y (token by token, as the training form does)
        end = slot + 1 == c  # the segment is complete: later retrievals read the memory written so far
        mem_start = jax.tree.map(lambda new, old: jnp.where(end, new, old), mem, cache.mem_start)
        new = MACCache(kh, vh, kx, vx, jnp.where(end, 0, slot + 1), mem_start, mem, pos[:, 0] + 1)
        return y * jax.nn.sigmoid(self.norm_m(ym)), new

    def _decode(self, x, positions, cache):
        """Prefill or decode ``x [b, t, d]`` from ``cache`` (a scan of :meth:`_token`)."""
        graphdef, state = nnx.split(self)

        def body(cache, xs):
            x1, p1 = xs
            o, cache = nnx.merge(graphdef, state)._token(cache, x1[:, None], p1[:, None])
            return cache, o[:, 0]

        cache, o = jax.lax.scan(body, cache, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(positions, 1, 0)))
        return jnp.moveaxis(o, 0, 1), cache

    def __call__(
        self,
        x: Hidden,
        *,
        segment_ids: SegmentIds | None = None,
        positions: Int[Array, "b t"] | None = None,
        cache: Cache = None,
    ) -> tuple[Hidden, Cache]:
        if segment_ids is not None:
            raise ValueError("titans_mac does not take segment_ids (packed sequences)")
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        b, t, d = x.shape
        c = self.chunk
        n = -(-t // c)
        if positions is None:  # one document, continued from the cache
            offset = None if cache is None else cache.next_pos
            positions = positions_from_segment_ids(jnp.zeros((b, t), jnp.int32), offset=offset,
                                                   prev_seg=None if cache is None else jnp.zeros((b,), jnp.int32))
        if cache is not None:
            return self._decode(x, positions, cache)
        xp = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0))).reshape(b, n, c, d)
        pp = jnp.pad(positions, ((0, 0), (0, n * c - t)), mode="edge").reshape(b, n, c)
        graphdef, state = nnx.split(self)

        def body(mem_cache, xs):
            o, mem_cache = nnx.merge(graphdef, state)._segment(mem_cache, *xs)
            return mem_cache, o

        mem0 = self.memory.init_cache(b, c)
        _, o = jax.lax.scan(body, mem0, (jnp.moveaxis(xp, 1, 0), jnp.moveaxis(pp, 1, 0)))
        return jnp.moveaxis(o, 0, 1).reshape(b, n * c, d)[:, :t], None

    def init_cache(self, batch_size: int, max_len: int) -> MACCache:
        """An empty :class:`MACCache`. ``max_len`` is not needed: the cache is O(chunk), whatever the length."""
        del max_len
        attn = self.attn
        kv = jnp.zeros((batch_size, self.chunk, attn.num_kv_heads, attn.head_dim), attn.dtype)
        mem = self.memory.init_cache(batch_size, self.chunk)
        return MACCache(kv, kv, kv, kv, jnp.zeros((), jnp.int32), mem, mem, jnp.zeros((batch_size,), jnp.int32))


_ATTENTION_CONFIG = ("num_heads", "num_kv_heads", "rope_theta", "qk_norm")
_PAPER = "https://arxiv.org/abs/2501.00663"
register(MixerSpec(
    name="titans_mag", layer=MAG, lm_config=_ATTENTION_CONFIG + ("window",), takes_positions=True, paper=_PAPER,
    doc="Titans memory as a gate (Behrouz et al. 2024): RMSNorm(SWA*(x)) * sigmoid(RMSNorm(M(x)))",
))
register(MixerSpec(
    name="titans_mal", layer=MAL, lm_config=_ATTENTION_CONFIG + ("window",), takes_positions=True, paper=_PAPER,
    doc="Titans memory as a layer (Behrouz et al. 2024): SWA*(M(x))",
))
register(MixerSpec(
    name="titans_mac", layer=MAC, lm_config=_ATTENTION_CONFIG, takes_positions=True, paper=_PAPER,
    doc="Titans memory as context (Behrouz et al. 2024): segments attend over [persistent | retrieved | input]",
))
