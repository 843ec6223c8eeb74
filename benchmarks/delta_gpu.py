"""Chunked gated delta rule on an accelerator: the Pallas kernel, the XLA chunked form and
flash-linear-attention's Triton ``chunk_gated_delta_rule`` (PyTorch, same GPU), side by side in one run.

    python benchmarks/delta_gpu.py [--ts=2048,8192] [--b=8 --h=16 --d=128] [--out=benchmarks/results/<dev>_delta.md]

B=8, T in {2k, 8k}, H=16, D=128, bf16 q/k/v, beta in (0, 2) (negative eigenvalues), chunk 64; forward and
forward+backward (loss ``sum(o²)``; gradients of q, k, v, beta and the log decays). "Pallas" differentiates
through the Pallas backward kernels (``pallas_kernels/delta_chunk/backward.py``), "Pallas, XLA bwd" through
the XLA chunked form (``backward="xla"``, so its fwd+bwd column is XLA's by construction). The state pass and
the output kernel have two GPU lowerings, both measured: "Pallas (Triton)" and "Pallas (Mosaic GPU)"
(``backend="mosaic_gpu"``, ``pallas_kernels/delta_chunk/mosaic_gpu.py``, with the backward's state recomputation and
state-gradient walk; the WY factors and the chunk-parallel gradient kernels are Triton's in both); "Pallas, XLA bwd"
takes the default lowering. The last column is the
forward output's ``max|Δ| / max|o|`` against fla on the same inputs (bf16 rounding: ~1e-2 is agreement).
FLOPs per head and chunk (forward): K Kᵀ, Q Kᵀ 2·C²·D each, W/U 2·C²·2D, W S, Q S, Kᵀ U 2·C·D² each, the
solve ~C³/3: about ``T·(8·C·D + 6·D² + C²/3)`` per head.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    FORMS,
    fla_lift_hopper_guard,
    fla_trim_autotune,
    gpu_bench_args,
    jax_form_cells,
    torch_form_cells,
    torch_reference,
    write,
)

from pallas_kernels.delta_chunk import delta_chunk
from seqjax.nn import l2_normalize
from seqjax.ops.delta import chunk_delta_rule


def _fla():
    try:
        import torch  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
    except Exception as e:  # noqa: BLE001
        return f"fla unavailable ({type(e).__name__}: {str(e)[:80]})"
    return lambda q, k, v, beta, g: f(q, k, v, g, beta, scale=1.0, output_final_state=True)[0]


def main(argv=None):
    a = gpu_bench_args(argv, __doc__)
    notes = [n for n in (fla_trim_autotune(), fla_lift_hopper_guard()) if n]  # before fla's first import/call
    b, h, d, c = a.b, a.h, a.d, 64
    rows = [f"# Chunked gated delta rule on {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
            f"B={b}, H={h}, D={d}, bf16 q/k/v, beta in (0,2), chunk {c}, median of 5 after a warm-up.", "",
            "| T | form | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd vs XLA | fwd+bwd vs XLA | o vs fla |",
            "|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)

    def emit(row):
        rows.append(row)
        print(row, flush=True)

    for t in a.ts:
        ks = jax.random.split(jax.random.PRNGKey(t), 5)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k = l2_normalize(jax.random.normal(ks[1], (b, t, h, d))).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
        beta = 2 * jax.random.uniform(ks[3], (b, t, h))
        la = jax.nn.log_sigmoid(3 + jax.random.normal(ks[4], (b, t, h)))
        args = (q, k, v, beta, la)
        flops = b * h * t * (8 * c * d + 6 * d * d + c * c / 3) * 2
        fla, ref, targs = torch_reference(_fla(), args, ("bfloat16",) * 3 + ("float32",) * 2)
        pallas = functools.partial(delta_chunk, chunk_size=c)
        # both GPU lowerings of the state pass and the output, side by side (WY factors and backward: Triton in both)
        forms = [("xla", FORMS["xla"], functools.partial(chunk_delta_rule, chunk_size=c))]
        forms += [("pallas", f"{FORMS['pallas']} ({name})", functools.partial(pallas, backend=backend))
                  for backend, name in (("triton", "Triton"), ("mosaic_gpu", "Mosaic GPU"))]
        forms += [("pallas_xla_bwd", FORMS["pallas_xla_bwd"], functools.partial(pallas, backward="xla"))]
        base = None if "xla" in a.forms else False
        for key, label, f in forms:
            if key in a.forms:
                cells, base = jax_form_cells(f, args, base, flops, ref)
                emit(f"| {t} | {label} | {cells} |")
        if "fla" in a.forms and isinstance(fla, str):
            emit(f"| {t} | {fla} | | | | | | |")
        elif "fla" in a.forms:
            emit(f"| {t} | fla chunk_gated_delta_rule (Triton) | {torch_form_cells(fla, targs, base, flops)} | |")
    if notes:
        rows += [""] + notes
        print("\n".join(notes))
    write(rows, a.out)


if __name__ == "__main__":
    main()
