"""Chunked gated linear attention on an accelerator: the Pallas kernel, the XLA chunked forms and
flash-linear-attention's Triton kernels (PyTorch, same GPU), side by side in one run.

    python benchmarks/gla_gpu.py [--ts=2048,8192] [--b=8 --h=16 --d=128] [--out=benchmarks/results/<dev>.md]

B=8, T in {2k, 8k}, H=16, D=128, bf16 q/k/v, chunk 64; forward and forward+backward (loss ``sum(o²)``,
gradients of q, k, v and the decays). Every kernel has two Pallas rows: "Pallas" differentiates through the
Pallas backward kernels (``pallas_kernels/*/backward.py``), "Pallas, XLA bwd" through the XLA chunked form
(``backward="xla"``, what ``impl="auto"`` asks for where ``seqjax._platform.AUTO_BACKWARD`` says so; its
fwd+bwd is XLA's). The per-head GLA and the mLSTM forwards have two GPU lowerings, both measured: "Pallas
(Triton)" and "Pallas (Mosaic GPU)" (``backend="mosaic_gpu"``, ``pallas_kernels/{gla,mlstm}_chunk/mosaic_gpu.py``;
their backward's serial walks run on Mosaic GPU too, and the per-head GLA's chunk-parallel gradient kernels; the
mLSTM's run on Triton); "Pallas, XLA
bwd" takes the default lowering (``backend=None``). Per-head decay
(SSD / RetNet / simple GLA: ``fla.ops.simple_gla``), per-channel decay (GLA: ``fla.ops.gla``) and the mLSTM
(stabilised exponential gating, ``pallas_kernels/mlstm_chunk``; fla has no mLSTM). The last column is the
forward output's ``max|Δ| / max|o|`` against fla on the same inputs (bf16 rounding: ~1e-2 is agreement).
FLOPs per head (forward): ``T·(2·C·D + 4·D²)·2`` (intra ``QKᵀ``, ``AV``; state readout and update).
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

from pallas_kernels.gla_chunk import gla_chunk_pallas
from pallas_kernels.mlstm_chunk import mlstm_chunk
from seqjax.mixers.mlstm import mlstm
from seqjax.ops.gla import chunk_gla


def _fla(per_channel: bool):
    """fla's chunked kernel as ``f(q, k, v, g) -> o`` on torch tensors, or the reason it is unavailable."""
    try:
        import torch  # noqa: F401

        if per_channel:
            from fla.ops.gla import chunk_gla as f
        else:
            from fla.ops.simple_gla import chunk_simple_gla as f
    except Exception as e:  # noqa: BLE001
        return f"fla unavailable ({type(e).__name__}: {str(e)[:80]})"
    return lambda q, k, v, g: f(q, k, v, g, scale=1.0, output_final_state=True)[0]


def main(argv=None):
    a = gpu_bench_args(argv, __doc__)
    notes = [n for n in (fla_trim_autotune(), fla_lift_hopper_guard()) if n]  # before fla's first import/call
    b, h, d, c = a.b, a.h, a.d, 64
    rows = [f"# Chunked GLA on {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
            f"B={b}, H={h}, D={d}, bf16 q/k/v, chunk {c}, median of 5 after a warm-up.", "",
            "| T | decay | form | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd vs XLA | fwd+bwd vs XLA | o vs fla |",
            "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)

    def emit(row):
        rows.append(row)
        print(row, flush=True)

    for t in a.ts:
        ks = jax.random.split(jax.random.PRNGKey(t), 5)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k = (jax.random.normal(ks[1], (b, t, h, d)) / d**0.5).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
        gates = {"per head": jax.nn.log_sigmoid(3 + jax.random.normal(ks[3], (b, t, h))),
                 "per channel": jax.nn.log_sigmoid(3 + jax.random.normal(ks[4], (b, t, h, d))) / 16}
        flops = b * h * t * (2 * c * d + 4 * d * d) * 2
        for decay, g in gates.items():
            pallas = functools.partial(gla_chunk_pallas, chunk_size=c)
            forms = [("xla", FORMS["xla"], functools.partial(chunk_gla, chunk_size=c))]
            if decay == "per head":  # both GPU lowerings, side by side (under Mosaic GPU its whole backward too)
                forms += [("pallas", f"{FORMS['pallas']} ({name})", functools.partial(pallas, backend=backend))
                          for backend, name in (("triton", "Triton"), ("mosaic_gpu", "Mosaic GPU"))]
            else:
                forms += [("pallas", FORMS["pallas"], pallas)]
            forms += [("pallas_xla_bwd", FORMS["pallas_xla_bwd"], functools.partial(pallas, backward="xla"))]
            fla, ref, targs = torch_reference(_fla(decay == "per channel"), (q, k, v, g),
                                              ("bfloat16", "bfloat16", "bfloat16", "float32"))
            base = None if "xla" in a.forms else False
            for key, label, f in forms:
                if key in a.forms:
                    cells, base = jax_form_cells(f, (q, k, v, g), base, flops, ref)
                    emit(f"| {t} | {decay} | {label} | {cells} |")
            if "fla" in a.forms and isinstance(fla, str):
                emit(f"| {t} | {decay} | {fla} | | | | | | |")
            elif "fla" in a.forms:
                name = f"fla {'chunk_gla' if decay == 'per channel' else 'chunk_simple_gla'} (Triton)"
                emit(f"| {t} | {decay} | {name} | {torch_form_cells(fla, targs, base, flops)} | |")
        ig, fg = jax.random.normal(ks[3], (b, t, h)), 3 + jax.random.normal(ks[4], (b, t, h))
        base = None if "xla" in a.forms else False
        mforms = [("xla", FORMS["xla"], functools.partial(mlstm, impl="chunked", chunk_size=c))]
        mforms += [("pallas", f"{FORMS['pallas']} ({name})", functools.partial(mlstm_chunk, chunk_size=c, backend=backend))
                   for backend, name in (("triton", "Triton"), ("mosaic_gpu", "Mosaic GPU"))]
        mforms += [("pallas_xla_bwd", FORMS["pallas_xla_bwd"], functools.partial(mlstm_chunk, chunk_size=c, backward="xla"))]
        for key, label, f in mforms:
            if key in a.forms:
                cells, base = jax_form_cells(f, (q, k, v, ig, fg), base, flops)
                emit(f"| {t} | mLSTM | {label} | {cells} |")
    if notes:
        rows += [""] + notes
        print("\n".join(notes))
    write(rows, a.out)


if __name__ == "__main__":
    main()
