"""What the kernels' Mosaic GPU bodies share: shared-memory operand types, head-dim padding, Mosaic GPU's CPU
interpreter and the backend choice.

jax >= 0.11 deprecates the Pallas Triton lowering; Mosaic GPU (warpgroup ``wgmma``, TMA copies) is its successor.
A kernel with a Mosaic GPU body takes it when asked (``backend="mosaic_gpu"``) and, once that body has passed its
tests compiled on a GPU (the ``tests`` stage of ``benchmarks/gpu_check.sh``; each kernel keeps its own flag), by
default on a GPU under jax >= 0.11. On the CPU, ``backend="mosaic_gpu"`` runs Mosaic GPU's own interpreter
(``InterpretGPUParams``, private in jax 0.10: TMA copies, barriers, shared memory and ``wgmma`` simulated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._util import resolve

try:  # Mosaic GPU's interpreter: private in jax 0.10
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover - depends on the jax version
    InterpretGPUParams = None

__all__ = ["JAX_0_11", "interpret_params", "key_pad", "resolve_mosaic_gpu", "smem"]

BF16 = jnp.bfloat16
JAX_0_11 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def key_pad(n: int) -> int:
    """A head dim padded for ``wgmma``: a power of two >= 64 (its ``M``; bf16 rows of 128 bytes, the one swizzle
    both operands then share). Padding with zeros is exact."""
    return max(64, 1 << (int(n) - 1).bit_length())


def smem(shape, dtype=BF16, plain=False):
    """A ``wgmma`` operand (or a ``WGMMA``-layout array's home) in shared memory: ``(8, row)`` tiles, swizzled by the
    row's bytes (at most 128); ``plain``: no transforms (Mosaic GPU's interpreter)."""
    if plain:
        return plgpu.SMEM(shape, dtype)
    minor = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = min(128, minor)
    tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def interpret_params():
    """Mosaic GPU's own interpreter, to pass as ``plgpu.kernel(interpret=...)``; raises where this jax has none."""
    if InterpretGPUParams is None:  # pragma: no cover - depends on the jax version
        raise NotImplementedError("this jax has no Mosaic GPU interpreter: run backend='mosaic_gpu' on a GPU")
    return InterpretGPUParams()


def resolve_mosaic_gpu(interpret, backend, chunk: int, *, default: bool, backends: tuple[str, ...]):
    """``_util.resolve`` plus a Mosaic GPU body. ``backend="mosaic_gpu"`` asks for it (interpreted on the CPU);
    ``None`` takes it on a GPU when ``default`` (the kernel's compiled tests passed and jax >= 0.11) and ``chunk`` is a
    multiple of 64, else what ``resolve`` picks (Triton on a GPU and in the CPU interpreter, Mosaic on a TPU).
    Returns ``(interpret, backend)``."""
    if backend not in (None, *backends):
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend == "mosaic_gpu":
        if chunk % 64:
            raise ValueError(f"backend='mosaic_gpu' needs chunk_size a multiple of 64, got {chunk}")
        return resolve(interpret, "triton")[0], backend
    interpret, resolved = resolve(interpret, backend)
    if backend is None and resolved == "triton" and not interpret and default and chunk % 64 == 0:
        resolved = "mosaic_gpu"
    return interpret, resolved
