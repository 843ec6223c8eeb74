"""Guidance (Subramaniam et al. 2024, "Training the Untrainable"): a deep plain MLP that does not train alone trains
when its layers are aligned by CKA with a frozen guide network's — a trained guide or a randomly initialised one.

    python experiments/guidance.py                          # none / random guide / trained guide, 3 seeds
    python experiments/guidance.py --kernel=rbf --weight=0.5
    python experiments/guidance.py --preset=paper           # deeper (48 layers), longer, 5 seeds

Data: scikit-learn's 8×8 digits (1,437 train / 360 test). Target: ``depth`` fully connected ReLU layers of width
``width`` with no residual connections and no normalisation (only the head reads the last layer through a layer norm), the
default (LeCun normal) initialisation, trained by
``optimizer`` (Adam or SGD with momentum) on cross entropy plus ``weight · Σ (1 − CKA(target layer j, guide layer i))``
(``seqjax.train.guidance``; guide layers paired with target layers by depth). Guide: a residual MLP (``guide_blocks``
pre-norm blocks ``h + W₂ relu(W₁ LN(h))``, the paper's ResNet stand-in), its block outputs as its layers; ``random``:
at initialisation, frozen; ``trained``: trained on the task first (Adam), then frozen. All seeds train at once
(``vmap``). Metric: test accuracy of the target; chance 0.10.

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``guidance``) afresh each run; every
record names the machine, the date, the seed and the paper's numbers.
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

from seqjax.tasks.classification import digits_split
from seqjax.tasks.runner import machine, parse, write_results
from seqjax.train.guidance import guidance_loss, pair_layers

#: the paper's numbers (Subramaniam et al. 2024; mean of 5 seeds, from a secondary summary)
PAPER = ("deep FCN on ImageNet, top-5: alone 1.65, trained ResNet-18 guide 7.50, random guide 13.10; "
         "RNN copy-paste accuracy: alone 14.35, trained Transformer guide 23.27, random guide 42.56")

Guide = Literal["none", "random", "trained"]


@dataclasses.dataclass
class Config:
    depth: int = 30  # target hidden layers
    width: int = 64
    guides: tuple[Guide, ...] = ("none", "random", "trained")
    guide_blocks: int = 5
    weight: float = 1.0  # of the summed (1 - CKA) terms
    kernel: Literal["linear", "rbf"] = "linear"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9  # sgd only
    clip: float = 1.0
    steps: int = 1000
    batch_size: int = 128  # CKA is computed on each mini-batch
    guide_steps: int = 300  # training the "trained" guide (Adam 1e-3)
    seeds: int = 3
    log_every: int = 50
    seed: int = 0  # first seed
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "guidance"
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(depth=4, width=8, guide_blocks=2, guides=("none", "random"), steps=2, batch_size=8, guide_steps=2,
                 seeds=1, log_every=1),
    "paper": dict(depth=48, width=128, steps=5000, guide_steps=2000, batch_size=256, seeds=5),
}


def _dense(key, a, b):
    return jax.random.normal(key, (a, b), jnp.float32) / np.sqrt(a), jnp.zeros((b,), jnp.float32)


# ----------------------------------------------------------------------------- networks


def init_plain(key, d_in, width, depth, classes=10):
    keys = jax.random.split(key, depth + 1)
    sizes = [d_in] + [width] * depth
    return {"hidden": [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])], "head": _dense(keys[-1], width, classes)}


def plain(params, x):
    """``(logits, [each hidden layer's output])``; the head reads the last layer through a layer norm, so the
    vanishing scale of the deep stack does not matter, only the geometry it keeps."""
    acts = []
    for w, b in params["hidden"]:
        x = jax.nn.relu(x @ w + b[None])
        acts.append(x)
    w, b = params["head"]
    return _ln(x) @ w + b[None], acts


def init_resmlp(key, d_in, width, blocks, classes=10):
    keys = jax.random.split(key, 2 * blocks + 2)
    return {"inp": _dense(keys[0], d_in, width),
            "blocks": [(_dense(keys[1 + 2 * i], width, 2 * width), _dense(keys[2 + 2 * i], 2 * width, width)) for i in range(blocks)],
            "head": _dense(keys[-1], width, classes)}


def _ln(x):
    mu = jnp.mean(x, -1, keepdims=True)
    return (x - mu) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5)


def resmlp(params, x):
    """Pre-norm residual MLP: ``(logits, [each block's output])``."""
    w, b = params["inp"]
    h = x @ w + b[None]
    acts = []
    for (w1, b1), (w2, b2) in params["blocks"]:
        h = h + jax.nn.relu(_ln(h) @ w1 + b1[None]) @ w2 + b2[None]
        acts.append(h)
    w, b = params["head"]
    return _ln(h) @ w + b[None], acts


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ----------------------------------------------------------------------------- training


def train_guides(cfg: Config, data, trained: bool):
    """One frozen guide per seed, ``[seeds]``-stacked; ``trained``: Adam on the task first. Returns (params, test acc)."""
    xtr, ytr, xte, yte = map(jnp.asarray, data)
    tx = optax.adam(1e-3)

    def one(seed):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 11)
        p = init_resmlp(key, xtr.shape[1], cfg.width, cfg.guide_blocks)
        if trained:
            def body(carry, k):
                p, st = carry
                idx = jax.random.randint(k, (cfg.batch_size,), 0, xtr.shape[0])
                g = jax.grad(lambda p: xent(resmlp(p, xtr[idx])[0], ytr[idx]))(p)
                u, st = tx.update(g, st, p)
                return (optax.apply_updates(p, u), st), None

            (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(jax.random.fold_in(key, 1), cfg.guide_steps))
        acc = jnp.mean(jnp.argmax(resmlp(p, xte)[0], -1) == yte)
        return p, acc

    return jax.jit(jax.vmap(one))(jnp.arange(cfg.seed, cfg.seed + cfg.seeds))


def train_target(cfg: Config, data, guides):
    """Train ``cfg.seeds`` targets at once (``guides``: stacked guide params or None). Returns (test acc [s], train
    acc [s], task-loss curve [s, n], guidance-loss curve [s, n])."""
    xtr, ytr, xte, yte = map(jnp.asarray, data)
    opt = optax.sgd(cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd" else optax.adam(cfg.lr)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), opt)
    pairs = pair_layers(cfg.depth, cfg.guide_blocks)

    def loss_fn(p, g, x, y):
        logits, acts = plain(p, x)
        task = xent(logits, y)
        if g is None:
            return task, (task, jnp.zeros(()))
        cka_terms = guidance_loss(acts, resmlp(g, x)[1], pairs=pairs, kernel=cfg.kernel)
        return task + cfg.weight * cka_terms, (task, cka_terms)

    def one(seed, g):
        key = jax.random.PRNGKey(seed)
        p = init_plain(key, xtr.shape[1], cfg.width, cfg.depth)

        def body(carry, k):
            p, st = carry
            idx = jax.random.randint(k, (cfg.batch_size,), 0, xtr.shape[0])
            x, y = xtr[idx], ytr[idx]
            grads, (task, cka_terms) = jax.grad(loss_fn, has_aux=True)(p, g, x, y)
            u, st = tx.update(grads, st, p)
            return (optax.apply_updates(p, u), st), (task, cka_terms)

        (p, _), (task, cka_terms) = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(jax.random.fold_in(key, 1), cfg.steps))
        acc = lambda x, y: jnp.mean(jnp.argmax(plain(p, x)[0], -1) == y)
        n = cfg.steps // cfg.log_every * cfg.log_every
        curve = lambda v: v[:n].reshape(-1, cfg.log_every).mean(1)
        return acc(xte, yte), acc(xtr, ytr), curve(task), curve(cka_terms)

    seeds = jnp.arange(cfg.seed, cfg.seed + cfg.seeds)
    if guides is None:
        out = jax.jit(jax.vmap(lambda s: one(s, None)))(seeds)
    else:
        out = jax.jit(jax.vmap(one))(seeds, guides)
    return [np.asarray(o) for o in out]


# ----------------------------------------------------------------------------- report


def table(rows: list[dict], cfg: Config) -> str:
    base = np.mean([r["test_acc"] for r in rows if r["guide"] == "none"]) if any(r["guide"] == "none" for r in rows) else None
    out = [f"Target: {cfg.depth}-layer plain ReLU MLP, width {cfg.width}; {cfg.optimizer} lr {cfg.lr}, "
           f"{cfg.steps} steps of batch {cfg.batch_size}; guidance weight {cfg.weight}, {cfg.kernel} CKA, guide: "
           f"residual MLP of {cfg.guide_blocks} blocks; {cfg.seeds} seeds. Chance 0.10.", "",
           "| guide | guide's own test acc | target test acc (mean) | per seed | target train acc | paper (deep FCN, top-5) | met |",
           "|---|---|---|---|---|---|---|"]
    paper = {"none": "1.65 (fails)", "random": "13.10 (> alone)", "trained": "7.50 (> alone)"}
    for guide in dict.fromkeys(r["guide"] for r in rows):
        sel = [r for r in rows if r["guide"] == guide]
        acc = np.mean([r["test_acc"] for r in sel])
        gacc = "—" if guide == "none" else f"{np.mean([r['guide_acc'] for r in sel]):.3f}"
        if guide == "none":
            met = "met" if acc <= 0.2 else "missed"  # the target must fail alone for the claim to mean anything
        else:
            met = "—" if base is None else ("met" if acc >= base + 0.2 else "missed")
        per_seed = ", ".join(f"{r['test_acc']:.2f}" for r in sel)
        out.append(f"| {guide} | {gacc} | {acc:.3f} | {per_seed} | "
                   f"{np.mean([r['train_acc'] for r in sel]):.3f} | {paper[guide]} | {met} |")
    out += ["", "met: alone ≤ 0.20 (it fails); guided ≥ alone + 0.20."]
    return "\n".join(out)


def plot(curves: dict, cfg: Config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for guide, (task, cka_terms) in curves.items():
        steps = (np.arange(task.shape[1]) + 1) * cfg.log_every
        line, = axes[0].plot(steps, task.mean(0), label=f"guide: {guide}")
        if guide != "none":
            axes[1].plot(steps, cka_terms.mean(0), color=line.get_color(), label=f"guide: {guide}")
    axes[0].set(xlabel="step", ylabel="task loss (mean over seeds)", title=f"{cfg.depth}-layer plain MLP, digits")
    axes[1].set(xlabel="step", ylabel="Σ (1 − CKA)", title="guidance term")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if cfg.steps < cfg.log_every:
        raise SystemExit(f"error: --steps ({cfg.steps}) must be >= --log_every ({cfg.log_every})")
    pair_layers(cfg.depth, cfg.guide_blocks)  # a clear error before any training if the guide cannot be paired
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "guidance", "machine": machine(), "date": datetime.date.today().isoformat(), "preset": cfg.preset,
            "command": " ".join(["python experiments/guidance.py", *argv]), "paper": PAPER, "kernel": cfg.kernel,
            "weight": cfg.weight, "depth": cfg.depth, "width": cfg.width}
    data = digits_split(flat=True)  # x [n, 64]
    rows, curves = [], {}
    for guide in cfg.guides:
        t0 = time.time()
        gp, gacc = (None, None) if guide == "none" else train_guides(cfg, data, trained=guide == "trained")
        test, train, task, cka_terms = train_target(cfg, data, gp)
        curves[guide] = (task, cka_terms)
        for s in range(cfg.seeds):
            rows.append(dict(meta, guide=guide, seed=cfg.seed + s, test_acc=float(test[s]), train_acc=float(train[s]),
                             guide_acc=None if gacc is None else float(gacc[s]), final_task_loss=float(task[s, -1]),
                             final_guidance_loss=float(cka_terms[s, -1])))
        log(f"guide {guide}: target test acc {np.round(test, 3).tolist()} ({time.time() - t0:.0f}s)")
    header = f"`{meta['command']}` — {meta['machine']}, seeds {cfg.seed}–{cfg.seed + cfg.seeds - 1}, preset {cfg.preset}\n\n"
    md = table(rows, cfg)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + f"\n\nPaper: {PAPER}.\n", lambda png: plot(curves, cfg, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
