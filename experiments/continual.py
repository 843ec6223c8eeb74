"""Continual learning on task sequences: fine-tuning, EWC, the RNN hypernetwork (Chandra et al. 2023) and Hebbian
orthogonal projection (the idea of HLOP, Xiao et al. 2024, with rate neurons).

    python experiments/continual.py                                   # split + permuted digits, 4 methods, 3 seeds
    python experiments/continual.py --benchmarks=split_mnist1d,permuted_mnist1d
    python experiments/continual.py --methods=finetune,hnet --beta=0.05
    python experiments/continual.py --preset=paper

Task-incremental (the task id is given at test time). The target is an MLP (``features → hidden → hidden``,
ReLU) with one output head per task. Each method trains the tasks of ``seqjax.tasks.continual`` in order,
``steps`` Adam steps per task, and after each task tests every task seen so far, filling the accuracy matrix
``R[i, j]``:

- ``finetune``: plain training, the lower bound;
- ``ewc``: + ``λ/2 Σ_t F_t (θ − θ*_t)²`` with each earlier task's diagonal Fisher (labels drawn from the model);
- ``hnet``: the LSTM hypernetwork of ``seqjax.models.hypernet`` generates the whole target (trunk and the task's
  head) from a learned task embedding, chunk by chunk, with the output regulariser ``β · mean_t ‖f(e_t) − ŵ_t‖²``
  on the earlier tasks' generated weights;
- ``hlop``: each trunk layer's principal input subspace is learnt by lateral Oja-subspace neurons while the task
  trains (``hlop_k`` new neurons per layer and task), stored at the end, and later tasks' updates are projected
  off it (``seqjax.train.continual.hebbian_projection`` after Adam); trunk biases are frozen after task 1, as in
  HLOP.

Reports average accuracy, forgetting (Chaudhry et al.) and backward transfer, mean ± sd over seeds, beside
chance. Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``continual``) afresh
each run; every record names the machine, the date, the seed and the paper's claim.
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

from seqjax.models import hypernet
from seqjax.tasks import continual as tasks_lib
from seqjax.tasks.runner import machine, parse, write_results
from seqjax.train import continual as cl

METHODS = ("finetune", "ewc", "hnet", "hlop")
Method = Literal["finetune", "ewc", "hnet", "hlop"]
Benchmark = Literal["split_digits", "permuted_digits", "split_mnist1d", "permuted_mnist1d"]

#: the papers' claims; numbers are not reproduced here (the notes record none verified)
PAPER = {
    "hnet": ("Chandra et al. 2023: the RNN hypernetwork with its regulariser beats hypernetwork and CL baselines "
             "(EWC among them) on Split/Permuted MNIST, Split CIFAR (abstract; numbers not retrieved)"),
    "hlop": ("Xiao et al. 2024: 'nearly zero forgetting', better than EWC, HAT, GPM on PMNIST, CIFAR-100, "
             "miniImageNet (abstract; from memory PMNIST ACC ~95 %, BWT ~0: unverified)"),
    "ewc": "Kirkpatrick et al. 2017: forgets less than fine-tuning; below hypernetworks and HLOP in both papers",
    "finetune": "the lower bound: forgets earlier tasks",
}


@dataclasses.dataclass
class Config:
    benchmarks: tuple[Benchmark, ...] = ("split_digits", "permuted_digits")
    methods: tuple[Method, ...] = METHODS
    split_tasks: int = 5  # 2 or 5
    permuted_tasks: int = 10
    hidden: int = 100  # target MLP width (two hidden layers)
    steps: int = 300  # Adam steps per task
    batch_size: int = 64
    lr: float = 1e-3
    ewc_lambda: float = 100.0
    beta: float = 0.05  # hypernetwork output regulariser
    hnet_hidden: int = 64
    task_dim: int = 32
    chunk_dim: int = 16
    chunk_size: int = 512
    hnet_lr: float = 1e-3
    hlop_k: tuple[int, int] = (6, 9)  # lateral neurons added per task in trunk layers 1 and 2
    hebbian_lr: float = 0.3
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "continual"  # the results folder
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(benchmarks=("split_digits",), split_tasks=2, hidden=8, steps=2, batch_size=8, hnet_hidden=8,
                 task_dim=4, chunk_dim=4, chunk_size=64, hlop_k=(2, 2), seeds=(0,)),
    "paper": dict(benchmarks=("split_mnist1d", "permuted_mnist1d", "split_digits", "permuted_digits"), hidden=400,
                  steps=2000, seeds=(0, 1, 2, 3, 4)),
}


# ----------------------------------------------------------------------------- the target MLP


def init_mlp(key, sizes: list[int], heads: int, classes: int) -> dict:
    """Trunk ``sizes[0] → … → sizes[-1]`` (ReLU) and ``heads`` output heads ``[heads, sizes[-1], classes]``."""
    keys = jax.random.split(key, len(sizes))
    trunk = [{"w": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a), "b": jnp.zeros((b,), jnp.float32)}
             for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
    head = {"w": jax.random.normal(keys[-1], (heads, sizes[-1], classes), jnp.float32) / np.sqrt(sizes[-1]),
            "b": jnp.zeros((heads, classes), jnp.float32)}
    return {"trunk": trunk, "head": head}


def mlp(params: dict, x, task):
    """Logits of head ``task`` and the input of every trunk layer (for the Hebbian projector)."""
    inputs, h = [], x
    for layer in params["trunk"]:
        inputs.append(h)
        h = jax.nn.relu(h @ layer["w"] + layer["b"][None])
    w, b = params["head"]["w"], params["head"]["b"]
    if w.ndim == 3:
        w, b = w[task], b[task]
    return h @ w + b[None], inputs


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(task, cfg: Config, rng) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` minibatches ``x [steps, batch, features]``, ``y [steps, batch]`` from shuffled epochs."""
    n = len(task.y_train)
    reps = -(-cfg.steps * cfg.batch_size // n)
    idx = np.concatenate([rng.permutation(n) for _ in range(reps)])[: cfg.steps * cfg.batch_size].reshape(cfg.steps, -1)
    return task.x_train[idx], task.y_train[idx]


# ----------------------------------------------------------------------------- methods
# Each trainer is compiled once per benchmark: the task id, the EWC anchor and the hypernetwork's stored targets
# are arguments of one shape for every task, and a task's steps run in one lax.scan.


def make_mlp_trainer(method: str, cfg: Config, classes: int, projectors: list):
    adam = optax.adam(cfg.lr)

    def loss_fn(p, xb, yb, t, anchor, fisher):
        logits, inputs = mlp(p, xb, t)
        loss = xent(logits[:, :classes], yb)
        if method == "ewc":
            loss = loss + cl.ewc_penalty(p, [(anchor, fisher)], cfg.ewc_lambda)
        return loss, inputs

    @jax.jit
    def train(params, xs, ys, t, freeze_bias, anchor, fisher, hstate):
        def body(carry, batch):
            p, o, hs = carry
            (loss, inputs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch, t, anchor, fisher)
            u, o = adam.update(g, o, p)
            if method == "hlop":
                trunk, new_hs = [], []
                for layer_u, s, tx, xin in zip(u["trunk"], hs, projectors, inputs):
                    layer_u = dict(layer_u, b=layer_u["b"] * (1.0 - freeze_bias))  # HLOP trains weights only after task 1
                    layer_u, s = tx.update(layer_u, s, hebbian_inputs={"w": xin, "b": None})
                    trunk.append(layer_u)
                    new_hs.append(s)
                u, hs = dict(u, trunk=trunk), new_hs
            return (optax.apply_updates(p, u), o, hs), loss

        (params, _, hstate), losses = jax.lax.scan(body, (params, adam.init(params), hstate), (xs, ys))
        return params, hstate, losses

    predict = jax.jit(lambda p, x, t: jnp.argmax(mlp(p, x, t)[0][:, :classes], -1))
    return train, predict


def train_mlp(method: str, seq, cfg: Config, seed: int, cache: dict) -> np.ndarray:
    """finetune / ewc / hlop on the multi-head MLP; returns the accuracy matrix."""
    T, classes = len(seq), max(t.num_classes for t in seq)
    sizes = [seq[0].features, cfg.hidden, cfg.hidden]
    caps = [min(k * T, n) for k, n in zip(cfg.hlop_k, sizes[:-1])]  # lateral neurons for every task
    key = (method, T, classes, tuple(sizes))
    if key not in cache:
        projectors = [cl.hebbian_projection({"w": True, "b": False}, c, lr=cfg.hebbian_lr) for c in caps]
        cache[key] = (make_mlp_trainer(method, cfg, classes, projectors), projectors)
    (train, predict), projectors = cache[key]
    params = init_mlp(jax.random.PRNGKey(seed), sizes, T, classes)
    rng = np.random.default_rng(seed + 1)
    R = np.full((T, T), np.nan)
    anchors = []
    anchor, fisher = params, jax.tree.map(jnp.zeros_like, params)
    hstate = None
    if method == "hlop":
        hstate = [cl.hebbian_projection({"w": True, "b": False}, c, seed=seed + i).init(layer)
                  for i, (c, layer) in enumerate(zip(caps, params["trunk"]))]
    for t, task in enumerate(seq):
        if method == "hlop":
            hstate = [cl.hebbian_start_task(s, min(k, c - int(s.stored["w"]))) for s, k, c in zip(hstate, cfg.hlop_k, caps)]
        xs, ys = batches(task, cfg, rng)
        params, hstate, losses = train(params, xs, ys, t, float(t > 0), anchor, fisher, hstate)
        if not np.isfinite(float(losses[-1])):
            raise FloatingPointError(f"non-finite loss on task {t} ({method})")
        if method == "hlop":
            hstate = [cl.hebbian_consolidate(s) for s in hstate]
        if method == "ewc":
            logits, _ = mlp(params, task.x_train, t)
            sampled = jax.random.categorical(jax.random.PRNGKey(seed * 1000 + t), logits[:, : task.num_classes])
            ts = np.full(len(sampled), t, np.int32)
            anchors.append((params, cl.fisher_diagonal(_loglik, params, task.x_train, sampled, ts, chunk=256)))
            anchor, fisher = cl.ewc_merge(anchors)
        for j in range(t + 1):
            R[t, j] = float(np.mean(np.asarray(predict(params, seq[j].x_test, j)) == seq[j].y_test))
    return R


def _loglik(p, x, y, t):
    """``log p(y | x, task t)`` of one example (the EWC Fisher's per-example term)."""
    return jax.nn.log_softmax(mlp(p, x[None], t)[0][0])[y]


def make_hnet_trainer(cfg: Config, spec, classes: int):
    adam = optax.adam(cfg.hnet_lr)

    def loss_fn(p, xb, yb, t, targets, mask):
        w = hypernet.unflatten(spec, hypernet.generate(p, spec, t)[0])
        return xent(mlp(w, xb, None)[0][:, :classes], yb) + cfg.beta * cl.hnet_regularizer(p, spec, targets, mask)

    @jax.jit
    def train(params, xs, ys, t, targets, mask):
        def body(carry, batch):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p, *batch, t, targets, mask)
            u, o = adam.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        (params, _), losses = jax.lax.scan(body, (params, adam.init(params)), (xs, ys))
        return params, losses

    @jax.jit
    def predict(p, x, j):
        return jnp.argmax(mlp(hypernet.weights(p, spec, j), x, None)[0][:, :classes], -1)

    return train, predict


