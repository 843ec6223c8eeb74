"""N-parity and N-DMS curricula with learnable single-neuron τ (Khajehabdollahi et al. 2024), and the mechanism split.

    python experiments/timescales.py study                       # the whole study -> experiments/results/timescales/
    python experiments/timescales.py study --preset=paper        # the paper's scale (500 units, 600k steps a run)
    python experiments/timescales.py --curriculum=single --task=parity --out=run.jsonl   # one run
    python experiments/timescales.py plot run.jsonl other.jsonl --png=runs.png          # table + curves of runs

Networks (``seqjax.models.timescale_rnn``): the paper's leaky rate RNN
``r_t = lrelu((1 − 1/τ) r_{t−1} + (W r_{t−1} + w_in x_t + b)/τ)`` with a trained τ ≥ 1 per neuron (``cell=leaky_paper``),
``seqjax.rnn``'s ``leaky`` cell (τ outside a ReLU), GRU and LSTM. They read a Bernoulli stream and answer on every
step. Curricula:

- single-head: one readout, trained on the current N; N grows by one when its accuracy passes ``threshold``;
- multi-head: a readout per N' ≤ N (their losses summed, as in the paper), all trained together; a head is added
  when all pass.

At every N solved the script records the trained single-neuron τ (mean over neurons) and the network-mediated
timescale ``τ_net``: the autocorrelation decay time of each unit's activity on long random input
(``seqjax.analysis.timescales``; median over units). The paper: single-head networks raise τ with N, multi-head
networks keep τ flat and lengthen τ_net through recurrence, reach larger N faster, and the multi-head curriculum
also helps GRU and LSTM.

``study`` trains the runs named in ``--runs`` (``<variant>:<curriculum>``; variants below) and writes
``records.jsonl``, ``table.md`` and ``plot.png`` afresh into ``--out_dir``: the paper's setup (SGD with Nesterov
momentum, no self-connections, τ ~ U[1, 2]), ``adam_leaky`` (Adam, self-connections, ``seqjax.rnn``'s ``leaky``
cell, τ = 1.5), one-factor swaps from the paper's setup (``paper_adam``, ``paper_selfconn``), and GRU / LSTM.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from seqjax import cli
from seqjax.analysis import timescales as ts
from seqjax.models import timescale_rnn as tr
from seqjax.tasks import IGNORE, timescales
from seqjax.tasks.runner import machine, parse, write_results

#: the paper's claims (Khajehabdollahi et al. 2024, abstract, Figs. 2-4; exact N_max and τ values not reproduced here)
PAPER = {
    "single": "single-head: mean trained τ grows with N (and τ_net with it); reaches large N slowly",
    "multi": "multi-head: mean τ stays ~constant, τ_net grows with N; reaches larger N than single-head in fewer steps",
    "gated": "GRU/LSTM: the multi-head curriculum reaches larger N than the single-head one",
}


@dataclasses.dataclass
class Config:
    task: Literal["parity", "dms"] = "parity"
    curriculum: Literal["single", "multi"] = "multi"
    cell: Literal["leaky_paper", "leaky", "gru", "lstm"] = "leaky_paper"
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: Nesterov momentum, as the paper; adam: Adam
    lr: float = 0.05
    momentum: float = 0.1
    clip: float = 2.0  # global-norm gradient clipping
    zero_diag: bool = True  # no self-connections (the paper); only for the leaky cells
    tau_lo: float = 1.0  # τ starts uniform in [tau_lo, tau_hi]
    tau_hi: float = 2.0
    hidden: int = 64
    seq_len: int = 100
    batch_size: int = 64
    steps: int = 3000
    threshold: float = 0.98
    check_every: int = 50
    n_max: int = 32
    ac_len: int = 2000  # τ_net: steps of random input per trial, trials, burn-in, fitted lags
    ac_trials: int = 8
    ac_burn: int = 100
    fit_lag: int = 30
    seed: int = 0
    out: str = ""  # JSON lines of this run (written afresh)
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(hidden=8, seq_len=20, batch_size=4, steps=2, check_every=1, n_max=4, ac_len=200, ac_trials=2,
                 ac_burn=10, fit_lag=5),
    "paper": dict(hidden=500, seq_len=500, batch_size=256, steps=600_000, check_every=600, n_max=100,
                  ac_len=100_000, ac_trials=10, ac_burn=500),
}

#: study variants: Config overrides
VARIANTS = {
    "paper": {},
    "paper_adam": dict(optimizer="adam", lr=3e-3),
    "paper_selfconn": dict(zero_diag=False),
    "adam_leaky": dict(cell="leaky", optimizer="adam", lr=3e-3, clip=1.0, zero_diag=False, tau_lo=1.5, tau_hi=1.5),
    "gru": dict(cell="gru", optimizer="adam", lr=1e-3, zero_diag=False),
    "lstm": dict(cell="lstm", optimizer="adam", lr=1e-3, zero_diag=False),
}
#: a ``study --runs`` entry: ``<variant>:<single|multi>``
RunSpec = Literal[tuple(f"{v}:{c}" for v in VARIANTS for c in ("single", "multi"))]


def optimizer(cfg: Config):
    opt = (optax.sgd(cfg.lr, momentum=cfg.momentum or None, nesterov=cfg.momentum > 0) if cfg.optimizer == "sgd"
           else optax.adam(cfg.lr))
    return optax.chain(optax.clip_by_global_norm(cfg.clip), opt)


def loss_fn(p, x, y, active, cell, zero_diag):
    """Per-head mean cross-entropy over scored steps, summed over the active heads; ``y [b, t, heads]``."""
    logp = jax.nn.log_softmax(tr.logits(p, tr.states(p, x, cell=cell, zero_diag=zero_diag)), axis=-1)
    mask = y != IGNORE
    nll = -jnp.take_along_axis(logp, jnp.where(mask, y, 0)[..., None], axis=-1)[..., 0]
    per_head = jnp.sum(nll * mask, axis=(0, 1)) / jnp.maximum(jnp.sum(mask, axis=(0, 1)), 1)
    return jnp.sum(per_head * active)


def network_timescales(p, cfg: Config, rng) -> dict:
    """Trained τ and τ_net of the network ``p`` now: activity on ``ac_trials`` random streams of ``ac_len`` steps
    (each trial's Bernoulli rate drawn uniformly, as the paper)."""
    rate = rng.uniform(size=(cfg.ac_trials, 1))
    x = (rng.uniform(size=(cfg.ac_trials, cfg.ac_len)) < rate).astype(np.float32)
    act = np.asarray(_states(p, jnp.asarray(x), cell=cfg.cell, zero_diag=cfg.zero_diag))
    tau_net = ts.unit_timescales(act, burn=cfg.ac_burn, max_lag=min(200, cfg.ac_len - cfg.ac_burn - 1),
                                 fit_lag=cfg.fit_lag)
    tau = tr.trained_tau(p)
    ok = np.isfinite(tau_net)
    return {"mean_tau": None if tau is None else float(tau.mean()), **_clamped(p),
            "tau_net_median": float(np.median(tau_net[ok])) if ok.any() else None,
            "tau_net_mean": float(np.mean(tau_net[ok])) if ok.any() else None,
            "active_units": int(ok.sum())}


def _clamped(p) -> dict:
    """The fraction of neurons whose raw τ sits at or below the clamp τ = 1 (where its gradient is zero)."""
    tau = p["cell"].get("tau")
    return {} if tau is None else {"tau_at_clamp": float(np.mean(np.asarray(tau) <= 1.0))}


_states = jax.jit(tr.states, static_argnames=("cell", "zero_diag"))


def run(cfg: Config, *, name: str = "", meta: dict | None = None) -> dict:
    """One curriculum run; returns ``{"largest_N", "records"}`` (records also go to ``cfg.out`` if set)."""
    if cfg.zero_diag and cfg.cell not in tr.TAU_CELLS:
        raise ValueError(f"--zero_diag applies to the leaky cells; use --zero_diag=False with --cell={cfg.cell}")
    heads = cfg.n_max if cfg.curriculum == "multi" else 1
    p = tr.init_params(cfg.cell, jax.random.PRNGKey(cfg.seed), cfg.hidden, heads, tau_range=(cfg.tau_lo, cfg.tau_hi))
    tx = optimizer(cfg)
    opt = tx.init(p)
    base = {"run": name or f"{cfg.cell}:{cfg.curriculum}", "task": cfg.task, "curriculum": cfg.curriculum,
            "cell": cfg.cell, "optimizer": cfg.optimizer, "zero_diag": cfg.zero_diag, "hidden": cfg.hidden,
            "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "paper": PAPER[cfg.curriculum if cfg.cell in tr.TAU_CELLS else "gated"], **(meta or {})}

    def targets(x, n):
        if cfg.curriculum == "multi":
            return timescales.multi_targets(x, cfg.n_max, task=cfg.task)
        return timescales.multi_targets(x, n, task=cfg.task)[..., n - 1 : n]

    @jax.jit
    def step(p, opt, x, y, active):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y, active, cfg.cell, cfg.zero_diag)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    @jax.jit
    def accuracy(p, x, y):
        pred = jnp.argmax(tr.logits(p, tr.states(p, x, cell=cfg.cell, zero_diag=cfg.zero_diag)), -1)
        scored = y != IGNORE
        return jnp.sum((pred == y) & scored, axis=(0, 1)) / jnp.maximum(jnp.sum(scored, axis=(0, 1)), 1)

    records = []
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        open(cfg.out, "w").close()

    def emit(rec):
        rec = {**base, **rec}
        records.append(rec)
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k not in ("paper", "machine", "date")}), flush=True)

    rng = np.random.default_rng(cfg.seed)
    ac_rng = np.random.default_rng(cfg.seed + 1)
    x_eval = rng.integers(0, 2, size=(256, cfg.seq_len)).astype(np.int32)
    emit({"kind": "timescales", "step": 0, "N": 0, **network_timescales(p, cfg, ac_rng)})
    n = 1
    for it in range(1, cfg.steps + 1):
        x = rng.integers(0, 2, size=(cfg.batch_size, cfg.seq_len)).astype(np.int32)
        active = np.arange(heads) < (n if cfg.curriculum == "multi" else 1)
        p, opt, loss = step(p, opt, jnp.asarray(x), jnp.asarray(targets(x, n)), jnp.asarray(active, np.float32))
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"non-finite loss at step {it}")
        if it % cfg.check_every == 0 or it == cfg.steps:
            acc = np.asarray(accuracy(p, jnp.asarray(x_eval), jnp.asarray(targets(x_eval, n))))
            k = n if cfg.curriculum == "multi" else 1
            solved = bool(np.all(acc[:k] >= cfg.threshold))
            tau = tr.trained_tau(p)
            emit({"kind": "check", "step": it, "N": n, "solved": solved, "loss": float(loss),
                  "mean_tau": None if tau is None else float(tau.mean()), **_clamped(p),
                  "acc_current": float(acc[k - 1])})
            if solved:
                emit({"kind": "timescales", "step": it, "N": n, **network_timescales(p, cfg, ac_rng)})
                if n < cfg.n_max:
                    n += 1
    checks = [r for r in records if r["kind"] == "check"]
    best = max([r["N"] - (0 if r["solved"] else 1) for r in checks] + [0])
    return {"largest_N": best, "records": records}


