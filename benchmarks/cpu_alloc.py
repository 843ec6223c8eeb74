"""What glibc's allocator costs XLA:CPU: a small LM's training step with and without transparent huge pages.

XLA:CPU allocates each compiled step's scratch buffer (tens to hundreds of MB for the experiments' small LMs)
with ``malloc`` and frees it when the step ends. glibc serves blocks that large with a fresh ``mmap`` and
returns them with ``munmap``, so every step touches new 4 KiB pages: the kernel zeroes and maps each one (a
page fault), tens of thousands per step. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35, Linux)
makes malloc ask for transparent huge pages (``madvise``), 2 MiB each, and the faults drop by two to three
orders of magnitude. The tunable is read when the process starts, so each setting runs in its own child
process; settings alternate over ``--rounds`` rounds and the table gives the medians.

Each child builds the experiments' model for each mixer (``seqjax.tasks.runner.build_model``), trains it on
MQAR batches (AdamW through ``seqjax.tasks.runner.train_step``, the step ``runner.run`` takes), and
measures ``--steps`` steps after two warm-up steps: wall time, CPU time (user + system, ``getrusage``) and
minor page faults per step.

    python benchmarks/cpu_alloc.py --out=benchmarks/results/cpu_alloc.md
    python benchmarks/cpu_alloc.py --mixers=attention,mamba2 --d_model=128 --rounds=5
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Literal

from _common import machine, versions

from seqjax import cli

TUNABLE = "glibc.malloc.hugetlb=1"


@dataclasses.dataclass
class Args:
    mixers: tuple[str, ...] = ("attention", "gla", "mamba2")  # the experiments' --model names
    d_model: int = 64  # model width
    batch: int = 64  # sequences per step
    seq_len: int = 64  # MQAR sequence length
    num_layers: int = 2  # mixer layers
    steps: int = 10  # timed steps per mixer and child
    rounds: int = 3  # children per setting, alternating
    out: str = ""  # append the markdown report to this file ("" = print only)
    child: Literal["", "on", "off"] = ""  # internal: run one measurement with the tunable on or off, print JSON


def _measure(a: Args) -> dict:
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from seqjax.tasks import mqar, runner

    b = mqar.mqar(a.batch, a.seq_len, 4, 256, seed=0)
    x, y = jnp.asarray(b.inputs), jnp.asarray(b.targets)
    out = {}
    for m in a.mixers:
        cfg = runner.RunConfig(model=m, d_model=a.d_model, num_layers=a.num_layers)
        model = runner.build_model(cfg, 256, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
        step = runner.train_step
        for _ in range(2):
            float(step(model, opt, x, y))
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(a.steps):
            float(step(model, opt, x, y))
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        n = a.steps
        out[m] = {"wall_ms": 1e3 * wall / n, "cpu_ms": 1e3 * (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n,
                  "sys_ms": 1e3 * (r1.ru_stime - r0.ru_stime) / n, "faults": (r1.ru_minflt - r0.ru_minflt) / n}
    return out


def _child(setting: str, argv: list[str]) -> dict:
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    if setting == "on":
        tunables.append(TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    if not env["GLIBC_TUNABLES"]:
        del env["GLIBC_TUNABLES"]
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--child={setting}"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = cli.parse(Args, argv, description=__doc__)
    if a.child:
        print(json.dumps(_measure(a)))
        return
    passed = [x for x in argv if not x.startswith("--out")]
    load0 = os.getloadavg()
    runs = {"off": [], "on": []}
    for _ in range(a.rounds):
        for setting in ("off", "on"):
            runs[setting].append(_child(setting, passed))
    load1 = os.getloadavg()
    med = {s: {m: {k: statistics.median(r[m][k] for r in runs[s]) for k in runs[s][0][m]} for m in a.mixers} for s in runs}
    lines = [f"## `python benchmarks/cpu_alloc.py {' '.join(argv)}`\n",
             f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
             f"- machine: {machine()}; {versions()}",
             f"- glibc {os.confstr('CS_GNU_LIBC_VERSION') if hasattr(os, 'confstr') else '?'}; transparent huge pages: "
             + _thp(),
             f"- LM: d_model {a.d_model}, {a.num_layers} layers, batch {a.batch} x {a.seq_len} tokens (MQAR); "
             f"{a.steps} steps per child after 2 warm-up steps; {a.rounds} children per setting, alternating; medians",
             f"- load average (1 min) before / after: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs\n",
             "| mixer | GLIBC_TUNABLES | wall ms / step | CPU ms / step | of it system | page faults / step "
             "| wall off / on | CPU off / on |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in a.mixers:
        off, on = med["off"][m], med["on"][m]
        for s, r in (("off", off), ("on", on)):
            ratio = (f"{off['wall_ms'] / on['wall_ms']:.2f}x", f"{off['cpu_ms'] / on['cpu_ms']:.2f}x") if s == "on" else ("", "")
            lines.append(f"| {m} | {'unset' if s == 'off' else TUNABLE} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} | "
                         f"{r['sys_ms']:.0f} | {r['faults']:.0f} | {ratio[0]} | {ratio[1]} |")
    report = "\n".join(lines)
    print(report)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write("\n" + report + "\n")


def _thp() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
