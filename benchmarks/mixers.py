"""Every registered mixer: parallel form vs reference, forward and forward+backward time, compiled peak
(temporary) memory, and the parallel forms' FLOP rate as a fraction of this machine's matmul rate.

    python benchmarks/mixers.py --quick                 # T = 1k only
    python benchmarks/mixers.py --mixers=gla,mamba2 --out=benchmarks/results/cpu_mixers.md

FLOPs are XLA's own count (``compiled.cost_analysis()["flops"]``) of the compiled forward; the matmul
rate is a float32 ``[n, n] @ [n, n]`` measured in the same run. Inputs come from each mixer's
``make_inputs(key, batch, T)`` (its default, small head counts and dims). All numbers come from one run,
side by side; ratios are what to read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp

from seqjax import cli, mixers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_jax


def _compiled(f, *args):
    c = jax.jit(f).lower(*args).compile()
    mem = c.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return c, temp, flops


def matmul_rate(n=1024):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / time_jax(f, a, reps=5)


def _fns(spec, impl, inputs):
    diff = [k for k, v in inputs.items() if jnp.issubdtype(v.dtype, jnp.inexact)]
    fixed = {k: v for k, v in inputs.items() if k not in diff}
    if impl == "reference":
        f = functools.partial(spec.recurrent, **spec.options)
    else:
        f = functools.partial(spec.fn, impl=impl, **spec.options)

    def fwd(d):
        return f(**d, **fixed)[0]

    def loss(d):
        y = fwd(d)
        return jnp.sum(jnp.real(y).astype(jnp.float32) ** 2)

    d = {k: inputs[k] for k in diff}
    return fwd, jax.grad(loss), d


def bench(names, ts, batch=1):
    rate = matmul_rate()
    rows = []
    print(f"# matmul rate (f32 1024^3): {rate / 1e9:.1f} GFLOP/s", flush=True)
    for name in names:
        spec = mixers.get(name)
        par = [i for i in spec.impls if i != "sequential"] or ["sequential"]
        for t in ts:
            inputs = spec.make_inputs(jax.random.PRNGKey(0), batch, t)
            res = {}
            for impl in ["reference", *par]:
                try:
                    fwd, grad, d = _fns(spec, impl, inputs)
                    cf, temp_f, flops = _compiled(fwd, d)
                    cg, temp_g, _ = _compiled(grad, d)
                    res[impl] = dict(fwd=time_jax(cf, d, reps=3), bwd=time_jax(cg, d, reps=3), mem_f=temp_f, mem_g=temp_g, flops=flops)
                except Exception as e:  # noqa: BLE001 — a mixer that cannot run this size is reported, not fatal
                    res[impl] = dict(err=f"{type(e).__name__}: {str(e)[:60]}")
            ref = res["reference"]
            for impl in par:
                r = res[impl]
                if "err" in r or "err" in ref:
                    rows.append((name, impl, t, r.get("err") or ref.get("err")))
                    continue
                rows.append((
                    name, impl, t,
                    r["fwd"] * 1e3, ref["fwd"] / r["fwd"], r["bwd"] * 1e3, ref["bwd"] / r["bwd"],
                    r["mem_g"] / 2**20, ref["mem_g"] / 2**20, r["flops"] / r["fwd"] / rate,
                ))
                print(_fmt(rows[-1]), flush=True)
    return rate, rows


HEADER = (
    "| mixer | impl | T | fwd ms | ref/par fwd | fwd+bwd ms | ref/par fwd+bwd | peak temp MiB fwd+bwd (par) "
    "| (ref) | FLOP rate / matmul |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(row):
    if len(row) == 4:
        return f"| {row[0]} | {row[1]} | {row[2]} | error: {row[3]} | | | | | | |"
    n, i, t, f, rf, b, rb, m, mr, fr = row
    return f"| {n} | {i} | {t} | {f:.2f} | {rf:.2f}x | {b:.2f} | {rb:.2f}x | {m:.1f} | {mr:.1f} | {fr:.3f} |"


@dataclasses.dataclass
class Args:
    quick: bool = False  # T = 1k only
    mixers: tuple[str, ...] = ()  # comma list of names (default: all registered)
    batch: int = 1
    out: str = ""  # also write the table to this markdown file


def main(argv=None):
    a = cli.parse(Args, argv, description=__doc__)
    names = list(a.mixers) or [n for n in mixers.names() if mixers.get(n).functional]
    ts = [1024] if a.quick else [1024, 4096, 16384]
    print(HEADER, flush=True)
    rate, rows = bench(names, ts, a.batch)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(f"# Mixers on {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}\n\n")
            fh.write(f"Command: `python benchmarks/mixers.py {' '.join(argv or sys.argv[1:])}`; batch {a.batch}, "
                     f"each mixer's default test dims. Matmul rate: {rate / 1e9:.1f} GFLOP/s (f32).\n\n")
            fh.write(HEADER + "\n" + "\n".join(_fmt(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
