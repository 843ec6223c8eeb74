"""Annealed gradient noise (Neelakantan et al. 2015): a 20-layer plain ReLU MLP (width 50) from a poor
initialisation trains with gradient noise and not without.

    python experiments/gradient_noise.py                       # 8 seeds × {no noise, eta = 0.3, eta = 0.01} + He init
    python experiments/gradient_noise.py --etas=0,1.0 --seeds=4
    python experiments/gradient_noise.py --preset=paper        # 10 seeds, eta in {0, 0.01, 0.3, 1.0}, 10k steps

Data: scikit-learn's 8×8 digits (1,437 train / 360 test, pixels / 16). Model: ``depth`` hidden layers of
``width`` ReLU units, weights ``N(0, init_std²)`` (the poor initialisation: at width 50 and std 0.1 each layer
halves the signal, 2^-20 after 20 layers) and zero biases; a ``He`` (``std = sqrt(2/fan_in)``) run without noise
is the well-initialised reference. Plain SGD on mini-batches with gradient clipping, then
``seqjax.train.noise.gradient_noise(eta, gamma)`` — ``N(0, eta / (1 + t)^gamma)`` added to every gradient entry —
before the SGD step. All seeds of a condition train at once (``vmap``). A run *trains* when its test accuracy
reaches ``success_acc``; the table gives the success rate per condition.

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``gradient_noise``) afresh each run;
every record names the machine, the date, the seed and the paper's claim.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.tasks.classification import digits_split
from seqjax.tasks.runner import machine, parse, write_results
from seqjax.train.noise import gradient_noise

#: the paper's claim (abstract; per-table numbers not reproduced here)
PAPER = ("a fully-connected 20-layer network trains with standard gradient descent from a poor initialisation "
         "when annealed gradient noise (gamma = 0.55, eta in {0.01, 0.3, 1.0}) is added, and not without it")


@dataclasses.dataclass
class Config:
    depth: int = 20  # hidden layers
    width: int = 50
    init_std: float = 0.1  # the poor initialisation: weights N(0, init_std^2)
    lr: float = 0.05
    clip: float = 10.0  # global-norm gradient clipping before the noise
    steps: int = 2000
    batch_size: int = 64
    etas: tuple[float, ...] = (0.0, 0.3, 0.01)  # 0 = no noise
    gamma: float = 0.55
    he_reference: bool = True  # also train He-initialised without noise
    seeds: int = 8
    success_acc: float = 0.5  # test accuracy that counts as "trains" (chance 0.1)
    log_every: int = 50  # training-loss curve resolution
    seed: int = 0  # first seed
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "gradient_noise"
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(depth=3, width=8, steps=2, seeds=2, etas=(0.0, 0.3), he_reference=False, log_every=1),
    "paper": dict(steps=10_000, seeds=10, etas=(0.0, 0.01, 0.3, 1.0)),
}


def init_mlp(key, sizes, std: float | None):
    """``[(W, b), ...]``; ``std=None`` is He (``sqrt(2 / fan_in)``)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [((std if std is not None else np.sqrt(2.0 / a)) * jax.random.normal(k, (a, b), jnp.float32), jnp.zeros((b,), jnp.float32))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def forward(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b[None])
    w, b = params[-1]
    return x @ w + b[None]


def train_condition(cfg: Config, data, eta: float, std: float | None):
    """Train ``cfg.seeds`` networks at once; returns (final test accuracy [s], loss curve [s, steps/log_every])."""
    xtr, ytr, xte, yte = map(jnp.asarray, data)
    sizes = [xtr.shape[1]] + [cfg.width] * cfg.depth + [10]
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), *([gradient_noise(eta, cfg.gamma)] if eta > 0 else []), optax.sgd(cfg.lr))
    loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

    def one(seed):
        key = jax.random.PRNGKey(seed)
        params = init_mlp(key, sizes, std)
        # each seed's own noise stream: the noise transform's state is (count, raw key)
        state = tx.init(params)
        if eta > 0:
            state = (state[0], state[1]._replace(rng_key=jax.random.key_data(jax.random.fold_in(key, 7))), state[2])

        def body(carry, k):
            p, st = carry
            idx = jax.random.randint(k, (cfg.batch_size,), 0, xtr.shape[0])
            loss, g = jax.value_and_grad(loss_fn)(p, xtr[idx], ytr[idx])
            u, st = tx.update(g, st, p)
            return (optax.apply_updates(p, u), st), loss

        (params, _), losses = jax.lax.scan(body, (params, state), jax.random.split(jax.random.fold_in(key, 1), cfg.steps))
        acc = jnp.mean(jnp.argmax(forward(params, xte), -1) == yte)
        curve = losses[: cfg.steps // cfg.log_every * cfg.log_every].reshape(-1, cfg.log_every).mean(1)
        return acc, curve

    seeds = jnp.arange(cfg.seed, cfg.seed + cfg.seeds)
    acc, curve = jax.jit(jax.vmap(one))(seeds)
    return np.asarray(acc), np.asarray(curve)


def conditions(cfg: Config):
    out = [(f"init N(0, {cfg.init_std}²), " + (f"noise eta={eta}" if eta > 0 else "no noise"), eta, cfg.init_std) for eta in cfg.etas]
    if cfg.he_reference:
        out.append(("He init, no noise (reference)", 0.0, None))
    return out


def table(rows: list[dict], cfg: Config) -> str:
    out = [f"{cfg.depth}-layer ReLU MLP, width {cfg.width}, SGD lr {cfg.lr}, clip {cfg.clip}, {cfg.steps} steps of "
           f"batch {cfg.batch_size}, gamma {cfg.gamma}; {cfg.seeds} seeds; a run trains when its test accuracy "
           f">= {cfg.success_acc} (chance 0.10)", "",
           "| condition | trains (seeds) | test accuracy, mean | best | paper | met |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["condition"] for r in rows):
        sel = [r for r in rows if r["condition"] == name]
        rate = np.mean([r["trains"] for r in sel])
        accs = [r["test_acc"] for r in sel]
        reference = name.startswith("He")
        noisy = sel[0]["eta"] > 0
        paper = "trains (well-initialised)" if reference else ("trains" if noisy else "fails")
        met = "—" if reference else ("met" if (rate >= 0.8 if noisy else rate <= 0.2) else "missed")
        out.append(f"| {name} | {int(round(rate * len(sel)))}/{len(sel)} | {np.mean(accs):.3f} | {np.max(accs):.3f} | {paper} | {met} |")
    return "\n".join(out)


def plot(curves: dict, cfg: Config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, c in curves.items():
        steps = (np.arange(c.shape[1]) + 1) * cfg.log_every
        line, = ax.plot(steps, np.median(c, 0), label=name)
        ax.fill_between(steps, c.min(0), c.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel="training loss (median, min–max over seeds)", title=f"{cfg.depth}-layer MLP on digits")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if cfg.steps < cfg.log_every:
        raise SystemExit(f"error: --steps ({cfg.steps}) must be >= --log_every ({cfg.log_every})")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "gradient_noise", "machine": machine(), "date": datetime.date.today().isoformat(), "preset": cfg.preset,
            "command": " ".join(["python experiments/gradient_noise.py", *argv]), "paper": PAPER}
    data = digits_split(flat=True)  # x [n, 64]
    rows, curves = [], {}
    for name, eta, std in conditions(cfg):
        t0 = time.time()
        acc, curve = train_condition(cfg, data, eta, std)
        curves[name] = curve
        for s, (a, c) in enumerate(zip(acc, curve)):
            rows.append(dict(meta, condition=name, eta=eta, gamma=cfg.gamma, init_std=std, seed=cfg.seed + s,
                             test_acc=float(a), trains=bool(a >= cfg.success_acc), final_loss=float(c[-1]),
                             loss_curve=[round(float(v), 4) for v in c]))
        log(f"{name}: acc {np.round(acc, 3).tolist()} ({time.time() - t0:.0f}s)")
    header = f"`{meta['command']}` — {meta['machine']}, seeds {cfg.seed}–{cfg.seed + cfg.seeds - 1}, preset {cfg.preset}\n\n"
    md = table(rows, cfg)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + f"\n\nPaper: {PAPER}.\n", lambda png: plot(curves, cfg, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