def train_hnet(seq, cfg: Config, seed: int, cache: dict) -> np.ndarray:
    """The RNN hypernetwork generating a single-head MLP per task; returns the accuracy matrix."""
    T, classes = len(seq), max(t.num_classes for t in seq)
    sizes = [seq[0].features, cfg.hidden, cfg.hidden]
    ref = init_mlp(jax.random.PRNGKey(0), sizes, 1, classes)  # the leaf scales: one spec (one compile) for every seed
    ref["head"] = {"w": ref["head"]["w"][0], "b": ref["head"]["b"][0]}
    spec = hypernet.target_spec(ref)
    key = ("hnet", T, classes, tuple(sizes), spec)
    if key not in cache:
        cache[key] = make_hnet_trainer(cfg, spec, classes)
    train, predict = cache[key]
    # one embedding per task of the sequence, each used from its task on
    params = hypernet.init(jax.random.PRNGKey(seed + 7), spec, T, task_dim=cfg.task_dim, chunk_dim=cfg.chunk_dim,
                           hidden=cfg.hnet_hidden, chunk_size=cfg.chunk_size)
    rng = np.random.default_rng(seed + 1)
    R = np.full((T, T), np.nan)
    targets = jnp.zeros((T, spec.size), jnp.float32)
    for t, task in enumerate(seq):
        if t:  # the weights of the tasks learnt so far (rows < t), as the hypernetwork generates them now
            targets = cl.hnet_targets(params, spec, T)
        xs, ys = batches(task, cfg, rng)
        params, losses = train(params, xs, ys, t, targets, np.arange(T) < t)
        if not np.isfinite(float(losses[-1])):
            raise FloatingPointError(f"non-finite loss on task {t} (hnet)")
        for j in range(t + 1):
            R[t, j] = float(np.mean(np.asarray(predict(params, seq[j].x_test, j)) == seq[j].y_test))
    return R


