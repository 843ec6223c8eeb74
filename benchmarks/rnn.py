"""Nonlinear RNN speed, as ratios measured side by side in one run.

1. LSTM and GRU forward+backward (grads w.r.t. all parameters and the input of ``sum(y²)``) at
   (B, T, D) = (16, 512, 256), one process, interleaved rounds: seqjax's ``rnn(kind, ...)`` per impl
   (``sequential``: JAX's autodiff of ``lax.scan``; ``fused``: the closed-form gate backward of
   ``seqjax/rnn/gates.py``; dense and head-wise G = 4), Flax's ``nnx.RNN`` over ``nnx.OptimizedLSTMCell`` /
   ``nnx.GRUCell``, and ``torch.nn.LSTM`` / ``torch.nn.GRU`` on the CPU when torch is installed (an optional
   benchmark dependency). Ratios are time / torch's time (time / Flax's without torch).
2. What bounds a step on this CPU (``--floor``): one recurrent matmul per step in a ``fori_loop`` (both
   layouts), the same matmul followed by an LSTM cell's gates, the loop with an empty body, and torch's
   per-step matmul.
   ``--phases``: where the dense fused LSTM's time goes against torch's, at the cell tables' shape: the forward
   alone, the forward that also returns what the backward reads (``jax.vjp``'s forward; torch's forward with
   autograd recording), and forward+backward, so the backward's share is the difference.
3. Parallel-in-time vs sequential: a GRU (B = 4, H = 32) forward+backward at T = 1k and 8k,
   quasi-DEER (diagonal Jacobians, seqjax.linear_scan ``auto`` and ``associative``) and full DEER
   (T = 1k only) against ``lax.scan``; Newton iterations are reported.

Each function is compiled (or warmed up) first, then all are timed in interleaved rounds; the tables give
medians and minima. ``--cores=N`` runs the process on its first N CPUs (``os.sched_setaffinity``, before JAX
starts its CPU client, whose thread pool follows the affinity) and ``torch.set_num_threads(N)``; 0 leaves both
frameworks at their defaults (all CPUs). XLA's thread flags (``intra_op_parallelism_threads``,
``xla_cpu_multi_thread_eigen``) do not keep its matmuls on one thread; the affinity does.

    python benchmarks/rnn.py --skip-parallel --out=benchmarks/results/cpu_rnn.md
    python benchmarks/rnn.py --skip-parallel --cores=1 --out=benchmarks/results/cpu_rnn.md --append
    python benchmarks/rnn.py --reps=3 --skip-cells          # parallel-in-time only
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pallas_kernels.rnn.flashrnn import _max_head
from seqjax import cli
from seqjax import rnn as R

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, time_interleaved, versions

try:
    import torch
except ImportError:  # optional: the torch rows are left out
    torch = None


def _jax_call(f, *args):
    return lambda: jax.block_until_ready(f(*args))


def _flax(kind, d, x):
    cell = nnx.OptimizedLSTMCell(d, d, rngs=nnx.Rngs(0)) if kind == "lstm" else nnx.GRUCell(d, d, rngs=nnx.Rngs(0))
    graphdef, state, rest = nnx.split(nnx.RNN(cell), nnx.Param, ...)

    def loss(state, x):
        zeros = jnp.zeros((x.shape[0], d), x.dtype)  # Flax's default carry init draws from rngs
        carry = (zeros, zeros) if kind == "lstm" else zeros
        return jnp.sum(nnx.merge(graphdef, state, rest)(x, initial_carry=carry) ** 2)

    return _jax_call(jax.jit(jax.grad(loss, argnums=(0, 1))), state, x)


def _seqjax(kind, d, heads, x, **kw):
    params = R.init_params(kind, jax.random.PRNGKey(0), d, d, heads=heads)

    def loss(params, x):
        return jnp.sum(R.rnn(kind, params, x, **kw)[0] ** 2)

    return _jax_call(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)


def _torch(kind, b, t, d):
    mod = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(d, d, batch_first=True)
    x = torch.randn(b, t, d, requires_grad=True)

    def step():
        mod.zero_grad()
        x.grad = None
        y, _ = mod(x)
        (y ** 2).sum().backward()

    return step


def bench_cells(kinds, b, t, d, reps) -> list[str]:
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
    on_cpu = jax.default_backend() == "cpu"
    rows = []
    for kind in kinds:
        fns = {}
        if torch is not None and on_cpu:
            fns[f"torch.nn.{kind.upper()}"] = _torch(kind, b, t, d)
        flax_name = "flax nnx.OptimizedLSTMCell" if kind == "lstm" else "flax nnx.GRUCell"
        fns[flax_name] = _flax(kind, d, x)
        for heads in (1, 4):
            impls = ["sequential", "fused"]
            # the Pallas kernel: on an accelerator (interpreted, hence slow, on a CPU), for heads that fit on chip
            if not on_cpu and d // heads <= _max_head(4 if kind == "lstm" else 3):
                impls.append("pallas")
            for impl in impls:
                fns[f"seqjax {kind} G={heads} {impl}"] = _seqjax(kind, d, heads, x, impl=impl)
        res = time_interleaved(fns, reps)
        base_name = next(iter(fns))
        base = res[base_name][0]
        rows += [f"\n### {kind.upper()} fwd+bwd, (B, T, D) = ({b}, {t}, {d})\n",
                 f"| impl | median ms | min ms | time / {base_name} |", "|---|---:|---:|---:|"]
        rows += [f"| {n} | {1e3 * med:.1f} | {1e3 * lo:.1f} | {med / base:.2f} |" for n, (med, lo) in res.items()]
        print("\n".join(rows[-len(res) - 3:]), flush=True)
    return rows


def bench_floor(b, t, d, reps) -> list[str]:
    """Per-step costs at the LSTM's shape: one recurrent matmul ``[B, D] x [D, 4D]`` per step (its four gate
    blocks summed, so that every output is used), in a loop of ``t`` steps."""
    key = jax.random.PRNGKey(2)
    Rm = jax.random.normal(key, (d, 4 * d)) / np.sqrt(d)
    Rt = jnp.asarray(np.array(Rm).T)
    h = jax.random.normal(key, (b, d))

    def rows_step(w, h):
        a = h @ w
        return jnp.tanh(a[:, :d] + a[:, d:2 * d] + a[:, 2 * d:3 * d] + a[:, 3 * d:])

    def cols_step(w, h):
        a = w @ h
        return jnp.tanh(a[:d] + a[d:2 * d] + a[2 * d:3 * d] + a[3 * d:])

    def cell_step(w, s):  # the same matmul, then an LSTM cell's gates (one-thread elementwise fusions)
        h, c = s
        a = w @ h
        i, f, o = (jax.nn.sigmoid(a[n * d:(n + 1) * d]) for n in (0, 1, 3))
        c = f * c + i * jnp.tanh(a[2 * d:3 * d])
        return o * jnp.tanh(c), c

    def loop(step):
        return jax.jit(lambda w, h0: lax.fori_loop(0, t, lambda i, h: step(w, h), h0))

    fns = {
        "empty step (h + 1)": _jax_call(loop(lambda w, h: h + 1.0), Rm, h),
        "h @ R, state [B, D]": _jax_call(loop(rows_step), Rm, h),
        "R^T @ h^T, state [D, B] (seqjax fused)": _jax_call(loop(cols_step), Rt, h.T),
        "R^T @ h^T, then an LSTM cell": _jax_call(loop(cell_step), Rt, (h.T, h.T)),
    }
    if torch is not None and jax.default_backend() == "cpu":
        tR, th = torch.from_numpy(np.array(Rm)), torch.from_numpy(np.array(h))

        def torch_loop():
            v = th
            for _ in range(t):
                a = v @ tR
                v = torch.tanh(a[:, :d] + a[:, d:2 * d] + a[:, 2 * d:3 * d] + a[:, 3 * d:])

        fns["torch h @ R (eager)"] = torch_loop
    res = time_interleaved(fns, reps)
    flops = 2 * b * d * 4 * d * t
    rows = [f"\n### One recurrent matmul per step, {t} steps, [{b}, {d}] x [{d}, {4 * d}]\n",
            "| loop | median ms | min ms | µs / step | GFLOP/s (min) |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {n} | {1e3 * med:.1f} | {1e3 * lo:.1f} | {1e6 * med / t:.1f} | "
             f"{'' if n.startswith('empty') else f'{flops / lo / 1e9:.0f}'} |" for n, (med, lo) in res.items()]
    print("\n".join(rows), flush=True)
    return rows


def bench_phases(b, t, d, reps) -> list[str]:
    """The dense LSTM (``impl="fused"``) and ``torch.nn.LSTM`` by phase: forward only, forward with the residuals the
    backward reads, forward+backward."""
    params = R.init_params("lstm", jax.random.PRNGKey(0), d, d, heads=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (b, t, d))
    run = lambda p, x: R.rnn("lstm", p, x, impl="fused")[0]
    fwd = jax.jit(run)
    fwd_res = jax.jit(lambda p, x: jax.tree.leaves(jax.vjp(run, p, x)))  # outputs and the vjp's residuals
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2), argnums=(0, 1)))
    fns = {"seqjax forward": _jax_call(fwd, params, x), "seqjax forward + residuals": _jax_call(fwd_res, params, x),
           "seqjax forward+backward": _jax_call(grad, params, x)}
    if torch is not None and jax.default_backend() == "cpu":
        mod = torch.nn.LSTM(d, d, batch_first=True)
        xt = torch.randn(b, t, d, requires_grad=True)

        def torch_fwd():
            with torch.no_grad():
                mod(xt)

        fns["torch forward (no_grad)"] = torch_fwd
        fns["torch forward (autograd recording)"] = lambda: mod(xt)
        fns["torch forward+backward"] = _torch("lstm", b, t, d)
    res = time_interleaved(fns, reps)
    rows = [f"\n### Dense LSTM by phase, (B, T, D) = ({b}, {t}, {d})\n", "| phase | median ms | min ms |", "|---|---:|---:|"]
    rows += [f"| {n} | {1e3 * med:.1f} | {1e3 * lo:.1f} |" for n, (med, lo) in res.items()]
    print("\n".join(rows), flush=True)
    return rows


def bench_parallel(ts, reps, b=4, h=32) -> list[str]:
    key = jax.random.PRNGKey(1)
    params = R.init_params("gru", key, h, h)
    rows = [f"\n### GRU fwd+bwd, parallel-in-time vs sequential (B = {b}, H = {h})\n",
            "| T | impl | iters | median ms | time / sequential |", "|---:|---|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    for t in ts:
        x = jax.random.normal(jax.random.fold_in(key, t), (b, t, h))
        variants = {"sequential": {}, "fused (closed-form backward)": {"impl": "fused"},
                    "quasi-DEER (scan auto)": {"impl": "parallel", "mode": "quasi", "tol": 1e-4},
                    "quasi-DEER (associative)": {"impl": "parallel", "mode": "quasi", "tol": 1e-4,
                                                 "scan_impl": "associative"}}
        if t <= 1024:
            variants["DEER (full Jacobians)"] = {"impl": "parallel", "mode": "full", "tol": 1e-4}
        fns, iters = {}, {}
        for name, kw in variants.items():
            def loss(p, x, kw=kw):
                return jnp.sum(R.rnn("gru", p, x, **kw)[0] ** 2)

            fns[name] = _jax_call(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)
            if kw.get("impl") == "parallel":
                _, _, info = jax.jit(lambda p, x, kw=kw: R.rnn("gru", p, x, return_info=True, **kw))(params, x)
                iters[name] = int(info["iters"])
        res = time_interleaved(fns, reps)
        new = [f"| {t} | {name} | {iters.get(name, '-')} | {1e3 * med:.1f} | {med / res['sequential'][0]:.2f} |"
               for name, (med, _) in res.items()]
        print("\n".join(new), flush=True)
        rows += new
    return rows


@dataclasses.dataclass
class Args:
    reps: int = 7  # interleaved timing rounds
    shape: str = "16x512x256"  # BxTxD of the cell tables
    kinds: tuple[str, ...] = ("lstm", "gru")  # cells of the cell tables
    cores: int = 0  # run both frameworks on this many CPUs (affinity + torch threads); 0 = defaults
    ts: tuple[int, ...] = (1024, 8192)  # the parallel-in-time GRU's lengths
    skip_cells: bool = False
    skip_lstm: bool = False  # leave the LSTM out of the cell tables
    skip_parallel: bool = False
    floor: bool = False  # also time the per-step floor (a loop of recurrent matmuls, an empty loop)
    phases: bool = False  # also time the dense fused LSTM and torch's by phase (forward, + residuals, + backward)
    out: str = ""  # write the run (command, machine, versions, tables) to this markdown file
    append: bool = False  # append to --out instead of overwriting it


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = cli.parse(Args, argv, description=__doc__)
    if a.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:a.cores]))  # before JAX's CPU client starts
        if torch is not None:
            torch.set_num_threads(a.cores)
    threads = (f"CPUs {sorted(os.sched_getaffinity(0))} for both (affinity), torch "
               f"{torch.get_num_threads() if torch is not None else '-'} threads; XLA's pool on the same CPUs, "
               f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or 'unset'}, "
               f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or 'unset'}")
    load0 = os.getloadavg()
    head = [f"## `python benchmarks/rnn.py {' '.join(argv)}`\n",
            f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- machine: {machine()}; backend {jax.default_backend()} ({jax.devices()[0].device_kind})",
            f"- versions: {versions(torch.__version__ if torch is not None else 'not installed')}",
            f"- cores: {threads}",
            f"- timing: {a.reps} interleaved rounds after a warm-up call each, all forms in one process; "
            "median and minimum wall time"]
    print("\n".join(head), flush=True)
    b, t, d = (int(v) for v in a.shape.split("x"))
    rows = []
    kinds = [k for k in a.kinds if not (a.skip_lstm and k == "lstm")]
    if not a.skip_cells and kinds:
        rows += bench_cells(kinds, b, t, d, a.reps)
    if a.floor:
        rows += bench_floor(b, t, d, a.reps)
    if a.phases:
        rows += bench_phases(b, t, d, a.reps)
    if not a.skip_parallel:
        rows += bench_parallel(list(a.ts), a.reps)
    load1 = os.getloadavg()
    head.append(f"- load average (1 min) before / after: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs")
    print(head[-1])
    if a.out:
        with open(a.out, "a" if a.append else "w") as fh:
            fh.write("\n" + "\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()
