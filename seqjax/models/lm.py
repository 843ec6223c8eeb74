"""Language models whose stack is a repeated layer pattern over attention and any registered mixer.

``LMConfig(pattern=("mamba2", "mamba2", "mamba2", "attention"), num_layers=8)`` builds
``embed -> [Layer(mamba2), Layer(mamba2), Layer(mamba2), Layer(attention)] x 2 -> RMSNorm -> head``,
each ``Layer`` being ``x + mixer(norm(x))`` then ``x + SwiGLU(norm(x))`` (``seqjax.models.blocks``).

Pattern names: any name in the mixer registry (``seqjax.mixers.names()``): ``"attention"`` (global causal
softmax attention with RoPE / GQA / QK-norm), ``"swa"`` (the same with a sliding window ``cfg.window``,
ring-buffer cache), the Titans blocks ``"titans_mag"`` / ``"titans_mal"`` / ``"titans_mac"``, ``"mamba2"``,
``"gla"``, ... Each is built as ``spec.layer(d_model, rngs=..., dtype=..., **fields, **cfg.mixer_kwargs[name])``
where ``fields`` are the config fields the spec names in ``lm_config`` (e.g. ``num_heads``, ``window``)
that are not ``None``; layers whose spec says ``takes_positions`` also receive the RoPE positions.

Scanned stack: the pattern repeats ``num_layers // len(pattern)`` times; these super-blocks are created
stacked (``nnx.vmap``, parameters get a leading ``layers`` logical axis) and applied with
``jax.lax.scan`` (compile time independent of depth), optionally under ``jax.checkpoint``
(``remat="full"`` saves nothing, ``"dots"`` saves matmuls without batch dims). Leftover layers
(``num_layers % len(pattern)``) and the whole stack when ``scan_layers=False`` run unrolled.

Packed sequences: ``segment_ids [b, t]`` go to every layer (attention masks, recurrent-state resets);
positions restart at each document. With a cache, positions and segments continue from it.

Embeddings: ``"standard"`` (a learned table, tied or untied head) or ``"lexinvariant"`` (Huang et al.
2023): each sequence draws its own Gaussian embedding per token id, shared by input and output; the key
comes from ``embed_key`` (one per batch row is derived from it), the cache, or the module's
``lexinvariant`` RNG stream.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks, mixers, sharding
from seqjax.attention.attention import positions_from_segment_ids
from seqjax.models.blocks import Layer, swiglu_hidden
from seqjax.nn import RMSNorm

__all__ = ["LMConfig", "LM", "LMCache", "layer_names", "build_layer"]

REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    pattern: tuple[str, ...] = ("mamba2", "mamba2", "mamba2", "attention")  # repeated to num_layers
    num_heads: int = 4
    num_kv_heads: int | None = None  # GQA; None = num_heads
    mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * 2/3 * d_model rounded up to a multiple of 8; 0 = no MLP
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype ("bfloat16"); params always float32
    remat: str = "none"  # "none" | "full" | "dots" (jax.checkpoint policies)
    scan_layers: bool = True  # stack repeating super-blocks and scan over them
    window: int | None = None  # sliding window for "swa" layers
    rope_theta: float = 10000.0
    qk_norm: bool = False
    embedding: str = "standard"  # or "lexinvariant"
    # per-layer-name extra keyword arguments, e.g. {"gla": {"chunk_size": 128}}
    mixer_kwargs: dict[str, dict[str, int | float | bool | str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "pattern", tuple(self.pattern))
        if not self.pattern:
            raise ValueError("pattern must name at least one layer")
        _checks.check_choice("remat", self.remat, tuple(REMAT_POLICIES))
        _checks.check_choice("embedding", self.embedding, ("standard", "lexinvariant"))
        _checks.check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    def __hash__(self):  # mixer_kwargs is a dict: hash its items so the config can be static
        return hash(tuple((f.name, _freeze(getattr(self, f.name))) for f in dataclasses.fields(self)))

    @property
    def layer_names(self) -> tuple[str, ...]:
        return layer_names(self)


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def layer_names(cfg: LMConfig) -> tuple[str, ...]:
    """The pattern repeated (and truncated) to ``num_layers`` names."""
    reps = math.ceil(cfg.num_layers / len(cfg.pattern))
    return (cfg.pattern * reps)[: cfg.num_layers]


def _check_names(cfg: LMConfig):
    registered = mixers.names()
    for name in set(cfg.pattern):
        if name not in registered:
            raise ValueError(f"unknown layer {name!r} in pattern {cfg.pattern}; known: {registered}")
    if any("num_heads" in mixers.get(n).lm_config for n in cfg.pattern):
        kv = cfg.num_kv_heads or cfg.num_heads
        _checks.check_divisible("d_model", cfg.d_model, "num_heads", cfg.num_heads)
        _checks.check_divisible("num_heads", cfg.num_heads, "num_kv_heads", kv)


def build_layer(cfg: LMConfig, name: str, rngs: nnx.Rngs) -> Layer:
    """One residual layer with mixer ``name`` (see the module docstring)."""
    spec = mixers.get(name)
    if spec.layer is None:
        raise ValueError(f"mixer {name!r} has no NNX layer")
    dtype = jnp.dtype(cfg.dtype)
    kw = {f: getattr(cfg, f) for f in spec.lm_config if getattr(cfg, f) is not None}
    kw.update(dtype=dtype, **cfg.mixer_kwargs.get(name, {}))
    mixer = spec.layer(cfg.d_model, rngs=rngs, **kw)
    hidden = swiglu_hidden(cfg.d_model, cfg.mlp_ratio)
    return Layer(cfg.d_model, mixer, hidden, takes_positions=spec.takes_positions, dtype=dtype, rngs=rngs)


class LMCache(NamedTuple):
    """The LM's decode cache: the stream ``index`` (tokens consumed), the next RoPE position and the last
    segment id per row, the per-layer caches (``blocks``: stacked ``[repeats, ...]`` for the scanned
    super-blocks; ``tail``: one per unrolled layer) and, for lexinvariant embeddings, the embedding key."""

    index: Any  # [] int32
    next_pos: Any  # [b] int32
    last_seg: Any  # [b] int32
    blocks: Any  # a tuple of layer caches per super-block layer, stacked over repeats, or None
    tail: Any  # a tuple of layer caches
    embed_key: Any = None  # a PRNG key (lexinvariant embeddings)


class SuperBlock(nnx.Module):
    """One period of the pattern: a list of layers applied in order."""

    def __init__(self, cfg: LMConfig, names, rngs: nnx.Rngs):
        self.layers = nnx.List([build_layer(cfg, n, rngs) for n in names])

    def __call__(self, x, caches, **kw):
        out = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cache=None if caches is None else caches[i], **kw)
            out.append(c)
        return x, (None if caches is None else tuple(out))

    def init_cache(self, batch_size, max_len):
        return tuple(layer.init_cache(batch_size, max_len) for layer in self.layers)


class LM(nnx.Module):
    """A causal language model over a layer pattern. See the module docstring.

    ``logits, cache = lm(tokens [b, t] int, segment_ids=None, positions=None, cache=None)``; logits are
    float32 ``[b, t, vocab]``; ``cache`` is ``None`` without an input cache.
    """

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        _check_names(cfg)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        names = layer_names(cfg)
        period = len(cfg.pattern)
        self.num_repeats = cfg.num_layers // period if cfg.scan_layers else 0
        if self.num_repeats:

            @nnx.split_rngs(splits=self.num_repeats)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return SuperBlock(cfg, cfg.pattern, r)

            self.blocks = make(rngs)
        else:
            self.blocks = None
        self.tail = nnx.List([build_layer(cfg, n, rngs) for n in names[self.num_repeats * period :]])
        d, v = cfg.d_model, cfg.vocab_size
        if cfg.embedding == "standard":
            self.embed = nnx.Param(nnx.initializers.normal(d**-0.5)(rngs.params(), (v, d)), out_sharding=("vocab", "embed"))
            self.lex_rngs = None
        else:
            self.embed = None
            self.lex_rngs = nnx.Rngs(lexinvariant=rngs.params())
        self.final_norm = RMSNorm(d)
        untied = cfg.embedding == "standard" and not cfg.tie_embeddings
        self.head = (
            nnx.Param(nnx.initializers.normal(d**-0.5)(rngs.params(), (d, v)), out_sharding=("embed", "vocab"))
            if untied
            else None
        )

    # -- embeddings --------------------------------------------------------------------------
    def _table(self, batch: int, key):
        """``[vocab, d]`` (standard) or ``[b, vocab, d]`` (lexinvariant, one table per row)."""
        if self.embed is not None:
            return self.embed[...]
        keys = jax.random.split(key, batch)
        d, v = self.cfg.d_model, self.cfg.vocab_size
        return jax.vmap(lambda k: jax.random.normal(k, (v, d), jnp.float32))(keys) * d**-0.5

    def _apply(self, layer, x, cache, kw):
        """Run one layer / super-block, under ``jax.checkpoint`` if ``cfg.remat`` asks for it."""
        if self.cfg.remat == "none":
            return layer(x, cache, **kw) if isinstance(layer, SuperBlock) else layer(x, cache=cache, **kw)
        graphdef, state = nnx.split(layer)

        def f(state, x, cache):
            mod = nnx.merge(graphdef, state)
            return mod(x, cache, **kw) if isinstance(mod, SuperBlock) else mod(x, cache=cache, **kw)

        return jax.checkpoint(f, policy=REMAT_POLICIES[self.cfg.remat])(state, x, cache)

    # -- forward -----------------------------------------------------------------------------
    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None, embed_key=None):
        _checks.check_ndim("tokens", tokens, 2, "[batch, time]")
        _checks.check_dtype("tokens", tokens, "int")
        b, t = tokens.shape
        if segment_ids is not None:
            _checks.check_shape("segment_ids", segment_ids, (b, t), "[batch, time]")
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if positions is not None:
            _checks.check_shape("positions", positions, (b, t), "[batch, time]")
        # segments and RoPE positions of this block's tokens (continuing the cached stream)
        if cache is None:
            seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
            if positions is None:
                positions = positions_from_segment_ids(seg)
        else:
            seg = jnp.broadcast_to(cache.last_seg[:, None], (b, t)) if segment_ids is None else segment_ids
            if positions is None:
                positions = positions_from_segment_ids(seg, prev_seg=cache.last_seg, offset=cache.next_pos)
        if self.embed is None and embed_key is None:
            embed_key = cache.embed_key if cache is not None else self.lex_rngs.lexinvariant()
        table = self._table(b, embed_key)
        if table.ndim == 2:
            x = jnp.take(table, tokens, axis=0)
        else:
            x = jnp.take_along_axis(table, tokens[:, :, None], axis=1)
        x = sharding.constrain(x.astype(self.dtype), ("batch", "length", "embed"))
        kw = dict(segment_ids=segment_ids, positions=positions)

        block_caches = None
        if self.blocks is not None:
            graphdef, state = nnx.split(self.blocks)
            policy = REMAT_POLICIES[self.cfg.remat]

            def body(x, xs):
                st, c = xs
                return nnx.merge(graphdef, st)(x, c, **kw)

            if self.cfg.remat != "none":
                body = jax.checkpoint(body, policy=policy)
            x, block_caches = jax.lax.scan(body, x, (state, None if cache is None else cache.blocks))
        tail_caches = []
        for i, layer in enumerate(self.tail):
            x, c = self._apply(layer, x, None if cache is None else cache.tail[i], kw)
            tail_caches.append(c)
        new_cache = None
        if cache is not None:
            new_cache = cache._replace(
                index=cache.index + t,
                next_pos=positions[:, -1] + 1,
                last_seg=seg[:, -1],
                blocks=block_caches,
                tail=tuple(tail_caches),
            )

        x = self.final_norm(x)
        if self.head is not None:
            w = self.head[...].astype(self.dtype)
            logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
        elif table.ndim == 2:
            logits = jnp.einsum("btd,vd->btv", x, table.astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,bvd->btv", x, table.astype(self.dtype), preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits, new_cache

    # -- cache -------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int) -> LMCache:
        """The mixed decode cache (:class:`LMCache`): a cache per layer (a KV cache or ring buffer per
        attention layer, recurrent and short-conv states per recurrent mixer)."""
        blocks = None
        if self.blocks is not None:
            graphdef, state = nnx.split(self.blocks)
            # per repeat (a mixer's initial state may be a learned parameter, e.g. Titans' memory)
            blocks = jax.vmap(lambda st: nnx.merge(graphdef, st).init_cache(batch_size, max_len))(state)
        return LMCache(
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch_size,), jnp.int32),
            last_seg=jnp.zeros((batch_size,), jnp.int32),
            blocks=blocks,
            tail=tuple(layer.init_cache(batch_size, max_len) for layer in self.tail),
            embed_key=None if self.embed is not None else self.lex_rngs.lexinvariant(),
        )
