"""The chunked GLA's Mosaic GPU bodies (``pallas_kernels/gla_chunk/mosaic_gpu.py``: the per-head forward;
``backward_mosaic_gpu.py``: the backward's chunk-state and state-gradient walks and its chunk-gradient kernels),
checked without a GPU.

* Lowering: ``jax.export`` with ``platforms=("cuda",)`` runs the Pallas -> Mosaic GPU lowering on this CPU
  (layouts, ``wgmma`` operand shapes and transforms, TMA slices) and emits the ``mosaic_gpu`` custom call, for the
  shapes ``benchmarks/gla_gpu.py`` runs (full size and ``GPU_CHECK_SMOKE``), bf16 and float32 inputs; under
  ``jax.grad`` five ``mosaic_gpu`` calls (the forward, the two walks, the two gradient kernels) and no Triton call.
  ptxas' compile and the speed need a GPU (``benchmarks/gpu_check.sh``).
* Values against ``seqjax.ops.gla.chunk_gla`` — resets, negative eigenvalues, ``h0``, a time not a multiple of
  the chunk, key/value dims that need padding: compiled on a GPU (``benchmarks/gpu_check.sh``, stage ``tests``),
  and on the CPU under Mosaic GPU's own interpreter (``InterpretGPUParams``, in ``jax._src`` in jax 0.10: TMA
  copies, barriers, shared memory and ``wgmma`` simulated). That interpreter takes no transposed shared-memory
  view and no register operand for ``wgmma``: under it the body stages ``Kᵀ`` and the intra-chunk matrix
  through shared memory, which the compiled body does not.
* Gradients: ``jax.grad`` under ``backend="mosaic_gpu"`` (every kernel interpreted likewise, the transposed operands
  staged the same way) against the Triton backend's.
* The backend choice of the GLA, delta-rule and mLSTM kernels: Mosaic GPU by default on a GPU under jax >= 0.11 once
  their compiled tests pass, Triton below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import _mosaic_gpu
from pallas_kernels.delta_chunk import kernel as delta_kernel
from pallas_kernels.gla_chunk import kernel as gla_kernel
from pallas_kernels.gla_chunk.kernel import gla_chunk_pallas
from pallas_kernels.mlstm_chunk import kernel as mlstm_kernel
from seqjax.ops.gla import chunk_gla

MOSAIC_GPU = "mosaic_gpu"
TRITON = "__gpu$xla.gpu.triton"


def _cuda_module(f, *args) -> str:
    return export.export(jax.jit(f), platforms=("cuda",))(*args).mlir_module()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(8, 2048, 16, 128), (1, 64, 2, 32)], ids=["bench", "smoke"])
def test_lowers_for_cuda(shape, dtype):
    s = jax.ShapeDtypeStruct
    qs, gs = s(shape, dtype), s(shape[:3], jnp.float32)
    mod = _cuda_module(lambda q, k, v, g: gla_chunk_pallas(q, k, v, g, chunk_size=64, interpret=False, backend="mosaic_gpu"),
                       qs, qs, qs, gs)
    assert mod.count(f"@{MOSAIC_GPU}") == 1 and "triton" not in mod


@pytest.mark.parametrize("shape,dtype", [((1, 128, 2, 64), jnp.bfloat16), ((8, 2048, 16, 128), jnp.bfloat16),
                                         ((1, 128, 2, 64), jnp.float32), ((1, 128, 2, 256), jnp.bfloat16)],
                         ids=["smoke", "bench", "float32", "wide"])
def test_grad_lowers_with_mosaic_gpu(shape, dtype):
    """The Mosaic GPU forward under ``jax.grad``: the forward, the backward's two serial walks (chunk states, state
    gradients) and its two chunk-parallel gradient kernels (``dQ, dK, db``; ``dV``) all on Mosaic GPU, no Triton call;
    at head dim 256 too (the first gradient kernel then takes two value blocks of 128 per key block)."""
    q = jax.ShapeDtypeStruct(shape, dtype)
    g = jax.ShapeDtypeStruct(shape[:3], jnp.float32)

    def loss(q, g):
        o, s = gla_chunk_pallas(q, q, q, g, chunk_size=64, interpret=False, backend="mosaic_gpu")
        return jnp.sum(o**2) + jnp.sum(s**2)

    exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=("cuda",),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])
    mod = exp(q, g).mlir_module()
    assert "gla_chunk_bwd_states" not in mod and "gla_chunk_bwd_dstates" not in mod
    # the forward, the walks and the two gradient kernels (backward_mosaic_gpu.py)
    assert mod.count(f"@{MOSAIC_GPU}") == 5 and mod.count(TRITON) == 0


def _inputs(dtype, b=1, t=100, h=1, dk=32, dv=48, seed=0, reset=37):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, dk)).astype(dtype)
    k = (jax.random.normal(ks[1], (b, t, h, dk)) / dk**0.5).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
    g = jax.nn.log_sigmoid(2 + jax.random.normal(ks[3], (b, t, h)))
    sign = jnp.where(jax.random.uniform(ks[4], (b, t, h)) < 0.2, -1.0, 1.0)
    h0 = jax.random.normal(ks[5], (b, h, dk, dv))
    resets = jnp.zeros((b, t), bool).at[:, reset].set(True)
    return (q, k, v, g), dict(sign=sign, h0=h0, resets=resets)


@pytest.mark.parametrize("t,budget", [(100, None), (300, None), (300, 0)], ids=["two-chunks", "five-chunks", "one-slot"])
def test_values(monkeypatch, t, budget):
    """Against the XLA chunked form, over two chunks (``T = 100``) and five (``T = 300``: the walk's two-slot TMA
    pipeline fills, reuses both slots and drains; and with one slot, as where two would not fit the shared-memory
    budget). The body's matmul operands are bf16 (float32 accumulation), so float32 inputs agree to bf16 rounding,
    relative to the largest output."""
    if budget is not None:
        monkeypatch.setattr(_mosaic_gpu, "SMEM_BUDGET", budget)
    args, kw = _inputs(jnp.float32, t=t)
    tol = 1e-2
    o, s = gla_chunk_pallas(*args, **kw, chunk_size=64, backend="mosaic_gpu")  # interpreted on the CPU, compiled on a GPU
    f32 = [x.astype(jnp.float32) for x in args]
    ro, rs = chunk_gla(*f32, **kw, chunk_size=64)
    assert o.shape == ro.shape and s.shape == rs.shape
    np.testing.assert_allclose(o, ro, atol=tol * float(jnp.abs(ro).max()))
    np.testing.assert_allclose(s, rs, atol=tol * float(jnp.abs(rs).max()))


def _walk_reference(x, y, w, a, init, chunk, reverse, time_major):
    """``linear_walk``'s recurrence written out: per chunk ``n`` in walk order, ``H_n = S``, then
    ``S ← a_n S + Xᵀ (Y ⊙ w)``, with the body's bf16 matmul operands (``X`` and the scaled ``Y``)."""
    bf = lambda z: z.astype(jnp.bfloat16).astype(jnp.float32)
    if time_major:
        x, y = jnp.swapaxes(x, 1, 2), jnp.swapaxes(y, 1, 2)
    n = x.shape[2] // chunk
    s, hs = init, [None] * n
    for c in (range(n - 1, -1, -1) if reverse else range(n)):
        rows = slice(c * chunk, (c + 1) * chunk)
        hs[c] = s
        s = a[:, :, c, None, None] * s + jnp.einsum("bhtk,bhtv->bhkv", bf(x[:, :, rows]), bf(bf(y[:, :, rows]) * w[:, :, rows, None]))
    return jnp.stack(hs, 2), s