# ----------------------------------------------------------------------------- report


def benchmark_tasks(name: str, cfg: Config, seed: int):
    kind, source = name.split("_")
    return tasks_lib.sequence(kind, cfg.split_tasks if kind == "split" else cfg.permuted_tasks, source=source, seed=seed)


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs):
            sel = [r for r in runs if r["benchmark"] == bench and r["method"] == method]
            if not sel:
                continue
            row = {"kind": "summary", "benchmark": bench, "method": method, "seeds": [r["seed"] for r in sel],
                   "chance": sel[0]["chance"], "paper": PAPER[method]}
            for k in ("acc", "forgetting", "bwt", "seconds"):
                v = np.array([r[k] for r in sel])
                row[k], row[k + "_sd"] = float(v.mean()), float(v.std())
            out.append(row)
    for row in out:  # the claim, judged against fine-tuning (and EWC) on the same benchmark
        ref = {r["method"]: r for r in out if r["benchmark"] == row["benchmark"]}
        ft, ewc = ref.get("finetune"), ref.get("ewc")
        if row["method"] != "finetune" and ft is not None and ft["forgetting"] < 0.02:
            row["met"] = "ceiling (fine-tuning forgets < 0.02)"
        elif row["method"] in ("hnet", "hlop") and ft is not None:
            ok = row["forgetting"] <= 0.5 * ft["forgetting"] and row["acc"] > ft["acc"]
            ok = ok and (ewc is None or row["acc"] >= ewc["acc"])
            row["met"] = "met" if ok else "missed"
        elif row["method"] == "ewc" and ft is not None:
            row["met"] = "met" if row["forgetting"] <= 0.5 * ft["forgetting"] else "missed"
        else:
            row["met"] = "—"
    return out


