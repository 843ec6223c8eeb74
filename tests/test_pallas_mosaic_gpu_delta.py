"""The chunked delta rule's Mosaic GPU bodies (``pallas_kernels/delta_chunk/wy_mosaic_gpu.py``, ``mosaic_gpu.py``,
``backward_mosaic_gpu.py``), checked without a GPU.

* Lowering: ``jax.export`` with ``platforms=("cuda",)`` runs the Pallas -> Mosaic GPU lowering on this CPU (layouts,
  ``wgmma`` operand shapes and transforms, TMA slices) and emits one ``mosaic_gpu`` custom call each for the WY
  factors, the state pass and the output kernel and no Triton call, for the benchmark shape (``B=8, T=2048, H=16,
  D=128``) and a smoke shape, bf16 and float32 inputs; under ``jax.grad`` eight (the backward's WY factors, two walks
  and two chunk-gradient kernels besides), and no Triton call but 4b's at chunks of 128. ptxas' compile (registers of
  the WY inverse's ``fori_loop`` included) and the speed need a GPU (``benchmarks/gpu_check.sh``).
* The WY factors against the Triton body (interpret mode) and a float64 reference, ``W``, ``U`` and ``X``.
* Values against ``seqjax.ops.delta.chunk_delta_rule`` — resets, ``beta`` up to 2, a gated decay, ``h0``, a time not
  a multiple of the chunk, head dims that need padding — under Mosaic GPU's own interpreter (``InterpretGPUParams``,
  in ``jax._src`` in jax 0.10: TMA copies, barriers, shared memory and ``wgmma`` simulated). That interpreter takes
  no transposed shared-memory view and no register operand for ``wgmma``: under it the bodies stage ``Kᵀ`` and the
  intra-chunk matrix through shared memory, which the compiled bodies do not.
* Gradients: ``jax.grad`` under ``backend="mosaic_gpu"`` (every kernel interpreted by Mosaic GPU's interpreter)
  against the XLA chunked form's and the Triton backend's.
* The shapes Mosaic GPU requires (the backend choice of all three kernels: ``test_pallas_mosaic_gpu.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import _mosaic_gpu
from pallas_kernels.delta_chunk import mosaic_gpu as delta_mgpu
from pallas_kernels.delta_chunk import wy_mosaic_gpu
from pallas_kernels.delta_chunk.forward import _chunk_gates
from pallas_kernels.delta_chunk.kernel import delta_chunk
from pallas_kernels.delta_chunk.wy import wy_factors
from seqjax.ops.delta import chunk_delta_rule

MOSAIC_GPU = "@mosaic_gpu"
TRITON = "__gpu$xla.gpu.triton"


def _cuda_module(f, *args) -> str:
    exp = export.export(jax.jit(f), platforms=("cuda",), disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])
    return exp(*args).mlir_module()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(8, 2048, 16, 128), (1, 64, 2, 32)], ids=["bench", "smoke"])
def test_lowers_for_cuda(shape, dtype):
    s = jax.ShapeDtypeStruct
    qs, gs = s(shape, dtype), s(shape[:3], jnp.float32)
    mod = _cuda_module(lambda q, k, v, beta, la: delta_chunk(q, k, v, beta, la, chunk_size=64, interpret=False,
                                                             backend="mosaic_gpu"), qs, qs, qs, gs, gs)
    # the WY factors, the state pass and the output on Mosaic GPU; no Triton call
    assert mod.count(MOSAIC_GPU) == 3 and mod.count(TRITON) == 0
    for name in ("delta_chunk_wy", "delta_chunk_states", "delta_chunk_out"):
        assert name not in mod


@pytest.mark.parametrize("shape,dtype,chunk", [((1, 128, 2, 64), jnp.bfloat16, 64), ((8, 2048, 16, 128), jnp.bfloat16, 64),
                                               ((1, 128, 2, 64), jnp.float32, 64), ((1, 128, 2, 256), jnp.bfloat16, 64),
                                               ((1, 256, 2, 128), jnp.bfloat16, 128)],
                         ids=["smoke", "bench", "float32", "wide", "chunk128"])
def test_grad_lowers_with_mosaic_gpu_walks(shape, dtype, chunk):
    """``jax.grad`` under ``backend="mosaic_gpu"``: the WY factors (forward, and backward with ``X``), the serial passes
    and both chunk-parallel gradient kernels (``backward.py`` 4a, 4b; ``backward_mosaic_gpu.py``) on Mosaic GPU, no
    Triton call; at head dim 256 too (4a then takes two value blocks of 128 beside four key blocks). At chunks of 128,
    4b's shared memory would pass its budget (``backward_mosaic_gpu.wy_grads_fit``): it runs on Triton, the one
    Triton call."""
    q = jax.ShapeDtypeStruct(shape, dtype)
    g = jax.ShapeDtypeStruct(shape[:3], jnp.float32)

    def loss(q, beta, la):
        o, s = delta_chunk(q, q, q, beta, la, chunk_size=chunk, interpret=False, backend="mosaic_gpu")
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s**2)

    mod = _cuda_module(jax.grad(loss, argnums=(0, 1, 2)), q, g, g)
    # Mosaic GPU: the forward's WY factors, state pass and output, the backward's WY factors (with X), state
    # recomputation, state-gradient walk, 4a and 4b; Triton: 4b alone, at chunks of 128
    on_triton = chunk == 128
    assert mod.count(MOSAIC_GPU) == 8 - on_triton and mod.count(TRITON) == on_triton
    assert ("delta_chunk_bwd_grads_wy" in mod) == on_triton
    for name in ("delta_chunk_wy", "delta_chunk_states", "delta_chunk_bwd_dstates", 'delta_chunk_bwd_grads"'):
        assert name not in mod


def _wy_inputs(c, dk, dv, decay, dtype, seed=0):
    """Prepared inputs of ``wy_factors`` (heads-first, two chunks): unit-norm keys, ``β ∈ [0.9, 1]``, a log decay of
    ``decay`` times ``[0.5, 1.5]`` per token (0: ungated) and three documents (resets at 37 and ``C + 5``). Keys and
    values are rounded to bf16 (exact in the bf16 ``wgmma`` operands), so that the float64 reference sees the
    kernel's inputs."""
    b, h, n = 1, 2, 2
    t = n * c
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    k = jax.random.normal(ks[0], (b, h, t, dk))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16).astype(dtype)
    v = jax.random.normal(ks[1], (b, h, t, dv)).astype(jnp.bfloat16).astype(dtype)
    beta = 0.9 + 0.1 * jax.random.uniform(ks[2], (b, h, t))
    rs = jnp.zeros((b, t), bool).at[:, 37].set(True).at[:, c + 5].set(True)
    la = jnp.where(rs[:, None], 0.0, decay * (0.5 + jax.random.uniform(ks[3], (b, h, t))))
    g, _, seg = _chunk_gates(la, rs, c, n)
    return k, v, beta, g, seg


