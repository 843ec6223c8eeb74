"""Chunked gated linear attention on an accelerator: the Pallas kernel vs the XLA chunked forms.

B=8, T in {2k, 8k}, H=16, D=128, bf16 inputs; forward and forward+backward (the Pallas backward is the
XLA chunked backward after recompute, see ``pallas_kernels/gla_chunk``). Prints a markdown table and
writes it to ``--out``. Run by ``benchmarks/gpu_check.sh``; measured ratios, one run, side by side.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gla_chunk import gla_chunk_pallas
from seqjax.mixers._gla_chunk import chunk_gla


def _time(f, *args, reps=5):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="")
    p.add_argument("--ts", default="2048,8192")
    a = p.parse_args()
    b, h, d = 8, 16, 128
    rows = [f"# Chunked GLA on {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
            f"B={b}, H={h}, D={d}, bf16 q/k/v, chunk 64, median of 5. FLOPs: chunked GLA forward ~ "
            "T*(2*C*D + 4*D*D)*2 per head (intra QK^T and AV, state update and readout).", "",
            "| T | form | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd vs XLA scalar |", "|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for t in [int(x) for x in a.ts.split(",")]:
        ks = jax.random.split(jax.random.PRNGKey(t), 5)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k = (jax.random.normal(ks[1], (b, t, h, d)) / d**0.5).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
        g = jax.nn.log_sigmoid(3 + jax.random.normal(ks[3], (b, t, h)))
        gk = jax.nn.log_sigmoid(3 + jax.random.normal(ks[4], (b, t, h, d))) / 16
        forms = {
            "XLA chunked, per-head decay": (functools.partial(chunk_gla, chunk_size=64), g),
            "XLA chunked, per-channel decay (GLA)": (functools.partial(chunk_gla, chunk_size=64), gk),
            "Pallas, per-head decay": (functools.partial(gla_chunk_pallas, chunk_size=64), g),
        }
        flops = b * h * t * (2 * 64 * d + 4 * d * d) * 2
        base = None
        for name, (f, gate) in forms.items():
            try:
                fwd = jax.jit(lambda q, k, v, gate, f=f: f(q, k, v, gate)[0])
                loss = lambda q, k, v, gate, f=f: jnp.sum(f(q, k, v, gate)[0].astype(jnp.float32) ** 2)
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
                tf, tb = _time(fwd, q, k, v, gate), _time(bwd, q, k, v, gate)
                base = base or tf
                row = f"| {t} | {name} | {tf*1e3:.2f} | {tb*1e3:.2f} | {flops/tf/1e12:.2f} | {base/tf:.2f}x |"
            except Exception as e:  # record misses, do not stop
                row = f"| {t} | {name} | error: {type(e).__name__}: {str(e)[:120]} | | | |"
            rows.append(row)
            print(row, flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
