"""Every Pallas kernel lowers to Mosaic TPU and to Triton (GPU) — checked without a TPU or a GPU.

``jax.export`` with ``platforms=("tpu",)`` runs the Pallas -> Mosaic lowering on this CPU (block-shape
rules, the ops Mosaic supports) and emits the Mosaic custom call; Mosaic's own compile to TPU code (libtpu)
is ``tests/test_tpu_compile.py``'s. Likewise ``platforms=("cuda",)`` with the kernels' Triton
compiler params runs the Pallas -> Triton IR lowering (dot shapes, the ops Triton supports) and emits
``__gpu$xla.gpu.triton`` custom calls; Triton's compile to PTX runs on a GPU. The values of every body are
checked in interpret mode in each kernel's test file. Forward and, where the kernel has its own backward
(the linear scan, per-head GLA, the delta rule, the mLSTM), the gradient.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.delta_chunk import delta_chunk
from pallas_kernels.gla_chunk import gla_chunk_pallas
from pallas_kernels.linear_scan.kernel import linear_scan_pallas
from pallas_kernels.mlstm_chunk import mlstm_chunk

TRITON = "__gpu$xla.gpu.triton"


def _mosaic_calls(f, *args) -> int:
    return export.export(jax.jit(f), platforms=("tpu",))(*args).mlir_module().count("tpu_custom_call")


def _triton_calls(f, *args) -> int:
    # Triton custom calls carry no serialisation-compatibility guarantee; we only lower, never serialise
    exp = export.export(jax.jit(f), platforms=("cuda",), disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])
    return exp(*args).mlir_module().count(TRITON)


def _grad(f):
    """All input gradients of ``sum(o²) + sum(S_T²)`` (squares: the backward needs the forward's values)."""
    return jax.grad(lambda *a: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(f(*a))),
                    argnums=(0, 1, 2))


@pytest.mark.parametrize("dk,dv", [(128, 128), (20, 9)])
def test_chunked_kernels_lower_to_mosaic_tpu(dk, dv):
    q = jnp.zeros((2, 256, 2, dk), jnp.bfloat16)
    v = jnp.zeros((2, 256, 2, dv), jnp.bfloat16)
    g = jnp.zeros((2, 256, 2))
    kw = dict(chunk_size=64, interpret=False, backend="mosaic_tpu")
    assert _mosaic_calls(lambda q, v, g: gla_chunk_pallas(q, q, v, g, **kw), q, v, g) == 1
    assert _mosaic_calls(lambda q, v, g: delta_chunk(q, q, v, g + 1.0, g, **kw), q, v, g) == 3  # WY, states, outputs
    assert _mosaic_calls(lambda q, v, g: mlstm_chunk(q, q, v, g, g, **kw), q, v, g) == 2  # states, outputs
    gla = lambda q, v, g: gla_chunk_pallas(q, q, v, g, **kw)
    assert _mosaic_calls(_grad(gla), q, v, g) == 4  # forward, then states, state gradients, chunk gradients
    delta = lambda q, v, g: delta_chunk(q, q, v, g + 1.0, g, **kw)
    assert _mosaic_calls(_grad(delta), q, v, g) == 8  # forward (3), WY + X, states, state grads, chunk grads (2)
    mlstm = lambda q, v, g: mlstm_chunk(q, q, v, g, g, **kw)
    assert _mosaic_calls(_grad(mlstm), q, v, g) == 6  # forward (2), then states, rows, state grads, chunk grads


@pytest.mark.parametrize("dk,dv", [(128, 128), (20, 9), (256, 256)])  # 256: key tiles and key-block grids
def test_chunked_kernels_lower_to_triton(dk, dv):
    q = jnp.zeros((2, 256, 2, dk), jnp.bfloat16)
    v = jnp.zeros((2, 256, 2, dv), jnp.bfloat16)
    g = jnp.zeros((2, 256, 2))
    kw = dict(chunk_size=64, interpret=False, backend="triton")
    gla = lambda q, v, g: gla_chunk_pallas(q, q, v, g, **kw)
    head_fwd = 2 if dk > 128 else 1  # past key dims of 128 the per-head forward is a state walk, then the outputs
    assert _triton_calls(gla, q, v, g) == head_fwd
    assert _triton_calls(_grad(gla), q, v, g) == head_fwd + 3  # forward, then states, state gradients, chunk gradients
    chan = lambda q, v, g: gla_chunk_pallas(q, q, v, jnp.zeros(q.shape, jnp.float32) + g[..., None], **kw)
    assert _triton_calls(chan, q, v, g) == 3  # intra-chunk matrices, states, outputs
    assert _triton_calls(_grad(chan), q, v, g) == 8  # forward (3), then intra, states, state grads, chunk grads, dv
    delta = lambda q, v, g: delta_chunk(q, q, v, g + 1.0, g, **kw)
    assert _triton_calls(delta, q, v, g) == 3  # WY, states, outputs
    assert _triton_calls(_grad(delta), q, v, g) == 8  # forward (3), WY + X, states, state grads, chunk grads (2)
    mlstm = lambda q, v, g: mlstm_chunk(q, q, v, g, g, **kw)
    assert _triton_calls(mlstm, q, v, g) == 2  # states, outputs
    assert _triton_calls(_grad(mlstm), q, v, g) == 6  # forward (2), then states, rows, state grads, chunk grads


