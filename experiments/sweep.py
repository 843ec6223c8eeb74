"""The results pipeline of the synthetic-task experiments: one named preset per task, every model and seed,
the trivial baselines beside them, and the README's tables rebuilt from the records.

    python experiments/sweep.py parity                 # the README's parity table: cpu preset, 3 seeds
    python experiments/sweep.py parity --preset=paper  # the paper's sizes and step budget (an accelerator)
    python experiments/sweep.py --all                  # every task, in the order of --list
    python experiments/sweep.py tables                 # rebuild every table.md / plot.png from the records
                                                       #   and the README's table and run-time blocks
    python experiments/sweep.py --list                 # the tasks, their scripts, rows and presets
    python experiments/sweep.py mqar_width --seeds=0   # MQAR accuracy vs model width (zoology's Fig. 2)

The tasks, their rows, targets and budgets are defined in ``experiments/sweep_tasks.py`` (``SWEEPS``, ``SEEDS``).
The tables, plots and README blocks are made from the records alone by ``experiments/sweep_report.py``.
A task's preset (``cpu`` | ``paper`` | ``tiny``, what the tests run) fully determines training and evaluation:
its script's preset of the same name plus the task's fixed options and its budget for that preset.
``experiments/sweep.py <task>`` writes ``experiments/results/<task>/`` afresh (whatever the current
directory): ``records.jsonl`` (every evaluation of every row and seed, and the baselines; each record names
the command, preset, machine, date and the paper's claim), ``table.md`` and ``plot.png``.

The table gives, per row, the mean ± std over seeds of the task's metric on each evaluation split (the last
evaluation of each run), the paper's number or claim, and a verdict on the headline split: **met** when
every seed meets it, **missed** when none does, **within noise** when the seeds' min–max range straddles it
(a relative claim compares min–max ranges with the other rows'), marked ``(1 seed)`` when a single seed
decides it. Baseline rows are the trivial predictors of ``seqjax.tasks.baselines`` scored by the same metric
on the same evaluation sets: chance (uniform over the answers), the majority class, and for the recall tasks
and ICLL copy-last and the in-context bigram lookup (on ICLL the bigram lookup never predicts the masked
``|``; ICLL also has always-separator, associative recall the most frequent value so far).

A task with an ``axis`` (``mqar_width``: ``d_model``) has one row per (model, axis value); its table adds the
axis value and the state size (the floats of the model's decode cache, ``seqjax.tasks.runner.state_size``)
and its plot draws the metric against each, one line per model. Its preset picks the rows it runs
(``preset_rows``: the CPU preset the small widths, the paper preset the paper's).

``--models=a,b`` re-runs only those rows (labels or model names) and ``--seeds=...`` only those seeds: the records
of the (row, seed) pairs run are replaced, all others kept. ``--baselines_only`` recomputes the baseline rows
alone (no training). ``--resume`` continues an interrupted run (each finished (row, seed) run is kept, the rest
trained), so the whole-day ``--all`` survives a stop: ``python experiments/sweep.py --all --resume``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import sys
import time

import numpy as np
import tyro

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, EXPERIMENTS)

from sweep_report import RESULTS, read_records, table, tables, update_readme, write_outputs  # the tables and plots
from sweep_tasks import SEEDS, SWEEPS, Row, Sweep  # experiments/sweep_tasks.py, beside this script

from seqjax import cli
from seqjax.tasks import baselines
from seqjax.tasks.runner import machine, parse, run, state_size

#: the README's older ``--grid`` view (the results notebook reads it): name -> (script, options, models, metric)
GRIDS = {k: (s.script, s.options, [r.model for r in s.rows], s.metric) for k, s in SWEEPS.items()}


# ----------------------------------------------------------------------------- running


def _config(sweep: Sweep, row: Row | None, preset: str, seed: int, mod):
    opts = {**sweep.options, **sweep.presets.get(preset, {}), **dict(row.options if row else ())}
    args = [f"--preset={preset}", f"--seed={seed}", f"--model={row.model if row else sweep.rows[0].model}"]
    args += [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()]
    return parse(mod.Config, mod.PRESETS, args)


def baseline_records(sweep: Sweep, preset: str, seed: int, mod) -> list[dict]:
    """The trivial predictors scored on the evaluation sets of ``seed`` (the first row's task); majority and
    chance take their answer set from eight training batches."""
    task = mod.make_task(_config(sweep, None, preset, seed, mod))
    train = np.concatenate([task.train(step, 64, seed).targets.reshape(-1) for step in range(1, 9)])[None]
    extra = dict(sweep.extra)
    recs = []
    for split, batch in task.evals().items():
        for name, scores in baselines.trivial_baselines(task.metric, batch, train, sequence=sweep.sequence, extra=extra).items():
            recs.append({"task": task.name, "row": name, "model": "baseline", "seed": seed, "step": 0, "split": split,
                         **{k: float(v) for k, v in scores.items()}})
    return recs


def run_sweep(name: str, preset: str = "cpu", seeds=None, only=(), baselines_only=False, out: str = RESULTS, argv=(),
              resume=False) -> list[dict]:
    """Train every row of ``SWEEPS[name]`` for every seed under ``preset`` and write ``out/<name>/``; returns the
    records. ``only``: labels or models of the rows to re-run (the others' records are kept). ``resume``: keep
    the (row, seed) runs of ``preset`` that the records show finished (an evaluation at their last step) and
    train only the others; an interrupted run's unfinished pair starts again."""
    sweep = SWEEPS[name]
    mod = importlib.import_module(sweep.script)
    partial = bool(only) or baselines_only or bool(seeds)  # the other rows' and seeds' records are kept
    seeds = tuple(SEEDS[preset] if not seeds else seeds)
    in_preset = sweep.preset_rows.get(preset)
    rows = [r for r in sweep.rows if (in_preset is None or r.label in in_preset) and (not only or r.label in only or r.model in only)]
    if only and not rows:
        raise ValueError(f"--models={','.join(only)} names no row of {name}: {[r.label for r in sweep.rows]}")
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "records.jsonl")
    kept = [r for r in read_records(folder) if _keep(r, rows, seeds, baselines_only)] if partial else []
    finished = set()
    if resume:
        old = [r for r in read_records(folder) if r not in kept]
        finished = {(r["row"], r["seed"]) for r in old if r.get("model") != "baseline" and r.get("preset") == preset
                    and r.get("step") == r.get("steps")}
        kept += [r for r in old if (r.get("row"), r["seed"]) in finished]
    meta = {"preset": preset, "command": "python experiments/sweep.py " + " ".join(argv or (name, f"--preset={preset}")),
            "machine": machine(), "date": datetime.date.today().isoformat(), "paper": sweep.claim}
    records = list(kept)
    with open(path, "w", buffering=1) as f:  # afresh: the kept rows, then this run's, a line at a time
        for r in kept:
            f.write(json.dumps(r) + "\n")
        for seed in seeds:
            for r in baseline_records(sweep, preset, seed, mod):
                records.append({**r, **meta})
                f.write(json.dumps(records[-1]) + "\n")
        for seed in [] if baselines_only else seeds:  # seed-major: a stopped run still has every row
            for row in rows:
                if (row.label, seed) in finished:
                    continue
                cfg = _config(sweep, row, preset, seed, mod)
                task = mod.make_task(cfg)
                size = {"state_size": state_size(cfg, task.vocab_size, getattr(cfg, "seq_len", 0))} if sweep.axis else {}
                t0 = time.time()
                for r in run(task, cfg):
                    records.append({**r, "row": row.label, "steps": cfg.steps, "seconds": round(time.time() - t0, 1), **size, **meta})
                    f.write(json.dumps(records[-1]) + "\n")
                f.flush()
    write_outputs(name, records, folder)
    return records


def _keep(rec, rerun_rows, seeds, baselines_only) -> bool:
    """Whether a partial run keeps an old record: everything but the (row, seed) pairs it recomputes."""
    if rec["seed"] not in seeds:
        return True
    if rec.get("model") == "baseline":
        return False  # the baselines of the run's seeds are always recomputed
    return baselines_only or rec.get("row", rec["model"]) not in {r.label for r in rerun_rows}


# ----------------------------------------------------------------------------- the results notebook's view


def summarize(records: list[dict], metric: str) -> tuple[str, dict]:
    """A plain view of any records (the results notebook's): ``(markdown, {(row, split): (mean, std)})``; rows are
    the records' ``row`` labels, else the model, as ``"<task> <model>"`` when the records mix tasks."""
    last = {}
    several = len({r.get("task") for r in records}) > 1
    for r in records:
        label = r.get("row") or (f"{r['task']} {r['model']}" if several else r["model"])
        key = (label, r["seed"], r["split"])
        if key not in last or r["step"] >= last[key]["step"]:
            last[key] = r
    splits = sorted({k[2] for k in last})
    models = list(dict.fromkeys(k[0] for k in last))
    out = {}
    lines = ["| model | " + " | ".join(f"{s} {metric}" for s in splits) + " | seeds |", "|---" * (len(splits) + 2) + "|"]
    for m in models:
        cells = []
        for s in splits:
            vals = [r[metric] for (mm, _, ss), r in last.items() if mm == m and ss == s]
            out[(m, s)] = (float(np.mean(vals)), float(np.std(vals)))
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len({k[1] for k in last if k[0] == m})} |")
    return "\n".join(lines), out


