r"""Pallas kernels: the chunked (gated) delta rule, forward in three kernels, backward in four (``backward.py``).

Computes, per (batch, head), ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``,
``o_t = scale S_tᵀ q_t`` (DeltaNet, Gated DeltaNet, DeltaProduct's micro-tokens; ``beta`` up to 2 for
negative eigenvalues) with the WY / UT chunked algorithm of ``seqjax.ops.delta``, split as fla
splits it (``chunk_gated_delta_rule_fwd``: ``recompute_w_u`` / ``chunk_fwd_h`` / ``chunk_fwd_o``):

1. ``wy_factors`` (``wy.py``), grid ``(batch, heads, chunks)`` — every chunk at once: ``A = tril(diag(beta)
   K Kᵀ ⊙ Gamma, -1)``, ``X = (I + A)^{-1}`` blocked by 16, ``W = X (beta gamma ⊙ K)``, ``U = X (beta ⊙ V)``.
2. ``chunk_states``, the only serial pass — walks the chunks in order with the float32 state on chip
   and does two matmuls per chunk: ``U' = U - W S`` and ``S <- gamma_C S + (K ⊙ to_end)ᵀ U'``. It writes
   the state entering every chunk ``H [b, h, N, K, V]`` and ``U'`` (both in the input dtype, as the
   output's matmuls take them) and the final state (float32). Triton: grid ``(batch, heads, value blocks
   of 64)`` with a ``fori_loop`` over chunks; Mosaic TPU: one chunk per grid step, state in VMEM scratch.
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
chunked form instead (``seqjax.ops.delta.chunk_delta_rule``, with its own residuals); that is
what ``impl="auto"`` asks for, once it takes this kernel at all (``seqjax._platform.GPU_TESTED``).

Lowering. GPU: the **Triton** lowering (``jax.experimental.pallas.triton`` compiler params). Why, with
jax 0.11.2 where Mosaic GPU is the default: these kernels are chains of small ``[C, C]`` / ``[C, d]``
block matmuls with masks and a sequential loop per program — exactly the block-level programming
model of Triton (and of fla's Triton kernels they are benchmarked against), where the compiler does
shared-memory staging, ``mma`` selection and software pipelining. Mosaic GPU requires writing that by
hand at warpgroup level (explicit SMEM buffers, TMA copies, barriers, ``wgmma`` layouts); a port is a
rewrite, left for a later GPU session. TPU: Mosaic bodies (``backend="mosaic_tpu"``, automatic on a TPU),
interpret-tested and checked to lower to Mosaic (``tests/test_pallas_lowering.py``); not yet run on a TPU.

Status: interpret-mode tests on CPU (``tests/test_pallas_delta.py``, CI); every kernel lowers to Triton and
to Mosaic TPU on this CPU (``tests/test_pallas_lowering.py``). Measured on an NVIDIA H200
(``benchmarks/results/NVIDIA_H200.md``, B=8, H=16, D=128, bf16), the two-kernel forward of 2026-11-27 (the
output computed inside the serial pass, ``Q Kᵀ ⊙ Gamma`` recomputed per value block) was **1.98x (T = 2k)
and 2.06x (T = 8k)** the XLA chunked form's, 0.38x fla's ``chunk_gated_delta_rule`` forward. The
three-kernel split above (2026-11-27) takes every ``[C, C]`` product out of the serial pass; it and the
backward kernels have not been compiled or timed on a GPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._util import chunk_block, mm, out_specs, resolve, tpu_params, triton_params
from pallas_kernels.delta_chunk.wy import chunk_gamma, wy_factors
from seqjax.ops.delta import chunk_delta_rule

__all__ = ["delta_chunk", "chunk_states"]

f32 = jnp.float32
_HI = lax.Precision.HIGHEST
_NN = (((1,), (0,)), ((), ()))  # X Y
_TN = (((0,), (0,)), ((), ()))  # Xᵀ Y
_NT = (((1,), (1,)), ((), ()))  # X Yᵀ


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _mm(x, y, dims=_NN):
    """Matmul with float32 accumulation; float32 operands at ``HIGHEST`` (the MXU/TF32 default passes are
    bf16-like), lower-precision operands at their native precision (``_util.mm``)."""
    return mm(x, y, dims, precision=_HI)


def _col_factors(gc, rc, sc):
    """Column gates ``[C, 1]`` -> ``γ, e^{rev}`` (masked to the chunk's first / last document) ``[C, 1]``,
    ``γ_C [1, 1]``."""
    c = gc.shape[0]
    last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    end = lambda x: jnp.sum(jnp.where(last, x, 0.0), axis=0, keepdims=True)  # noqa: E731
    g_last, s_last = end(gc), end(sc)
    gamma = chunk_gamma(gc, sc)
    total = jnp.where(s_last == 0.0, jnp.exp(g_last), 0.0)
    to_end = jnp.where(sc == s_last, jnp.exp(rc), 0.0)
    return gamma, total, to_end


def _decay_incl(gc, sc, gr, sr):
    """``Γ_ts = e^{g_t − g_s}`` for ``s ≤ t`` in one document, else 0 (masked before ``exp``)."""
    c = gc.shape[0]
    ok = (lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (sc == sr)
    return jnp.where(ok, jnp.exp(jnp.where(ok, gc - gr, 0.0)), 0.0)


def _state_step(k, w, u, gc, rc, sc, s):
    """``U' = U − W S`` and ``S⁺ = γ_C S + (K ⊙ e^{rev})ᵀ U'`` (float32)."""
    md = k.dtype
    _, total, to_end = _col_factors(gc, rc, sc)
    u_new = u.astype(f32) - _mm(w, s.astype(md))
    return total * s + _mm((k.astype(f32) * to_end).astype(md), u_new.astype(md), _TN), u_new


def _chunk_out(q, k, un, gc, sc, gr, sr, s, scale):
    """``O = scale [(γ ⊙ Q) S + (Q Kᵀ ⊙ Γ) U']`` for one chunk; ``s`` and ``un`` in the input dtype."""
    md = q.dtype
    gamma = chunk_gamma(gc, sc)
    qk = (_mm(q, k, _NT) * _decay_incl(gc, sc, gr, sr)).astype(md)
    return scale * (_mm((q.astype(f32) * gamma).astype(md), s) + _mm(qk, un))


# ----------------------------------------------------------------------------- kernels


def _states_kernel(k_ref, w_ref, u_ref, gc_ref, rc_ref, sc_ref, h0_ref, hs_ref, ht_ref, un_ref=None, *, c, n):
    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        hs_ref[i] = s.astype(hs_ref.dtype)
        s, u_new = _state_step(k_ref[sl, :], w_ref[sl, :], u_ref[sl, :], gc_ref[sl, :], rc_ref[sl, :], sc_ref[sl, :], s)
        if un_ref is not None:
            un_ref[sl, :] = u_new.astype(un_ref.dtype)
        return s

    ht_ref[...] = lax.fori_loop(0, n, body, h0_ref[...].astype(f32))


def _states_kernel_tpu(k_ref, w_ref, u_ref, gc_ref, rc_ref, sc_ref, h0_ref, hs_ref, ht_ref, *rest):
    *un_ref, s_scr = rest

    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(f32)

    s = s_scr[...]
    hs_ref[...] = s.astype(hs_ref.dtype)
    s, u_new = _state_step(k_ref[...], w_ref[...], u_ref[...], gc_ref[...], rc_ref[...], sc_ref[...], s)
    s_scr[...] = s
    if un_ref:
        un_ref[0][...] = u_new.astype(un_ref[0].dtype)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = s


def _out_kernel(q_ref, k_ref, un_ref, gc_ref, sc_ref, gr_ref, sr_ref, h_ref, o_ref, *, scale):
    o = _chunk_out(q_ref[...], k_ref[...], un_ref[...], gc_ref[...], sc_ref[...], gr_ref[...], sr_ref[...],
                   h_ref[...], scale)
    o_ref[...] = o.astype(o_ref.dtype)


# ----------------------------------------------------------------------------- drivers


def chunk_states(kh, w, u, g, rev, seg, h0p, *, c, interpret, backend, dtype=f32, with_u_new=False):
    """The serial pass on either backend: the state entering every chunk ``H [b, h, N, Kp, Vp]`` in
    ``dtype``, the final state ``[b, h, Kp, Vp]`` float32 and, with ``with_u_new``, ``U' = U − W S``
    ``[b, h, Tp, Vp]`` in the input dtype. Gates ``g, rev, seg [b, h, Tp]`` float32."""
    b, h, tp, kp = kh.shape
    vp, n = u.shape[-1], tp // c
    cols = [x[..., None] for x in (g, rev, seg)]  # [b, h, Tp, 1]
    out_shape = [jax.ShapeDtypeStruct((b, h, n, kp, vp), dtype), jax.ShapeDtypeStruct((b, h, kp, vp), f32)]
    out_shape += [jax.ShapeDtypeStruct((b, h, tp, vp), u.dtype)] if with_u_new else []
    if backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        blk = lambda d: chunk_block(c, d)  # noqa: E731
        whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
        chunk_state = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, l, 0, 0))
        return pl.pallas_call(
            _states_kernel_tpu, grid=(b, h, n),
            in_specs=[blk(kp), blk(kp), blk(vp), blk(1), blk(1), blk(1), whole],
            out_specs=[chunk_state, whole] + ([blk(vp)] if with_u_new else []), out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((kp, vp), f32)], interpret=interpret,
            compiler_params=tpu_params(interpret, "parallel", "parallel", "arbitrary"), name="delta_chunk_states_tpu",
        )(kh, w, u, *cols, h0p)
    bv = min(vp, 64)
    full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))  # noqa: E731
    vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
    vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
    vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
    return pl.pallas_call(
        functools.partial(_states_kernel, c=c, n=n), grid=(b, h, vp // bv),
        in_specs=[full(kp), full(kp), vseq, full(1), full(1), full(1), vstate],
        out_specs=[vstates, vstate] + ([vseq] if with_u_new else []), out_shape=out_shape, interpret=interpret,
        compiler_params=triton_params(interpret, backend, num_warps=4, num_stages=1), name="delta_chunk_states",
    )(kh, w, u, *cols, h0p)


def _chunk_gates(la, rs, c, n):
    """``[b, h, n*c]`` chunk-local inclusive cumsum ``g``, exclusive reverse cumsum ``rev`` of the
    log decays, and the document index ``seg`` of each token inside its chunk (float32)."""
    b, h = la.shape[:2]
    la = la.reshape(b, h, n, c)
    g = jnp.cumsum(la, -1)
    rev = jnp.flip(jnp.cumsum(jnp.flip(la, -1), -1), -1)
    rev = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], -1)
    seg = jnp.cumsum(rs.reshape(b, 1, n, c).astype(jnp.float32), -1)
    seg = jnp.broadcast_to(seg, g.shape)
    return tuple(x.reshape(b, h, n * c) for x in (g, rev, seg))


