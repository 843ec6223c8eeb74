"""The chunkwise mLSTM's Mosaic GPU bodies (``pallas_kernels/mlstm_chunk/mosaic_gpu.py``: the forward's two kernels
and the backward's two serial passes), checked without a GPU.

* Lowering: ``jax.export`` with ``platforms=("cuda",)`` runs the Pallas -> Mosaic GPU lowering on this CPU
  (layouts, ``wgmma`` operand shapes and transforms, TMA slices) and emits one ``mosaic_gpu`` custom call per
  kernel (the state pass and the outputs), at the benchmark shape and a smoke shape, bf16 and float32 inputs;
  under ``jax.grad`` the backward's states and state-gradient walk join them on Mosaic GPU and its two
  chunk-parallel kernels stay on Triton. ptxas' compile and the speed need a GPU.
* Values against the XLA chunked form ``seqjax.ops.mlstm.chunk_mlstm`` — resets, ``h0``, a time not a multiple
  of the chunk, head dims that need padding, forward and (slow tier) gradients: compiled on a GPU
  (``benchmarks/gpu_check.sh``, stage ``tests``) and on the CPU under Mosaic GPU's own interpreter
  (``InterpretGPUParams``: TMA copies, barriers, shared memory and ``wgmma`` simulated; no transposed shared-memory
  view and no register operand for ``wgmma``, so under it the bodies stage ``Kᵀ`` and ``Q Kᵀ ⊙ D`` through shared
  memory, which the compiled bodies do not).
* The requirements Mosaic GPU imposes (chunks of 64, head dims padded to ``key_pad``); the backend choice of all three
  kernels is in ``test_pallas_mosaic_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.mlstm_chunk import mlstm_chunk
from pallas_kernels.mlstm_chunk.mosaic_gpu import dstates_mosaic_gpu, out_mosaic_gpu, states_mosaic_gpu
from seqjax.nn import rms_rel_err
from seqjax.ops.mlstm import chunk_mlstm

MOSAIC_GPU = "@mosaic_gpu"
TRITON = "__gpu$xla.gpu.triton"


def _mlstm(q, k, v, i, f, **kw):
    return mlstm_chunk(q, k, v, i, f, chunk_size=64, interpret=False, backend="mosaic_gpu", **kw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(8, 2048, 16, 128), (1, 64, 2, 32)], ids=["bench", "smoke"])
def test_lowers_for_cuda(shape, dtype):
    s = jax.ShapeDtypeStruct
    qs, gs = s(shape, dtype), s(shape[:3], jnp.float32)
    mod = export.export(jax.jit(_mlstm), platforms=("cuda",))(qs, qs, qs, gs, gs).mlir_module()
    assert mod.count(MOSAIC_GPU) == 2 and "triton" not in mod  # the state pass and the outputs


def test_grad_lowers_with_serial_backward_on_mosaic_gpu():
    """Under ``jax.grad``: the forward's two kernels and the backward's two serial passes (the states recomputed, the
    state gradients walking backwards) on Mosaic GPU; the backward's chunk-parallel rows and gradients on Triton."""
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((1, 128, 2), jnp.float32)

    def loss(q, i, f):
        y, (C, n, m) = _mlstm(q, q, q, i, f)
        return jnp.sum(y**2) + jnp.sum(C**2) + jnp.sum(n) + jnp.sum(m)

    exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])
    mod = exp(q, g, g).mlir_module()
    # forward: states, outputs; backward (backward.py): states, state gradients on Mosaic GPU; rows, chunk gradients
    assert mod.count(MOSAIC_GPU) == 4 and mod.count(TRITON) == 2
    assert 'name = "mlstm_chunk_bwd_rows"' in mod and 'name = "mlstm_chunk_bwd_grads"' in mod


def _inputs(t=100):
    """A reset, ``h0``, strong input gates (the stabilisers at work), T = 100 (two chunks, the first part padding; or
    ``t``), dk = 32 and dv = 48 (padded to 64)."""
    b, h, dk, dv = 1, 1, 32, 48
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    q, k = (jax.random.normal(kk, (b, t, h, dk)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, t, h, dv))
    i, f = 3.0 * jax.random.normal(ks[3], (b, t, h)), 3.0 * jax.random.normal(ks[4], (b, t, h))
    h0 = (jax.random.normal(ks[5], (b, h, dk, dv)), jax.random.normal(ks[6], (b, h, dk)), jax.random.normal(ks[7], (b, h)))
    resets = jnp.zeros((b, t), bool).at[:, 37].set(True)
    return (q, k, v, i, f), h0, resets


