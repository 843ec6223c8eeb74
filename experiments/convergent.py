"""Convergent learning (Li, Yosinski, Clune, Lipson & Hopcroft, ICLR 2016): do two networks trained from different
seeds learn the same units?

    python experiments/convergent.py                      # two LSTMs on the S3 word problem (CPU, minutes)
    python experiments/convergent.py --model=gru --task=parity
    python experiments/convergent.py --preset=paper

Two (or ``seeds``) stacked-RNN LMs (``seqjax.tasks.runner``; embedding → ``num_layers`` RNN layers → head) are
trained on the same task from different seeds. On one held-out batch (scored positions as samples), for every
layer — the embedding, each RNN layer's output, the logits — ``seqjax.analysis.matching`` computes:

- one-to-one bipartite (Hungarian) matching by correlation: the fraction of units whose match has ``corr ≥
  threshold`` ("near-perfect"), and the mean matched correlation;
- one-to-many L1 prediction: mean R² of each unit of net B from all units of net A, and the mean number of
  predictors a unit needs;
- many-to-many spectral clustering: the fraction of groups that mix units of both nets.

Baseline: the same measurements between the two networks *before* training (same inputs, same seeds).

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` afresh each run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax.analysis import matching as MA
from seqjax.tasks import IGNORE, masked_accuracy, state_tracking
from seqjax.tasks.runner import RNN_MODELS, RunConfig, TaskSpec, build_model, machine, parse, run, write_results

#: Li et al. 2016 (abstract, §3): a subset of units is learned reliably by every net (near-perfect one-to-one
#: matches) while others are not; alignment is best in the first layer; sparse (few-to-one) maps explain more.
CLAIM = ("some units have near-perfect one-to-one matches across seeds, others are matched only by small groups "
         "(one-to-many / many-to-many); alignment is best near the input")

TASKS = {
    "s3": (lambda n, lo, hi, seed: state_tracking.word_problem(n, lo, hi, k=3, seed=seed), 7),
    "parity": (lambda n, lo, hi, seed: state_tracking.parity(n, lo, hi, seed=seed), 3),
}


@dataclasses.dataclass
class Config(RunConfig):
    model: str = "lstm"
    task: Literal["s3", "parity"] = "s3"
    seeds: int = 2
    min_len: int = 4
    max_len: int = 16
    eval_size: int = 256
    threshold: float = 0.9  # a "near-perfect" match
    alpha: float = 0.05  # L1 weight of the sparse prediction
    groups: int = 8  # spectral clusters
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "convergent"


PRESETS = {
    "cpu": dict(steps=1500, batch_size=64, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=1500, progress=False),
    "tiny": dict(steps=2, batch_size=4, d_model=8, num_layers=1, eval_every=2, eval_size=8, groups=2, progress=False),
    "paper": dict(steps=10000, batch_size=128, d_model=256, num_layers=3, lr=1e-3, eval_every=5000, seeds=4, eval_size=1024,
                  groups=32, progress=False),
}


def make_task(cfg: Config) -> TaskSpec:
    gen, vocab = TASKS[cfg.task]
    return TaskSpec(cfg.task, vocab, lambda step, bs, seed: gen(bs, cfg.min_len, cfg.max_len, seed * 1_000_003 + step),
                    lambda: {"test": gen(cfg.eval_size, cfg.min_len, cfg.max_len, 10_000)},
                    lambda preds, b: {"acc": masked_accuracy(preds, b.targets)})


def layer_activations(model, tokens) -> dict[str, np.ndarray]:
    """``{layer: [b, t, units]}``: the embedding, each RNN layer's output and the logits."""
    x = model.embed(tokens)
    out = {"embed": x}
    for i, layer in enumerate(model.rnn.layers):
        x, _ = layer(x)
        out[f"rnn{i + 1}"] = x
    out["logits"] = model.head(x)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def compare(acts_a, acts_b, mask, cfg: Config) -> list[dict]:
    rows = []
    for layer in acts_a:
        a, b = acts_a[layer][mask], acts_b[layer][mask]
        m = MA.match_units(a, b)
        sp = MA.sparse_prediction(a, b, cfg.alpha)
        la, lb = MA.spectral_groups(a, b, min(cfg.groups, a.shape[1] + b.shape[1]), seed=cfg.seed)
        groups = set(la) | set(lb)
        rows.append({"layer": layer, "units": a.shape[1], "near_perfect": MA.near_perfect_fraction(m, cfg.threshold),
                     "mean_corr": float(m.corr.mean()), "median_corr": float(np.median(m.corr)),
                     "sparse_r2": float(sp.r2.mean()), "predictors": float(np.mean([len(p) for p in sp.predictors(0.1)])),
                     "mixed_groups": float(np.mean([g in set(la) and g in set(lb) for g in groups]))})
    return rows


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if cfg.model not in RNN_MODELS:
        raise SystemExit(f"error: --model must be a nonlinear RNN cell {RNN_MODELS}, got {cfg.model!r}")
    if cfg.seeds < 2:
        raise SystemExit(f"error: --seeds must be >= 2 (networks to compare), got {cfg.seeds}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    task = make_task(cfg)
    ev = task.evals()["test"]
    tokens, mask = jnp.asarray(ev.inputs), ev.targets != IGNORE
    meta = {"system": "convergent", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "model": cfg.model, "task": cfg.task, "steps": cfg.steps, "d_model": cfg.d_model,
            "threshold": cfg.threshold, "claim": CLAIM, "command": " ".join(["python experiments/convergent.py", *argv])}
    trained, initial, accs = [], [], []
    for s in range(cfg.seeds):
        sc = dataclasses.replace(cfg, seed=cfg.seed + s, out="")
        initial.append(layer_activations(build_model(sc, task.vocab_size, rngs=nnx.Rngs(sc.seed)), tokens))
        keep = {}
        recs = run(task, sc, keep)
        accs.append(recs[-1]["acc"])
        trained.append(layer_activations(keep["model"], tokens))
        log(f"seed {sc.seed}: test acc {accs[-1]:.3f}")
    rows = []
    for i in range(cfg.seeds):
        for j in range(i + 1, cfg.seeds):
            for state, acts in (("trained", trained), ("init", initial)):
                for r in compare(acts[i], acts[j], mask, cfg):
                    rows.append(dict(meta, kind="pair", state=state, seed_a=cfg.seed + i, seed_b=cfg.seed + j,
                                     acc_a=accs[i], acc_b=accs[j], **r))
    md = table(rows, cfg, accs)
    header = f"`{meta['command']}` — {meta['machine']}, seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}, preset {cfg.preset}\n\n"
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


def table(rows, cfg: Config, accs) -> str:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    out = [f"{cfg.model} × {cfg.num_layers}, d = {cfg.d_model}, task {cfg.task}, {cfg.steps} steps; test accuracy per seed: "
           + ", ".join(f"{a:.3f}" for a in accs) + f". Mean over {cfg.seeds * (cfg.seeds - 1) // 2} pair(s); 'init': the same "
           "two networks before training (baseline).", "",
           f"| layer | units | near-perfect (corr ≥ {cfg.threshold}) | init | mean matched corr | init | L1 R² | init | "
           "predictors / unit | mixed groups |", "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        t = [r for r in rows if r["layer"] == layer and r["state"] == "trained"]
        i = [r for r in rows if r["layer"] == layer and r["state"] == "init"]
        mean = lambda rs, k: np.mean([r[k] for r in rs])
        out.append(f"| {layer} | {t[0]['units']} | {mean(t, 'near_perfect'):.3f} | {mean(i, 'near_perfect'):.3f} | "
                   f"{mean(t, 'mean_corr'):.3f} | {mean(i, 'mean_corr'):.3f} | {mean(t, 'sparse_r2'):.3f} | "
                   f"{mean(i, 'sparse_r2'):.3f} | {mean(t, 'predictors'):.1f} | {mean(t, 'mixed_groups'):.2f} |")
    out += ["", f"Paper's claim: {CLAIM}."]
    return "\n".join(out)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for state in ("trained", "init"):
        ax.plot(layers, [np.mean([r["near_perfect"] for r in rows if r["layer"] == layer and r["state"] == state])
                         for layer in layers], "o-", label=state)
    ax.set(ylabel="near-perfect matches", title="one-to-one matching across seeds", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