def tables(summary: list[dict]) -> str:
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in summary):
        sel = [r for r in summary if r["benchmark"] == bench]
        out += [f"**{bench}** (task-incremental, {len(sel[0]['seeds'])} seeds, mean ± sd)", "",
                "| method | average accuracy | forgetting | backward transfer | s / run | claim (papers) | met |",
                "|---|---|---|---|---|---|---|",
                f"| chance | {sel[0]['chance']:.3f} | — | — | — | trivial baseline | — |"]
        for r in sel:
            out.append(f"| {r['method']} | {r['acc']:.3f} ± {r['acc_sd']:.3f} | {r['forgetting']:.3f} ± {r['forgetting_sd']:.3f} "
                       f"| {r['bwt']:+.3f} ± {r['bwt_sd']:.3f} | {r['seconds']:.0f} | {r['paper']} | {r['met']} |")
        out.append("")
    out.append("met: hnet/hlop forget at most half of fine-tuning's and score above fine-tuning and EWC; "
               "EWC forgets at most half of fine-tuning's; no verdict where fine-tuning itself forgets < 0.02.")
    return "\n".join(out)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r["benchmark"] for r in runs))
    if not benches:
        return
    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.2), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for method in dict.fromkeys(r["method"] for r in runs):
            Rs = np.array([r["R"] for r in runs if r["benchmark"] == bench and r["method"] == method], dtype=float)
            if not len(Rs):
                continue
            curve = np.nanmean(Rs, axis=2).mean(0)  # average accuracy over the tasks seen, after each task
            ax.plot(np.arange(1, len(curve) + 1), curve, "o-", label=method)
        ax.axhline(next(r["chance"] for r in runs if r["benchmark"] == bench), color="grey", ls=":", label="chance")
        ax.set(title=bench, xlabel="tasks learnt", ylabel="mean accuracy on tasks seen", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if len(cfg.hlop_k) != 2 or min(cfg.hlop_k) < 1:
        raise SystemExit(f"error: --hlop_k must be two positive ints (trunk layers 1 and 2), got {cfg.hlop_k}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "continual", "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "steps": cfg.steps, "hidden": cfg.hidden, "ewc_lambda": cfg.ewc_lambda,
            "beta": cfg.beta, "hlop_k": list(cfg.hlop_k), "command": " ".join(["python experiments/continual.py", *argv])}
    runs, cache = [], {}
    for bench in cfg.benchmarks:
        for seed in cfg.seeds:
            seq = benchmark_tasks(bench, cfg, seed)
            for method in cfg.methods:
                t0 = time.time()
                R = train_hnet(seq, cfg, seed, cache) if method == "hnet" else train_mlp(method, seq, cfg, seed, cache)
                row = dict(meta, kind="run", benchmark=bench, method=method, seed=seed, tasks=len(seq),
                           R=[[None if np.isnan(v) else float(v) for v in r] for r in R],
                           acc=cl.average_accuracy(np.nan_to_num(R)), forgetting=cl.forgetting(np.nan_to_num(R)),
                           bwt=cl.backward_transfer(np.nan_to_num(R)), chance=tasks_lib.chance(seq),
                           seconds=round(time.time() - t0, 1), paper=PAPER[method])
                runs.append(row)
                log(f"{bench} seed {seed} {method}: acc {row['acc']:.3f} forgetting {row['forgetting']:.3f} "
                    f"bwt {row['bwt']:+.3f} ({row['seconds']:.0f}s)")
    summary = [dict(meta, **r) for r in summarise(runs)]
    rows = runs + summary
    header = (f"`{meta['command']}` — {meta['machine']}, seeds {list(cfg.seeds)}, preset {cfg.preset}, "
              f"{cfg.steps} Adam steps per task, MLP {cfg.hidden}-{cfg.hidden}\n\n")
    md = tables(summary)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(runs, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
