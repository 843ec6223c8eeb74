"""Where ``impl="auto"`` takes a Pallas kernel.

Measured on an NVIDIA H200, jax 0.11.2 (``benchmarks/results/NVIDIA_H200.md``), at B=8, H=16, D=128, bf16:
the chunked per-head-decay GLA kernel's forward is 2.8x (T = 2k) to 3.2x (T = 8k) the XLA chunked form's,
the chunked delta-rule kernel's 1.06-1.10x; under ``jax.grad`` both run the XLA form's forward and backward
(their ``custom_vjp`` forward rule), so training costs the same either way. So ``"auto"`` takes the kernels
on a GPU, where they were compiled and tested. Only in a one-device process: a ``pallas_call`` has no
sharding rule, and under a multi-device ``jit`` XLA would replicate its operands on every device. TPU:
the kernels are untested there, so XLA.
"""

from __future__ import annotations

import jax


def auto_pallas(chunk_size: int | None = None) -> bool:
    """True where ``impl="auto"`` should run the chunked Pallas kernels (see the module docstring); with
    ``chunk_size``, also only if the GLA kernel takes it (a power of two >= 16)."""
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return False
    return jax.default_backend() == "gpu" and jax.device_count() == 1
