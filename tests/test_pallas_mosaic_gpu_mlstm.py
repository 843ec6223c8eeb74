"""The chunkwise mLSTM's Mosaic GPU bodies (``pallas_kernels/mlstm_chunk/mosaic_gpu.py``: the forward's two kernels
and the backward's two serial passes; ``backward_mosaic_gpu.py``: the backward's rows and chunk gradients), checked
without a GPU.

* Lowering: ``jax.export`` with ``platforms=("cuda",)`` runs the Pallas -> Mosaic GPU lowering on this CPU
  (layouts, ``wgmma`` operand shapes and transforms, TMA slices) and emits one ``mosaic_gpu`` custom call per
  kernel (the state pass and the outputs), at the benchmark shape and a smoke shape, bf16 and float32 inputs;
  under ``jax.grad`` the backward's five kernels join them on Mosaic GPU, no Triton call (head dim 256 too). ptxas'
  compile and the speed need a GPU.
* Values against the XLA chunked form ``seqjax.ops.mlstm.chunk_mlstm`` — resets, ``h0``, a time not a multiple
  of the chunk, head dims that need padding, forward and gradients (float32 ``wgmma`` operands, so that the
  bodies' algebra is checked to float32 rounding; bf16 operands in the slow tier): compiled on a GPU
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

from pallas_kernels import _mosaic_gpu
from pallas_kernels.mlstm_chunk import backward_mosaic_gpu, mlstm_chunk
from pallas_kernels.mlstm_chunk import mosaic_gpu as mlstm_mosaic_gpu
from pallas_kernels.mlstm_chunk.backward_mosaic_gpu import grads_mosaic_gpu, rows_mosaic_gpu
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


@pytest.mark.parametrize("shape,dtype", [((1, 128, 2, 64), jnp.bfloat16), ((8, 2048, 16, 128), jnp.bfloat16),
                                         ((1, 128, 2, 64), jnp.float32), ((1, 128, 2, 256), jnp.bfloat16)],
                         ids=["smoke", "bench", "float32", "wide"])
def test_grad_lowers_with_mosaic_gpu(shape, dtype):
    """Under ``jax.grad`` every kernel on Mosaic GPU, no Triton call: the forward's two (states, outputs) and the
    backward's five (the states recomputed, the rows, the state-gradient walk, the ``dq, dk, db, di`` kernel and the
    ``dv`` kernel); at head dim 256 too (four key blocks, two value blocks of 128 in the gradient kernel)."""
    q = jax.ShapeDtypeStruct(shape, dtype)
    g = jax.ShapeDtypeStruct(shape[:3], jnp.float32)

    def loss(q, i, f):
        y, (C, n, m) = _mlstm(q, q, q, i, f)
        return jnp.sum(y**2) + jnp.sum(C**2) + jnp.sum(n) + jnp.sum(m)

    exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])
    mod = exp(q, g, g).mlir_module()
    assert mod.count(MOSAIC_GPU) == 7 and mod.count(TRITON) == 0
    assert "mlstm_chunk_bwd_rows" not in mod and "mlstm_chunk_bwd_grads" not in mod


def _inputs(t=100, dk=32, dv=48, mild=None, reset=37):
    """A reset (at token ``reset``), ``h0``, strong input gates (the stabilisers at work), T = 100 (two chunks, the
    second part padding; or ``t``), dk = 32 and dv = 48 (padded to 64), or others. ``mild``: a range of tokens with
    mild gates (input gates near -1, forget gates near 1), over which the state carries from chunk to chunk (the
    carry ``φ`` of a chunk without a reset between 0.3 and 1; strong gates leave it under 1e-17)."""
    b, h = 1, 1
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    q, k = (jax.random.normal(kk, (b, t, h, dk)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, t, h, dv))
    i, f = 3.0 * jax.random.normal(ks[3], (b, t, h)), 3.0 * jax.random.normal(ks[4], (b, t, h))
    if mild is not None:
        tok = jnp.arange(t)[None, :, None]
        late = (tok >= mild[0]) & (tok < mild[1])
        i, f = jnp.where(late, i / 6.0 - 1.0, i), jnp.where(late, 5.0 + f / 3.0, f)
    h0 = (jax.random.normal(ks[5], (b, h, dk, dv)), jax.random.normal(ks[6], (b, h, dk)), jax.random.normal(ks[7], (b, h)))
    resets = jnp.zeros((b, t), bool).at[:, reset].set(True)
    return (q, k, v, i, f), h0, resets


@pytest.mark.parametrize("t,y_tol", [(100, 2e-2), (300, 6e-2)])
def test_values(t, y_tol):
    """Against the XLA chunked form, over two chunks and five (``T = 300``: the walks' TMA pipeline fills, reuses
    both slots and drains). The bodies' matmul operands are bf16 (float32 accumulation) and the entering states are
    kept in bf16, so the outputs agree to bf16 rounding amplified by the normaliser's division: at ``T = 100`` the
    Triton body on the same inputs rounded to bf16 lands at an rms-relative error of 1.5e-2, this one at 0.9e-2; at
    ``T = 300`` (more chunks, strong input gates) at 3.7e-2 and 4.5e-2. The final ``C`` passes through one bf16
    update per chunk (2.5e-3 at either length); ``n`` is summed in XLA from the keys' bf16 values, the ones the
    kernels multiply (``forward._bf16_values``: 1.4e-3 and 1.7e-3), and ``m`` in XLA from the gates."""
    (q, k, v, i, f), h0, resets = _inputs(t)
    # interpreted on the CPU, compiled on a GPU; jitted, so the interpreter runs as one program
    run = jax.jit(lambda *a: mlstm_chunk(*a, h0=h0, resets=resets, chunk_size=64, backend="mosaic_gpu"))
    y, (C, n, m) = run(q, k, v, i, f)
    ry, (rC, rn, rm) = jax.jit(lambda *a: chunk_mlstm(*a, h0, resets, 64))(q, k, v, i, f)
    for got, want, tol in ((y, ry, y_tol), (C, rC, 1e-2), (n, rn, 5e-3), (m, rm, 1e-6)):
        assert got.shape == want.shape and np.all(np.isfinite(np.asarray(got)))
        assert rms_rel_err(got, want) <= tol


def _grads(run, args, h0, resets):
    """``jax.grad`` of a loss linear in ``y`` and the final ``(C, n, m)`` (random weights, so the cotangents are the same
    on every side) for every input and all of ``h0``, flattened ``(q, k, v, i, f, C0, n0, m0)``."""
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    w = [jax.random.normal(kk, x.shape) for kk, x in zip(ks, (args[2], *h0), strict=True)]  # y has v's shape

    def loss(q, k, v, i, f, h0):
        y, state = run(q, k, v, i, f, h0, resets)
        return sum(jnp.sum(x.astype(jnp.float32) * wx) for x, wx in zip((y, *state), w, strict=True))

    return [x.astype(jnp.float32) for x in jax.tree.leaves(jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args, h0))]


_NAMES = ("q", "k", "v", "i", "f", "C0", "n0", "m0")
_MGPU = lambda *a: mlstm_chunk(*a[:5], h0=a[5], resets=a[6], chunk_size=64, backend="mosaic_gpu")
_REF = lambda *a: chunk_mlstm(*a, 64)


def _float32_operands(monkeypatch):
    """float32 ``wgmma`` operands in every Mosaic GPU body of the mLSTM (the compiled bodies take bf16 only; Mosaic
    GPU's interpreter takes float32 too): the bodies' bf16 constant and the shared-memory helper's default dtype,
    patched in the modules that use them."""
    f32, smem = jnp.float32, _mosaic_gpu.smem
    f32_smem = lambda shape, dtype=f32, plain=False: smem(shape, dtype, plain)
    for module, name in ((_mosaic_gpu, "BF16"), (mlstm_mosaic_gpu, "_BF16"), (backward_mosaic_gpu, "BF16")):
        monkeypatch.setattr(module, name, f32)
    for module in (_mosaic_gpu, backward_mosaic_gpu):
        monkeypatch.setattr(module, "smem", f32_smem)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="an interpreter check: compiled wgmma takes bf16 operands")
@pytest.mark.parametrize("t,dk,dv,mild,reset", [(100, 130, 200, (0, 85), 90),
                                                pytest.param(300, 32, 48, (50, 300), 37, marks=pytest.mark.slow)])
def test_grads_at_float32_operands(monkeypatch, t, dk, dv, mild, reset):
    """Every Mosaic GPU body (the forward's two, the backward's two walks, its rows and its two gradient kernels) with
    float32 ``wgmma`` operands under Mosaic GPU's interpreter (:func:`_float32_operands`), so that their algebra is
    checked to float32 rounding, against the XLA chunked form. ``T = 100`` (28 tokens of padding), key dim 130 and
    value dim 200, both padded to 256: four key blocks of 64, two value blocks of 128 in the gradient kernel, four of
    64 in the rows and ``dv`` kernels, so every value block's share counts; mild gates up to token 85 (the first
    chunk's carry ``φ`` 0.37 and a state read well into the second chunk, so the carry's terms of the decay gradient
    count), strong ones and a reset at 90. ``T = 300``: five chunks, mild gates from token 50 (carries 0.3-0.8 after
    the first), head dims 32 and 48. Measured: within 1.3e-6 rms-relative at ``T = 100``, 5.1e-6 at ``T = 300`` (the
    Triton backend: 3.1e-6, 2.2e-6); 1e-4 allowed."""
    _float32_operands(monkeypatch)
    args, h0, resets = _inputs(t, dk=dk, dv=dv, mild=mild, reset=reset)
    got, want = _grads(_MGPU, args, h0, resets), _grads(_REF, args, h0, resets)
    for name, g, r in zip(_NAMES, got, want, strict=True):
        assert g.shape == r.shape and np.all(np.isfinite(np.asarray(g))), name
        assert rms_rel_err(g, r) <= 1e-4, f"{name}: {rms_rel_err(g, r):.1e}"


@pytest.mark.slow
@pytest.mark.parametrize("t,dk,dv,mild", [(100, 32, 48, None), (100, 130, 200, None), (300, 32, 48, None),
                                          (300, 32, 48, (50, 300))])
def test_grads_with_bf16_operands(t, dk, dv, mild):
    """As compiled (bf16 ``wgmma`` operands, interpreted here): ``jax.grad`` under ``backend="mosaic_gpu"`` against the
    Triton backend on the same inputs in bf16 (whose matmul operands are bf16 likewise: both round the same values
    the same way, mostly) and against the XLA chunked form on those bf16 values in float32. ``_inputs``' strong input
    gates leave small normalisers, whose division amplifies every operand's rounding: both backends land at 2.5-4.2e-2
    rms-relative from the chunked form on ``q, k, i, f``, 0.7-1.2e-2 on ``v``, 2-5e-3 on the initial state (within
    5e-2, 1e-2 on the state), and within 3.5e-3 of each other (``dm0``: 7.5e-3, the serial walks' rounding; 1e-2).
    With mild gates from token 50 (the state carried over four chunks) both land at 1.0-1.3e-2 on ``q, k, i, f``; that
    case needs the normaliser states summed in XLA from the keys' bf16 values (``forward._bf16_values``): from the
    float32 keys the Mosaic GPU gradients land 4.8e-2 from Triton's."""
    args, h0, resets = _inputs(t, dk=dk, dv=dv, mild=mild)
    args = tuple(x.astype(jnp.bfloat16).astype(jnp.float32) if j < 3 else x for j, x in enumerate(args))
    bf = lambda x: x.astype(jnp.bfloat16)
    triton = lambda q, k, v, *a: mlstm_chunk(bf(q), bf(k), bf(v), *a[:2], h0=a[2], resets=a[3], chunk_size=64,
                                             backend="triton")
    got, yard, want = (_grads(run, args, h0, resets) for run in (_MGPU, triton, _REF))
    for name, g, y, r in zip(_NAMES, got, yard, want, strict=True):
        assert g.shape == r.shape and np.all(np.isfinite(np.asarray(g))), name
        assert rms_rel_err(g, r) <= (1e-2 if name in ("C0", "n0", "m0") else 5e-2), f"{name}: {rms_rel_err(g, r):.1e}"
        assert rms_rel_err(g, y) <= 1e-2, f"{name} against Triton: {rms_rel_err(g, y):.1e}"


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
    g = (ew,) * 4
    with pytest.raises(ValueError, match="mLSTM backward needs .* key_pad .* got chunk 64, key dim 32, value dim 64"):
        rows_mosaic_gpu(kh, kh, vh, vh, *g, ew[..., :1], jnp.zeros((1, 1, 1, 32, 64)), jnp.zeros((1, 1, 1, 32)), c=64)
    with pytest.raises(ValueError, match="mLSTM backward needs chunk a multiple of 64 .* got chunk 32"):
        grads_mosaic_gpu(vh, vh, vh, vh, *g, *g, ew[..., :2], *(jnp.zeros((1, 1, 2, 64, 64)),) * 2,
                         *(jnp.zeros((1, 1, 2, 64)),) * 2, c=32)
    with pytest.raises(ValueError, match="mlstm_chunk_out: .* value dim padded to key_pad .* got 32"):
        out_mosaic_gpu(vh, vh, kh, ew, ew, ew, ew, ew[..., :1], jnp.zeros((1, 1, 1, 64, 32)), jnp.zeros((1, 1, 1, 64)),
                       c=64)
