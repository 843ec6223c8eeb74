"""Shared helpers for the pretraining tests: a tiny LM, fixed batches, cached compiled steps."""

import functools

import jax
import numpy as np
from flax import nnx

from seqjax import mixers
from seqjax import sharding as shd
from seqjax.models.lm import LM, LMConfig
from seqjax.train.config import OptimConfig
from seqjax.train.data import split_row
from seqjax.train.step import Trainer

B, T, STEPS = 8, 16, 6


def pattern():
    return ("mamba2", "attention") if "mamba2" in mixers.names() else ("attention",)


def make_model():
    cfg = LMConfig(pattern=pattern(), d_model=16, num_layers=len(pattern()), num_heads=2, num_kv_heads=1, mlp_ratio=2.0)
    return LM(cfg, rngs=nnx.Rngs(0))


def batches(n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tok = rng.integers(0, 256, (B, T + 1))
        cut = rng.integers(2, T, (B, 1))
        seg = 1 + (np.arange(T + 1)[None] >= cut)  # two documents per row
        out.append(split_row(tok, seg))
    return out


def mesh_for(shape):
    n = int(np.prod(shape))
    return shd.make_mesh(shape, jax.devices()[:n])


@functools.cache
def compiled(shape, accum=1):
    tr = Trainer(make_model, mesh_for(shape), OptimConfig(lr=1e-2, warmup=2), total_steps=STEPS, accum=accum)
    step, _, info = tr.compile(B, T, with_eval=False)
    return tr, step


def put(tr, batch):
    return {k: jax.device_put(v, tr.batch_sharding) for k, v in batch.items()}


def run(shape, accum, state, steps):
    """Continue ``state`` (or a fresh one) for ``steps``, a list of step indices; returns (losses, state)."""
    tr, step = compiled(shape, accum)
    state = tr.init_state() if state is None else state
    data = batches()
    losses = []
    for s in steps:
        state, m = step(state, put(tr, data[s]))
        losses.append(float(m["loss"]))
    return losses, state


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def restore_on_one_device(path):
    """Every array of the orbax checkpoint at ``path`` (an item directory), as numpy, onto device 0."""
    import orbax.checkpoint as ocp

    ck = ocp.StandardCheckpointer()
    meta = ck.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.tree.map(np.asarray, ck.restore(path, target))
