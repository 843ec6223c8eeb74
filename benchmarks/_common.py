"""Shared helpers of the benchmark scripts: wall-clock timing of JAX and PyTorch callables, one table writer.

Every script measures the forms it compares side by side in one process (the machines are shared and
noisy: ratios measured in one run are what to read) and reports the median of a few repetitions after a
warm-up call that also compiles.
"""

from __future__ import annotations

import time

import numpy as np


def time_jax(f, *args, reps: int = 5) -> float:
    """Median seconds of ``f(*args)`` (blocked until ready), after one warm-up (compiling) call."""
    import jax

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def time_torch(f, reps: int = 5) -> float:
    """Median seconds of ``f()`` on a CUDA device (synchronised), after one warm-up (autotuning) call."""
    import torch

    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def to_torch(x, dtype: str = "bfloat16", grad: bool = False):
    """A JAX array as a CUDA torch tensor (through float32 numpy: exact for bf16 values)."""
    import torch

    t = torch.from_numpy(np.asarray(x, np.float32)).to("cuda").to(getattr(torch, dtype))
    return t.requires_grad_(grad)


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` in float64 (numpy or torch inputs)."""
    a = np.asarray(a.detach().float().cpu() if hasattr(a, "detach") else a, np.float64)
    b = np.asarray(b.detach().float().cpu() if hasattr(b, "detach") else b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def write(rows: list[str], out: str) -> None:
    """Print nothing (callers print as they go); write the table to ``out`` if given."""
    if out:
        with open(out, "w") as fh:
            fh.write("\n".join(rows) + "\n")
