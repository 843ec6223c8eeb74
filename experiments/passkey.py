"""Passkey retrieval and state collapse (Chen et al. 2024, "Stuffed Mamba").

    python experiments/passkey.py --model=mamba2 --train_len=128
    python experiments/passkey.py --model=mamba2 --mitigation=forget --forget_shift=1.0
    python experiments/passkey.py --preset=paper --model=mamba2

Train at ``train_len`` on the tokenizer-free passkey task (``seqjax.tasks.passkey``), then evaluate at
``{1, 2, 4, 8, 16} × train_len`` over 10 needle depths: exact match of all five digits (teacher forced,
which equals greedy decoding's exact match). The state-collapse curve is the norm of every recurrent
state in the model's decode cache, read after each ``probe_every`` tokens of a long filler sequence.

Mitigation (training-free, the paper's "forget more"): ``--mitigation=forget`` adds ``forget_shift`` to
every ``dt_bias`` parameter (a larger Δ, a faster decay) before evaluating beyond the training length.
Writes JSON lines (``kind`` = ``"train" | "passkey" | "state_norm"``) to ``--out`` and a PNG beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax.tasks import IGNORE, passkey
from seqjax.tasks.runner import RunConfig, TaskSpec, parse, run


@dataclasses.dataclass
class Config(RunConfig):
    model: str = "mamba2"
    train_len: int = 128
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    depths: int = 10
    eval_per_depth: int = 8
    probe_len: int = 2048
    probe_every: int = 64
    mitigation: Literal["none", "forget"] = "none"  # forget: both are evaluated, on the same trained weights
    forget_shift: float = 1.0


PRESETS = {
    "cpu": dict(steps=1500, batch_size=32, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, train_len=32, multiples=(1, 2),
                 depths=2, eval_per_depth=2, probe_len=64, probe_every=32, progress=False),
    "paper": dict(steps=20000, batch_size=64, d_model=256, num_layers=4, train_len=1024, eval_every=2000,
                  eval_per_depth=20, probe_len=65536, probe_every=1024),
}


def exact_match(preds, batch) -> float:
    mask = batch.targets != IGNORE
    ok = np.where(mask, preds == batch.targets, True).all(axis=1)
    return float(ok.mean())


def make_task(cfg: Config) -> TaskSpec:
    return TaskSpec(
        f"passkey_{cfg.train_len}",
        passkey.VOCAB,
        lambda step, bs, seed: passkey.passkey(bs, cfg.train_len, seed=seed * 1_000_003 + step),
        lambda: {"train_len": passkey.passkey(64, cfg.train_len, seed=10_000 + cfg.seed)},
        lambda preds, b: {"exact": exact_match(preds, b)},
    )


def apply_mitigation(model, cfg: Config) -> None:
    if cfg.mitigation == "none":
        return
    if cfg.mitigation != "forget":
        raise ValueError(f"--mitigation must be none or forget, got {cfg.mitigation!r}")
    n = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path and "dt_bias" in str(path[-1]):
            var.value = var.value + cfg.forget_shift
            n += 1
    if n == 0:
        raise ValueError(f"--mitigation=forget needs dt_bias parameters; {cfg.model} has none")


def evaluate(model, cfg: Config) -> list[dict]:
    predict = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))
    rows = []
    for mult in cfg.multiples:
        t = cfg.train_len * mult
        for i in range(cfg.depths):
            depth = (i + 0.5) / cfg.depths
            b = passkey.passkey(cfg.eval_per_depth, t, depth=depth, seed=30_000 + i)
            preds = np.asarray(predict(model, jnp.asarray(b.inputs)))
            rows.append({"kind": "passkey", "length": t, "depth": depth, "exact": exact_match(preds, b)})
    return rows


def state_norms(model, cfg: Config) -> list[dict]:
    """Norm of every recurrent state in the decode cache along a long filler sequence."""
    lm = model.lm
    toks = np.tile(passkey.FILLER, -(-cfg.probe_len // len(passkey.FILLER)))[: cfg.probe_len][None].astype(np.int32)
    cache = lm.init_cache(1, cfg.probe_len)
    step = nnx.jit(lambda m, x, c: m(x, cache=c)[1])
    rows = []
    for s in range(0, cfg.probe_len, cfg.probe_every):
        cache = step(lm, jnp.asarray(toks[:, s : s + cfg.probe_every]), cache)
        leaves = [x for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 3]
        norm = float(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves) ** 0.5)
        rows.append({"kind": "state_norm", "position": s + cfg.probe_every, "norm": norm})
    return rows


def main(argv=None):
    cfg = parse(Config, PRESETS, argv)
    holder = {}
    records = run(make_task(cfg), cfg, keep_model=holder)
    model = holder["model"]
    rows = [dict(r, kind="train", mitigation="none") for r in records]
    # the trained model as is, then (with --mitigation) the same weights with the mitigation applied
    for mitigation in dict.fromkeys(["none", cfg.mitigation]):
        if mitigation != "none":
            apply_mitigation(model, cfg)
        part = evaluate(model, cfg) + (state_norms(model, cfg) if cfg.model != "attention" else [])
        rows += [dict(r, mitigation=mitigation) for r in part]
    for r in rows:
        r.update(model=cfg.model, seed=cfg.seed)
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        plot(rows, os.path.splitext(cfg.out)[0] + ".png")
    for mitigation in dict.fromkeys(["none", cfg.mitigation]):
        for mult in cfg.multiples:
            t = cfg.train_len * mult
            acc = np.mean([r["exact"] for r in rows if r["kind"] == "passkey" and r["length"] == t and r["mitigation"] == mitigation])
            print(f"mitigation {mitigation:6s} length {t:6d}: passkey exact match {acc:.3f}")
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    lengths = sorted({r["length"] for r in rows if r["kind"] == "passkey"})
    for m in dict.fromkeys(r["mitigation"] for r in rows if r["kind"] == "passkey"):
        sel = [r for r in rows if r["kind"] == "passkey" and r["mitigation"] == m]
        a1.plot(lengths, [np.mean([r["exact"] for r in sel if r["length"] == t]) for t in lengths], "o-", label=m)
        norms = [r for r in rows if r["kind"] == "state_norm" and r["mitigation"] == m]
        if norms:
            a2.plot([r["position"] for r in norms], [r["norm"] for r in norms], label=m)
    a1.set_xscale("log", base=2)
    a1.set(xlabel="context length", ylabel="passkey exact match", ylim=(-0.05, 1.05))
    a1.legend(title="mitigation", fontsize=8)
    a2.set(xlabel="position", ylabel="state norm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
