r"""Pallas kernels: the chunkwise mLSTM (xLSTM's matrix memory) with its stabilised exponential gating.

Computes ``seqjax.ops.mlstm``'s recurrence (see that module for the equations): per head, forget gate
``σ(f)``, exponential input gate ``e^{i}``, stabiliser ``m``, memory ``C [dk, dv]``, normaliser
``n [dk]``; ``h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, e^{-m_t})``.

How it works (the split of NX-AI's ``mlstm_kernels`` chunkwise kernels and of fla: a short serial pass
for the states, the outputs chunk-parallel)
    Per chunk of ``C`` tokens, as the XLA chunked form (``seqjax.ops.mlstm.chunk_mlstm``): ``b`` the
    cumulative log forget gate within the chunk, log weights ``w_ts = b_t − b_s + i_s`` (causal, one
    document). Chunk level, in XLA (``chunk_stabilisers``; vectors only, associative scans): the
    stabiliser ``m`` entering each chunk, the chunk's write weights ``ε_s = e^{b_C − b_s + i_s − m⁺}`` and
    carry ``φ = e^{b_C + m − m⁺}`` with ``m⁺ = max(b_C + m, max_s (b_C − b_s + e_s))``, and the normaliser
    ``n'`` entering each chunk. Then two kernels:

    1. ``chunk_states``, the only serial pass: ``C'⁺ = φ C' + (K ⊙ ε)ᵀ V``, writing the ``C'`` entering
       every chunk (input dtype) and the final one (float32). Triton: grid ``(batch, heads, value blocks
       of 64)``, a ``fori_loop`` over chunks; Mosaic TPU: one chunk per grid step, state in VMEM scratch.
    2. ``mlstm_chunk_out``, grid ``(batch, heads, chunks, value blocks of 128)``, every chunk at once: the row
       stabiliser
       ``m_t = max(max_s w_ts, b_t + m)``, ``D = e^{w − m_t}``, ``ρ = e^{b + m − m_t}``,
       ``O = ((Q Kᵀ ⊙ D) V + ρ ⊙ Q C') / max(|(Q Kᵀ ⊙ D) 1 + ρ ⊙ Q n'|, e^{−m_t})``.

    Every ``exp`` but the floor ``e^{−m_t}`` sees an argument ``≤ 0``. The elementwise preparation (cumulative gates, document
    index, the reset-aware stabiliser term, ``k / √dk``, padding) runs in XLA in the wrapper. Gates enter
    the chunk-parallel kernel as columns ``[C, 1]`` and rows ``[1, C]``, so one body serves both backends.

Backward (``custom_vjp``, ``backward="pallas"``, the default): ``backward.py`` — the output does not depend on
the stabiliser, so every stabiliser is held constant and the backward is a gated linear attention's with the
normaliser as an extra value column: the chunk states recomputed (``chunk_states``, float32), per-row
``1/den`` and the normaliser's gradient, the state gradients walking the chunks backwards, then every
chunk's ``dq, dk, dv`` and gate gradients in parallel. Only the inputs are kept from the forward. The final
``m`` is recomputed in XLA (``_final_m``) so its gradient reaches the winning gate as in the reference.
``backward="xla"`` runs the XLA chunked form's forward and backward under ``jax.grad``. ``impl="auto"`` picks
the backward from ``seqjax._platform.AUTO_BACKWARD`` where it takes this kernel (``GPU_TESTED``).

Lowering: jax 0.11 makes Mosaic GPU the default Pallas lowering on a GPU and deprecates Triton. The forward
has two GPU bodies, picked by ``backend``: ``"triton"`` (``forward.py``'s ``pallas_call`` bodies, asking for the
Triton lowering explicitly) and ``"mosaic_gpu"`` (``mosaic_gpu.py``, both forward kernels as one warpgroup
each: the state pass per (batch, head, value block of 64) walking the chunks with the float32 ``C'`` as the
loop carry, the outputs per (chunk, value block); TMA copies, ``wgmma`` for ``Kᵀ (ε ⊙ V)``, ``Q Kᵀ``,
``(Q Kᵀ ⊙ D) V`` and ``Q C'``, bf16 operands; chunk a multiple of 64, head dims padded on to 64).
``backend=None`` on a GPU takes Triton; once the Mosaic GPU bodies pass their tests compiled on a GPU
(``MOSAIC_GPU_COMPILED_TESTS_PASS``) it takes **Mosaic GPU under jax >= 0.11** for a chunk size that is a
multiple of 64 (``MOSAIC_GPU_DEFAULT``). Under ``"mosaic_gpu"`` the backward's kernels take Mosaic GPU bodies
too, so that ``jax.grad`` runs no Triton kernel: the two serial passes (``mosaic_gpu.py``: the states
recomputed, the forward's state pass with float32 states out, and the state-gradient walk
``dC' = φ dC'⁺ + Qᵀ (ρ/den ⊙ dO)``, the same body walking the chunks backwards) and the chunk-parallel ones
(``backward_mosaic_gpu.py``): the rows per (chunk, value block of 64), each writing its value block's share of
the row sum of ``dO ⊙ num`` that ``1/den`` and ``dr`` need (XLA adds the shares), and the chunk gradients as
two kernels, ``dq, dk, db, di`` per (chunk, key block of 64 × value block of up to 128, the value blocks' shares
added in XLA) and ``dv`` per (chunk, value block of 64); at most 187 KiB of shared memory a block at head dims
of 256. The Mosaic GPU bodies lower for CUDA through ``jax.export`` and run against the XLA chunked form,
forward and gradients, under Mosaic GPU's own interpreter on the CPU (``tests/test_pallas_mosaic_gpu_mlstm.py``);
ptxas, the register budget of the gradient kernels and the speed need a GPU. TPU: Mosaic bodies
(``backend="mosaic_tpu"``, automatic on a TPU), compiled by libtpu without a TPU (``tests/test_tpu_compile.py``).

Tests: interpret mode on CPU (``tests/test_pallas_mlstm.py``); every kernel lowers to Triton and to Mosaic
TPU (``tests/test_pallas_lowering.py``); the forward and the whole backward also to Mosaic GPU
(``tests/test_pallas_mosaic_gpu_mlstm.py``).
What has run on which device, and how fast: ``benchmarks/results/``
(``NVIDIA_H200.md``, ``triton_sm90_resources.md``, ``tpu_compile.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._mosaic_gpu import JAX_0_11, check_operand_dtype, resolve_mosaic_gpu
from pallas_kernels._util import check_chunk_size
from pallas_kernels.mlstm_chunk.backward import mlstm_bwd
from pallas_kernels.mlstm_chunk.forward import NEG, _core, _forward, _pad_state, _pow2, _prepare
from seqjax.ops.mlstm import chunk_mlstm

__all__ = ["mlstm_chunk"]

# The forward takes its Mosaic GPU bodies by default on a GPU under jax >= 0.11 once they have passed their tests
# compiled on a GPU (the `tests` stage of benchmarks/gpu_check.sh); until then they run only when asked for
# (backend="mosaic_gpu") and the default stays on the measured Triton bodies
MOSAIC_GPU_COMPILED_TESTS_PASS = False
MOSAIC_GPU_DEFAULT = MOSAIC_GPU_COMPILED_TESTS_PASS and JAX_0_11
BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu")


def _resolve(interpret, backend, chunk):
    return resolve_mosaic_gpu(interpret, backend, chunk, default=MOSAIC_GPU_DEFAULT, backends=BACKENDS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _mlstm(q, k, v, i, f, h0, resets, chunk, interpret, backend):
    return _forward(q, k, v, i, f, h0, resets, chunk, interpret, backend)


def _fwd(q, k, v, i, f, h0, resets, chunk, interpret, backend):
    """Under differentiation the XLA chunked form runs forward and backward (see the module docstring)."""
    del interpret, backend
    out, vjp = jax.vjp(lambda q, k, v, i, f, h0: chunk_mlstm(q, k, v, i, f, h0, resets, chunk), q, k, v, i, f, h0)
    return out, (vjp, resets)


def _bwd(chunk, interpret, backend, res, cts):
    vjp, resets = res
    return (*vjp(cts), None if resets is None else jnp.zeros_like(resets, jnp.float32))


_mlstm.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _mlstm_core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, interpret, backend):
    """The kernel on prepared inputs, differentiated by ``backward.py`` with every stabiliser held constant
    (the returned ``m`` gets no gradient: ``mlstm_chunk`` rescales the state to an ``m`` XLA differentiates)."""
    return _core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk=chunk, interpret=interpret, backend=backend)


def _core_fwd(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, interpret, backend):
    out = _mlstm_core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, interpret, backend)
    return out, (qh, kh, vh, bt, st, it, et, C0, n0, m0)


def _core_bwd(chunk, interpret, backend, res, cts):
    do, (dCt, dnt, _) = cts
    dq, dk, dv, db, di, (dC0, dn0, dm0) = mlstm_bwd(*res, do, dCt, dnt, chunk=chunk, interpret=interpret,
                                                    backend=backend)
    zero = jnp.zeros_like(res[4])
    return dq, dk, dv, db, zero, di, zero, dC0, dn0, dm0


_mlstm_core.defvjp(_core_fwd, _core_bwd)


def _final_m(i, f, resets, m0):
    """The reference's final stabiliser ``m_T = max(Σ log σ(f) + m_0, max_s Σ_{u>s} log σ(f_u) + e_s)`` over the
    last document (``e_s = max(i_s, log σ(f_s))`` at a reset token, else ``i_s``), in XLA so that its
    gradient reaches the winning gate as the reference's chain of maxima sends it."""
    logf = jax.nn.log_sigmoid(f.astype(jnp.float32))
    i = i.astype(jnp.float32)
    cut = jnp.zeros(i.shape[:2], bool) if resets is None else jnp.asarray(resets).astype(bool)
    e = jnp.where(cut[..., None], jnp.maximum(i, logf), i)
    after = jnp.flip(jnp.cumsum(jnp.flip(logf, 1), 1), 1) - logf  # Σ_{u>s} log σ(f_u), without cancellation
    seg = jnp.cumsum(cut, axis=1)
    live = (seg == seg[:, -1:])[..., None]
    z = jnp.max(jnp.where(live, after + e, NEG), axis=1)  # [b, h]
    z0 = jnp.where((seg[:, -1] == 0)[:, None], jnp.sum(logf, axis=1) + m0.astype(jnp.float32), NEG)
    return jnp.maximum(z0, z)