@pytest.mark.parametrize("time_major,reverse,out_dtype,n_chunks,budget", [
    (False, False, jnp.float32, 5, None),
    (True, True, jnp.bfloat16, 5, None),
    (False, True, jnp.float32, 4, 0),  # one pipeline slot (the shared-memory budget of C = 128 at Kp = 256)
    (True, False, jnp.float32, 1, None),
], ids=["forward", "reverse-time-major-bf16", "one-slot", "one-chunk"])
def test_linear_walk_pipeline(monkeypatch, time_major, reverse, out_dtype, n_chunks, budget):
    """``_mosaic_gpu.linear_walk`` (the GLA backward's and the mLSTM's walks; Mosaic GPU's interpreter on the CPU) against
    its recurrence written out: five chunks, so the two-slot TMA pipeline fills, reuses both slots and drains, in
    either direction and layout; one slot; a single chunk. Two value blocks of 64. ``H`` in float32 matches to
    float32 rounding, in bf16 to its rounding."""
    if budget is not None:
        monkeypatch.setattr(_mosaic_gpu, "SMEM_BUDGET", budget)
    b, h, c, kp, vp = 1, 2, 64, 64, 128
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    shp = (b, n_chunks * c, h) if time_major else (b, h, n_chunks * c)
    x, y = jax.random.normal(ks[0], (*shp, kp)), jax.random.normal(ks[1], (*shp, vp))
    w, a = jax.random.uniform(ks[2], (b, h, n_chunks * c)), jax.random.uniform(ks[3], (b, h, n_chunks))
    init = jax.random.normal(ks[4], (b, h, kp, vp))
    interpret = jax.default_backend() != "gpu"  # compiled on a GPU (benchmarks/gpu_check.sh), else interpreted
    hs, last = jax.jit(lambda *z: _mosaic_gpu.linear_walk(*z, chunk=c, reverse=reverse, interpret=interpret,
                                                          out_dtype=out_dtype, time_major=time_major))(x, y, w, a, init)
    rh, rl = _walk_reference(x, y, w, a, init, c, reverse, time_major)
    assert hs.shape == rh.shape and hs.dtype == out_dtype and last.shape == rl.shape
    rtol = 1e-6 if out_dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(np.asarray(hs, np.float32), rh, rtol=rtol, atol=rtol * float(jnp.abs(rh).max()))
    np.testing.assert_allclose(last, rl, rtol=1e-6, atol=1e-6 * float(jnp.abs(rl).max()))