def _prepare(q, k, v, beta, la, h0, rs, chunk_size):
    """The XLA preprocessing (differentiable): heads-first inputs padded to ``Tp = n C`` and head dims to
    powers of two, ``beta [b, h, Tp]`` and the chunk gates ``g, rev, seg [b, h, Tp]`` (``_chunk_gates``)."""
    b, t, h, dk = q.shape
    c = _pow2(chunk_size)
    n = -(-t // c)
    tp, dkp, dvp = n * c, _pow2(dk), _pow2(v.shape[-1])

    def heads_first(x, d):  # [b, t, h, d] -> [b, h, tp, d_pad], zero padded
        x = jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])])
        return jnp.moveaxis(x, 2, 1)

    pad_t = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    la = jnp.where(rs[..., None], 0.0, la.astype(jnp.float32))
    bh = jnp.moveaxis(pad_t(beta.astype(jnp.float32)), 2, 1)
    g, rev, seg = _chunk_gates(jnp.moveaxis(pad_t(la), 2, 1), pad_t(rs), c, n)
    h0p = jnp.pad(h0.astype(jnp.float32), [(0, 0), (0, 0), (0, dkp - dk), (0, dvp - v.shape[-1])])
    return (heads_first(q, dkp), heads_first(k, dkp), heads_first(v, dvp), bh, g, rev, seg, h0p), c, n


