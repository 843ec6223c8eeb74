"""Decode throughput and cache memory vs context length: hybrid Mamba-2/attention vs attention-only.

For each context length L the cache is sized ``L + steps`` and positioned at ``L`` (a decode step's
cost does not depend on the cached values), then ``steps`` jitted decode steps are timed. Both models
are measured side by side in one run; the table prints tokens/s, cache MiB and the hybrid/attention
ratios. Attention layers attend over the whole ``max_len`` cache, so their per-token cost grows with
L; Mamba-2 layers carry a fixed-size state.

    python benchmarks/generate.py --quick          # L = 1k, 2k, 4k
    python benchmarks/generate.py                  # L = 1k ... 32k
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import cli
from seqjax.attention.attention import KVCache
from seqjax.models import LM, LMConfig
from seqjax.models.generate import decode_fns


def cache_bytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def positioned_cache(model, batch, length, steps):
    cache = model.init_cache(batch, length + steps)
    cache = cache._replace(index=jnp.asarray(length, jnp.int32), next_pos=jnp.full((batch,), length, jnp.int32))

    def fix(c):  # attention layers: mark the first L slots as filled, set their index
        if not isinstance(c, KVCache):
            return c
        slots = jnp.arange(c.pos.shape[-1])
        pos = jnp.where(slots < length, slots, -1).astype(c.pos.dtype) * jnp.ones_like(c.pos)
        return c._replace(pos=pos, index=jnp.full_like(c.index, length))

    def is_kv(c):
        return isinstance(c, KVCache)

    return cache._replace(blocks=jax.tree.map(fix, cache.blocks, is_leaf=is_kv),
                          tail=jax.tree.map(fix, cache.tail, is_leaf=is_kv))


def time_decode(model, batch, length, steps):
    state, _, step = decode_fns(model)
    cache = positioned_cache(model, batch, length, steps)
    mem = cache_bytes(cache)
    tok = jnp.zeros((batch,), jnp.int32)
    logits, cache = step(state, tok, cache)  # compile + warm up
    logits.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = step(state, tok, cache)
    logits.block_until_ready()
    dt = time.perf_counter() - t0
    return batch * steps / dt, mem


def n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclasses.dataclass
class Args:
    quick: bool = False  # contexts 1k, 2k, 4k only
    d_model: int = 256
    num_layers: int = 4
    batch: int = 1
    steps: int = 32  # decode steps timed per context length
    dtype: str = "float32"


def main(argv=None):
    args = cli.parse(Args, argv, description=__doc__)
    lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    common = dict(vocab_size=256, d_model=args.d_model, num_layers=args.num_layers, num_heads=args.d_model // 64,
                  dtype=args.dtype)
    models = {
        "hybrid 3:1": LM(LMConfig(pattern=("mamba2", "mamba2", "mamba2", "attention"), **common), rngs=nnx.Rngs(0)),
        "attention": LM(LMConfig(pattern=("attention",), **common), rngs=nnx.Rngs(0)),
    }
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}, {args.steps} decode steps, dtype {args.dtype}")
    for name, m in models.items():
        print(f"  {name}: {n_params(m) / 1e6:.2f}M params, pattern {m.cfg.pattern}")
    print("| context | hybrid tok/s | attention tok/s | hybrid/attn speed | hybrid cache MiB | attention cache MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in lengths:
        res = {name: time_decode(m, args.batch, length, args.steps) for name, m in models.items()}
        (th, mh), (ta, ma) = res["hybrid 3:1"], res["attention"]
        print(f"| {length} | {th:.1f} | {ta:.1f} | {th / ta:.2f}x | {mh / 2**20:.2f} | {ma / 2**20:.2f} |", flush=True)


if __name__ == "__main__":
    main()
