"""Speed of the scan engine's impls, as ratios to ``"sequential"`` measured side by side in one run.

For each ``(B, T, D)`` shape, every impl's forward and forward+backward (grads w.r.t. ``a`` and
``b``) are jitted and compiled first, then timed in interleaved rounds (one call of each impl per
round) and summarised by their medians. The table shows ``time / time(sequential)`` (lower is
faster), the impl ``"auto"`` picks (:func:`seqjax.scan.choose_impl`), and auto's time over the
fastest impl's (``auto/best``, 1.00 = auto picked the fastest).

    python benchmarks/scan.py                 # all shapes, 5 rounds
    python benchmarks/scan.py --reps=3 --shapes=8x512x256,1x16384x16
    python benchmarks/scan.py --pallas        # include the kernel (interpret mode on CPU: not a
                                              # speed measurement, only a smoke test there)
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import cli
from seqjax.scan import choose_impl, linear_scan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_interleaved

SHAPES = ((8, 512, 256), (4, 4096, 1024), (16, 1024, 64), (1, 16384, 16), (32, 256, 2048))


def _fns(impl):
    def fwd(a, b):
        return linear_scan(a, b, impl=impl)[0]

    def loss(a, b, w):  # w is an input, so XLA cannot constant-fold the backward pass
        h, h_last = linear_scan(a, b, impl=impl)
        return jnp.sum(h * w) + jnp.sum(h_last)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


def bench_shape(shape, impls, reps, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.uniform(0.5, 1.0, shape), jnp.float32)
    b = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    calls = {}
    for impl in impls:
        fwd, fwdbwd = _fns(impl)
        calls[impl, "f"] = lambda fwd=fwd: jax.block_until_ready(fwd(a, b))
        calls[impl, "fb"] = lambda fwdbwd=fwdbwd: jax.block_until_ready(fwdbwd(a, b, w))
    res = time_interleaved(calls, reps)
    return {impl: (res[impl, "f"][0], res[impl, "fb"][0]) for impl in impls}


@dataclasses.dataclass
class Args:
    shapes: tuple[str, ...] = tuple("x".join(map(str, s)) for s in SHAPES)  # comma list of BxTxD
    reps: int = 5  # interleaved timing rounds per shape
    pallas: bool = False  # include impl="pallas"


def main(argv=None):
    args = cli.parse(Args, argv, description=__doc__)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    impls = ["sequential", "associative", "chunked"] + (["pallas"] if args.pallas else [])
    platform = jax.default_backend()
    print(f"platform: {platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"reps={args.reps}; time / time(sequential), median of interleaved rounds")
    others = impls[1:]
    head = ["B x T x D", "seq fwd ms", "seq f+b ms"]
    head += [f"{i} fwd" for i in others] + [f"{i} f+b" for i in others]
    head += ["auto", "auto/best fwd", "auto/best f+b"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape in shapes:
        res = bench_shape(shape, impls, args.reps)
        seq_f, seq_fb = res["sequential"]
        auto = choose_impl(shape, jnp.float32, platform)
        best_f = min(f for f, _ in res.values())
        best_fb = min(fb for _, fb in res.values())
        auto_f, auto_fb = res.get(auto, (float("nan"),) * 2)
        row = ["x".join(map(str, shape)), f"{seq_f * 1e3:.2f}", f"{seq_fb * 1e3:.2f}"]
        row += [f"{res[i][0] / seq_f:.2f}" for i in others]
        row += [f"{res[i][1] / seq_fb:.2f}" for i in others]
        row += [auto, f"{auto_f / best_f:.2f}", f"{auto_fb / best_fb:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