def _kernels(qh, kh, vh, bh, g, rev, seg, h0p, *, c, scale, interpret, backend):
    """The three forward kernels on prepared inputs: ``(o [b, h, Tp, Vp] input dtype, S_T [b, h, Kp, Vp]
    float32)``."""
    b, h, tp, kp = qh.shape
    vp, n = vh.shape[-1], tp // c
    dtype = jnp.result_type(qh, kh, vh)
    tpu = backend == "mosaic_tpu"
    w, u = wy_factors(kh, vh, bh, g, seg, c=c, interpret=interpret, backend=backend)
    hs, ht, un = chunk_states(kh, w, u, g, rev, seg, h0p, c=c, interpret=interpret, backend=backend, dtype=dtype,
                              with_u_new=True)
    bv, blk, rblk, vblk, params = out_specs(c, vp, interpret=interpret, backend=backend)
    o = pl.pallas_call(
        functools.partial(_out_kernel, scale=scale), grid=(b, h, n, vp // bv),
        in_specs=[blk(kp), blk(kp), vblk, blk(1), blk(1), rblk, rblk,
                  pl.BlockSpec((None, None, None, kp, bv), lambda i, j, l, z: (i, j, l, 0, z))],
        out_specs=vblk, out_shape=jax.ShapeDtypeStruct((b, h, tp, vp), dtype), interpret=interpret,
        compiler_params=params, name="delta_chunk_out" + ("_tpu" if tpu else ""),
    )(qh, kh, un, g[..., None], seg[..., None], g.reshape(b, h, n, 1, c), seg.reshape(b, h, n, 1, c), hs)
    return o, ht


def _forward(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    args, c, _ = _prepare(q, k, v, beta, la, h0, rs, chunk_size)
    o, ht = _kernels(*args, c=c, scale=float(scale), interpret=interpret, backend=backend)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], ht[:, :, :dk, :dv]



@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _delta_core(qh, kh, vh, bh, g, rev, seg, h0p, c, scale, interpret, backend):
    """The kernels on prepared inputs, differentiated by the Pallas backward (``backward.py``); XLA
    differentiates ``_prepare`` (the gates' cumulative sums, the padding) around it."""
    return _kernels(qh, kh, vh, bh, g, rev, seg, h0p, c=c, scale=scale, interpret=interpret, backend=backend)


def _core_fwd(qh, kh, vh, bh, g, rev, seg, h0p, c, scale, interpret, backend):
    out = _delta_core(qh, kh, vh, bh, g, rev, seg, h0p, c, scale, interpret, backend)
    return out, (qh, kh, vh, bh, g, rev, seg, h0p)


def _core_bwd(c, scale, interpret, backend, res, cts):
    from pallas_kernels.delta_chunk.backward import delta_bwd

    grads = delta_bwd(*res, *cts, c=c, scale=scale, interpret=interpret, backend=backend)
    dq, dk, dv, dbeta, dg, drev, dh0 = grads
    return dq, dk, dv, dbeta, dg, drev, jnp.zeros_like(res[6]), dh0


_delta_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _delta_chunk(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    return _forward(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend)


def _fwd(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    """Under differentiation the XLA chunked form runs the forward and keeps its own residuals.

    This is ``backward="xla"``. Measured on an H200 (``benchmarks/results/NVIDIA_H200.md``, session 3): running
    the kernel forward and then the XLA form's VJP (which recomputes its forward) made training 1.3x slower
    than XLA alone, so this path is exactly the XLA chunked form under ``jax.grad``; a forward outside
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
      backend: ``"triton"`` (GPU, and the CPU interpreter) or ``"mosaic_tpu"``; ``None`` picks by platform.
      backward: what ``jax.grad`` runs: ``"pallas"`` (the kernels of ``backward.py``) or ``"xla"`` (the XLA
        chunked form's forward and backward).

    Returns:
      ``(o [b, t, h, dv] in the inputs' dtype, h_last [b, h, dk, dv] float32)``.
    """
    interpret, backend = resolve(interpret, backend)
    if backward not in ("pallas", "xla"):
        raise ValueError(f"backward must be 'pallas' or 'xla', got {backward!r}")
    dt = jnp.result_type(q, k, v)  # one matmul dtype (the gradients return to each input's own)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    la = jnp.zeros((b, t, h), jnp.float32) if log_alpha is None else jnp.asarray(log_alpha, jnp.float32)
    h0 = jnp.zeros((b, h, dk, dv), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)
    rs = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    if backward == "xla":
        return _delta_chunk(q, k, v, beta, la, h0, rs, float(scale), int(chunk_size), bool(interpret), backend)
    args, c, _ = _prepare(q, k, v, beta, la, h0, rs, int(chunk_size))
    o, ht = _delta_core(*args, c, float(scale), bool(interpret), backend)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], ht[:, :, :dk, :dv]
