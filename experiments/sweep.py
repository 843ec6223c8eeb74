"""Run a grid (task × model × seed) and write a markdown table and a PNG plot.

    python experiments/sweep.py --grid=parity                  # the README's parity table
    python experiments/sweep.py --grid=mqar --seeds=0,1,2
    python experiments/sweep.py --grid=parity --models=mamba,mamba_negeig --set=steps=500
    python experiments/sweep.py --grid=parity --preset=paper   # the paper's configuration

Writes ``results/<grid>/records.jsonl`` (every evaluation), ``table.md`` (the last evaluation of each
run: mean ± std over seeds of the headline metric per split) and ``plot.png``. ``--list`` prints the grids.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
from typing import Annotated, Literal

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seqjax import cli
from seqjax.tasks.runner import parse, run

#: name -> (script, fixed overrides, models, headline metric)
GRIDS = {
    "parity": ("state_tracking", {"task": "parity"},
               ["mamba", "mamba_negeig", "deltanet", "deltanet_negeig", "lstm", "slstm", "attention"], "scaled_acc"),
    "modarith": ("state_tracking", {"task": "modarith"}, ["deltanet", "deltanet_negeig"], "scaled_acc"),
    "modarith_brackets": ("state_tracking", {"task": "modarith_brackets"}, ["deltanet", "deltanet_negeig"], "scaled_acc"),
    "s3": ("state_tracking", {"task": "s3"}, ["deltanet_negeig", "deltanet"], "scaled_acc"),
    "s5": ("state_tracking", {"task": "s5"}, ["deltanet_negeig", "deltanet"], "scaled_acc"),
    "mqar": ("mqar", {}, ["attention", "gated_deltanet", "mamba2", "gla"], "acc"),
    "icll": ("icll", {}, ["attention", "mamba2", "mamba2+ngram2", "gated_deltanet", "lstm"], "dfa_acc"),
    "digits": ("classification", {"data": "digits"}, ["s4d", "lssl", "lstm"], "acc"),
    "pdigits": ("classification", {"data": "pdigits"}, ["s4d", "lssl", "lstm"], "acc"),
    "mnist1d": ("classification", {"data": "mnist1d"}, ["s4d", "lssl", "lstm"], "acc"),
    "sets": ("set_disjointness", {}, ["gla", "attention"], "acc"),
    "recall": ("recall", {"task": "ar"}, ["attention", "mamba", "gla"], "acc"),
    "copy": ("recall", {"task": "copy"}, ["attention", "mamba", "gla"], "acc"),
}


def run_grid(grid: str, models, seeds, preset: str, extra: list[str], out_dir: str) -> list[dict]:
    script, fixed, default_models, _ = GRIDS[grid]
    mod = importlib.import_module(script)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "records.jsonl")
    records = []
    for model in models or default_models:
        for seed in seeds:
            args = [f"--preset={preset}"] + [f"--{k}={v}" for k, v in fixed.items()]
            args += [f"--model={model}", f"--seed={seed}", f"--out={path}"] + extra
            cfg = parse(mod.Config, mod.PRESETS, args)
            records += run(mod.make_task(cfg), cfg)
    return records


def summarize(records: list[dict], metric: str) -> tuple[str, dict]:
    last = {}
    several = len({r.get("task") for r in records}) > 1  # e.g. both set orders: label rows "task model"
    for r in records:
        key = (f"{r['task']} {r['model']}" if several else r["model"], r["seed"], r["split"])
        if key not in last or r["step"] >= last[key]["step"]:
            last[key] = r
    splits = sorted({k[2] for k in last})
    models = list(dict.fromkeys(k[0] for k in last))
    table = {}
    lines = ["| model | " + " | ".join(f"{s} {metric}" for s in splits) + " | seeds |", "|---" * (len(splits) + 2) + "|"]
    for m in models:
        cells = []
        for s in splits:
            vals = [r[metric] for (mm, _, ss), r in last.items() if mm == m and ss == s]
            table[(m, s)] = (float(np.mean(vals)), float(np.std(vals)))
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        n = len({k[1] for k in last if k[0] == m})
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines), table


def plot(table: dict, metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(m for m, _ in table))
    splits = sorted({s for _, s in table})
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(models), 3.2))
    w = 0.8 / len(splits)
    for i, s in enumerate(splits):
        ax.bar(np.arange(len(models)) + i * w, [table[(m, s)][0] for m in models], w,
               yerr=[table[(m, s)][1] for m in models], label=s)
    ax.set_xticks(np.arange(len(models)) + w * (len(splits) - 1) / 2, models, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


Grid = Literal[tuple(GRIDS)]  # type: ignore[valid-type]
Overrides = Annotated[list[str], tyro.conf.UseAppendAction]  # --set=a=1 --set=b=2 -> ["a=1", "b=2"]


@dataclasses.dataclass
class Args:
    grid: Grid | None = None  # None: list the grids
    models: tuple[str, ...] = ()  # comma list; default: the grid's
    seeds: tuple[int, ...] = (0,)
    preset: str = "cpu"  # the scripts' preset: cpu | tiny | paper
    set: Overrides = dataclasses.field(default_factory=list)  # key=value, e.g. steps=500: a script option
    out: str = "results"
    list: bool = False  # print the grids


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = cli.parse(Args, argv, description=__doc__)
    if a.list or not a.grid:
        for name, (script, fixed, models, metric) in GRIDS.items():
            print(f"{name:10s} {script}.py {fixed} models={models} metric={metric}")
        return
    out_dir = os.path.join(a.out, a.grid)
    records = run_grid(a.grid, list(a.models), list(a.seeds), a.preset, [f"--{kv}" for kv in a.set], out_dir)
    metric = GRIDS[a.grid][3]
    md, table = summarize(records, metric)
    cmd = "python experiments/sweep.py " + " ".join(argv)
    header = f"`{cmd}` — {platform.machine()} CPU, {os.cpu_count()} cores, preset {a.preset}\n\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(header + md + "\n")
    plot(table, metric, os.path.join(out_dir, "plot.png"), f"{a.grid} ({a.preset})")
    print(header + md)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({f"{m}/{s}": v for (m, s), v in table.items()}, f, indent=1)


if __name__ == "__main__":
    main()
