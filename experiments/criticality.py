"""Criticality (Roberts, Yaida & Hanin, *The Principles of Deep Learning Theory*): deep tanh/ReLU MLPs and tanh RNNs
initialised at and off the critical ``(C_b, C_W)``.

    python experiments/criticality.py                   # CPU preset (a few minutes)
    python experiments/criticality.py --preset=paper    # wider, deeper, more seeds

Three measurements (``seqjax.analysis.criticality``):

1. **Signal and gradient propagation at initialisation**: the mean squared preactivation ``K̂`` at the last layer
   (time step) relative to the first, and the squared-gradient ratio first/last layer, for tanh ``C_W ∈ {0.8, 1,
   1.25}``, ReLU ``C_W ∈ {1.6, 2, 2.5}`` (MLP of ``depth`` layers) and a tanh RNN over ``time`` steps, beside the
   infinite-width kernel recursion and ``χ_⊥^L``. The book: at criticality both change at most as a power of
   depth; off it, exponentially.
2. **Trainability**: tanh MLPs of ``train_depths`` layers, width ``train_width``, trained by full-batch gradient
   descent on a random teacher; final loss / initial loss over ``C_W``. Expected: a band around ``C_W = 1`` that
   narrows as depth grows.
3. **Depth-to-width ratio**: the excess kurtosis of one preactivation of a critical ReLU MLP over initialisations,
   against ``L/n``: the finite-width correction is set by ``L/n`` (equal ratios collapse) and grows linearly in it,
   about ``15 (L − 1)/n`` at first order (per-layer relative variance ``⟨σ⁴⟩/⟨σ²⟩² − 1 = 5`` for ReLU, times 3).

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` afresh each run; every record names the machine, the
date, the seed and the book's claim.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.analysis import criticality as CR
from seqjax.tasks.runner import machine, parse, write_results

#: the book's claims (ch. 5 and §2.4/§4.6; kurtosis slope derived here to first order in L/n)
CLAIM = {
    "propagation": "at criticality K and gradients change at most polynomially with depth; off it exponentially (χ_⊥^L)",
    "trainability": "trainable depth diverges at criticality (tanh C_W = 1); off it, deep nets fail to train",
    "depth_to_width": "finite-width effects are controlled by L/n (equal L/n collapse); ReLU kurtosis ≈ 15(L−1)/n",
}


@dataclasses.dataclass
class Config:
    width: int = 256  # propagation
    depth: int = 40
    time: int = 60  # RNN steps
    seeds: int = 6
    train_width: int = 64
    train_depths: tuple[int, ...] = (8, 24)
    train_cw: tuple[float, ...] = (0.5, 0.8, 1.0, 1.25, 2.0, 3.0)
    train_steps: int = 300
    train_lr: float = 0.05
    train_samples: int = 128
    train_seeds: int = 2
    kurt_pairs: tuple[int, ...] = (4, 64, 8, 128, 16, 256, 8, 64, 16, 128, 32, 256)  # (L, n) pairs, flattened
    kurt_inits: int = 400
    seed: int = 0
    out: str = "experiments/results"
    name: str = "criticality"
    preset: str = "cpu"


PRESETS = {
    "cpu": {},
    "tiny": dict(width=16, depth=4, time=4, seeds=2, train_width=8, train_depths=(3,), train_cw=(1.0, 2.0), train_steps=2,
                 train_samples=16, kurt_pairs=(2, 16, 4, 32), kurt_inits=8),
    "paper": dict(width=1024, depth=100, time=200, seeds=32, train_width=256, train_depths=(10, 30, 60), train_steps=2000,
                  train_samples=2048, train_seeds=8, kurt_pairs=(8, 128, 16, 256, 32, 512, 16, 128, 32, 256, 64, 512), kurt_inits=2000),
}


def propagation(cfg: Config) -> list[dict]:
    rows = []
    key = jax.random.PRNGKey(cfg.seed)
    x = jax.random.normal(key, (16, 32))
    x = x / jnp.sqrt(jnp.mean(x**2, axis=1, keepdims=True))  # ‖x‖²/n_0 = 1
    for act, cws in (("tanh", (0.8, 1.0, 1.25)), ("relu", (1.6, 2.0, 2.5))):
        for cw in cws:
            ds = [CR.mlp_diagnostics(jax.random.PRNGKey(cfg.seed * 1000 + s), x, act, cfg.width, cfg.depth, cw, 0.0)
                  for s in range(cfg.seeds)]
            K = np.mean([d.K for d in ds], 0)
            g = np.exp(np.mean([np.log(d.grad_sq) for d in ds], 0))
            theory = CR.kernel_recursion(act, cw, 0.0, cw * 1.0, cfg.depth)
            chi = np.prod([CR.susceptibilities(act, cw, k)[1] for k in theory[:-1]])  # σ'(z) of layers 1..L-1
            rows.append({"kind": "propagation", "net": "mlp", "activation": act, "C_W": cw,
                         "critical": cw == CR.critical_init(act)[1], "depth": cfg.depth, "width": cfg.width,
                         "K_last_over_first": float(K[-1] / K[0]), "K_theory": float(theory[-1] / theory[0]),
                         "grad_first_over_last": float(g[0] / g[-1]), "grad_theory": float(chi),
                         "claim": CLAIM["propagation"]})
    xs = jax.random.normal(key, (16, cfg.time, 32)) * 0.3  # small inputs: C_U ‖x‖²/n_in = 0.09
    for cw in (0.8, 1.0, 1.25):
        ds = [CR.rnn_diagnostics(jax.random.PRNGKey(cfg.seed * 1000 + s), xs, "tanh", cfg.width, cw, 0.0, 1.0)
              for s in range(cfg.seeds)]
        K = np.mean([d.K for d in ds], 0)
        g = np.exp(np.mean([np.log(d.grad_sq) for d in ds], 0))
        theory = CR.rnn_kernel_recursion("tanh", cw, 0.0, 1.0, np.full(cfg.time, 0.09))
        chi = np.prod([CR.susceptibilities("tanh", cw, k)[1] for k in theory[:-1]])
        rows.append({"kind": "propagation", "net": "rnn", "activation": "tanh", "C_W": cw, "critical": cw == 1.0,
                     "depth": cfg.time, "width": cfg.width, "K_last_over_first": float(K[-1] / K[0]),
                     "K_theory": float(theory[-1] / theory[0]), "grad_first_over_last": float(g[0] / g[-1]),
                     "grad_theory": float(chi), "claim": CLAIM["propagation"]})
    return rows


def trainability(cfg: Config) -> list[dict]:
    key = jax.random.PRNGKey(cfg.seed + 7)
    kx, kt1, kt2 = jax.random.split(key, 3)
    n0 = 16
    X = jax.random.normal(kx, (cfg.train_samples, n0))
    Y = jnp.tanh(X @ jax.random.normal(kt1, (n0, 32)) / np.sqrt(n0)) @ jax.random.normal(kt2, (32, 1)) / np.sqrt(32)
    base = float(jnp.mean((Y - Y.mean()) ** 2))
    rows = []
    for depth in cfg.train_depths:
        widths = (n0,) + (cfg.train_width,) * depth + (1,)

        def loss(params):
            z = CR.mlp_forward(params, X, "tanh")[-1]
            return jnp.mean((z - Y) ** 2)

        def train(cw, k):
            params = CR.init_mlp(k, widths, cw, 0.0)
            params[-1] = (params[-1][0] * jnp.sqrt(1.0 / cw), params[-1][1])  # the readout at C_W = 1 for every C_W
            l0 = loss(params)

            def step(p, _):
                g = jax.grad(loss)(p)
                return jax.tree.map(lambda a, b: a - cfg.train_lr * b, p, g), None

            params, _ = jax.lax.scan(step, params, None, length=cfg.train_steps)
            return l0, loss(params)

        run = jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))
        keys = jax.random.split(jax.random.PRNGKey(cfg.seed + depth), cfg.train_seeds)
        l0, l1 = (np.asarray(a) for a in run(jnp.asarray(cfg.train_cw), keys))
        for i, cw in enumerate(cfg.train_cw):
            fin = np.where(np.isfinite(l1[i]), l1[i], np.inf)
            rows.append({"kind": "trainability", "activation": "tanh", "depth": depth, "width": cfg.train_width,
                         "C_W": cw, "critical": cw == 1.0, "steps": cfg.train_steps, "lr": cfg.train_lr,
                         "loss_init": float(np.median(l0[i])), "loss_final": float(np.median(fin)),
                         "final_over_variance": float(np.median(fin) / base), "claim": CLAIM["trainability"]})
    return rows


def depth_to_width(cfg: Config) -> list[dict]:
    pairs = list(zip(cfg.kurt_pairs[::2], cfg.kurt_pairs[1::2]))
    x = jnp.ones((1, 8))
    rows = []
    for L, n in pairs:
        keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 31 * L + n), cfg.kurt_inits)
        widths = (8,) + (n,) * L
        z = jax.jit(jax.vmap(lambda k: CR.mlp_forward(CR.init_mlp(k, widths, 2.0, 0.0), x, "relu")[-1][0, :4]))(keys)
        z = np.asarray(z, np.float64).ravel()  # 4 units per init (exchangeable)
        kurt = float(np.mean(z**4) / np.mean(z**2) ** 2 - 3)
        rows.append({"kind": "depth_to_width", "activation": "relu", "C_W": 2.0, "depth": L, "width": n, "ratio": L / n,
                     "kurtosis": kurt, "kurtosis_first_order": 15 * (L - 1) / n, "inits": cfg.kurt_inits,
                     "claim": CLAIM["depth_to_width"]})
    return rows


def tables(rows: list[dict]) -> str:
    out = ["**Propagation at initialisation** (tanh/ReLU MLP over depth, tanh RNN over time; 'theory': infinite width)", "",
           "| net | σ | C_W | critical | L or T | K_L/K_1 | theory | grad_1/grad_L | χ_⊥ product |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "propagation"):
        out.append(f"| {r['net']} | {r['activation']} | {r['C_W']} | {'yes' if r['critical'] else 'no'} | {r['depth']} | "
                   f"{r['K_last_over_first']:.3g} | {r['K_theory']:.3g} | {r['grad_first_over_last']:.3g} | {r['grad_theory']:.3g} |")
    tr = [r for r in rows if r["kind"] == "trainability"]
    if tr:
        cws = list(dict.fromkeys(r["C_W"] for r in tr))
        out += ["", f"**Trainability** (tanh MLP, width {tr[0]['width']}, {tr[0]['steps']} GD steps, lr {tr[0]['lr']}; "
                "final training loss / target variance, median over seeds; trivial baseline (predict the mean) = 1.0)", "",
                "| depth | " + " | ".join(f"C_W={c}" for c in cws) + " | best C_W | met |", "|---" * (len(cws) + 3) + "|"]
        for d in dict.fromkeys(r["depth"] for r in tr):
            sel = {r["C_W"]: r["final_over_variance"] for r in tr if r["depth"] == d}
            best = min(sel, key=sel.get)
            out.append(f"| {d} | " + " | ".join(f"{sel[c]:.3f}" for c in cws) + f" | {best} | "
                       f"{'met' if 0.8 <= best <= 1.25 else 'missed'} |")
    kw = [r for r in rows if r["kind"] == "depth_to_width"]
    if kw:
        out += ["", f"**Depth-to-width ratio** (critical ReLU, excess kurtosis of one preactivation over {kw[0]['inits']} "
                "initialisations ×4 units)", "", "| L | n | L/n | kurtosis | 15(L−1)/n |", "|---|---|---|---|---|"]
        for r in sorted(kw, key=lambda r: (r["ratio"], r["depth"])):
            out.append(f"| {r['depth']} | {r['width']} | {r['ratio']:.4g} | {r['kurtosis']:.3f} | {r['kurtosis_first_order']:.3f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    tr = [r for r in rows if r["kind"] == "trainability"]
    for d in dict.fromkeys(r["depth"] for r in tr):
        sel = [r for r in tr if r["depth"] == d]
        axes[0].plot([r["C_W"] for r in sel], [min(r["final_over_variance"], 2.0) for r in sel], "o-", label=f"L={d}")
    axes[0].axvline(1.0, color="gray", lw=0.5)
    axes[0].set(xscale="log", xlabel="C_W (tanh)", ylabel="final loss / variance", title="trainability")
    axes[0].legend(fontsize=7)
    kw = [r for r in rows if r["kind"] == "depth_to_width"]
    axes[1].plot([r["ratio"] for r in kw], [r["kurtosis"] for r in kw], "o", label="measured")
    xr = np.linspace(0, max([r["ratio"] for r in kw] + [0.01]), 20)
    axes[1].plot(xr, 15 * xr, "-", lw=0.8, label="15 L/n")
    axes[1].set(xlabel="L / n", ylabel="excess kurtosis", title="ReLU at criticality")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if len(cfg.kurt_pairs) % 2:
        raise SystemExit(f"error: --kurt_pairs must list (depth, width) pairs, got {len(cfg.kurt_pairs)} numbers")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "criticality", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "command": " ".join(["python experiments/criticality.py", *argv])}
    rows = []
    for part in (propagation, trainability, depth_to_width):
        got = part(cfg)
        log(f"{part.__name__}: {len(got)} rows")
        rows += [dict(meta, **r) for r in got]
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}\n\n"
    md = tables(rows)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
