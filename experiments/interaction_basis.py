"""The interaction basis (Bushnaq et al. 2024): rotate a trained network's layers into the basis built from the
activations' and the Jacobians' Gram matrices, and compare how sparsely and how modularly its features interact
with the PCA basis and the plain neuron basis.

    python experiments/interaction_basis.py                   # a ReLU MLP on scikit-learn's 8×8 digits (CPU, minutes)
    python experiments/interaction_basis.py --width=128 --depth=4
    python experiments/interaction_basis.py --preset=paper

A ReLU MLP (``depth`` hidden layers of ``width``) is trained with Adam on the bundled digits (no download). On the
training inputs, ``seqjax.analysis.interaction`` builds every layer's basis backwards from the logits (PCA at the
logits), drops null directions, and measures per basis (interaction, whitened; interaction+Λ, scaled by the
gradient × activation importance as the Local Interaction Basis does; PCA; neuron):

- the number of directions kept per layer (degeneracy removed),
- the fraction of edges that hold 99 % of the interaction-graph weight (lower = sparser), per layer pair,
- Newman's modularity of the layered graph (edges normalised per layer pair; spectral clustering, best over
  2–6 modules),
- relevance: test accuracy when one hidden layer keeps only its top-r directions (interaction basis ordered by
  the Jacobian metric, PCA by variance).

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` afresh each run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.analysis import interaction as IB
from seqjax.tasks import classification
from seqjax.tasks.runner import machine, parse, write_results

#: Bushnaq et al. 2024 (LIB paper abstract): on modular addition and CIFAR-10 MLPs, LIB finds more computationally
#: relevant, more sparsely interacting features than PCA; modules are unreliable in language models
CLAIM = "interaction-basis features interact more sparsely and are more computationally relevant than PCA's"


@dataclasses.dataclass
class Config:
    width: int = 64
    depth: int = 3
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 128
    tol: float = 1e-5  # eigenvalues below tol × the largest are null directions
    probe_layer: int = 2  # hidden layer truncated for the relevance test
    ranks: tuple[int, ...] = (2, 4, 8, 16, 32)
    seed: int = 0
    out: str = "experiments/results"
    name: str = "interaction_basis"
    preset: str = "cpu"


PRESETS = {
    "cpu": {},
    "tiny": dict(width=8, depth=2, steps=2, batch_size=16, probe_layer=1, ranks=(2, 4)),
    "paper": dict(width=256, depth=4, steps=10_000),
}


def init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (o, i)) * np.sqrt(2.0 / i), jnp.zeros(o)) for k, i, o in zip(keys, sizes[:-1], sizes[1:])]


def layer_map(W, b, relu: bool):
    return lambda v: (jax.nn.relu if relu else (lambda z: z))(W @ v + b)


def forward(params, x):
    """Activations of every layer ``[x, h_1, ..., h_depth, logits]``."""
    acts = [x]
    for i, (W, b) in enumerate(params):
        z = acts[-1] @ W.T + b[None, :]
        acts.append(jax.nn.relu(z) if i < len(params) - 1 else z)
    return acts


def train(cfg: Config, data):
    x_tr, y_tr = data["x_train"], data["y_train"]
    params = init(jax.random.PRNGKey(cfg.seed), (x_tr.shape[1],) + (cfg.width,) * cfg.depth + (10,))
    tx = optax.adam(cfg.lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, x)[-1], y).mean())(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.steps):
        idx = rng.integers(0, len(x_tr), cfg.batch_size)
        params, opt, _ = step(params, opt, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
    return params


def accuracy(params, x, y, layer=None, basis=None, r=None):
    acts = [jnp.asarray(x)]
    for i, (W, b) in enumerate(params):
        h = acts[-1]
        if layer is not None and i == layer:  # h is hidden layer `layer`: keep its top-r directions
            h = jnp.asarray((np.asarray(h, np.float64) @ basis.C[:, :r]) @ basis.C_pinv[:r], jnp.float32)
        z = h @ W.T + b[None, :]
        acts.append(jax.nn.relu(z) if i < len(params) - 1 else z)
    return float((np.argmax(np.asarray(acts[-1]), -1) == y).mean())


def best_modularity(edges, seed):
    norm = [e / e.sum() for e in edges]  # every layer pair weighs the same
    A = IB.layered_adjacency(norm)
    live = int((A.sum(1) > 0).sum())
    best = (-1.0, 0)
    for m in range(2, min(6, live) + 1):
        q = IB.modularity(A, IB.find_modules(A, m, seed))
        best = max(best, (q, m))
    return best


def data_for(cfg: Config):
    x_tr, y_tr, x_te, y_te = classification.digits(seed=cfg.seed)  # pixel sequences in [0, 1]; an MLP reads all 64 at once
    return {"x_train": x_tr[:, :, 0], "y_train": y_tr, "x_test": x_te[:, :, 0], "y_test": y_te}


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if not 1 <= cfg.probe_layer <= cfg.depth:
        raise SystemExit(f"error: --probe_layer must be a hidden layer in [1, {cfg.depth}], got {cfg.probe_layer}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    data = data_for(cfg)
    params = train(cfg, data)
    acc = accuracy(params, data["x_test"], data["y_test"])
    log(f"trained: test accuracy {acc:.3f}")
    acts = [np.asarray(a, np.float64) for a in forward(params, jnp.asarray(data["x_train"]))]
    maps = [layer_map(W, b, i < len(params) - 1) for i, (W, b) in enumerate(params)]
    bases = {"interaction": IB.interaction_bases(maps, acts, cfg.tol),
             "interaction+Λ": IB.interaction_bases(maps, acts, cfg.tol, importance=True),
             "pca": [IB.pca_basis(a, cfg.tol) for a in acts],
             "neuron": [IB.neuron_basis(a.shape[1]) for a in acts]}
    meta = {"system": "interaction_basis", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "width": cfg.width, "depth": cfg.depth, "steps": cfg.steps, "test_acc": acc,
            "claim": CLAIM, "command": " ".join(["python experiments/interaction_basis.py", *argv])}
    rows = []
    for name, bs in bases.items():
        edges = [IB.interaction_graph(maps[i], acts[i], bs[i], bs[i + 1]) for i in range(len(maps))]
        q, m = best_modularity(edges, cfg.seed)
        rows.append(dict(meta, kind="basis", basis=name, ranks=[b.rank for b in bs],
                         sparsity=[IB.edge_sparsity(e) for e in edges],
                         edges_needed=[round(IB.edge_sparsity(e) * e.size) for e in edges], modularity=q, modules=m))
        log(f"{name}: ranks {rows[-1]['ranks']} sparsity {np.round(rows[-1]['sparsity'], 3).tolist()} Q={q:.3f} ({m})")
    majority = float(np.bincount(data["y_test"]).max() / len(data["y_test"]))
    for name in ("interaction", "interaction+Λ", "pca"):
        b = bases[name][cfg.probe_layer]
        for r in cfg.ranks:
            if r <= b.rank:
                rows.append(dict(meta, kind="relevance", basis=name, layer=cfg.probe_layer, r=r, majority=majority,
                                 acc=accuracy(params, data["x_test"], data["y_test"], cfg.probe_layer, b, r)))
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}\n\n"
    md = table(rows, cfg, acc, majority)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


def table(rows, cfg: Config, acc, majority) -> str:
    basis = [r for r in rows if r["kind"] == "basis"]
    pairs = len(basis[0]["sparsity"])
    out = [f"ReLU MLP 64 → {cfg.width}×{cfg.depth} → 10 on digits, {cfg.steps} Adam steps, test accuracy {acc:.3f} "
           f"(majority class {majority:.3f}).", "",
           "Edges: the fraction (count) of interaction-graph edges, largest first, that hold 99 % of the weight.", "",
           "| basis | directions kept per layer | " + " | ".join(f"edges, L{i}→L{i + 1}" for i in range(pairs))
           + " | modularity Q (modules) |", "|---" * (pairs + 3) + "|"]
    for r in basis:
        out.append(f"| {r['basis']} | {r['ranks']} | " + " | ".join(f"{s:.3f} ({n})" for s, n in zip(r["sparsity"], r["edges_needed"]))
                   + f" | {r['modularity']:.3f} ({r['modules']}) |")
    rel = [r for r in rows if r["kind"] == "relevance"]
    ranks = sorted({r["r"] for r in rel})
    if rel:
        out += ["", f"**Relevance**: test accuracy with hidden layer {cfg.probe_layer} cut to its top-r directions", "",
                "| basis | " + " | ".join(f"r = {r}" for r in ranks) + " |", "|---" * (len(ranks) + 1) + "|"]
        for name in ("interaction", "interaction+Λ", "pca"):
            got = {r["r"]: r["acc"] for r in rel if r["basis"] == name}
            out.append(f"| {name} | " + " | ".join(f"{got[r]:.3f}" if r in got else "—" for r in ranks) + " |")
    pca = next(r for r in basis if r["basis"] == "pca")
    verdict = []
    for name in ("interaction", "interaction+Λ"):
        lib = next(r for r in basis if r["basis"] == name)
        sparser = sum(lib["edges_needed"][:-1]) < sum(pca["edges_needed"][:-1])
        verdict.append(f"{name}: {'met' if sparser else 'missed'} ({sum(lib['edges_needed'][:-1])} vs "
                       f"{sum(pca['edges_needed'][:-1])} edges)")
    out += ["", f"Paper's claim: {CLAIM}. Fewer edges than PCA for 99 % of the weight, summed over the layer pairs "
            "before the logits: " + "; ".join(verdict) + "."]
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for r in (r for r in rows if r["kind"] == "basis"):
        axes[0].plot(range(len(r["sparsity"])), r["sparsity"], "o-", label=r["basis"])
    axes[0].set(xlabel="layer pair", ylabel="edge fraction for 99 %", title="interaction sparsity")
    axes[0].legend(fontsize=7)
    for name in ("interaction", "interaction+Λ", "pca"):
        sel = [r for r in rows if r["kind"] == "relevance" and r["basis"] == name]
        axes[1].plot([r["r"] for r in sel], [r["acc"] for r in sel], "o-", label=name)
    axes[1].set(xscale="log", xlabel="directions kept", ylabel="test accuracy", title="relevance")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
