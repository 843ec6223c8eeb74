"""Shared helpers of the benchmark scripts: wall-clock timing of JAX and PyTorch callables, one table writer, the
machine and library versions a run's header names.

Every script measures the forms it compares side by side in one process (the machines are shared and
noisy: ratios measured in one run are what to read) and reports the median of a few repetitions after a
warm-up call that also compiles.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Literal

import numpy as np

from seqjax import cli


def machine() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name, family, model number and widest vector extension, else
    ``platform``'s name) and the number of logical CPUs. Cloud CPUs often share one model name ("AMD EPYC")
    across generations of different speed; the family and the vector width tell them apart."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            info = {}
            for ln in fh:
                key, sep, val = ln.partition(":")
                if not sep:
                    break  # the first CPU's block ends at a blank line
                info.setdefault(key.strip(), val.strip())
    except OSError:
        info = {}
    if "model name" in info:
        flags = info.get("flags", "").split()
        vec = next((v for v in ("avx512f", "avx2", "neon", "asimd") if v in flags), "")
        extra = [f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else "",
                 vec.removesuffix("f").upper()]
        cpu = info["model name"] + "".join(f", {e}" for e in extra if e)
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def versions(torch: str = "") -> str:
    """Python, jax, jaxlib, flax and numpy versions; ``torch`` (a version, or e.g. "not installed") goes before
    numpy when given."""
    import flax
    import jax
    import jaxlib

    torch_v = f"torch {torch}, " if torch else ""
    return (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
            f"flax {flax.__version__}, {torch_v}numpy {np.__version__}")


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


def time_interleaved(fns: dict, reps: int) -> dict:
    """``{name: (median s, min s)}`` of each ``fn()`` (which blocks until its result is ready), after one
    warm-up (compiling) call each, timed in interleaved rounds: one call of every ``fn`` per round, in order,
    so the slow drifts of a shared machine hit every form alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(v), min(v)) for name, v in times.items()}


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

    t = torch.from_numpy(np.array(x, np.float32)).to("cuda").to(getattr(torch, dtype))
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


def fla_trim_autotune(max_configs: int = 6) -> str:
    """Cap the Triton autotuning of fla's kernels, before fla is imported: keep the configs with 4 or 8 warps
    and 2 or 3 pipeline stages, at most ``max_configs`` per kernel. fla 0.6 autotunes each backward kernel
    over up to 48 configs on its first call, which can outrun a whole device stage
    (``benchmarks/results/NVIDIA_H200.md``).
    Returns the note to print under a table, or "" without Triton."""
    try:
        import triton
    except Exception:  # noqa: BLE001
        return ""
    if getattr(triton.autotune, "_seqjax_trimmed", False):
        return ""
    orig = triton.autotune

    def autotune(configs, *args, **kwargs):
        keep = [c for c in configs if getattr(c, "num_warps", 4) in (4, 8) and getattr(c, "num_stages", 2) in (2, 3)]
        return orig((keep or list(configs))[:max_configs], *args, **kwargs)

    autotune._seqjax_trimmed = True
    triton.autotune = autotune
    return (f"fla: Triton autotuning capped at {max_configs} configs per kernel (4/8 warps, 2/3 stages) to fit "
            "the device budget; its untrimmed best may be faster.")


