"""Every Pallas kernel lowers to Mosaic TPU — checked without a TPU.

``jax.export`` with ``platforms=("tpu",)`` runs the Pallas -> Mosaic lowering on this CPU (block-shape
rules, the ops Mosaic supports) and emits the Mosaic custom call; Mosaic's own compile to TPU code runs in
libtpu on a TPU and is not exercised here. The values of the TPU bodies are checked in interpret mode in
each kernel's test file (``backend="mosaic_tpu"``). Forward and, where the kernel has its own backward
(the linear scan), the gradient.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.delta_chunk import delta_chunk
from pallas_kernels.gla_chunk import gla_chunk_pallas
from pallas_kernels.linear_scan.kernel import linear_scan_pallas
from pallas_kernels.mlstm_chunk import mlstm_chunk


def _mosaic_calls(f, *args) -> int:
    return export.export(jax.jit(f), platforms=("tpu",))(*args).mlir_module().count("tpu_custom_call")


@pytest.mark.parametrize("dk,dv", [(128, 128), (20, 9)])
def test_chunked_kernels_lower_to_mosaic_tpu(dk, dv):
    q = jnp.zeros((2, 256, 2, dk), jnp.bfloat16)
    v = jnp.zeros((2, 256, 2, dv), jnp.bfloat16)
    g = jnp.zeros((2, 256, 2))
    kw = dict(chunk_size=64, interpret=False, backend="mosaic_tpu")
    assert _mosaic_calls(lambda q, v, g: gla_chunk_pallas(q, q, v, g, **kw), q, v, g) == 1
    assert _mosaic_calls(lambda q, v, g: delta_chunk(q, q, v, g + 1.0, g, **kw), q, v, g) == 2  # WY + state pass
    assert _mosaic_calls(lambda q, v, g: mlstm_chunk(q, q, v, g, g, **kw), q, v, g) == 1


def test_per_channel_gla_lowers_and_bad_backend_is_named():
    q = jnp.zeros((2, 256, 2, 128), jnp.bfloat16)
    f = lambda q, g: gla_chunk_pallas(q, q, q, g, chunk_size=64, interpret=False, backend="mosaic_tpu")  # noqa: E731
    assert _mosaic_calls(f, q, jnp.zeros((2, 256, 2, 128))) == 2  # intra-chunk kernel + state pass
    with pytest.raises(ValueError, match="backend must be"):
        delta_chunk(q, q, q, jnp.ones((2, 256, 2)), chunk_size=16, backend="mosaic")


def test_linear_scan_lowers_to_mosaic_tpu_forward_and_backward():
    a, b, h0 = jnp.full((2, 256, 512), 0.9), jnp.ones((2, 256, 512)), jnp.zeros((2, 512))
    assert _mosaic_calls(lambda a, b, h0: linear_scan_pallas(a, b, h0, interpret=False)[0], a, b, h0) == 1

    def grads(a, b, h0):
        return jax.grad(lambda a, b: jnp.sum(linear_scan_pallas(a, b, h0, interpret=False)[0]), argnums=(0, 1))(a, b)

    assert _mosaic_calls(grads, a, b, h0) == 2  # the forward kernel and its transpose
