"""N-parity and N-DMS curricula with a learnable-τ leaky RNN (Khajehabdollahi et al. 2024).

    python experiments/timescales.py --curriculum=single --task=parity
    python experiments/timescales.py --curriculum=multi --task=parity
    python experiments/timescales.py --preset=paper --curriculum=multi
    python experiments/timescales.py plot single.jsonl multi.jsonl --png=timescales.png   # table + plot

A leaky ReLU RNN ``r_t = (1 − 1/τ) r_{t−1} + (1/τ) relu(W r_{t−1} + W_in x_t + b)`` with a trainable
τ ≥ 1 per neuron (``seqjax.rnn``'s ``"leaky"`` cell) reads a Bernoulli stream. Curricula:

- single-head: one readout, trained on the current N; N grows by one when its accuracy passes
  ``threshold``;
- multi-head: a readout per N' ≤ N, all trained together; a head is added when all pass.

Within a step budget we report the largest N solved and the mean-τ trajectory (JSON lines in
``--out``; the paper's finding: multi-head reaches larger N with a flat mean τ, single-head grows τ).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from seqjax import cli, rnn
from seqjax.tasks import IGNORE, timescales
from seqjax.tasks.runner import parse


@dataclasses.dataclass
class Config:
    task: Literal["parity", "dms"] = "parity"
    curriculum: Literal["single", "multi"] = "multi"
    hidden: int = 64
    seq_len: int = 100
    batch_size: int = 64
    steps: int = 3000
    lr: float = 3e-3
    threshold: float = 0.98
    check_every: int = 50
    n_max: int = 32
    seed: int = 0
    out: str = ""
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(hidden=8, seq_len=20, batch_size=4, steps=2, check_every=1, n_max=4),
    "paper": dict(hidden=500, seq_len=500, batch_size=256, steps=200_000, lr=1e-3, check_every=500, n_max=100),
}


def init(cfg: Config, key):
    k1, k2 = jax.random.split(key)
    p = rnn.init_params("leaky", k1, 1, cfg.hidden, tau_init=1.5)
    heads = cfg.n_max if cfg.curriculum == "multi" else 1
    p["readout"] = jax.random.normal(k2, (cfg.hidden, heads, 2), jnp.float32) / np.sqrt(cfg.hidden)
    p["readout_b"] = jnp.zeros((heads, 2), jnp.float32)
    return p


def logits_fn(p, x):
    y, _ = rnn.rnn("leaky", {k: v for k, v in p.items() if not k.startswith("readout")}, x[..., None].astype(jnp.float32))
    return jnp.einsum("bth,hkc->btkc", y, p["readout"]) + p["readout_b"][None, None]


def loss_fn(p, x, y, active):
    """``y [b, t, heads]`` targets per head; ``active [heads]`` which heads are trained."""
    logp = jax.nn.log_softmax(logits_fn(p, x), axis=-1)
    mask = (y != IGNORE) & active[None, None]
    nll = -jnp.take_along_axis(logp, jnp.where(mask, y, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def run(cfg: Config) -> dict:
    if cfg.curriculum not in ("single", "multi"):
        raise ValueError(f"--curriculum must be single or multi, got {cfg.curriculum!r}")
    p = init(cfg, jax.random.PRNGKey(cfg.seed))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.lr))
    opt = tx.init(p)
    heads = p["readout"].shape[1]

    def targets(x, n):
        if cfg.curriculum == "multi":
            return timescales.multi_targets(x, cfg.n_max, task=cfg.task)
        return timescales.multi_targets(x, n, task=cfg.task)[..., n - 1 : n]

    @jax.jit
    def step(p, opt, x, y, active):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y, active)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    @jax.jit
    def accuracy(p, x, y):
        pred = jnp.argmax(logits_fn(p, x), -1)
        ok = (pred == y) | (y == IGNORE)
        return jnp.sum(ok & (y != IGNORE), axis=(0, 1)) / jnp.maximum(jnp.sum(y != IGNORE, axis=(0, 1)), 1)

    n, records = 1, []
    rng = np.random.default_rng(cfg.seed)
    x_eval = rng.integers(0, 2, size=(256, cfg.seq_len)).astype(np.int32)
    for it in range(1, cfg.steps + 1):
        x = rng.integers(0, 2, size=(cfg.batch_size, cfg.seq_len)).astype(np.int32)
        active = np.arange(heads) < (n if cfg.curriculum == "multi" else 1)
        p, opt, loss = step(p, opt, jnp.asarray(x), jnp.asarray(targets(x, n)), jnp.asarray(active))
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"non-finite loss at step {it}")
        if it % cfg.check_every == 0 or it == cfg.steps:
            acc = np.asarray(accuracy(p, jnp.asarray(x_eval), jnp.asarray(targets(x_eval, n))))
            solved = bool(np.all(acc[: (n if cfg.curriculum == "multi" else 1)] >= cfg.threshold))
            tau = np.maximum(np.asarray(p["tau"]), 1.0)
            rec = {"task": cfg.task, "curriculum": cfg.curriculum, "seed": cfg.seed, "step": it, "N": n,
                   "solved": solved, "loss": float(loss), "mean_tau": float(tau.mean()),
                   "acc_current": float(acc[n - 1] if cfg.curriculum == "multi" else acc[0])}
            records.append(rec)
            if cfg.out:
                os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
                with open(cfg.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
            if solved and n < cfg.n_max:
                n += 1
    best = max([r["N"] - (0 if r["solved"] else 1) for r in records] + [0])
    return {"largest_N": best, "records": records}


def plot(paths: list[str], out: str) -> str:
    """Curves of N and mean τ over steps for each run's JSON lines in ``paths`` (one line per curriculum and
    task) into ``out`` (PNG); returns the markdown table of the largest N solved and the final mean τ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    rows = ["| task | curriculum | steps | largest N solved | mean τ at the end |", "|---|---|---|---|---|"]
    for path in paths:
        recs = [json.loads(x) for x in open(path)]
        label = f"{recs[0]['task']} {recs[0]['curriculum']}"
        steps = [r["step"] for r in recs]
        a1.plot(steps, [r["N"] for r in recs], label=label)
        a2.plot(steps, [r["mean_tau"] for r in recs], label=label)
        best = max(r["N"] - (0 if r["solved"] else 1) for r in recs)
        rows.append(f"| {recs[0]['task']} | {recs[0]['curriculum']} | {steps[-1]} | {best} | {recs[-1]['mean_tau']:.3f} |")
    a1.set(xlabel="step", ylabel="N (curriculum)")
    a2.set(xlabel="step", ylabel="mean τ")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return "\n".join(rows)


@dataclasses.dataclass
class Plot:
    """``timescales.py plot <runs.jsonl ...> [--png=<out>]``: the table and curves of finished runs."""

    runs: tyro.conf.Positional[tuple[str, ...]]  # JSON-lines files written with --out
    png: str = "timescales.png"


def main(argv=None):
    """Options train one run (``--help``); ``plot <runs.jsonl ...> --png=<out>`` plots finished runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        a = cli.parse(Plot, argv[1:])
        table = plot(list(a.runs), a.png)
        print(table)
        return table
    out = run(parse(Config, PRESETS, argv))
    print(f"largest N solved: {out['largest_N']}")
    return out


if __name__ == "__main__":
    main()
