"""The reporting half of ``experiments/sweep.py``: everything that reads a task's records and writes its
``table.md`` and ``plot.png`` and the README's blocks (each task's table between ``<!-- table:<task> -->``
markers, and the run-time block). The table's columns and the verdicts are described in ``sweep.py``'s
module doc; the tasks, rows and targets come from ``experiments/sweep_tasks.py``.

Not a script: ``python experiments/sweep.py tables`` rebuilds every table, plot and README block.
"""

from __future__ import annotations

import json
import os

import numpy as np
from sweep_tasks import SEEDS, SWEEPS  # experiments/sweep_tasks.py, beside this module

#: where ``python experiments/sweep.py`` writes and reads the records, whatever the current directory
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_records(folder: str) -> list[dict]:
    """The records of ``folder/records.jsonl``, in file order; none when the file is missing."""
    path = os.path.join(folder, "records.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_scores(records: list[dict], metric: str) -> dict:
    """``{(row, split): [metric at the last evaluation of each seed]}`` in row order of first appearance."""
    last: dict = {}
    for r in records:
        key = (r.get("row", r["model"]), r["seed"], r["split"])
        if key not in last or r["step"] >= last[key]["step"]:
            last[key] = r
    out: dict = {}
    for (row, _, split), r in last.items():
        out.setdefault((row, split), []).append(r[metric])
    return out


def verdict(target, scores: dict, label: str, split: str) -> str:
    """``met`` / ``missed`` / ``within noise`` of ``label``'s seeds against ``target`` (see ``sweep.py``'s module doc),
    marked ``(1 seed)`` when the row or a row it is compared with has a single seed (no spread to judge by)."""
    if target is None or (label, split) not in scores:
        return "—"
    vals = scores[(label, split)]
    lo, hi = min(vals), max(vals)
    op, ref = target
    others = []
    if op in (">=", "<="):
        ok_all, ok_none = (lo >= ref, hi < ref) if op == ">=" else (hi <= ref, lo > ref)
    else:
        others = [scores[(o, split)] for o in ref if (o, split) in scores]
        if not others:
            return "—"
        if op == ">":
            ok_all, ok_none = all(lo > max(o) for o in others), any(hi < min(o) for o in others)
        else:
            ok_all, ok_none = all(hi < min(o) for o in others), any(lo > max(o) for o in others)
    word = "met" if ok_all else "missed" if ok_none else "within noise"
    return word + (" (1 seed)" if min(len(v) for v in [vals, *others]) < 2 else "")


def _target_text(target) -> str:
    if target is None:
        return "—"
    op, ref = target
    return f"{op.replace('>=', '≥').replace('<=', '≤')} {ref:.2f}" if isinstance(ref, float) else f"{op} {', '.join(ref)}"


def _num(x) -> str:
    s = f"{x:.3f}"
    return "0.000" if s == "-0.000" else s


def _cell(vals) -> str:
    return _num(np.mean(vals)) if len(vals) == 1 else f"{_num(np.mean(vals))} ± {_num(np.std(vals))}"


def table(name: str, records: list[dict]) -> str:
    """The README block of task ``name`` (a caption line, the table, the plot) from its records alone."""
    sweep = SWEEPS[name]
    scores = final_scores(records, sweep.metric)
    splits = [sweep.split] + sorted({s for _, s in scores} - {sweep.split})
    model_rows = [r for r in sweep.rows if any((r.label, s) in scores for s in splits)]
    base_rows = list(dict.fromkeys(r["row"] for r in records if r.get("model") == "baseline"))
    trained = [r for r in records if r.get("model") != "baseline"]
    seeds = sorted({r["seed"] for r in trained})
    last_step: dict = {}
    for r in trained:
        key = (r.get("row", r["model"]), r["seed"])
        last_step[key] = max(last_step.get(key, 0), r["step"])
    steps = sorted(set(last_step.values()))
    presets = sorted({r["preset"] for r in trained if "preset" in r})
    machines = sorted({r["machine"] for r in trained if "machine" in r})
    how = (f"`python experiments/sweep.py {name}`: baselines only, no trained rows yet." if not trained else
           f"`python experiments/sweep.py {name}`"
           + (f" (preset {', '.join(presets)})" if presets else " (records from before the presets)")
           + f": {len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))}), {'/'.join(map(str, steps))} steps"
           + (f", {'; '.join(machines)}" if machines else "") + f"; {sweep.metric}, mean ± std over seeds.")
    axis = [sweep.axis, "state size"] if sweep.axis else []
    sizes = {r["row"]: r["state_size"] for r in trained if r.get("state_size") is not None}
    head = "| row | " + "".join(f"{a} | " for a in axis) + " | ".join(f"{s}" for s in splits) + " | seeds | paper | verdict |"
    lines = [how, "", head, "|---" * (len(splits) + len(axis) + 4) + "|"]
    for r in model_rows:
        n = len(scores.get((r.label, sweep.split), []))
        cells = [_cell(scores[(r.label, s)]) if (r.label, s) in scores else "" for s in splits]
        ax = [str(dict(r.options).get(sweep.axis, "")), str(sizes.get(r.label, ""))] if axis else []
        lines.append(f"| {r.label} | " + " | ".join(ax + cells) + f" | {n} | {_target_text(r.target)} | "
                     f"{verdict(r.target, scores, r.label, sweep.split)} |")
    for b in base_rows:
        cells = [""] * len(axis) + [_cell(scores[(b, s)]) if (b, s) in scores else "" for s in splits]
        lines.append(f"| *baseline: {b}* | " + " | ".join(cells) + " | | | |")
    return "\n".join(lines + ["", f"![{name}](experiments/results/{name}/plot.png)"])


def plot(name: str, records: list[dict], path: str) -> None:
    """Bars: the rows' mean ± std on the headline split (each seed a dot); lines: the baselines. A task with an
    ``axis``: the metric against the axis and against the state size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = SWEEPS[name]
    scores = final_scores(records, sweep.metric)
    if sweep.axis:
        return _axis_plot(name, records, scores, path, plt)
    rows = [r.label for r in sweep.rows if (r.label, sweep.split) in scores]
    bases = list(dict.fromkeys(r["row"] for r in records if r.get("model") == "baseline"))
    fig, ax = plt.subplots(figsize=(2.0 + 1.0 * len(rows), 3.4))
    for i, label in enumerate(rows):
        v = scores[(label, sweep.split)]
        ax.bar(i, np.mean(v), 0.6, yerr=np.std(v), color="C0", alpha=0.8)
        ax.plot(np.full(len(v), i), v, "k.", ms=4)
    for j, b in enumerate(bases):
        ax.axhline(np.mean(scores[(b, sweep.split)]), ls="--", lw=1, color=f"C{j + 1}", label=f"baseline: {b}")
    ax.set_xticks(range(len(rows)), rows, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"{sweep.split} {sweep.metric}")
    ax.set_title(name, fontsize=10)
    if bases:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axis_plot(name, records, scores, path, plt):
    sweep = SWEEPS[name]
    sizes = {r["row"]: r["state_size"] for r in records if r.get("state_size") is not None}
    bases = list(dict.fromkeys(r["row"] for r in records if r.get("model") == "baseline"))
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
    for j, model in enumerate(dict.fromkeys(r.model for r in sweep.rows)):
        rows = sorted((dict(r.options)[sweep.axis], r.label) for r in sweep.rows if r.model == model and (r.label, sweep.split) in scores)
        if not rows:
            continue
        mean = [np.mean(scores[(lab, sweep.split)]) for _, lab in rows]
        std = [np.std(scores[(lab, sweep.split)]) for _, lab in rows]
        for ax, xs in ((axes[0], [x for x, _ in rows]), (axes[1], [sizes.get(lab, np.nan) for _, lab in rows])):
            ax.errorbar(xs, mean, yerr=std, marker="o", ms=4, capsize=2, color=f"C{j}", label=model)
    for k, b in enumerate(bases):
        for ax in axes:
            label = f"baseline: {b}" if ax is axes[0] else None
            ax.axhline(np.mean(scores[(b, sweep.split)]), ls="--", lw=1, color=f"C{k + 5}", label=label)
    axes[0].set_xscale("log", base=2)
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(plt.NullFormatter())  # a narrow range would label every minor tick
    axes[0].set_xlabel(sweep.axis)
    axes[1].set_xlabel("state size (numbers in the decode cache)")
    axes[0].set_ylabel(f"{sweep.split} {sweep.metric}")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(name: str, records: list[dict], folder: str) -> str:
    md = table(name, records)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(md + "\n")
    plot(name, records, os.path.join(folder, "plot.png"))
    return md


def readme_block(name: str, records: list[dict]) -> str:
    return f"<!-- table:{name} -->\n{table(name, records)}\n<!-- /table:{name} -->"


def run_times(out: str = RESULTS, preset: str = "cpu") -> str:
    """The README's run-time block: per task, the wall time of each finished (row, seed) run of ``preset`` as its
    records give it (``seconds`` at its last evaluation), summed; a run without a timed record (not yet run at the
    preset, or from before the presets) is estimated by the mean of its row's timed runs, else of the task's."""
    lines = [f"Wall time of `python experiments/sweep.py <task>` at the {preset} preset ({len(SEEDS[preset])} seeds), "
             "summed from the records' `seconds` (each run's time at its last evaluation, on the machine its records "
             "name, shared with other work at times); runs not yet timed are estimated by the mean of the same row's "
             "timed runs (else the task's).", "",
             "| task | runs | timed | timed min | estimate, all runs (min) |", "|---|---|---|---|---|"]
    total = timed_total = 0.0
    missing = []
    for name, sweep in SWEEPS.items():
        in_preset = sweep.preset_rows.get(preset)
        rows = [r.label for r in sweep.rows if in_preset is None or r.label in in_preset]
        runs = [(row, seed) for seed in SEEDS[preset] for row in rows]
        took: dict = {}
        for r in read_records(os.path.join(out, name)):
            if r.get("preset") == preset and "seconds" in r and r.get("step") == r.get("steps"):
                key = (r.get("row"), r["seed"])
                took[key] = max(took.get(key, 0.0), r["seconds"])
        timed = [took[k] for k in runs if k in took]
        if not timed:
            missing.append(name)
            lines.append(f"| {name} | {len(runs)} | 0 | | |")
            continue
        by_row = {row: [took[(row, s)] for s in SEEDS[preset] if (row, s) in took] for row in rows}
        est = sum(took.get((row, s), np.mean(by_row[row]) if by_row[row] else np.mean(timed)) for row, s in runs)
        total, timed_total = total + est, timed_total + sum(timed)
        lines.append(f"| {name} | {len(runs)} | {len(timed)} | {sum(timed) / 60:.0f} | {est / 60:.0f} |")
    lines += ["", f"All tasks with a timed run: {timed_total / 3600:.1f} h timed, about {total / 3600:.1f} h for every run"
              + (f"; no timed run yet: {', '.join(missing)}." if missing else ".")]
    return "\n".join(lines)


def run_times_block(out: str = RESULTS) -> str:
    return f"<!-- table:run_times -->\n{run_times(out)}\n<!-- /table:run_times -->"


def tables(out: str = RESULTS, write: bool = True) -> str:
    """Every task's README block from its committed records (and, with ``write``, its table.md and plot.png)."""
    blocks = []
    for name in SWEEPS:
        folder = os.path.join(out, name)
        records = read_records(folder)
        if records:
            if write:
                write_outputs(name, records, folder)
            blocks.append(readme_block(name, records))
    blocks.append(run_times_block(out))
    return "\n\n".join(blocks)


def update_readme(path: str, out: str = RESULTS) -> list[str]:
    """Replace each ``<!-- table:<task> -->`` … ``<!-- /table:<task> -->`` block of the README at ``path`` with the
    block the task's records give, and the ``run_times`` block; returns the blocks that changed. A task without
    markers is left out."""
    with open(path) as f:
        text = f.read()
    blocks = {name: readme_block(name, recs) for name in SWEEPS if (recs := read_records(os.path.join(out, name)))}
    blocks["run_times"] = run_times_block(out)
    changed = []
    for name, block in blocks.items():
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if start not in text:
            continue
        i, j = text.index(start), text.index(end) + len(end)
        if text[i:j] != block:
            text, changed = text[:i] + block + text[j:], changed + [name]
    with open(path, "w") as f:
        f.write(text)
    return changed
