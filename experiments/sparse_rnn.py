"""Sparse RNNs (Darji 2021, "Investigating Sparsity in Recurrent Neural Networks"): magnitude pruning of the input
and recurrent weights of Elman, GRU and LSTM cells with retraining, and recurrent connectivity drawn from random
graphs, with accuracy against the graphs' properties.

    python experiments/sparse_rnn.py                                   # rnn_tanh, gru, lstm
    python experiments/sparse_rnn.py --cells=gru --sparsities=0.5,0.9,0.99
    python experiments/sparse_rnn.py --preset=paper                    # wider, longer, more graphs

Task: scikit-learn's 8×8 digits read row by row (8 steps of 8 pixels; 1,437 train / 360 test), the class read
from the last hidden state. Model: one ``seqjax.rnn`` layer (``W`` input, ``R`` recurrent weights) and a linear
head; Adam.

1. **Pruning** (the thesis's protocol): train dense; prune the smallest ``|w|`` of ``W`` and ``R`` pooled
   (``seqjax.train.sparsity.magnitude_mask``, exactly ``round(s·N)`` weights) at each sparsity ``s``; evaluate, then
   retrain ``retrain_epochs`` epochs with the mask held (``fixed_mask``). *Epochs to recover*: the first epoch
   whose test accuracy is within ``recover_tol`` of the dense model's (0 = no retraining needed). The thesis's
   "one retraining epoch" is 18,750 examples, about 13 of ours (1,437): the claim is met when a sparsity >= 60 %
   recovers within that many examples.
2. **Random-graph recurrence**: train from scratch with ``R`` masked by the adjacency of Watts–Strogatz,
   Barabási–Albert and Erdős–Rényi graphs on the hidden units (``sparsity.graph``, ``recurrent_mask``); regress
   test accuracy on the graphs' properties (edges, clustering, path length): Pearson correlations and the R² of a
   least-squares fit.

All runs of one cell train at once (``vmap`` over masks). Writes ``<out>/<name>/{records.jsonl, table.md,
plot.png}`` (``name`` default ``sparse_rnn``) afresh each run; every record names the machine, the date, the seed
and the paper's number.
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

from seqjax.rnn import cells, rnn
from seqjax.tasks.classification import digits_split
from seqjax.tasks.runner import machine, parse, write_results
from seqjax.train import sparsity as sp

#: the thesis's findings (Darji 2021, conclusion and result tables; Reber-grammar classification, 3-layer RNNs of 50)
PAPER = {
    "prune": "over 60 % of the weights pruned with little loss; one retraining epoch usually recovers "
             "(GRU at 90 %: 0.551 -> 1.000 after 1 epoch; LSTM at 80 %: 0.668 -> 1.000)",
    "graph": "random-structure RNNs, mean test accuracy GRU 0.956, LSTM 0.946, RNN-tanh 0.868; accuracy predicted from "
             "graph features with R² (random forest) GRU 0.876, LSTM 0.579, RNN-tanh 0.43–0.48",
}

#: examples in one of the thesis's retraining epochs (18,750 training strings)
THESIS_EPOCH = 18_750

Cell = Literal["rnn_tanh", "rnn_relu", "gru", "lstm"]


@dataclasses.dataclass
class Config:
    cells: tuple[Cell, ...] = ("rnn_tanh", "gru", "lstm")
    hidden: int = 32
    epochs: int = 15  # dense training, and the random-graph runs
    retrain_epochs: int = 13  # 13 x 1,437 examples: about the thesis's one retraining epoch (18,750 strings)
    sparsities: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
    recover_tol: float = 0.01  # within this of the dense accuracy counts as recovered
    ws_p: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)  # Watts–Strogatz rewiring, k = ws_k
    ws_k: int = 4
    ba_m: tuple[int, ...] = (1, 2, 4)  # Barabási–Albert edges per new node
    er_p: tuple[float, ...] = (0.03, 0.1, 0.3)  # Erdős–Rényi edge probability
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "sparse_rnn"
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(cells=("gru",), hidden=8, epochs=1, retrain_epochs=1, sparsities=(0.5,), ws_p=(0.1,), ba_m=(1,),
                 er_p=(0.3,), batch_size=718),
    "paper": dict(cells=("rnn_tanh", "rnn_relu", "gru", "lstm"), hidden=50, epochs=30, retrain_epochs=10,
                  sparsities=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), ws_p=(0.0, 0.05, 0.1, 0.2, 0.5, 1.0),
                  ba_m=(1, 2, 3, 5, 8), er_p=(0.02, 0.05, 0.1, 0.2, 0.4)),
}


def init(kind: str, key, hidden: int) -> dict:
    k1, k2 = jax.random.split(key)
    return {"rnn": cells.init_params(kind, k1, 8, hidden),
            "head": {"w": jax.random.normal(k2, (hidden, 10), jnp.float32) / np.sqrt(hidden), "b": jnp.zeros((10,), jnp.float32)}}


def make_fit(kind: str, cfg: Config, data, epochs: int):
    """``fit(params, mask, key) -> (params, test accuracy after each epoch [epochs])``, Adam with the mask held."""
    xtr, ytr, xte, yte = map(jnp.asarray, data)
    steps = len(xtr) // cfg.batch_size
    tx = optax.chain(optax.adam(cfg.lr), sp.fixed_mask({}))  # the mask lives in the state: one compile for all masks

    def logits(p, x):
        y, _ = rnn(kind, p["rnn"], x)
        return y[:, -1] @ p["head"]["w"] + p["head"]["b"][None]

    def acc(p):
        return jnp.mean(jnp.argmax(logits(p, xte), -1) == yte)

    def fit(params, mask, key):
        adam_state, mask_state = tx.init(params)
        state = (adam_state, mask_state._replace(mask=mask))

        def step(carry, idx):
            p, st = carry
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, xtr[idx]), ytr[idx]).mean())(p)
            u, st = tx.update(g, st, p)
            return (optax.apply_updates(p, u), st), None

        def epoch(carry, k):
            idx = jax.random.permutation(k, len(xtr))[: steps * cfg.batch_size].reshape(steps, cfg.batch_size)
            carry, _ = jax.lax.scan(step, carry, idx)
            return carry, acc(carry[0])

        (params, _), accs = jax.lax.scan(epoch, (params, state), jax.random.split(key, epochs))
        return params, accs

    return jax.jit(jax.vmap(fit)), jax.jit(acc)


def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def graphs(cfg: Config):
    out = [("watts_strogatz", dict(k=cfg.ws_k, p=p)) for p in cfg.ws_p]
    out += [("barabasi_albert", dict(m=m)) for m in cfg.ba_m]
    out += [("erdos_renyi", dict(p=p)) for p in cfg.er_p]
    return out


def run_cell(kind: str, cfg: Config, data, meta: dict, log) -> list[dict]:
    key = jax.random.PRNGKey(cfg.seed)
    rows, t0 = [], time.time()
    fit, _ = make_fit(kind, cfg, data, cfg.epochs)
    refit, acc = make_fit(kind, cfg, data, cfg.retrain_epochs)
    params = init(kind, key, cfg.hidden)
    full = {n: jnp.ones(v.shape, bool) for n, v in sp.select(params, sp.rnn_weights()).items()}

    # dense
    dense_params, accs = fit(stack([params]), stack([full]), jax.random.split(jax.random.fold_in(key, 1), 1))
    dense_params = jax.tree.map(lambda x: x[0], dense_params)
    dense = float(accs[0, -1])
    rows.append(dict(meta, kind="dense", cell=kind, test_acc=dense, curve=np.asarray(accs[0]).round(4).tolist()))

    # one-shot magnitude pruning of W and R pooled, then retraining with the mask held
    masks = [sp.magnitude_mask(dense_params, s, sp.rnn_weights()) for s in cfg.sparsities]
    pruned = [sp.apply_mask(dense_params, m) for m in masks]
    after = [float(acc(p)) for p in pruned]
    keys = jax.random.split(jax.random.fold_in(key, 2), len(masks))
    retrained, curves = fit_many(refit, pruned, masks, keys)
    for s, a0, c, p in zip(cfg.sparsities, after, curves, retrained):
        seq = [a0, *c.tolist()]
        rec = next((e for e, a in enumerate(seq) if a >= dense - cfg.recover_tol), None)
        rows.append(dict(meta, kind="prune", cell=kind, sparsity=s, achieved=sp.sparsity_of(p), dense_acc=dense,
                         pruned_acc=a0, retrained_acc=float(c[-1]), epochs_to_recover=rec, curve=[round(a, 4) for a in seq]))

    # random-graph recurrent masks, trained from scratch (input weights dense)
    specs = graphs(cfg)
    adjs = [sp.graph(g, cfg.hidden, seed=cfg.seed + i, **kw) for i, (g, kw) in enumerate(specs)]
    gmasks = [dict(full, **sp.recurrent_mask(params, a)) for a in adjs]
    keys = jax.random.split(jax.random.fold_in(key, 3), len(gmasks))
    _, gcurves = fit_many(fit, [params] * len(gmasks), gmasks, keys)
    for (g, kw), a, c in zip(specs, adjs, gcurves):
        rows.append(dict(meta, kind="graph", cell=kind, graph=g, graph_args=kw, test_acc=float(c[-1]),
                         recurrent_density=float(a.mean()), **sp.graph_properties(a)))
    log(f"{kind}: dense {dense:.3f}; pruned " + " ".join(f"{s}:{a:.2f}->{c[-1]:.2f}" for s, a, c in zip(cfg.sparsities, after, curves))
        + "; graphs " + " ".join(f"{c[-1]:.2f}" for c in gcurves) + f" ({time.time() - t0:.0f}s)")
    return rows


def fit_many(fit, params: list, masks: list, keys):
    out, accs = fit(stack(params), stack(masks), keys)
    n = len(params)
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(n)], np.asarray(accs)


def graph_fit(rows: list[dict], features=("edges", "clustering", "path_length")) -> dict:
    """Pearson r of test accuracy with each feature, and the R² of a least-squares fit on all of them."""
    acc = np.array([r["test_acc"] for r in rows])
    out = {}
    for f in features:
        v = np.array([r[f] for r in rows], float)
        out[f"r_{f}"] = float(np.corrcoef(v, acc)[0, 1]) if v.std() > 0 and acc.std() > 0 else float("nan")
    x = np.c_[np.ones(len(rows)), np.array([[r[f] for f in features] for r in rows], float)]
    if len(rows) > x.shape[1] and acc.std() > 0:
        coef, *_ = np.linalg.lstsq(x, acc, rcond=None)
        out["r2"] = float(1 - np.sum((acc - x @ coef) ** 2) / np.sum((acc - acc.mean()) ** 2))
    else:
        out["r2"] = float("nan")
    return out


def tables(rows: list[dict], cfg: Config) -> str:
    out = [f"**Pruning** (W and R pooled, one-shot from the dense model, then {cfg.retrain_epochs} retraining epochs; "
           f"hidden {cfg.hidden}; recovered = within {cfg.recover_tol} of dense)", "",
           "| cell | dense | sparsity | pruned | after 1 epoch | after retraining | epochs to recover |", "|---|---|---|---|---|---|---|"]
    prune = [r for r in rows if r["kind"] == "prune"]
    for r in prune:
        one = r["curve"][1] if len(r["curve"]) > 1 else float("nan")
        rec = "—" if r["epochs_to_recover"] is None else str(r["epochs_to_recover"])
        out.append(f"| {r['cell']} | {r['dense_acc']:.3f} | {r['achieved']:.2f} | {r['pruned_acc']:.3f} | {one:.3f} | "
                   f"{r['retrained_acc']:.3f} | {rec} |")
    budget = round(THESIS_EPOCH / 1437)
    out += ["", f"| cell | paper (thesis) | ours: largest sparsity recovered within {budget} epochs (≈ one thesis epoch, "
            f"{THESIS_EPOCH:,} examples) | within 1 epoch (1,437 examples) | met (≥ 0.6) |", "|---|---|---|---|---|"]
    for cell in dict.fromkeys(r["cell"] for r in prune):
        rec = lambda e: [r["sparsity"] for r in prune if r["cell"] == cell and r["epochs_to_recover"] is not None
                         and r["epochs_to_recover"] <= e]
        ok, one = rec(budget), rec(1)
        best = max(ok) if ok else None
        met = "met" if best is not None and best >= 0.6 else "missed"
        out.append(f"| {cell} | ≥ 0.6 within one epoch | {'none' if best is None else best} | {max(one) if one else 'none'} | {met} |")
    graph_rows = [r for r in rows if r["kind"] == "graph"]
    out += ["", f"Thesis: {PAPER['prune']}.", "",
            f"**Random-graph recurrence** (R masked by the graph on {cfg.hidden} units, trained {cfg.epochs} epochs from scratch)", "",
            "| cell | graph | args | edges | clustering | path length | test acc |", "|---|---|---|---|---|---|---|"]
    for r in graph_rows:
        args = ", ".join(f"{k}={v}" for k, v in r["graph_args"].items())
        out.append(f"| {r['cell']} | {r['graph']} | {args} | {r['edges']} | {r['clustering']:.3f} | {r['path_length']:.2f} | "
                   f"{r['test_acc']:.3f} |")
    out += ["", "| cell | mean acc (graphs) | dense acc | r(acc, edges) | r(acc, clustering) | r(acc, path length) | "
            "R² (linear, 3 features) |",
            "|---|---|---|---|---|---|---|"]
    for cell in dict.fromkeys(r["cell"] for r in graph_rows):
        sel = [r for r in graph_rows if r["cell"] == cell]
        f = graph_fit(sel)
        dense = next(r["test_acc"] for r in rows if r["kind"] == "dense" and r["cell"] == cell)
        out.append(f"| {cell} | {np.mean([r['test_acc'] for r in sel]):.3f} | {dense:.3f} | {f['r_edges']:.2f} | "
                   f"{f['r_clustering']:.2f} | {f['r_path_length']:.2f} | {f['r2']:.2f} |")
    out += ["", f"Thesis: {PAPER['graph']}."]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prune = [r for r in rows if r["kind"] == "prune"]
    graph_rows = [r for r in rows if r["kind"] == "graph"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for cell in dict.fromkeys(r["cell"] for r in prune):
        sel = [r for r in prune if r["cell"] == cell]
        line, = axes[0].plot([r["sparsity"] for r in sel], [r["pruned_acc"] for r in sel], "o--", label=f"{cell} pruned")
        axes[0].plot([r["sparsity"] for r in sel], [r["retrained_acc"] for r in sel], "o-", color=line.get_color(),
                     label=f"{cell} retrained")
    axes[0].set(xlabel="sparsity of W and R", ylabel="test accuracy", title="magnitude pruning")
    for ax, feat in zip(axes[1:], ("clustering", "path_length")):
        for cell in dict.fromkeys(r["cell"] for r in graph_rows):
            sel = [r for r in graph_rows if r["cell"] == cell]
            ax.plot([r[feat] for r in sel], [r["test_acc"] for r in sel], "o", label=cell)
        ax.set(xlabel=feat.replace("_", " "), ylabel="test accuracy", title="random-graph recurrence")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    for s in cfg.sparsities:
        if not 0.0 <= s < 1.0:
            raise SystemExit(f"error: --sparsities must lie in [0, 1), got {s}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "sparse_rnn", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "hidden": cfg.hidden, "command": " ".join(["python experiments/sparse_rnn.py", *argv])}
    data = digits_split()  # x [n, 8, 8]: 8 steps of 8 pixels
    rows = []
    for kind in cfg.cells:
        rows += [dict(r, paper=PAPER["graph" if r["kind"] == "graph" else "prune"]) for r in run_cell(kind, cfg, data, meta, log)]
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}\n\n"
    md = tables(rows, cfg)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
