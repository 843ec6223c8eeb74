"""Training memory of the chunked kernels: what ``jax.grad`` keeps from the forward for the backward.

For each kernel, the bytes of the residuals its VJP closes over (``jax.eval_shape`` of ``jax.vjp``: shapes
only, nothing runs, so any machine gives the same table) with the Pallas backward (``backward="pallas"``:
the inputs, the chunk states recomputed) and with the XLA chunked form's (``backward="xla"``: per-chunk
states, factors and masks), side by side, and their ratio. The Pallas backward also materialises the chunk
states and their gradients while it runs (``2 · B·H·(T/C)·K·V`` float32), freed when it returns.

    python benchmarks/residuals.py [--b=8 --t=2048 --h=16 --d=128] [--out=benchmarks/results/residuals.md]
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write

from pallas_kernels.delta_chunk import delta_chunk
from pallas_kernels.gla_chunk import gla_chunk_pallas
from pallas_kernels.mlstm_chunk import mlstm_chunk
from seqjax import cli


def _mib(f, *args) -> float:
    leaves = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves) / 2**20


@dataclasses.dataclass
class Args:
    b: int = 8  # batch
    t: int = 2048  # sequence length
    h: int = 16  # heads
    d: int = 128  # head dim
    out: str = ""  # also write the table to this markdown file


def main(argv=None):
    a = cli.parse(Args, argv, description=__doc__)
    act = jax.ShapeDtypeStruct((a.b, a.t, a.h, a.d), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((a.b, a.t, a.h), jnp.float32)
    chan = jax.ShapeDtypeStruct((a.b, a.t, a.h, a.d), jnp.float32)
    kw = dict(chunk_size=64, interpret=False)
    forms = {
        "GLA, per-head decay": (lambda bw: lambda q, k, v, g: gla_chunk_pallas(q, k, v, g, backward=bw, **kw), (act,) * 3 + (gate,)),
        "GLA, per-channel decay": (lambda bw: lambda q, k, v, g: gla_chunk_pallas(q, k, v, g, backward=bw, **kw), (act,) * 3 + (chan,)),
        "delta rule": (lambda bw: lambda q, k, v, b, g: delta_chunk(q, k, v, b, g, backward=bw, **kw), (act,) * 3 + (gate,) * 2),
        "mLSTM": (lambda bw: lambda q, k, v, i, f: mlstm_chunk(q, k, v, i, f, backward=bw, **kw), (act,) * 3 + (gate,) * 2),
    }
    qkv = 3 * a.b * a.t * a.h * a.d * 2 / 2**20
    rows = ["# Residuals kept for the backward (MiB)", "",
            f"B={a.b}, T={a.t}, H={a.h}, D={a.d}, bf16 q/k/v ({qkv:.0f} MiB together), chunk 64. "
            "`python benchmarks/residuals.py` (shapes only: the same on any machine).", "",
            "| kernel | Pallas backward | XLA chunked backward | XLA / Pallas |", "|---|---|---|---|"]
    for name, (make, args) in forms.items():
        pallas, xla = _mib(make("pallas"), *args), _mib(make("xla"), *args)
        rows.append(f"| {name} | {pallas:.0f} | {xla:.0f} | {xla / pallas:.1f}x |")
        print(rows[-1], flush=True)
    write(rows, a.out)


if __name__ == "__main__":
    main()