def test_per_channel_gla_lowers_and_bad_backend_is_named():
    q = jnp.zeros((2, 256, 2, 128), jnp.bfloat16)
    f = lambda q, g: gla_chunk_pallas(q, q, q, g, chunk_size=64, interpret=False, backend="mosaic_tpu")
    g = jnp.zeros((2, 256, 2, 128))
    assert _mosaic_calls(f, q, g) == 3  # intra-chunk matrices, states, outputs
    grads = jax.grad(lambda q, g: jnp.sum(jnp.square(f(q, g)[0])), argnums=(0, 1))
    assert _mosaic_calls(grads, q, g) == 8  # forward (3), then intra, states, state grads, chunk grads, dv
    with pytest.raises(ValueError, match="backend must be"):
        delta_chunk(q, q, q, jnp.ones((2, 256, 2)), chunk_size=16, backend="mosaic")


def test_linear_scan_lowers_to_mosaic_tpu_forward_and_backward():
    a, b, h0 = jnp.full((2, 256, 512), 0.9), jnp.ones((2, 256, 512)), jnp.zeros((2, 512))
    assert _mosaic_calls(lambda a, b, h0: linear_scan_pallas(a, b, h0, interpret=False)[0], a, b, h0) == 1

    def grads(a, b, h0):
        return jax.grad(lambda a, b: jnp.sum(linear_scan_pallas(a, b, h0, interpret=False)[0]), argnums=(0, 1))(a, b)

    assert _mosaic_calls(grads, a, b, h0) == 2  # the forward kernel and its transpose


def test_fused_rnn_lowers_to_triton(monkeypatch):
    """The FlashRNN-style cells ask for the Triton lowering by name on a GPU (jax >= 0.11 would otherwise take
    Mosaic GPU, which has no ``dot_general`` for them); their TPU compile is ``tests/test_tpu_compile.py``'s."""
    from pallas_kernels import _util
    from seqjax import rnn as R
    from seqjax.rnn import functional

    monkeypatch.setattr(_util, "platform", lambda: "gpu")
    monkeypatch.setattr(functional, "kernel_platform", lambda: "gpu")
    p = R.init_params("lstm", jax.random.PRNGKey(0), 3, 12, heads=2)
    loss = lambda p, x: jnp.sum(R.rnn("lstm", p, x, impl="pallas")[0] ** 2)
    assert _triton_calls(jax.grad(loss, argnums=(0, 1)), p, jnp.ones((2, 9, 3))) == 2  # forward, reverse time


def test_backend_and_interpret_defaults(monkeypatch):
    """``interpret=None`` interprets on the CPU and runs the TPU bodies interpreted off a TPU (their tests also
    pass on a GPU machine); an explicit ``interpret=False`` is kept (the exports above)."""
    from pallas_kernels import _util

    for platform, want in (("cpu", [(True, "triton"), (True, "mosaic_tpu")]),
                           ("gpu", [(False, "triton"), (True, "mosaic_tpu")]),
                           ("tpu", [(False, "mosaic_tpu"), (False, "mosaic_tpu")])):
        monkeypatch.setattr(_util.jax, "default_backend", lambda p=platform: p)
        assert [_util.resolve(None, None), _util.resolve(None, "mosaic_tpu")] == want, platform
        assert _util.resolve(False, "mosaic_tpu") == (False, "mosaic_tpu")


def test_kernels_target_the_platform_of_the_mesh_in_context(monkeypatch):
    """Under ``seqjax.sharding.use_rules(mesh)`` the kernels target the mesh's devices, not the process's
    default backend (an ahead-of-time compile for a TPU topology from a CPU host)."""
    from pallas_kernels import _util
    from seqjax import sharding

    monkeypatch.setattr(_util.jax, "default_backend", lambda: "gpu")
    assert _util.platform() == "gpu" and _util.resolve(None, None) == (False, "triton")
    with sharding.use_rules(sharding.make_mesh((2, 1, 1, 1), devices=jax.devices()[:2])):
        assert _util.platform() == "cpu" and _util.resolve(None, None) == (True, "triton")
