"""Learnable Commutative Monoids (Ong & Veličković 2022): set functions that need more than a sum, on sets larger
than any seen in training, and the depth advantage of the tree over the recurrent aggregator.

    python experiments/lcm.py                                        # every task × aggregator, then the timing
    python experiments/lcm.py --tasks=second_minimum --aggregators=lcm,gru,sum
    python experiments/lcm.py --assoc=0.1 --aggregators=lcm           # with the associativity penalty
    python experiments/lcm.py --timing_only=true                      # the depth timing alone
    python experiments/lcm.py --preset=paper

``seqjax.models.lcm.SetModel`` (embed → MLP → aggregate → MLP) with each aggregator — ``sum``, ``mean``, ``max``,
``gru`` (a GRU read over the set, depth n) and ``lcm`` (the symmetrised GRU operator reduced by a balanced
tree, depth ⌈log₂ n⌉) — is trained on multisets of ``train_n`` elements from ``seqjax.tasks.multisets``
(second minimum, parity of the count of odd elements, product mod a prime) and tested at every ``test_n``; metric:
accuracy. Then, for ``timing_n`` (1k–64k elements), the forward wall-clock of the same operator reduced by
the tree and by a sequential fold (``lax.scan``), jitted, best of ``timing_repeats``.

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``lcm``) afresh each run; every record names the machine,
the date, the seed and the paper's finding.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.models.lcm import AGGREGATORS, SetModel, associativity_gap, fold, gru_op, symmetrise, tree_reduce
from seqjax.rnn import cells
from seqjax.tasks import multisets
from seqjax.tasks.runner import machine, parse, write_results

#: the paper's finding (Ong & Veličković 2022, abstract and §5; its per-task numbers are not reproduced here)
PAPER = ("recurrent aggregators match the best permutation-invariant ones and LCM (O(log n) depth) is "
         "competitive with them; sum aggregation fails to extrapolate to larger sets")

Task = Literal["second_minimum", "count_parity", "product"]
Aggregator = Literal["sum", "mean", "max", "gru", "lcm"]


@dataclasses.dataclass
class Config:
    tasks: tuple[Task, ...] = multisets.TASKS
    aggregators: tuple[Aggregator, ...] = AGGREGATORS
    train_n: tuple[int, ...] = (2, 16)  # lo,hi: set sizes drawn per training example
    test_n: tuple[int, ...] = (16, 64, 128)
    values: int = 100  # elements in [0, values) (second_minimum, count_parity)
    modulus: int = 7  # product: elements in [1, modulus), a prime
    d: int = 64
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    assoc: float = 0.0  # weight of the associativity penalty on the LCM operator
    eval_size: int = 1000
    timing_n: tuple[int, ...] = (1024, 4096, 16384, 65536)
    timing_batch: int = 8
    timing_repeats: int = 3
    timing_only: bool = False  # skip the training, time the reductions only
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "lcm"  # the results folder
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(tasks=("second_minimum",), aggregators=("sum", "lcm"), train_n=(2, 4), test_n=(4, 8), d=8,
                 steps=2, batch_size=4, eval_size=8, timing_n=(16,), timing_batch=2, timing_repeats=1),
    "paper": dict(d=128, steps=20_000, eval_size=5000, test_n=(16, 32, 64, 128), modulus=101),
}


def data(task: str, cfg: Config, num: int, n, seed: int) -> multisets.SetBatch:
    return multisets.multiset(task, num, n, values=cfg.modulus if task == "product" else cfg.values, seed=seed)


def train_and_test(task: str, agg: str, cfg: Config, log) -> list[dict]:
    probe = data(task, cfg, 1, 2, 0)
    model = SetModel(probe.vocab_size, probe.num_classes, agg, d=cfg.d, rngs=nnx.Rngs(cfg.seed))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, 0.05)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m, x, mask, y):
        logits = m(x, mask)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        if agg == "lcm" and cfg.assoc > 0:
            h = m.encode(x)  # positions 0 and 1 are real in every set (n >= 2)
            loss = loss + cfg.assoc * associativity_gap(m.agg.op, h[:, 0], h[:, 1], jnp.roll(h[:, 0], 1, axis=0))
        return loss

    @nnx.jit
    def step(m, opt, x, mask, y):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x, mask, y)
        opt.update(m, grads)
        return loss

    predict = nnx.jit(lambda m, x, mask: jnp.argmax(m(x, mask), -1))
    rows, t0, losses = [], time.time(), []
    for it in range(1, cfg.steps + 1):
        b = data(task, cfg, cfg.batch_size, tuple(cfg.train_n), cfg.seed * 1_000_003 + it)
        loss = float(step(model, opt, jnp.asarray(b.values), jnp.asarray(b.mask), jnp.asarray(b.labels)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {it} ({task}/{agg})")
        losses.append(loss)
    rows.append({"kind": "train", "task": task, "aggregator": agg, "step": cfg.steps,
                 "loss": float(np.mean(losses[-100:])), "seconds": round(time.time() - t0, 1)})
    for n in cfg.test_n:
        b = data(task, cfg, cfg.eval_size, n, 10_000 + 131 * n + cfg.seed)
        preds = np.concatenate([np.asarray(predict(model, jnp.asarray(b.values[i : i + 500]), jnp.asarray(b.mask[i : i + 500])))
                                for i in range(0, len(b), 500)])
        majority = np.bincount(b.labels, minlength=b.num_classes).max() / len(b)
        rows.append({"kind": "test", "task": task, "aggregator": agg, "n": n, "acc": float((preds == b.labels).mean()),
                     "majority": float(majority), "paper": PAPER})
    log(f"{task}/{agg}: loss {rows[0]['loss']:.3f} ({rows[0]['seconds']:.0f}s) "
        + " ".join(f"n={r['n']}:{r['acc']:.3f}" for r in rows[1:]))
    return rows


def timing(cfg: Config) -> list[dict]:
    """Forward wall-clock of the symmetrised GRU operator reduced by the tree and by a sequential fold."""
    key = jax.random.PRNGKey(cfg.seed)
    params = cells.init_params("gru", key, cfg.d, cfg.d)
    op = symmetrise(lambda x, y: gru_op(params, x, y))
    tree = jax.jit(lambda x: tree_reduce(op, x))
    seq = jax.jit(lambda x: fold(op, x))
    rows = []
    for n in cfg.timing_n:
        x = jax.random.normal(key, (cfg.timing_batch, n, cfg.d), jnp.float32)
        row = {"kind": "timing", "n": n, "batch": cfg.timing_batch, "d": cfg.d,
               "depth_tree": int(np.ceil(np.log2(n))), "depth_fold": n}
        for name, fn in (("tree", tree), ("fold", seq)):
            fn(x).block_until_ready()  # compile
            best = np.inf
            for _ in range(cfg.timing_repeats):
                t = time.perf_counter()
                fn(x).block_until_ready()
                best = min(best, time.perf_counter() - t)
            row[f"{name}_s"] = best
        row["fold_over_tree"] = row["fold_s"] / row["tree_s"]
        rows.append(row)
    return rows


def tables(rows: list[dict], cfg: Config) -> str:
    tests = [r for r in rows if r["kind"] == "test"]
    out = []
    for task in dict.fromkeys(r["task"] for r in tests):
        sel = [r for r in tests if r["task"] == task]
        ns = list(dict.fromkeys(r["n"] for r in sel))
        out += [f"**{task}** (trained on n = {cfg.train_n[0]}–{cfg.train_n[-1]}; accuracy, majority class "
                + ", ".join(f"n={n}: {next(r['majority'] for r in sel if r['n'] == n):.3f}" for n in ns) + ")", "",
                "| aggregator | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
        for agg in dict.fromkeys(r["aggregator"] for r in sel):
            accs = {r["n"]: r["acc"] for r in sel if r["aggregator"] == agg}
            out.append(f"| {agg} | " + " | ".join(f"{accs[n]:.3f}" for n in ns) + " |")
        out.append("")
    times = [r for r in rows if r["kind"] == "timing"]
    if times:
        out += [f"**Depth** (forward, batch {times[0]['batch']}, d = {times[0]['d']}, best of {cfg.timing_repeats})", "",
                "| n | tree depth | tree s | fold s | fold / tree |", "|---|---|---|---|---|"]
        out += [f"| {r['n']} | {r['depth_tree']} | {r['tree_s']:.4f} | {r['fold_s']:.4f} | {r['fold_over_tree']:.1f} |"
                for r in times]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [r for r in rows if r["kind"] == "test"]
    tasks = list(dict.fromkeys(r["task"] for r in tests))
    times = [r for r in rows if r["kind"] == "timing"]
    if not tasks and not times:
        return
    fig, axes = plt.subplots(1, len(tasks) + bool(times), figsize=(3.4 * (len(tasks) + bool(times)), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for agg in dict.fromkeys(r["aggregator"] for r in tests):
            sel = [r for r in tests if r["task"] == task and r["aggregator"] == agg]
            ax.plot([r["n"] for r in sel], [r["acc"] for r in sel], "o-", label=agg)
        ax.set_xscale("log", base=2)
        ax.set(title=task, xlabel="set size", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    if times:
        ax = axes[0][-1]
        for name in ("tree", "fold"):
            ax.plot([r["n"] for r in times], [r[f"{name}_s"] for r in times], "o-", label=name)
        ax.set(xscale="log", yscale="log", title="reduction wall-clock", xlabel="set size", ylabel="seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if len(cfg.train_n) != 2 or not 1 <= cfg.train_n[0] <= cfg.train_n[1]:
        raise SystemExit(f"error: --train_n must be lo,hi with 1 <= lo <= hi, got {cfg.train_n}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "lcm", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "steps": cfg.steps, "d": cfg.d, "assoc": cfg.assoc, "train_n": list(cfg.train_n),
            "command": " ".join(["python experiments/lcm.py", *argv])}
    rows = []
    for task in () if cfg.timing_only else cfg.tasks:
        for agg in cfg.aggregators:
            rows += [dict(meta, **r) for r in train_and_test(task, agg, cfg, log)]
    if cfg.timing_n:
        rows += [dict(meta, **r) for r in timing(cfg)]
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}, {cfg.steps} steps\n\n"
    md = tables(rows, cfg)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