# ----------------------------------------------------------------------------- command line


@dataclasses.dataclass
class Args:
    task: tyro.conf.Positional[str] = ""  # a task of SWEEPS (--list), or "tables" (rebuild tables, plots, README blocks)
    grid: str = ""  # the same as the positional task
    all: bool = False  # every task, in the order of --list
    preset: str = "cpu"  # cpu | paper | tiny
    seeds: tuple[int, ...] = ()  # default: the preset's (three at cpu and paper)
    models: tuple[str, ...] = ()  # only these rows (labels or models); the other rows' records are kept
    baselines_only: bool = False  # recompute the baseline rows only
    out: str = RESULTS  # the results folder (default: experiments/results, whatever the current directory)
    list: bool = False  # print the tasks
    resume: bool = False  # after an interruption: keep the finished (row, seed) runs of this preset, train the rest


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = cli.parse(Args, argv, description=__doc__)
    task = a.task or a.grid
    if task == "tables":
        print(tables(a.out))
        readme = os.path.join(os.path.dirname(EXPERIMENTS), "README.md")
        if a.out == RESULTS and os.path.exists(readme):
            print(f"README.md: {', '.join(update_readme(readme)) or 'every table already matches its records'}", file=sys.stderr)
        return
    if a.list or not (task or a.all):
        for name, s in SWEEPS.items():
            print(f"{name:18s} {s.script}.py {s.options} rows={[r.label for r in s.rows]} {s.metric}@{s.split} presets={s.presets}")
        return
    if a.preset not in SEEDS:
        raise SystemExit(f"error: --preset must be one of {', '.join(SEEDS)}, got {a.preset!r}")
    names = list(SWEEPS) if a.all else [task]
    for name in names:
        if name not in SWEEPS:
            raise SystemExit(f"error: {name!r} is not a sweep task; choose from {', '.join(SWEEPS)} or 'tables'")
    for name in names:
        if a.models and not any(r.label in a.models or r.model in a.models for r in SWEEPS[name].rows):
            raise SystemExit(f"error: --models={','.join(a.models)} names no row of {name}: {[r.label for r in SWEEPS[name].rows]}")
        records = run_sweep(name, a.preset, a.seeds, a.models, a.baselines_only, a.out, resume=a.resume,
                            argv=[name] + [x for x in argv if x not in (name, "--all") and not x.startswith(("--grid", "--resume"))])
        print(table(name, records))


if __name__ == "__main__":
    main()
