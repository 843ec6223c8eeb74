"""Nonlinear RNN speed, as ratios measured side by side in one run.

1. LSTM forward+backward (grads w.r.t. all parameters and the input) at (B, T, D) = (16, 512, 256):
   seqjax's ``rnn("lstm", ...)`` (input projection precomputed as one matmul, fused 4-gate recurrent
   matmul; ``impl="sequential"`` (JAX autodiff of the scan) and ``impl="fused"`` (hand-written backward
   scan, dR as one big matmul), ``unroll`` 1 or 8) against Flax's ``nnx.RNN(nnx.OptimizedLSTMCell)``; then a head-wise
   config (G = 4 heads of 64), whose recurrent matmul is 4x smaller (Flax has no head-wise cell, so
   its dense LSTM of the same width is the baseline).
2. Parallel-in-time vs sequential: a GRU (B = 4, H = 32) forward+backward at T = 1k and 8k,
   quasi-DEER (diagonal Jacobians, seqjax.linear_scan ``auto`` and ``associative``) and full DEER
   (T = 1k only) against ``lax.scan``; Newton iterations are reported.

Each function is jitted and compiled first, then timed in interleaved rounds (medians).

    python benchmarks/rnn.py               # everything (a few minutes on a quiet CPU)
    python benchmarks/rnn.py --reps=3 --skip-parallel   # or --skip-lstm
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.rnn.flashrnn import _max_head
from seqjax import cli
from seqjax import rnn as R


def _time(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _race(fns: dict, args: dict, reps: int) -> dict:
    for name, fn in fns.items():
        _time(fn, *args[name])
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time(fn, *args[name]))
    return {name: statistics.median(v) for name, v in times.items()}


def _flax_lstm(d, key):
    model = nnx.RNN(nnx.OptimizedLSTMCell(d, d, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def loss(state, x):
        zeros = jnp.zeros((x.shape[0], d), x.dtype)  # (c, h); Flax's default carry init draws from rngs
        return jnp.sum(nnx.merge(graphdef, state, rest)(x, initial_carry=(zeros, zeros)) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), state


def _seqjax(kind, d, heads, key, **kw):
    params = R.init_params(kind, key, d, d, heads=heads)

    def loss(params, x):
        return jnp.sum(R.rnn(kind, params, x, **kw)[0] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def bench_lstm(b, t, d, reps):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (b, t, d))
    fns, args = {}, {}
    fns["flax OptimizedLSTMCell"], st = _flax_lstm(d, key)
    args["flax OptimizedLSTMCell"] = (st, x)
    for heads in (1, 4):
        impls = [("sequential", 1), ("fused", 1), ("fused", 8)]
        # the fused Pallas kernel: on an accelerator (interpreted, hence slow, on a CPU), for heads that fit on chip
        if jax.default_backend() != "cpu" and d // heads <= _max_head(4):
            impls.append(("pallas", 1))
        for impl, unroll in impls:
            name = f"seqjax lstm G={heads} {impl} unroll={unroll}"
            kw = {"impl": impl} if impl == "pallas" else {"impl": impl, "unroll": unroll}
            fns[name], p = _seqjax("lstm", d, heads, key, **kw)
            args[name] = (p, x)
    res = _race(fns, args, reps)
    base = res["flax OptimizedLSTMCell"]
    print(f"\n### LSTM fwd+bwd, (B, T, D) = ({b}, {t}, {d})\n")
    print("| impl | ms | time / flax |\n|---|---:|---:|")
    for name, v in res.items():
        print(f"| {name} | {1e3 * v:.1f} | {v / base:.2f} |")


def bench_parallel(ts, reps, b=4, h=32):
    key = jax.random.PRNGKey(1)
    params = R.init_params("gru", key, h, h)
    print(f"\n### GRU fwd+bwd, parallel-in-time vs sequential (B = {b}, H = {h})\n")
    print("| T | impl | iters | ms | time / sequential |\n|---:|---|---:|---:|---:|")
    for t in ts:
        x = jax.random.normal(jax.random.fold_in(key, t), (b, t, h))
        variants = {"sequential": {}, "fused (sequential, custom bwd)": {"impl": "fused"},
                    "quasi-DEER (scan auto)": {"impl": "parallel", "mode": "quasi", "tol": 1e-4},
                    "quasi-DEER (associative)": {"impl": "parallel", "mode": "quasi", "tol": 1e-4,
                                                 "scan_impl": "associative"}}
        if t <= 1024:
            variants["DEER (full Jacobians)"] = {"impl": "parallel", "mode": "full", "tol": 1e-4}
        fns, args, iters = {}, {}, {}
        for name, kw in variants.items():
            def loss(p, x, kw=kw):
                return jnp.sum(R.rnn("gru", p, x, **kw)[0] ** 2)

            fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
            args[name] = (params, x)
            if kw.get("impl") == "parallel":
                _, _, info = jax.jit(lambda p, x, kw=kw: R.rnn("gru", p, x, return_info=True, **kw))(params, x)
                iters[name] = int(info["iters"])
        res = _race(fns, args, reps)
        for name, v in res.items():
            print(f"| {t} | {name} | {iters.get(name, '-')} | {1e3 * v:.1f} | {v / res['sequential']:.2f} |")


@dataclasses.dataclass
class Args:
    reps: int = 5  # interleaved timing rounds
    shape: str = "16x512x256"  # the LSTM's BxTxD
    ts: tuple[int, ...] = (1024, 8192)  # the parallel-in-time GRU's lengths
    skip_parallel: bool = False
    skip_lstm: bool = False


def main(argv=None):
    a = cli.parse(Args, argv, description=__doc__)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}")
    b, t, d = (int(v) for v in a.shape.split("x"))
    if not a.skip_lstm:
        bench_lstm(b, t, d, a.reps)
    if not a.skip_parallel:
        bench_parallel(list(a.ts), a.reps)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