@pytest.mark.parametrize("t,y_tol", [(100, 2e-2), (300, 6e-2)])
def test_values(t, y_tol):
    """Against the XLA chunked form, over two chunks and five (``T = 300``: the walks' TMA pipeline fills, reuses
    both slots and drains). The bodies' matmul operands are bf16 (float32 accumulation) and the entering states are
    kept in bf16, so the outputs agree to bf16 rounding amplified by the normaliser's division: at ``T = 100`` the
    Triton body on the same inputs rounded to bf16 lands at an rms-relative error of 1.5e-2, this one at 0.9e-2; at
    ``T = 300`` (more chunks, strong input gates) at 3.7e-2 and 4.5e-2. The final ``C`` passes through one bf16
    update per chunk (2.5e-3 at either length); ``n`` and ``m`` are computed in XLA."""
    (q, k, v, i, f), h0, resets = _inputs(t)
    # interpreted on the CPU, compiled on a GPU; jitted, so the interpreter runs as one program
    run = jax.jit(lambda *a: mlstm_chunk(*a, h0=h0, resets=resets, chunk_size=64, backend="mosaic_gpu"))
    y, (C, n, m) = run(q, k, v, i, f)
    ry, (rC, rn, rm) = jax.jit(lambda *a: chunk_mlstm(*a, h0, resets, 64))(q, k, v, i, f)
    for got, want, tol in ((y, ry, y_tol), (C, rC, 1e-2), (n, rn, 1e-5), (m, rm, 1e-6)):
        assert got.shape == want.shape and np.all(np.isfinite(np.asarray(got)))
        assert rms_rel_err(got, want) <= tol


@pytest.mark.slow
def test_grads_equal_the_chunked_form():
    """``jax.grad`` under ``backend="mosaic_gpu"`` (the serial backward passes on Mosaic GPU, interpreted here; the
    chunk-parallel ones on Triton, interpreted) against the XLA chunked form's, for every input and all of ``h0``, on
    ``_inputs``. The loss is linear in ``y`` and the final ``(C, n, m)``, so the cotangents are the same on both
    sides. The Mosaic GPU walks round their matmul operands to bf16 (``2^-9`` relative each; float32
    accumulation), once per chunk, into the recomputed ``C'`` and the ``dC'`` the chunk-gradient kernel reads, and
    ``dC0`` sums two such walks: 1e-2 rms-relative allows for a few of them (measured: 2.5e-3 on ``dC0``, 4.5e-4 on
    ``dm0``, at most 1.1e-4 on the rest; the state-gradient walk run front to back misses by 0.12 on ``dv``)."""
    args, h0, resets = _inputs()
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    w = [jax.random.normal(kk, x.shape) for kk, x in zip(ks, (args[2], *h0), strict=True)]  # y has v's shape

    def grads(run):
        def loss(q, k, v, i, f, h0):
            y, state = run(q, k, v, i, f, h0)
            return sum(jnp.sum(x * wx) for x, wx in zip((y, *state), w, strict=True))
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args, h0)

    got = grads(lambda *a: mlstm_chunk(*a[:5], h0=a[5], resets=resets, chunk_size=64, backend="mosaic_gpu"))
    want = grads(lambda *a: chunk_mlstm(*a, resets, 64))
    names = ("q", "k", "v", "i", "f", "C0", "n0", "m0")
    for name, g, r in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == r.shape and np.all(np.isfinite(np.asarray(g))), name
        assert rms_rel_err(g, r) <= 1e-2, f"{name}: {rms_rel_err(g, r):.1e}"


def test_requirements_raise():
    """Mosaic GPU's requirements fail before tracing, naming what is wrong: ``chunk_size`` through the entry point,
    the head dims and the chunk at the bodies (the entry point pads head dims itself)."""
    x = jnp.zeros((1, 64, 1, 32))
    g = jnp.zeros((1, 64, 1))
    with pytest.raises(ValueError, match="chunk_size a multiple of 64, got 32"):
        mlstm_chunk(x, x, x, g, g, chunk_size=32, backend="mosaic_gpu")
    kh, vh, ew = jnp.zeros((1, 1, 64, 32)), jnp.zeros((1, 1, 64, 64)), jnp.zeros((1, 1, 64))
    with pytest.raises(ValueError, match="chunk_states: .* key dim padded to key_pad .* got 32"):
        states_mosaic_gpu(kh, vh, ew, ew[..., :1], jnp.zeros((1, 1, 32, 64)), c=64)
    with pytest.raises(ValueError, match="chunk_states: .* chunk a multiple of 64, got 32"):
        states_mosaic_gpu(vh, vh, ew, ew[..., :2], jnp.zeros((1, 1, 64, 64)), c=32)
    with pytest.raises(ValueError, match="mlstm_chunk_bwd_dstates: .* value dim padded to key_pad .* got 32"):
        dstates_mosaic_gpu(vh, kh, ew, ew[..., :1], jnp.zeros((1, 1, 64, 32)), c=64)
    with pytest.raises(ValueError, match="mlstm_chunk_out: .* value dim padded to key_pad .* got 32"):
        out_mosaic_gpu(vh, vh, kh, ew, ew, ew, ew, ew[..., :1], jnp.zeros((1, 1, 1, 64, 32)), jnp.zeros((1, 1, 1, 64)),
                       c=64)
