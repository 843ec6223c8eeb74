"""Flash attention against XLA's attention, side by side in one run: time and peak temporary memory.

For each ``B x T x H x D`` shape (causal self-attention, GQA with ``H / 2`` kv heads), every backend's
forward and forward+backward (gradients w.r.t. q, k, v) are jitted, compiled, then timed in interleaved
rounds (one call of each per round; medians). Memory is XLA's own count for the compiled program
(``compiled.memory_analysis().temp_size_in_bytes``: the buffers it allocates besides inputs and outputs).
The table shows milliseconds and MiB for XLA and each other backend's ratio to XLA (lower is better), the
backend ``impl=None`` picks (``seqjax.ops.attention.choose_impl``) and its time over the fastest's.

Backends: ``xla`` and ``blocked`` everywhere; ``cudnn`` on a GPU (bf16); ``splash`` on a TPU.

    python benchmarks/attention.py                           # the CPU table -> benchmarks/results/cpu_attention.md
    python benchmarks/attention.py --dtype=bfloat16 --shapes=8x2048x16x128,8x8192x16x128   # a GPU
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import cli
from seqjax.ops.attention import attention, choose_impl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_interleaved

SHAPES = ("1x256x4x64", "1x512x4x64", "1x1024x4x64", "1x2048x4x64", "1x4096x4x64")


def _fns(impl, window):
    def fwd(q, k, v):
        return attention(q, k, v, window=window, impl=impl)

    def loss(q, k, v, w):  # w is an input, so XLA cannot constant-fold the backward pass
        return jnp.sum(attention(q, k, v, window=window, impl=impl).astype(jnp.float32) * w)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _temp_mib(fn, *args) -> float:
    mem = fn.lower(*args).compile().memory_analysis()
    return float("nan") if mem is None else mem.temp_size_in_bytes / 2**20


def bench_shape(shape, impls, reps, dtype, window):
    b, t, h, d = shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, max(1, h // 2), d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, max(1, h // 2), d)), dtype)
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    fns = {i: _fns(i, window) for i in impls}
    mem = {i: (_temp_mib(f, q, k, v), _temp_mib(fb, q, k, v, w)) for i, (f, fb) in fns.items()}
    calls = {}
    for i, (f, fb) in fns.items():
        calls[i, "f"] = lambda f=f: jax.block_until_ready(f(q, k, v))
        calls[i, "fb"] = lambda fb=fb: jax.block_until_ready(fb(q, k, v, w))
    res = time_interleaved(calls, reps)
    return {i: (res[i, "f"][0], res[i, "fb"][0]) for i in impls}, mem, q, k


@dataclasses.dataclass
class Args:
    shapes: tuple[str, ...] = SHAPES  # comma list of BxTxHxD
    reps: int = 3  # interleaved timing rounds per shape
    dtype: str = "float32"  # float32 | bfloat16
    window: int | None = None  # sliding window (None: full causal)
    out: str = ""  # markdown file (default: benchmarks/results/<cpu|device>_attention.md)


def main(argv=None):
    args = cli.parse(Args, argv, description=__doc__)
    dtype = jnp.dtype(args.dtype)
    platform = jax.default_backend()
    impls = ["xla", "blocked"] + (["cudnn"] if platform == "gpu" else []) + (["splash"] if platform == "tpu" else [])
    others = impls[1:]
    kind = jax.devices()[0].device_kind
    name = "cpu" if platform == "cpu" else kind.replace(" ", "_")
    out = args.out or f"benchmarks/results/{name}_attention.md"
    rows = [
        f"# Flash attention vs XLA attention ({platform})",
        "",
        f"Machine: {platform} ({kind}), {os.cpu_count()} CPUs; jax {jax.__version__}; {args.dtype}; causal"
        f"{'' if args.window is None else f', window {args.window}'}; GQA with H/2 kv heads; "
        f"median of {args.reps} interleaved rounds. Ratios are backend / xla (lower is better); memory is the "
        "compiled program's temporary buffers (XLA's memory_analysis).",
        "",
        "Command: `python benchmarks/" + os.path.basename(__file__) + " " + " ".join(
            f"--{k}={v if not isinstance(v, tuple) else ','.join(v)}" for k, v in dataclasses.asdict(args).items()
            if v not in (None, "")) + "`",
        "",
    ]
    head = ["B x T x H x D", "xla fwd ms", "xla f+b ms", "xla fwd MiB", "xla f+b MiB"]
    for i in others:
        head += [f"{i} fwd time", f"{i} f+b time", f"{i} fwd mem", f"{i} f+b mem"]
    head += ["auto", "auto/best f+b"]
    rows += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(rows), flush=True)
    for s in args.shapes:
        shape = tuple(int(n) for n in s.split("x"))
        res, mem, q, k = bench_shape(shape, impls, args.reps, dtype, args.window)
        (xf, xfb), (mf, mfb) = res["xla"], mem["xla"]
        row = [s, f"{xf * 1e3:.1f}", f"{xfb * 1e3:.1f}", f"{mf:.1f}", f"{mfb:.1f}"]
        for i in others:
            row += [f"{res[i][0] / xf:.2f}", f"{res[i][1] / xfb:.2f}", f"{mem[i][0] / mf:.3f}", f"{mem[i][1] / mfb:.3f}"]
        auto = choose_impl(platform, dtype, q.shape, k.shape, window=args.window is not None)
        best = min(fb for _, fb in res.values())
        row += [auto, f"{res[auto][1] / best:.2f}" if auto in res else "n/a"]
        rows.append("| " + " | ".join(row) + " |")
        print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