# --------------------------------------------------------------------------------------------- study


@dataclasses.dataclass
class Study:
    """``timescales.py study``: several runs into one results folder (records.jsonl, table.md, plot.png)."""

    runs: tuple[RunSpec, ...] = ("paper:single", "adam_leaky:single", "paper_adam:single", "paper_selfconn:single",
                             "paper:multi", "gru:single", "gru:multi", "lstm:single", "lstm:multi")
    task: Literal["parity", "dms"] = "parity"
    steps: int = 1500
    long_steps: int = 8000  # the paper:single run, for its N-vs-step curve to saturate
    hidden: int = 64
    seq_len: int = 50
    seed: int = 0
    workers: int = 1  # runs trained at once, each in its own process
    summarise_only: bool = False  # rewrite table.md and plot.png from the out_dir's records.jsonl, train nothing
    out_dir: str = "experiments/results/timescales"
    preset: str = "cpu"  # cpu | tiny | paper: the Config preset every run starts from


STUDY_PRESETS = {
    "cpu": {},
    "tiny": dict(runs=("paper:single", "paper:multi", "gru:multi"), steps=2, long_steps=2, hidden=8, seq_len=20),
    "paper": dict(steps=600_000, long_steps=600_000, hidden=500, seq_len=500),
}


def study(s: Study) -> list[dict]:
    if s.summarise_only:
        records = [json.loads(line) for line in open(os.path.join(s.out_dir, "records.jsonl"))]
        return _write_summary(records, s.out_dir)
    jobs = []
    for spec in s.runs:
        variant, _, curriculum = spec.partition(":")
        steps = s.long_steps if spec == "paper:single" else s.steps
        cfg = dataclasses.replace(parse(Config, PRESETS, [f"--preset={s.preset}"]), task=s.task, curriculum=curriculum,
                                  steps=steps, hidden=s.hidden, seq_len=s.seq_len, seed=s.seed, **VARIANTS[variant])
        jobs.append((cfg, spec, variant))
    if s.workers > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(s.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            outs = list(ex.map(_study_run, jobs))
    else:
        outs = [_study_run(job) for job in jobs]
    return _write_summary([r for out in outs for r in out], s.out_dir)


def _write_summary(records: list[dict], out_dir: str) -> list[dict]:
    table = summarise(records)
    write_results(out_dir, records, table + "\n", lambda png: plot_study(records, png))
    print(table)
    return records


def _study_run(job) -> list[dict]:
    cfg, spec, variant = job
    return run(cfg, name=spec, meta={"variant": variant})["records"]


def _f(v, fmt="{:.2f}"):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def _solved_by(checks: list[dict], step: int) -> int:
    """The largest N solved at or before ``step``."""
    return max([r["N"] for r in checks if r["solved"] and r["step"] <= step] + [0])


def summarise(records: list[dict]) -> str:
    """One row per run: N reached (at half the steps and at the end: still rising?), trained τ and τ_net from the
    first to the last N solved, and the paper's claim with met / missed. Curricula are compared at equal steps."""
    runs = list(dict.fromkeys(r["run"] for r in records))
    rows = ["| run | cell | optimizer | self-conn. | steps | N at ½ steps | largest N | mean τ start → end "
            "(at clamp) | τ_net (median) first → last N | paper | met |", "|" + "---|" * 11]
    checks = {name: [r for r in records if r["run"] == name and r["kind"] == "check"] for name in runs}
    last = {name: (c[-1]["step"] if c else 0) for name, c in checks.items()}
    for name in runs:
        rs = [r for r in records if r["run"] == name]
        tsr = [r for r in rs if r["kind"] == "timescales"]
        t0, t1, r0 = tsr[0], tsr[-1], rs[0]
        net = [r for r in tsr if r["N"] > 0 and r["tau_net_median"] is not None]
        dtau = None if t0["mean_tau"] is None else t1["mean_tau"] - t0["mean_tau"]
        dnet = None if not net else net[-1]["tau_net_median"] - net[0]["tau_net_median"]
        if r0["cell"] not in tr.TAU_CELLS:
            claim, met = "–", None
        elif r0["curriculum"] == "single":
            claim, met = "τ grows with N", dtau is not None and dtau > 0
        else:
            claim = "τ flat (Δτ within ±0.1), τ_net grows"
            met = dtau is not None and abs(dtau) <= 0.1 and dnet is not None and dnet > 0
        tau = (f"{_f(t0['mean_tau'])} → {_f(t1['mean_tau'])} ({_f(100 * t1.get('tau_at_clamp', 0), '{:.0f}')}%)"
               if dtau is not None else "–")
        tnet = (f"{_f(net[0]['tau_net_median'])} (N={net[0]['N']}) → {_f(net[-1]['tau_net_median'])} (N={net[-1]['N']})"
                if net else "–")
        row = [name, r0["cell"], r0["optimizer"], "no" if r0["zero_diag"] else "yes", last[name],
               _solved_by(checks[name], last[name] // 2), _solved_by(checks[name], last[name]), tau, tnet, claim,
               "–" if met is None else ("met" if met else "missed")]
        rows.append("| " + " | ".join(str(c) for c in row) + " |")
    rows += ["", "| variant | steps compared | N single-head | N multi-head | paper: multi-head reaches larger N "
             "| at the largest N both solved: mean τ single / multi | τ_net (median) single / multi |", "|" + "---|" * 7]
    for variant in dict.fromkeys(name.partition(":")[0] for name in runs):
        single, multi = f"{variant}:single", f"{variant}:multi"
        if single in checks and multi in checks:
            at = min(last[single], last[multi])
            ns, nm = _solved_by(checks[single], at), _solved_by(checks[multi], at)
            k = min(_solved_by(checks[single], last[single]), _solved_by(checks[multi], last[multi]))
            at_k = [next((r for r in records if r["run"] == name and r["kind"] == "timescales" and r["N"] == k), {})
                    for name in (single, multi)]
            taus = " / ".join(_f(r.get("mean_tau")) for r in at_k)
            nets = " / ".join(_f(r.get("tau_net_median")) for r in at_k)
            rows.append(f"| {variant} | {at} | {ns} | {nm} | {'met' if nm > ns else 'missed'} | N={k}: {taus} | {nets} |")
    return "\n".join(rows)


def plot_study(records: list[dict], out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(r["run"] for r in records):
        checks = [r for r in records if r["run"] == name and r["kind"] == "check"]
        tsr = [r for r in records if r["run"] == name and r["kind"] == "timescales" and r["N"] > 0]
        style = "-" if name.endswith(":multi") else "--"
        line = axes[0].plot([r["step"] for r in checks], [r["N"] for r in checks], style, label=name)[0]
        if tsr and tsr[0]["mean_tau"] is not None:
            axes[1].plot([r["N"] for r in tsr], [r["mean_tau"] for r in tsr], style, color=line.get_color(), marker=".")
        axes[2].plot([r["N"] for r in tsr], [np.nan if r["tau_net_median"] is None else r["tau_net_median"] for r in tsr],
                     style, color=line.get_color(), marker=".")
    axes[0].set(xlabel="step", ylabel="N (curriculum)", title="curriculum progress")
    axes[1].set(xlabel="N solved", ylabel="mean trained τ", title="single-neuron τ")
    axes[2].set(xlabel="N solved", ylabel="median τ_net (steps)", title="network-mediated τ_net", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- plot of runs


def plot(paths: list[str], out: str) -> str:
    """Curves of N and mean τ over steps for each run's JSON lines in ``paths`` into ``out`` (PNG); returns the
    markdown table of the largest N solved and the final mean τ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    rows = ["| task | curriculum | steps | largest N solved | mean τ at the end |", "|---|---|---|---|---|"]
    for path in paths:
        recs = [r for r in map(json.loads, open(path)) if r.get("kind", "check") == "check"]
        label = f"{recs[0]['task']} {recs[0]['curriculum']}"
        steps = [r["step"] for r in recs]
        a1.plot(steps, [r["N"] for r in recs], label=label)
        a2.plot(steps, [np.nan if r["mean_tau"] is None else r["mean_tau"] for r in recs], label=label)
        best = max(r["N"] - (0 if r["solved"] else 1) for r in recs)
        rows.append(f"| {recs[0]['task']} | {recs[0]['curriculum']} | {steps[-1]} | {best} | {_f(recs[-1]['mean_tau'], '{:.3f}')} |")
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
    """Options train one run (``--help``); ``study`` runs the study; ``plot <runs.jsonl ...>`` plots finished runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        a = cli.parse(Plot, argv[1:])
        table = plot(list(a.runs), a.png)
        print(table)
        return table
    if argv[:1] == ["study"]:
        return study(parse(Study, STUDY_PRESETS, argv[1:]))
    out = run(parse(Config, PRESETS, argv))
    print(f"largest N solved: {out['largest_N']}")
    return out


if __name__ == "__main__":
    main()