@pytest.mark.parametrize("kernel", [gla_kernel, delta_kernel, mlstm_kernel], ids=["gla", "delta", "mlstm"])
def test_backend_choice(monkeypatch, kernel):
    """Each kernel's choice between its Triton and Mosaic GPU bodies (``_mosaic_gpu.resolve_mosaic_gpu`` with the
    kernel's own ``MOSAIC_GPU_DEFAULT``)."""
    resolve = kernel._resolve
    monkeypatch.setattr(_mosaic_gpu, "resolve", lambda interpret, backend: (True, backend or "triton"))  # as on the CPU
    assert resolve(None, None, 64) == (True, "triton")  # the CPU interprets the Triton bodies
    assert resolve(None, "mosaic_gpu", 64) == (True, "mosaic_gpu")  # or the Mosaic GPU bodies, asked for
    monkeypatch.setattr(_mosaic_gpu, "resolve", lambda interpret, backend: (False, backend or "triton"))  # as on a GPU
    monkeypatch.setattr(kernel, "MOSAIC_GPU_DEFAULT", False)  # jax < 0.11, or the compiled tests not yet passed
    assert resolve(None, None, 64) == (False, "triton")
    monkeypatch.setattr(kernel, "MOSAIC_GPU_DEFAULT", True)  # jax >= 0.11 and the compiled tests passed
    assert resolve(None, None, 64) == (False, "mosaic_gpu")
    assert resolve(None, None, 32) == (False, "triton")  # wgmma's M: the Mosaic GPU bodies need chunks of 64
    assert resolve(None, None, 128) == (False, "triton")  # by default only at 64 (at 128 head dim 256 would not fit)
    assert resolve(None, "mosaic_gpu", 128) == (False, "mosaic_gpu")  # asked for
    assert resolve(None, "triton", 64) == (False, "triton")
    with pytest.raises(ValueError, match="multiple of 64"):
        resolve(None, "mosaic_gpu", 32)
    with pytest.raises(ValueError, match="backend must be"):
        resolve(None, "cuda", 64)


@pytest.mark.parametrize("t,dk,dv", [(100, 32, 48), pytest.param(300, 32, 48, marks=pytest.mark.slow),
                                     pytest.param(100, 130, 200, marks=pytest.mark.slow)])
