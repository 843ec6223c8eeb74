r"""Pallas kernels: the chunked (gated) delta rule, forward in three kernels, backward in five (``backward.py``).

Computes, per (batch, head), ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``,
``o_t = scale S_tᵀ q_t`` (DeltaNet, Gated DeltaNet, DeltaProduct's micro-tokens; ``beta`` up to 2 for
negative eigenvalues) with the WY / UT chunked algorithm of ``seqjax.ops.delta``, split as fla
splits it (``chunk_gated_delta_rule_fwd``: ``recompute_w_u`` / ``chunk_fwd_h`` / ``chunk_fwd_o``):

1. ``wy_factors`` (``wy.py``), grid ``(batch, heads, chunks)`` — every chunk at once: ``A = tril(diag(beta)
   K Kᵀ ⊙ Gamma, -1)``, ``X = (I + A)^{-1}`` blocked by 16 (Mosaic GPU, ``wy_mosaic_gpu.py``: row by row in float32
   registers), ``W = X (beta gamma ⊙ K)``, ``U = X (beta ⊙ V)``.
2. ``chunk_states``, the only serial pass — walks the chunks in order with the float32 state on chip
   and does two matmuls per chunk: ``U' = U - W S`` and ``S <- gamma_C S + (K ⊙ to_end)ᵀ U'``. It writes
   the state entering every chunk ``H [b, h, N, K, V]`` and ``U'`` (both in the input dtype, as the
   output's matmuls take them) and the final state (float32). Triton: grid ``(batch, heads, value blocks
   of 64)`` with a ``fori_loop`` over chunks; Mosaic TPU: one chunk per grid step, state in VMEM scratch;
   Mosaic GPU (``mosaic_gpu.py``): Triton's grid, the chunks' tiles copied by TMA, both matmuls ``wgmma``.
3. ``delta_chunk_out``, grid ``(batch, heads, chunks, value blocks of 128)`` — every chunk at once:
   ``O = scale [(gamma ⊙ Q) H + (Q Kᵀ ⊙ Gamma) U']``.

Matmul operands take the input dtype (bf16 allowed) with float32 accumulation; float32 operands run at
``HIGHEST``. Gates enter the state pass and the output kernel as columns ``[C, 1]`` and rows ``[1, C]``, so
one body serves both backends there (the TPU tiling wants 2-D values); the WY kernel keeps one body per
backend (``wy.py``). The cheap elementwise preprocessing
(chunk-local cumulative log decays, document index per token from ``resets``, padding ``T`` to a multiple
of ``C`` and head dims to powers of two >= 16) runs in XLA in the wrapper.

Backward (``custom_vjp``, ``backward="pallas"``, the default): ``backward.py`` — the WY factors again with
the inverse ``X`` itself, the chunk states (``chunk_states`` in float32), the state gradients walking the
chunks backwards, then every chunk's ``dq, dk, dv, dβ`` and log-decay gradients in parallel. Only the
inputs are kept from the forward, so training memory is linear in ``T`` (plus one ``[dk, dv]`` state and
its gradient per chunk while the backward runs). ``backward="xla"`` differentiates through the XLA
chunked form instead (``seqjax.ops.delta.chunk_delta_rule``, with its own residuals). ``impl="auto"``
picks the backward from ``seqjax._platform.AUTO_BACKWARD`` where it takes this kernel (``GPU_TESTED``).

Lowering. GPU: two bodies, picked by ``backend``. ``"triton"`` (``jax.experimental.pallas.triton`` compiler
params) runs every kernel; it is the measured one and the default. ``"mosaic_gpu"`` (``mosaic_gpu.py``; jax 0.11
makes Mosaic GPU the default Pallas lowering and deprecates Triton) gives every kernel a Mosaic GPU body: one
warpgroup per program, TMA copies of each chunk into shared memory, ``wgmma`` for every product, the float32 state
(or state gradient) a loop carry in the ``wgmma`` accumulator layout. Forward: the WY factors (``wy_mosaic_gpu.py``:
``K Kᵀ``, ``W`` and ``U`` by ``wgmma``, ``X = (I + A)^{-1}`` by float32 forward substitution in registers), the
state pass (``U' = U − W S``, the state update) and the output (``Q Kᵀ``, the readout, the intra-chunk product).
Backward, under ``jax.grad``: the WY factors with ``X``, the chunk-state recomputation (the forward's state pass
itself), the state-gradient walk (chunks in reverse, ``dU' = (Q Kᵀ ⊙ Γ)ᵀ dÕ + e^{rev} ⊙ K dS⁺``, ``dS = γ_C dS⁺ + (γ ⊙ Q)ᵀ dÕ − Wᵀ dU'``; it
writes ``dU'``) and the two chunk-parallel gradient kernels (``backward_mosaic_gpu.py``: ``backward.py`` 4a, through
the outputs, the attention and the states, per key block of 64 and value block of up to 128; 4b, through ``W, U``
and ``X``, per chunk, on Triton at chunks of 128, where its shared memory would pass the budget).
It needs ``chunk_size`` a multiple of 64 (``wgmma``'s ``M``) and pads both head dims to at least 64; its matmul
operands are bf16 (float32 inputs rounded; the states, state gradients and ``U'``, ``dU'`` the kernels hand on are
bf16). What runs on Triton under it, while jax ships Triton, where a Mosaic GPU body's shared memory would pass
the budget: 4b at chunks of 128, and the WY factors at chunks of 128 with a head dim of 256. ``backend=None`` on a
GPU takes Triton; once the Mosaic GPU bodies pass their tests compiled on a GPU (``MOSAIC_GPU_COMPILED_TESTS_PASS``), it takes
them under jax >= 0.11 for a chunk size that is a multiple of 64 (``MOSAIC_GPU_DEFAULT``). Without a GPU they lower
for CUDA through ``jax.export`` and run under Mosaic GPU's own interpreter against the XLA chunked form (outputs and
gradients) and the Triton bodies' gradients (``tests/test_pallas_mosaic_gpu_delta.py``). TPU: Mosaic bodies
(``backend="mosaic_tpu"``, automatic on a TPU), compiled by libtpu without a TPU (``tests/test_tpu_compile.py``).

Tests: interpret mode on CPU (``tests/test_pallas_delta.py``); every kernel lowers to Triton and to Mosaic TPU
(``tests/test_pallas_lowering.py``). What has run on which device, and how fast: ``benchmarks/results/``
(``NVIDIA_H200.md``, ``triton_sm90_resources.md``, ``tpu_compile.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._mosaic_gpu import JAX_0_11, check_operand_dtype, resolve_mosaic_gpu
from pallas_kernels.delta_chunk.backward import delta_bwd
from pallas_kernels.delta_chunk.forward import _forward, _kernels, _pow2, _prepare
from seqjax.ops.delta import chunk_delta_rule

__all__ = ["delta_chunk"]

# Every kernel takes its Mosaic GPU body by default on a GPU under
# jax >= 0.11 once those bodies have passed their tests compiled on a GPU (the `tests` stage of
# benchmarks/gpu_check.sh); until then they run only when asked for (backend="mosaic_gpu") and the default stays on
# the measured Triton bodies
MOSAIC_GPU_COMPILED_TESTS_PASS = False
MOSAIC_GPU_DEFAULT = MOSAIC_GPU_COMPILED_TESTS_PASS and JAX_0_11
BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu")


def _resolve(interpret, backend, chunk):
    return resolve_mosaic_gpu(interpret, backend, chunk, default=MOSAIC_GPU_DEFAULT, backends=BACKENDS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _delta_core(qh, kh, vh, bh, g, rev, seg, h0p, c, scale, interpret, backend):
    """The kernels on prepared inputs, differentiated by the Pallas backward (``backward.py``); XLA
    differentiates ``_prepare`` (the gates' cumulative sums, the padding) around it."""
    return _kernels(qh, kh, vh, bh, g, rev, seg, h0p, c=c, scale=scale, interpret=interpret, backend=backend)


def _core_fwd(qh, kh, vh, bh, g, rev, seg, h0p, c, scale, interpret, backend):
    out = _delta_core(qh, kh, vh, bh, g, rev, seg, h0p, c, scale, interpret, backend)
    return out, (qh, kh, vh, bh, g, rev, seg, h0p)


def _core_bwd(c, scale, interpret, backend, res, cts):
    grads = delta_bwd(*res, *cts, c=c, scale=scale, interpret=interpret, backend=backend)
    dq, dk, dv, dbeta, dg, drev, dh0 = grads
    return dq, dk, dv, dbeta, dg, drev, jnp.zeros_like(res[6]), dh0


_delta_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _delta_chunk(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    return _forward(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend)


def _fwd(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    """Under differentiation the XLA chunked form runs the forward and keeps its own residuals.

    This is ``backward="xla"``. Running the kernel forward and then the XLA form's VJP (which recomputes its
    forward) trains slower than XLA alone (1.3x on an H200, ``benchmarks/results/NVIDIA_H200.md``), so this
    path is exactly the XLA chunked form under ``jax.grad``; a forward outside
    ``jax.grad`` (inference, evaluation, prefill) runs the kernel.
    """
    del interpret, backend

    def f(q, k, v, beta, la, h0):
        return chunk_delta_rule(q, k, v, beta, la, h0=h0, resets=rs, scale=scale, chunk_size=chunk_size)

    return jax.vjp(f, q, k, v, beta, la, h0)


def _bwd(scale, chunk_size, interpret, backend, vjp, cts):
    return (*vjp(cts), None)


_delta_chunk.defvjp(_fwd, _bwd)


def delta_chunk(q, k, v, beta, log_alpha=None, *, h0=None, resets=None, scale=1.0, chunk_size=64, interpret=None, backend=None,
                backward="pallas"):
    """Chunked (gated) delta rule through the Pallas kernel.

    Args:
      q, k: ``[b, t, h, dk]`` (``k`` L2-normalised); v: ``[b, t, h, dv]``; float32 or bf16.
      beta: ``[b, t, h]`` in ``[0, 2]``; log_alpha: ``[b, t, h]`` (``<= 0``) or ``None`` (``alpha = 1``).
      h0: ``[b, h, dk, dv]`` or ``None``; resets: ``[b, t]`` bool (``alpha_t = 0`` there) or ``None``.
      chunk_size: rounded up to a power of two >= 16.
      interpret: run the kernel as HLO (CPU); ``None`` = interpret exactly when the backend is CPU.
      backend: ``"triton"`` (GPU, and the CPU interpreter), ``"mosaic_gpu"`` (every kernel on Mosaic GPU,
        ``wy_mosaic_gpu.py``, ``mosaic_gpu.py``, ``backward_mosaic_gpu.py``; chunk a multiple of 64, head dims
        padded to at least 64; interpreted by Mosaic GPU's own interpreter on the CPU) or ``"mosaic_tpu"``; ``None``
        picks by platform (and, once ``MOSAIC_GPU_COMPILED_TESTS_PASS``, jax version: see the module docstring,
        "Lowering").
      backward: what ``jax.grad`` runs: ``"pallas"`` (the kernels of ``backward.py``) or ``"xla"`` (the XLA
        chunked form's forward and backward).

    Returns:
      ``(o [b, t, h, dv] in the inputs' dtype, h_last [b, h, dk, dv] float32)``.
    """
    interpret, backend = _resolve(interpret, backend, _pow2(chunk_size))
    if backward not in ("pallas", "xla"):
        raise ValueError(f"backward must be 'pallas' or 'xla', got {backward!r}")
    dt = jnp.result_type(q, k, v)  # one matmul dtype (the gradients return to each input's own)
    check_operand_dtype(backend, dt)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    la = jnp.zeros((b, t, h), jnp.float32) if log_alpha is None else jnp.asarray(log_alpha, jnp.float32)
    h0 = jnp.zeros((b, h, dk, dv), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)
    rs = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    if backward == "xla":
        return _delta_chunk(q, k, v, beta, la, h0, rs, float(scale), int(chunk_size), bool(interpret), backend)
    args, c, _ = _prepare(q, k, v, beta, la, h0, rs, int(chunk_size), backend)
    o, ht = _delta_core(*args, c, float(scale), bool(interpret), backend)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], ht[:, :, :dk, :dv]