def _wy_reference(k, v, beta, g, seg, c):
    """``W, U, X`` per chunk in float64 (``X`` by ``numpy.linalg.inv``)."""
    k, v, beta, g, seg = (np.asarray(x, np.float64) for x in (k, v, beta, g, seg))
    w, u, x = np.zeros_like(k), np.zeros_like(v), np.zeros(k.shape[:-1] + (c,))
    for i in np.ndindex(k.shape[:2]):
        for s in range(0, k.shape[2], c):
            r = slice(s, s + c)
            kc, bc, gc, sc = k[i][r], beta[i][r], g[i][r], seg[i][r]
            ok = np.tril(np.ones((c, c), bool), -1) & (sc[:, None] == sc[None, :])
            dec = np.where(ok, np.exp(np.where(ok, gc[:, None] - gc[None, :], 0.0)), 0.0)
            x[i][r] = np.linalg.inv(np.eye(c) + bc[:, None] * (kc @ kc.T) * dec)
            w[i][r] = x[i][r] @ ((bc * np.where(sc == 0, np.exp(gc), 0.0))[:, None] * kc)
            u[i][r] = x[i][r] @ (bc[:, None] * v[i][r])
    return w, u, x


@pytest.mark.parametrize("c,dk,dv,decay,dtype", [
    (64, 128, 64, -0.05, jnp.float32), (64, 64, 128, -5.0, jnp.float32), (64, 64, 64, 0.0, jnp.float32),
    (64, 64, 128, -0.05, jnp.bfloat16), (128, 64, 64, -5.0, jnp.float32),
    pytest.param(128, 128, 64, -0.05, jnp.float32, marks=pytest.mark.slow),
], ids=["weak", "strong", "ungated", "bf16", "chunk128-strong", "chunk128-weak"])
def test_wy_factors(c, dk, dv, decay, dtype):
    """``wy_factors`` under ``backend="mosaic_gpu"`` (``wy_mosaic_gpu.py``, Mosaic GPU's interpreter) against the
    Triton body (interpret mode) and the float64 reference, on ``W, U`` and the inverse ``X``: weak decay (``log α
    ≈ −0.05`` per token), strong (``≈ −5``) and none, three documents, ``β`` near 1, unit-norm keys, key tiles of
    ``K Kᵀ`` and value tiles of ``U`` one and two, chunks of 64 and 128. ``X`` is float32 forward substitution, as
    the Triton body's: within 1e-6 of its largest entry (measured: at most 1.5e-7 from either). ``W`` and ``U`` are
    ``wgmma`` products with the scaled ``X`` as two bf16 pieces (``hi + lo``) where they fit the shared-memory budget:
    within 2e-5 (measured: at most 4.0e-6; the Triton body, float32 at ``HIGHEST``, within 1.3e-7 of the reference),
    and as one (``C = 128`` at a head dim of 128) within 5e-3 (measured: 1.7e-3). bf16 inputs: ``W, U`` and ``X`` come
    out bf16, each rounding worth ``2^-9`` of an entry (measured: ``W, U`` 2.7e-3, 3.6e-3 from the reference, as the
    Triton body's; ``X`` equal to the Triton body's)."""
    args = _wy_inputs(c, dk, dv, decay, dtype)
    interpret = jax.default_backend() != "gpu"  # compiled on a GPU (benchmarks/gpu_check.sh), else interpreted
    got = wy_factors(*args, c=c, interpret=interpret, backend="mosaic_gpu", with_x=True)
    tri = wy_factors(*args, c=c, interpret=interpret, backend="triton", with_x=True)
    ref = _wy_reference(*args, c)
    f32 = dtype == jnp.float32
    wu = 2e-5 if wy_mosaic_gpu._parts(c, dk, dv, dtype) == 2 else 5e-3
    for name, x, t, r, tol in zip("WUX", got, tri, ref, (wu, wu, 1e-6) if f32 else (1e-2, 1e-2, 4e-3)):
        assert x.shape == r.shape and x.dtype == dtype, name
        x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
        np.testing.assert_allclose(x, r, atol=tol * np.abs(r).max(), err_msg=f"{name} vs the reference")
        np.testing.assert_allclose(x, t, atol=tol * np.abs(r).max(), err_msg=f"{name} vs the Triton body")