def test_grads_under_mosaic_gpu(t, dk, dv):
    """``jax.grad`` under ``backend="mosaic_gpu"`` (the forward, the backward's two walks and its two chunk-gradient
    kernels all run by Mosaic GPU's interpreter) against the Triton backend: negative eigenvalues, ``h0``,
    ``T = 100`` over chunks of 64 (28 tokens of front padding; ``T = 300``: five chunks), head dims 32 and 48 padded to
    64 (key and value dims 130 and 200: 256, four key blocks and two value blocks whose shares XLA adds), a reset
    late in the second chunk and a
    first chunk that ends on a negative cumulative sign (so every factor of both walks reaches the gradients). The loss
    is linear in the outputs, so the cotangents are exact and only the bf16 matmul operands (each rounding worth up to
    ``2^-9`` relative, accumulated over the chunks into ``H``, ``dH`` and ``dh0``) separate the two: agreement to 1%
    of the largest gradient (measured: at most 0.6%, ``dh0`` at head dims 256; 0.1-0.4% for the rest)."""
    (q, k, v, g), kw = _inputs(jnp.float32, seed=1, reset=90, t=t, dk=dk, dv=dv)
    h0 = kw.pop("h0")
    t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    wo = jnp.cos(jnp.arange(t * dv * 1.0)).reshape(1, t, 1, dv)
    ws = jnp.sin(jnp.arange(dk * dv * 1.0)).reshape(1, 1, dk, dv)

    def grads(backend):
        def f(q, k, v, g, h0):
            o, s = gla_chunk_pallas(q, k, v, g, h0=h0, **kw, chunk_size=64, backend=backend)
            return jnp.sum(o * wo) + jnp.sum(s * ws)
        return jax.grad(f, argnums=tuple(range(5)))(q, k, v, g, h0)

    for got, want in zip(grads("mosaic_gpu"), grads("triton"), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-2 * float(jnp.abs(want).max()))


@pytest.mark.slow
def test_bf16_grads_under_mosaic_gpu():
    """bf16 ``q, k, v``: the Mosaic GPU chunk-gradient kernels write ``dQ, dK, dV`` in bf16 (through bf16 shared-memory
    tiles), as the Triton body does; both backends' gradients against the float32 Triton gradients of the same
    (bf16-valued) inputs, to the 3% of bf16 gradients elsewhere in the suite."""
    (q, k, v, g), kw = _inputs(jnp.bfloat16, seed=2, reset=90)
    h0 = kw.pop("h0")

    def grads(backend, *xs):
        def f(q, k, v, g, h0):
            o, s = gla_chunk_pallas(q, k, v, g, h0=h0, **kw, chunk_size=64, backend=backend)
            return jnp.sum(jnp.sin(o)) + jnp.sum(s)
        return jax.grad(f, argnums=tuple(range(5)))(*xs, g, h0)

    want = grads("triton", *(x.astype(jnp.float32) for x in (q, k, v)))
    for backend in ("mosaic_gpu", "triton"):
        got = grads(backend, q, k, v)
        assert [x.dtype for x in got[:3]] == [jnp.bfloat16] * 3, backend
        for x, y in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=3e-2 * float(jnp.abs(y).max()), err_msg=backend)


@pytest.mark.parametrize("kernel", ["gla", "delta", "mlstm"])
def test_mosaic_gpu_refuses_float16(kernel):
    """The Mosaic GPU bodies take float32 or bf16: float16 inputs raise before lowering, naming the backend."""
    x, g = jnp.zeros((1, 64, 1, 64), jnp.float16), jnp.zeros((1, 64, 1), jnp.float32)
    call = {"gla": lambda: gla_chunk_pallas(x, x, x, g, chunk_size=64, backend="mosaic_gpu"),
            "delta": lambda: delta_kernel.delta_chunk(x, x, x, g + 0.5, g, chunk_size=64, backend="mosaic_gpu"),
            "mlstm": lambda: mlstm_kernel.mlstm_chunk(x, x, x, g, g, chunk_size=64, backend="mosaic_gpu")}[kernel]
    with pytest.raises(ValueError, match="backend='mosaic_gpu' takes float32 or bfloat16 q, k, v, got float16"):
        call()
