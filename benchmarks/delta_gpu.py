"""Chunked gated delta rule on an accelerator: the Pallas kernel vs the XLA chunked form (and fla's Triton
``chunk_gated_delta_rule`` in PyTorch, if importable), side by side in one run.

B=8, T in {2k, 8k}, H=16, D=128, bf16 q/k/v, beta in (0, 2) (negative eigenvalues), chunk 64; forward and
forward+backward (the Pallas backward is the XLA chunked backward after recompute, see
``pallas_kernels/delta_chunk``). Prints a markdown table and writes it to ``--out``. Run by
``benchmarks/gpu_check.sh``. FLOPs per head and chunk (forward): K Kᵀ, Q Kᵀ 2·C²·D each, W/U 2·C²·2D,
W S, Q S, Kᵀ U 2·C·D² each, the solve ~C³/3: about T·(8·C·D + 6·D² + C²/3) per head.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.delta_chunk import delta_chunk
from seqjax.mixers._delta_chunk import delta_rule_chunked
from seqjax.nn import l2_normalize


def _time(f, *args, reps=5):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _fla_row(b, t, h, d, reps=5):
    """fla's Triton kernel in PyTorch on the same GPU (None if fla/torch are not importable)."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001
        return f"fla unavailable ({type(e).__name__})"
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(b, t, h, d, device=dev, dtype=bf, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev), dim=-1).to(bf).requires_grad_()
    v = torch.randn(b, t, h, d, device=dev, dtype=bf, requires_grad=True)
    beta = (2 * torch.rand(b, t, h, device=dev)).to(bf).requires_grad_()
    g = torch.nn.functional.logsigmoid(3 + torch.randn(b, t, h, device=dev)).requires_grad_()

    def run(backward):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        if backward:
            o.float().square().sum().backward()

    out = []
    for backward in (False, True):
        run(backward)
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(backward)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        out.append(float(np.median(ts)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="")
    p.add_argument("--ts", default="2048,8192")
    a = p.parse_args()
    b, h, d, c = 8, 16, 128, 64
    rows = [f"# Chunked gated delta rule on {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
            f"B={b}, H={h}, D={d}, bf16 q/k/v, beta in (0,2), chunk {c}, median of 5.", "",
            "| T | form | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd speed-up vs XLA |", "|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(rows), flush=True)
    for t in [int(x) for x in a.ts.split(",")]:
        ks = jax.random.split(jax.random.PRNGKey(t), 5)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k = l2_normalize(jax.random.normal(ks[1], (b, t, h, d))).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
        beta = 2 * jax.random.uniform(ks[3], (b, t, h))
        la = jax.nn.log_sigmoid(3 + jax.random.normal(ks[4], (b, t, h)))
        forms = {
            "XLA chunked": functools.partial(delta_rule_chunked, chunk_size=c),
            "Pallas": functools.partial(delta_chunk, chunk_size=c),
        }
        flops = b * h * t * (8 * c * d + 6 * d * d + c * c / 3) * 2
        base = None
        for name, f in forms.items():
            try:
                fwd = jax.jit(lambda *x, f=f: f(*x)[0])
                loss = lambda *x, f=f: jnp.sum(f(*x)[0].astype(jnp.float32) ** 2)  # noqa: E731
                fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
                tf, tb = _time(fwd, q, k, v, beta, la), _time(fb, q, k, v, beta, la)
                base = base or tf
                row = f"| {t} | {name} | {tf * 1e3:.2f} | {tb * 1e3:.2f} | {flops / tf / 1e12:.1f} | {base / tf:.2f}x |"
            except Exception as e:  # noqa: BLE001 — record the miss, keep measuring
                row = f"| {t} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |"
            rows.append(row)
            print(row, flush=True)
        fla = _fla_row(b, t, h, d)
        if isinstance(fla, list):
            row = f"| {t} | fla chunk_gated_delta_rule (Triton, torch) | {fla[0] * 1e3:.2f} | {fla[1] * 1e3:.2f} | {flops / fla[0] / 1e12:.1f} | {base / fla[0]:.2f}x |"
        else:
            row = f"| {t} | {fla} | | | | |"
        rows.append(row)
        print(row, flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