def _inputs(b=1, t=100, h=1, dk=32, dv=48, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv))
    beta = 2.0 * jax.random.uniform(ks[3], (b, t, h))  # up to 2: negative eigenvalues
    la = jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (b, t, h)))
    h0 = jax.random.normal(ks[5], (b, h, dk, dv))
    resets = jnp.zeros((b, t), bool).at[:, 37].set(True)
    return (q, k, v, beta, la), dict(h0=h0, resets=resets, scale=0.5)


@pytest.mark.parametrize("t,budget", [(100, None), (300, None), (300, 0)], ids=["two-chunks", "five-chunks", "one-slot"])
def test_values(monkeypatch, t, budget):
    """Against the XLA chunked form, ``T = 100`` over chunks of 64 (two chunks) and ``T = 300`` (five: the walks'
    two-slot TMA pipeline fills, reuses both slots and drains; and with one slot, as where two would not fit the
    shared-memory budget), head dims 32 and 48 padded to 64. The bodies' matmul operands are bf16 (float32
    accumulation; ``H`` and ``U'`` are stored in bf16; the WY factors' ``K Kᵀ`` takes the keys in bf16), each rounding
    worth up to ``2^-9`` relative, so float32 inputs agree to about 1% of the largest output (measured: 0.49% on the
    outputs, 0.66% on the final state at ``T = 100``)."""
    if budget is not None:
        monkeypatch.setattr(_mosaic_gpu, "SMEM_BUDGET", budget)
    args, kw = _inputs(t=t)
    tol = 1e-2
    o, s = delta_chunk(*args, **kw, chunk_size=64, backend="mosaic_gpu")  # interpreted on the CPU, compiled on a GPU
    ro, rs = chunk_delta_rule(*args, **kw, chunk_size=64)
    assert o.shape == ro.shape and s.shape == rs.shape and o.dtype == ro.dtype
    np.testing.assert_allclose(o, ro, atol=tol * float(jnp.abs(ro).max()))
    np.testing.assert_allclose(s, rs, atol=tol * float(jnp.abs(rs).max()))


