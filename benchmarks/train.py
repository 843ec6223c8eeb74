"""Training throughput of the tiny preset: attention-only vs Mamba-2-only vs the 3:1 hybrid.

    python benchmarks/train.py [--steps=10] [--preset=tiny] [--key=value ...] [--out=benchmarks/results/train.md]
    python benchmarks/train.py --preset=125m --data.global_batch=32 --remats=dots,full   # remat policies side by side

Each model is built from the same preset (the options of ``experiments/pretrain.py``, e.g.
``--model.d_model=256``; the pattern is the benchmark's), compiled ahead of time on all local devices, and
timed over ``--steps`` train steps (default 10, after two warm-up steps) on the same random byte batches,
in one process, one after the other; with ``--remats`` each model once per rematerialisation policy
(``seqjax.models.lm.REMAT_POLICIES``: ``full`` recomputes a layer's whole forward in the backward, ``dots``
saves its matmuls without batch dimensions, ``none`` saves everything). Prints tokens/s, the analytic FLOPs per
token (checked against XLA in ``tests/test_train_metrics.py``; a recomputed forward is not counted), MFU against
the device's peak (on CPU: a measured float32 matmul, so "MFU" is the fraction of this machine's matmul
throughput) and the speed ratio to attention-only (under the first policy).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from seqjax import cli
from seqjax import sharding as shd
from seqjax.train import config as C
from seqjax.train import metrics as M
from seqjax.train.data import split_row
from seqjax.train.run import build_model_fn
from seqjax.train.step import Trainer

PATTERNS = {
    "attention": ("attention",),
    "mamba2": ("mamba2",),
    "hybrid 3:1": ("mamba2", "mamba2", "mamba2", "attention"),
}


def bench(cfg: C.TrainConfig, pattern, steps: int, peak: float):
    mcfg = dataclasses.replace(cfg.model, pattern=pattern)
    make = build_model_fn(mcfg)
    mesh = shd.make_mesh(cfg.mesh)
    tr = Trainer(make, mesh, cfg.optim, max(steps + 2, 10), accum=cfg.accum)
    d = cfg.data
    step, _, info = tr.compile(d.global_batch, d.seq_len, with_eval=False)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tok = rng.integers(0, 256, (d.global_batch, d.seq_len + 1))
        batches.append({k: jax.device_put(v, tr.batch_sharding) for k, v in split_row(tok, np.ones_like(tok)).items()})
    state = tr.init_state()
    for i in range(2):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    fpt = M.flops_per_token(nnx.eval_shape(make), tr.abstract_params, d.seq_len, tied_embedding=mcfg.tie_embeddings)
    tokens = d.global_batch * d.seq_len
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr.abstract_params))
    return {
        "params": n_params,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "flops_per_token": fpt["total"],
        "mfu": M.mfu(fpt["total"] * tokens, dt, jax.device_count(), peak),
        "mem_mb": info.get("total_bytes", 0) / 2**20,
    }


@dataclasses.dataclass
class BenchConfig(C.TrainConfig):
    out: str = ""  # also write the table to this markdown file
    remats: tuple[str, ...] = ()  # rematerialisation policies to time each model under (default: the preset's)


def _bench_preset(make):
    return lambda: BenchConfig(**{**vars(make()), "steps": 10})


def main(argv=None):
    cfg = cli.parse(BenchConfig, argv, presets={k: _bench_preset(f) for k, f in C.PRESETS.items()},
                    description=__doc__)
    steps, out = cfg.steps, cfg.out
    remats = list(cfg.remats) or [cfg.model.remat]
    for r in remats:  # a bad name fails here, before any model compiles
        dataclasses.replace(cfg.model, remat=r)
    peak = cfg.peak_flops or M.peak_flops() or M.measured_peak_flops()
    dev = jax.devices()[0]
    rows = {}
    for remat in remats:
        run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
        for name, pat in PATTERNS.items():  # print each as it lands (a long run may be cut short)
            key = name if len(remats) == 1 else f"{name}, remat={remat}"
            rows[key] = r = bench(run, pat, steps, peak)
            print(f"{key}: {r['tokens_per_s']:.0f} tokens/s, {1e3 * r['step_s']:.1f} ms/step, MFU {100 * r['mfu']:.1f}%",
                  flush=True)
    base = rows["attention" if len(remats) == 1 else f"attention, remat={remats[0]}"]["tokens_per_s"]
    lines = [
        f"Training throughput, preset {cfg.preset} (d_model={cfg.model.d_model}, {cfg.model.num_layers} layers, "
        f"seq {cfg.data.seq_len}, batch {cfg.data.global_batch}, remat {', '.join(remats)}), "
        f"{jax.device_count()} x {dev.device_kind}, "
        f"peak {peak / 1e9:.1f} GFLOP/s per device, {steps} timed steps",
        "",
        "| model | params | step (ms) | tokens/s | x attention | GFLOP/token | MFU | compiled MB/device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base:.2f} | {r['flops_per_token'] / 1e9:.4f} | {100 * r['mfu']:.1f}% | {r['mem_mb']:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