def mlstm_chunk(q, k, v, i, f, *, h0=None, resets=None, chunk_size=64, interpret=None, backend=None,
                backward="pallas"):
    """The chunkwise mLSTM through the Pallas kernel; same contract as ``seqjax.mixers.mlstm.mlstm``.

    Args:
      q, k: ``[b, t, h, dk]``; v: ``[b, t, h, dv]`` (float32 or bf16); i, f: ``[b, t, h]`` gate
        pre-activations; h0: ``(C [b, h, dk, dv], n [b, h, dk], m [b, h])`` or ``None``;
        resets: ``[b, t]`` bool or ``None``. chunk_size: a power of two ``>= 16``.
      interpret: run as HLO (CPU); ``None`` = interpret exactly when the backend is CPU.
      backend: ``"triton"`` (GPU, and the CPU interpreter), ``"mosaic_gpu"`` (the Mosaic GPU bodies of the forward
        and of every backward kernel, ``mosaic_gpu.py`` and ``backward_mosaic_gpu.py``; chunk_size a multiple of 64;
        on the CPU Mosaic GPU's interpreter) or ``"mosaic_tpu"``; ``None`` picks by platform and jax version (module
        docstring, "Lowering").
      backward: what ``jax.grad`` runs: ``"pallas"`` (``backward.py``) or ``"xla"`` (the XLA chunked form's
        forward and backward).

    Returns:
      ``(y [b, t, h, dv] float32, (C, n, m))``.
    """
    if backward not in ("pallas", "xla"):
        raise ValueError(f"backward must be 'pallas' or 'xla', got {backward!r}")
    dt = jnp.result_type(q, k, v)  # one matmul dtype (the gradients return to each input's own)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    check_chunk_size(chunk_size)
    interpret, backend = _resolve(interpret, backend, chunk_size)
    check_operand_dtype(backend, dt)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if h0 is None:
        h0 = (jnp.zeros((b, h, dk, dv), jnp.float32), jnp.zeros((b, h, dk), jnp.float32), jnp.zeros((b, h), jnp.float32))
    rs = None if resets is None else jnp.asarray(resets).astype(jnp.float32)
    # a short sequence takes a shorter chunk, except on Mosaic GPU (wgmma's M: chunks of 64)
    chunk = int(chunk_size) if backend == "mosaic_gpu" else min(int(chunk_size), max(16, _pow2(t)))
    if backward == "xla":
        return _mlstm(q, k, v, i, f, tuple(h0), rs, chunk, bool(interpret), backend)
    qh, kh, vh, bt, st, it, et, _ = _prepare(q, k, v, i, f, rs, chunk, backend)
    C0, n0, m0 = _pad_state(h0, qh.shape[-1], vh.shape[-1])
    o, (Ck, nk, mk) = _mlstm_core(qh, kh, vh, bt, st, it, et, C0, n0, m0, chunk, bool(interpret), backend)
    m_t = _final_m(i, f, rs, h0[2])
    rescale = jnp.exp(lax.stop_gradient(mk) - m_t)  # ~1: the same maximum, computed twice
    y = jnp.moveaxis(o, 1, 2)[:, :t, :, :dv]
    return y, (Ck[:, :, :dk, :dv] * rescale[..., None, None], nk[:, :, :dk] * rescale[..., None], m_t)