def test_mosaic_gpu_requirements_raise():
    (q, k, v, beta, la), _ = _inputs(t=16)
    with pytest.raises(ValueError, match="chunk_size a multiple of 64, got 32"):  # before tracing, from the public API
        delta_chunk(q, k, v, beta, la, chunk_size=32, backend="mosaic_gpu")
    with pytest.raises(ValueError, match="chunk_size a multiple of 64, got 32"):
        delta_mgpu.check_shapes(32, 64, 64)
    with pytest.raises(ValueError, match=r"key head dim \(k.shape\[-1\]\) padded to key_pad .* got 32"):
        delta_mgpu.check_shapes(64, 32, 64)
    with pytest.raises(ValueError, match=r"value head dim \(v.shape\[-1\]\) padded to key_pad .* got 96"):
        delta_mgpu.check_shapes(64, 64, 96)
    # chunks of 128 at head dim 256: the walks' shared memory would pass an H100's 227 KiB even with one pipeline slot
    wide = jax.ShapeDtypeStruct((1, 256, 1, 256), jnp.bfloat16)
    gates = jax.ShapeDtypeStruct((1, 256, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"chunk_size 128 .* KiB of shared memory, over the 227 KiB .* smaller chunk_size"):
        jax.eval_shape(lambda q, g: delta_chunk(q, q, q, g, g, chunk_size=128, backend="mosaic_gpu"), wide, gates)


@pytest.mark.parametrize("t,dk,dv,gated,ref,chunk", [
    (100, 32, 130, True, "xla", 64),
    pytest.param(300, 32, 48, True, "xla", 64, marks=pytest.mark.slow),
    pytest.param(100, 130, 200, False, "triton", 64, marks=pytest.mark.slow),
    pytest.param(200, 32, 48, True, "triton", 128, marks=pytest.mark.slow),
], ids=["two-value-blocks", "five-chunks", "wide-ungated", "chunk128"])
def test_grads_under_mosaic_gpu(t, dk, dv, gated, ref, chunk):
    """``jax.grad`` under ``backend="mosaic_gpu"`` (both walks and both chunk-gradient kernels, ``backward.py`` 4a and
    4b, and the WY factors, under Mosaic GPU's interpreter) against the XLA chunked
    form's gradients or the Triton backend's (interpret mode): a reset (two documents), ``h0``, ``T = 100`` over chunks
    of 64 (padded to two chunks) and ``300`` (five: the walks' pipelines fill and drain),
    gated and ungated (``log_alpha=None``), key dims 32 and 130 (padded to 64 and 256: one key block and four;
    4b's key tiles likewise) and value dims 48, 130 and 200 (padded to 64 and 256: 4a then takes two value blocks of
    128, whose shares XLA adds, and 4b four value tiles). The matmul operands are bf16 (float32 accumulation; ``H``,
    ``dH``, ``U'``, ``dU'``, ``X`` and ``dA`` are kept in bf16), each rounding worth up to ``2^-9`` relative, so the
    gradients of float32 inputs agree to about 1% of each gradient's largest entry (measured: at most 0.61%, ``dq`` at
    key/value dims 32/48 gated over five chunks and at chunks of 128; 0.58% ``dv`` at chunks of 128, 0.46% at
    130/200; the Triton backend's are within 1e-6 of the reference). At chunks of 128, 4a stages its outputs through
    one shared-memory buffer and 4b runs on Triton
    (``backward_mosaic_gpu._plan``, ``wy_grads_fit``)."""
    args, kw = _inputs(t=t, dk=dk, dv=dv)
    h0 = kw.pop("h0")
    if not gated:
        args = args[:4]
    wo = jnp.cos(jnp.arange(t * dv * 1.0)).reshape(1, t, 1, dv)
    ws = jnp.sin(jnp.arange(dk * dv * 1.0)).reshape(1, 1, dk, dv)

    def grads(fn, **extra):  # linear in the outputs: the cotangents do not depend on the forward's (bf16-rounded) values
        def f(*xs):
            o, s = fn(*xs[:-1], h0=xs[-1], **kw, chunk_size=chunk, **extra)
            return jnp.sum(o * wo) + jnp.sum(s * ws)
        return jax.jit(jax.grad(f, argnums=tuple(range(len(args) + 1))))(*args, h0)  # one compile

    want = grads(chunk_delta_rule) if ref == "xla" else grads(delta_chunk, backend="triton")
    got = grads(delta_chunk, backend="mosaic_gpu")
    names = ("q", "k", "v", "beta", "log_alpha")[:len(args)] + ("h0",)
    for name, x, y in zip(names, got, want, strict=True):
        assert x.shape == y.shape, name
        np.testing.assert_allclose(x, y, atol=1e-2 * float(jnp.abs(y).max()), err_msg=name)