def fla_lift_hopper_guard() -> str:
    """Let fla time its gated backward on Hopper with Triton < 3.7.1, which fla 0.6 refuses (fla issue #640:
    that Triton miscompiles one backward kernel, so its *gradients* may be wrong there; the kernels and hence
    the timings are the ones fla runs). Returns the note to print under a table, or "" if nothing changed."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception:  # noqa: BLE001
        return ""
    if getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        return ("fla fwd+bwd: timed with fla's Hopper guard for Triton < 3.7.1 lifted (fla #640: that Triton "
                "miscompiles its gated `chunk_bwd_dqkwg`, so those gradients may be wrong; timing only).")
    return ""


def time_torch_or_reason(f, reps: int = 5):
    """``time_torch(f)``, or a short reason string if ``f`` raises."""
    try:
        return time_torch(f, reps)
    except Exception as e:  # noqa: BLE001
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"


def torch_reference(fn, arrays, dtypes):
    """``(fn, fn(*targs) detached, targs)`` on CUDA copies of the JAX ``arrays`` (``dtypes`` per array), or
    ``(reason, None, None)`` when ``fn`` is already a reason string or fails on them."""
    if isinstance(fn, str):
        return fn, None, None
    try:
        targs = [to_torch(x, d, grad=True) for x, d in zip(arrays, dtypes)]
        return fn, fn(*targs).detach(), targs
    except Exception as e:  # noqa: BLE001
        return f"fla failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})", None, None


def torch_form_cells(fn, targs, base, flops) -> str:
    """Time the PyTorch form ``fn(*targs) -> o``, forward then forward+backward of ``sum(o²)`` (the backward's
    failure becomes its cell), as ``fwd ms | fwd+bwd ms | TFLOP/s | fwd vs base | fwd+bwd vs base``, where
    ``base`` is the ``(fwd, fwd+bwd)`` seconds of the JAX baseline (or None)."""
    tf = time_torch(lambda: fn(*targs))
    print(f"(torch forward {tf * 1e3:.2f} ms; its backward, with any autotuning, next)", flush=True)
    tb = time_torch_or_reason(lambda: fn(*targs).float().square().sum().backward())
    bwd = f"{tb * 1e3:.2f}" if isinstance(tb, float) else tb
    vf = f"{base[0] / tf:.2f}x" if base else ""
    vb = f"{base[1] / tb:.2f}x" if base and isinstance(tb, float) else ""
    return f"{tf * 1e3:.2f} | {bwd} | {flops / tf / 1e12:.2f} | {vf} | {vb}"


FORMS = {"xla": "XLA chunked", "pallas": "Pallas", "pallas_xla_bwd": "Pallas, XLA bwd", "fla": "fla"}
Form = Literal["xla", "pallas", "pallas_xla_bwd", "fla"]


@dataclasses.dataclass
class GpuBenchArgs:
    """The options of the chunked-kernel GPU benchmarks. ``--forms`` picks the rows: e.g. ``--forms=fla`` gives
    flash-linear-attention a device call of its own (its first backward autotunes for minutes). Ratios are
    against the XLA chunked form, so they stay blank when it is not among the forms."""

    out: str = ""  # also write the table to this markdown file
    ts: tuple[int, ...] = (2048, 8192)  # sequence lengths
    b: int = 8  # batch
    h: int = 16  # heads
    d: int = 128  # head dim
    forms: tuple[Form, ...] = tuple(FORMS)  # comma list of rows


def gpu_bench_args(argv=None, doc: str = "") -> GpuBenchArgs:
    """:class:`GpuBenchArgs` from a command line (``sys.argv[1:]`` when None); ``doc`` is the ``--help`` text."""
    return cli.parse(GpuBenchArgs, argv, description=doc)


def jax_form_cells(f, args, base, flops, ref=None) -> tuple[str, tuple[float, float]]:
    """Time the JAX form ``f(*args) -> (o, state)``: forward, and forward+backward of ``sum(o²)`` w.r.t. every
    argument. Returns the row cells ``fwd ms | fwd+bwd ms | TFLOP/s | fwd vs base | fwd+bwd vs base | o vs ref``
    (``base`` the ``(fwd, fwd+bwd)`` seconds of the first form, None to make this one the base, or False for no
    ratios) and the base to pass on. A failure becomes the row's text; measuring goes on."""
    import jax
    import jax.numpy as jnp

    try:
        fwd = jax.jit(lambda *x: f(*x)[0])
        loss = lambda *x: jnp.sum(f(*x)[0].astype(jnp.float32) ** 2)
        bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        tf, tb = time_jax(fwd, *args), time_jax(bwd, *args)
    except Exception as e:  # noqa: BLE001 — record the miss, keep measuring
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | | |", base
    if base is None:
        base = (tf, tb)
    err = f"{rel_err(fwd(*args), ref):.1e}" if ref is not None else ""
    ratios = f"{base[0] / tf:.2f}x | {base[1] / tb:.2f}x" if base else " | "
    return f"{tf * 1e3:.2f} | {tb * 1e3:.2f} | {flops / tf / 1e12:.2f} | {ratios} | {err}", base
