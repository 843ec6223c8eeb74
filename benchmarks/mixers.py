"""Every registered mixer: parallel form vs reference, forward and forward+backward time, compiled peak
(temporary) memory, and the parallel forms' FLOP rate as a fraction of this machine's matmul rate.

    python benchmarks/mixers.py --quick                 # T = 1k only
    python benchmarks/mixers.py --mixers=gla,mamba2 --out=benchmarks/results/cpu_mixers.md
    python benchmarks/mixers.py --mixers=gla,deltanet,gated_deltanet --heads=4 --dim=64 --ts=8192   # model widths
    python benchmarks/mixers.py --mixers=deltanet --heads=4 --dim=64 --ts=8192 --cores=1       # on one CPU
    python benchmarks/mixers.py --mixers=mamba --batch=64 --ts=64 --make channels=128 state=16   # any make_inputs size

FLOPs are XLA's own count (``compiled.cost_analysis()["flops"]``) of the compiled forward. The matmul rate
is a float32 ``[n, n] @ [n, n]`` (``n = 1024``), or with ``--heads/--dim`` a projection-shaped
``[B T, H D] @ [H D, H D]``; it is timed in every round next to the forms, so each row's FLOP rate is
against the matmul rate of the same minutes. With ``--heads/--dim`` a second one is timed beside it: the
block matmuls a chunked form is made of, ``Q Kᵀ``-shaped ``[B H T/C, C, D] @ [B H T/C, D, C]`` (``C =
--chunk``), whose rate bounds any chunked form built from such blocks (the last column, ``FLOP rate /
blocks``). Inputs come from each mixer's ``make_inputs(key, batch, T)``:
its default, small head counts and dims, or ``heads=H, dk=dv=D`` with ``--heads/--dim``. Every form of one
(mixer, T) is compiled first and then timed interleaved, round by round (``--reps`` rounds, medians): on a
shared machine the ratios of one row are what to read. ``impl="auto"`` is a row of its own.
``--cores=N`` runs on the first N CPUs (XLA's thread pool follows the process's affinity).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys

import jax
import jax.numpy as jnp

from seqjax import cli, mixers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_interleaved

REF_CALLS = 8  # calls of a reference matmul per timing


def _compiled(f, *args):
    c = jax.jit(f).lower(*args).compile()
    mem = c.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return c, temp, flops


def _matmul(batch, t, heads, dim):
    """The reference matmul: ``[n, n] @ [n, n]`` (n = 1024), or ``[B T, H D] @ [H D, H D]`` at model widths."""
    m, n = (1024, 1024) if not heads else (batch * t, heads * dim)
    a = jax.random.normal(jax.random.PRNGKey(0), (m, n))
    w = jax.random.normal(jax.random.PRNGKey(1), (n, n))
    return jax.jit(lambda a, w: a @ w), (a, w), 2 * m * n * n


def _blocks(batch, t, heads, dim, chunk):
    """The chunked forms' block matmuls: ``[B H T/C, C, D] @ [B H T/C, D, C]`` (``Q Kᵀ`` of every chunk)."""
    n = batch * heads * (t // chunk)
    a = jax.random.normal(jax.random.PRNGKey(2), (n, chunk, dim))
    b = jax.random.normal(jax.random.PRNGKey(3), (n, dim, chunk))
    return jax.jit(lambda a, b: jnp.einsum("ncd,nde->nce", a, b)), (a, b), 2 * n * chunk * dim * chunk


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


def _widths(make_inputs, heads, dim) -> dict:
    """``make_inputs``' keywords for ``heads`` heads of width ``dim``: ``dk = dv = dim``, or for an SSM that takes
    ``head_dim`` / ``state`` (Mamba-2) ``head_dim = state = dim`` with one B/C group."""
    params = inspect.signature(make_inputs).parameters
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # a variant's **kw wrapper
    if "dk" in params or (forwards and "head_dim" not in params):
        return dict(heads=heads, dk=dim, dv=dim)
    if "head_dim" in params:
        return dict(heads=heads, head_dim=dim, **({"state": dim} if "state" in params else {}),
                    **({"groups": 1} if "groups" in params else {}))
    raise SystemExit(f"--heads/--dim: {make_inputs.__name__} takes neither dk/dv nor head_dim")


def _make_kwargs(pairs) -> dict:
    """``("channels=128", "state=16")`` → ``{"channels": 128, "state": 16}``."""
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not v.lstrip("-").isdigit():
            raise SystemExit(f"--make: expected name=integer, got {p!r}")
        out[k] = int(v)
    return out


def bench(names, ts, batch=1, heads=0, dim=0, reps=3, make=None, impls=(), chunk=64):
    rows, rates = [], []
    for name in names:
        spec = mixers.get(name)
        par = list(impls) or [i for i in spec.impls if i != "sequential"] or ["sequential"]
        forms = ["reference", *par, "auto"]
        for t in ts:
            dims = {**(_widths(spec.make_inputs, heads, dim) if heads else {}), **(make or {})}
            inputs = spec.make_inputs(jax.random.PRNGKey(0), batch, t, **dims)
            mm, mm_args, mm_flops = _matmul(batch, t, heads, dim)
            calls, info, res = {"matmul": (mm, mm_args)}, {}, {}
            if heads:
                bm, bm_args, bm_flops = _blocks(batch, t, heads, dim, chunk)
                calls["blocks"] = (bm, bm_args)
            for impl in forms:
                try:
                    fwd, grad, d = _fns(spec, impl, inputs)
                    cf, temp_f, flops = _compiled(fwd, d)
                    cg, temp_g, _ = _compiled(grad, d)
                    calls[(impl, "f")], calls[(impl, "g")] = (cf, (d,)), (cg, (d,))
                    info[impl] = dict(mem_f=temp_f, mem_g=temp_g, flops=flops)
                except Exception as e:  # noqa: BLE001 — a mixer that cannot run this size is reported, not fatal
                    res[impl] = dict(err=f"{type(e).__name__}: {str(e)[:60]}")
            # the reference matmuls run REF_CALLS times back to back per timing: one few-ms call right after a form
            # that freed hundreds of MB reads the cold cache, not the matmul rate
            n_calls = {k: REF_CALLS if k in ("matmul", "blocks") else 1 for k in calls}
            fns = {k: (lambda f=f, a=a, n=n_calls[k]: [jax.block_until_ready(f(*a)) for _ in range(n)])
                   for k, (f, a) in calls.items()}
            times = {k: med / n_calls[k] for k, (med, _) in time_interleaved(fns, reps).items()}
            rate = mm_flops / times["matmul"]
            block_rate = bm_flops / times["blocks"] if heads else None
            rates.append(rate)
            for impl in info:
                res[impl] = dict(fwd=times[(impl, "f")], bwd=times[(impl, "g")], **info[impl])
            ref = res["reference"]
            for impl in [*par, "auto"]:
                r = res[impl]
                if "err" in r or "err" in ref:
                    rows.append((name, impl, t, r.get("err") or ref.get("err")))
                    continue
                rows.append((
                    name, impl, t,
                    r["fwd"] * 1e3, ref["fwd"] / r["fwd"], r["bwd"] * 1e3, ref["bwd"] / r["bwd"],
                    r["mem_g"] / 2**20, ref["mem_g"] / 2**20, r["flops"] / r["fwd"] / rate,
                    r["flops"] / r["fwd"] / block_rate if block_rate else None,
                ))
                blocks = f", blocks {block_rate / 1e9:.1f} GFLOP/s = {block_rate / rate:.2f} of it" if block_rate else ""
                print(_fmt(rows[-1]), f"(matmul {rate / 1e9:.1f} GFLOP/s{blocks})", flush=True)
    return rates, rows


HEADER = (
    "| mixer | impl | T | fwd ms | ref/par fwd | fwd+bwd ms | ref/par fwd+bwd | peak temp MiB fwd+bwd (par) "
    "| (ref) | FLOP rate / matmul | FLOP rate / blocks |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(row):
    if len(row) == 4:
        return f"| {row[0]} | {row[1]} | {row[2]} | error: {row[3]} | | | | | | | |"
    n, i, t, f, rf, b, rb, m, mr, fr, fb = row
    fb = "" if fb is None else f"{fb:.3f}"
    return f"| {n} | {i} | {t} | {f:.2f} | {rf:.2f}x | {b:.2f} | {rb:.2f}x | {m:.1f} | {mr:.1f} | {fr:.3f} | {fb} |"


@dataclasses.dataclass
class Args:
    quick: bool = False  # T = 1k only
    mixers: tuple[str, ...] = ()  # comma list of names (default: all registered)
    batch: int = 1
    heads: int = 0  # with dim: make_inputs(heads=H, dk=dv=D; Mamba-2 head_dim=d_state=D) instead of the small defaults
    dim: int = 0  # head dim (with heads)
    ts: tuple[int, ...] = ()  # sequence lengths (default 1k, 4k, 16k; --quick: 1k)
    reps: int = 3  # interleaved rounds (medians)
    make: tuple[str, ...] = ()  # extra make_inputs keywords, name=integer (e.g. channels=128 state=16 for Mamba)
    impls: tuple[str, ...] = ()  # the forms to time beside the reference and auto (default: every impl but sequential)
    chunk: int = 64  # with --heads/--dim: C of the block matmul [B H T/C, C, D] @ [B H T/C, D, C] timed beside
    cores: int = 0  # run on this machine's first N CPUs (affinity, set before JAX starts its CPU client); 0 = all
    out: str = ""  # also write the table to this markdown file


def main(argv=None):
    a = cli.parse(Args, argv, description=__doc__)
    if a.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:a.cores]))  # XLA's pool follows the affinity
    names = list(a.mixers) or [n for n in mixers.names() if mixers.get(n).functional]
    if bool(a.heads) != bool(a.dim):
        raise SystemExit("--heads and --dim go together")
    ts = list(a.ts) or ([1024] if a.quick else [1024, 4096, 16384])
    print(HEADER, flush=True)
    rates, rows = bench(names, ts, a.batch, a.heads, a.dim, a.reps, _make_kwargs(a.make), a.impls, a.chunk)
    if a.out:
        dims = f"H = {a.heads}, head dim {a.dim}" if a.heads else "each mixer's default test dims"
        dims += "".join(f", {p}" for p in a.make)
        mm = f"[B T, {a.heads * a.dim}] @ [{a.heads * a.dim}, {a.heads * a.dim}]" if a.heads else "[1024, 1024]^2"
        with open(a.out, "w") as fh:
            fh.write(f"# Mixers on {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}\n\n")
            fh.write(f"Command: `python benchmarks/mixers.py {' '.join(argv or sys.argv[1:])}`; batch {a.batch}, "
                     f"{dims}. Matmul ({mm}, f32) rate per row: {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} "
                     "GFLOP/s, timed interleaved with the forms; "
                     f"CPUs {sorted(os.sched_getaffinity(0))} (affinity).\n\n")
            fh.write(HEADER + "\n" + "\n".join(_fmt(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
