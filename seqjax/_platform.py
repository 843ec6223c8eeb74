"""Where ``impl="auto"`` takes a Pallas kernel.

Measured on an NVIDIA H200, jax 0.11.2 (``benchmarks/results/NVIDIA_H200.md``), at B=8, H=16, D=128, bf16,
forward against the XLA chunked form: per-head-decay GLA (Mamba-2/SSD, RetNet, linear attention) 3.0-3.5x,
the delta rule 2.0x, the mLSTM 1.9x; per-channel-decay GLA 0.33x (so GLA proper keeps XLA). Under
``jax.grad`` the kernels that ``"auto"`` takes run the XLA form's forward and backward (their ``custom_vjp``
forward rule), so training costs the same either way: per-head GLA, the delta rule and the mLSTM have Pallas
backward kernels (``pallas_kernels/*/backward.py``, what ``impl="pallas"`` differentiates through),
but they have not yet been compiled or timed on a GPU, so ``"auto"`` asks for
``backward=AUTO_BACKWARD = "xla"`` until they have.
So ``"auto"`` takes the kernels on a GPU, where they were compiled and tested. Only in a one-device process: a ``pallas_call`` has no sharding rule, and under a multi-device
``jit`` XLA would replicate its operands on every device. TPU: the kernels are untested there, so XLA.
"""

from __future__ import annotations

import jax

AUTO_BACKWARD = "xla"  # what impl="auto" differentiates the chunked kernels through (see above)


def auto_pallas(chunk_size: int | None = None) -> bool:
    """True where ``impl="auto"`` should run the chunked Pallas kernels (see the module docstring); with
    ``chunk_size``, also only if the GLA kernel takes it (a power of two >= 16)."""
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return False
    return jax.default_backend() == "gpu" and jax.device_count() == 1
