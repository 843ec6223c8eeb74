r"""Pallas kernels: the chunked (gated) delta rule, forward in two kernels, backward in four (``backward.py``).

Computes, per (batch, head), ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``,
``o_t = scale S_tᵀ q_t`` (DeltaNet, Gated DeltaNet, DeltaProduct's micro-tokens; ``beta`` up to 2 for
negative eigenvalues) with the WY / UT chunked algorithm of ``seqjax.mixers._delta_chunk``, split as fla
splits it:

1. ``delta_chunk_wy``, grid ``(batch, heads, chunks)`` — every chunk at once: ``A = tril(diag(beta) K Kᵀ ⊙
   Gamma, -1)`` (decays in log space, masked before ``exp``), ``X = (I + A)^{-1}`` blocked by 16: each
   diagonal ``16 x 16`` block by forward substitution (15 row steps, all diagonal blocks in one loop), the
   blocks below by block substitution ``X_ij = -X_ii sum_{j<=m<i} A_im X_mj`` in small matmuls; then
   ``W = X (beta gamma ⊙ K)`` and ``U = X (beta ⊙ V)``, written in the input dtype. Sub-blocks are loaded
   from the refs at static offsets: the GPU lowering has no value slicing.
2. ``delta_chunk_fwd``, grid ``(batch, heads, value blocks of 64)`` — walks the chunks in order with the
   ``[dk, 64]`` float32 state on chip: ``U_new = U - W S``, ``O = (gamma ⊙ Q) S + (Q Kᵀ ⊙ Gamma) U_new``,
   ``S <- gamma_C S + (K ⊙ to_end)ᵀ U_new``; matmul operands in the input dtype, float32 accumulation.

The cheap elementwise preprocessing (chunk-local cumulative log decays, document index per token from
``resets``, padding ``T`` to a multiple of ``C`` and head dims to powers of two >= 16) runs in XLA in the
wrapper.

Backward (``custom_vjp``, ``backward="pallas"``, the default): four more kernels in ``backward.py`` —
the WY factors again with the inverse ``X`` itself, the chunk states, the state gradients walking the
chunks backwards, then every chunk's ``dq, dk, dv, dβ`` and log-decay gradients in parallel. Only the
inputs are kept from the forward, so training memory is linear in ``T`` (plus one ``[dk, dv]`` state and
its gradient per chunk while the backward runs). ``backward="xla"`` differentiates through the XLA
chunked form instead (``seqjax.mixers._delta_chunk.delta_rule_chunked``, with its own residuals); that is
what ``impl="auto"`` does until the Pallas backward has been timed on a GPU.

Lowering. GPU: the **Triton** lowering (``jax.experimental.pallas.triton`` compiler params). Why, with
jax 0.11.2 where Mosaic GPU is the default: these kernels are chains of small ``[C, C]`` / ``[C, d]``
block matmuls with masks and a sequential loop per program — exactly the block-level programming
model of Triton (and of fla's Triton kernels they are benchmarked against), where the compiler does
shared-memory staging, ``mma`` selection and software pipelining. Mosaic GPU requires writing that by
hand at warpgroup level (explicit SMEM buffers, TMA copies, barriers, ``wgmma`` layouts); a port is a
rewrite, left for a later GPU session. TPU: separate Mosaic bodies (``backend="mosaic_tpu"``, automatic on a
TPU; one chunk per grid step, state in VMEM scratch, gates as columns and rows), interpret-tested and
checked to lower to Mosaic (``tests/test_pallas_lowering.py``); not yet run on a TPU.

Status: interpret-mode tests on CPU (``tests/test_pallas_delta.py``, CI); the forward's tests pass compiled
with the Triton lowering on an NVIDIA H200 with jax 0.11.2 (``benchmarks/gpu_check.sh``, 2026-11-27). The
backward kernels (2026-11-27, after that GPU session) are interpret-tested and lower to Triton and to Mosaic
TPU on this CPU (``tests/test_pallas_lowering.py``); not yet compiled or timed on a GPU.
Speed there (``benchmarks/results/NVIDIA_H200.md``, B=8, H=16, D=128, bf16): the forward is **1.98x
(T = 2k) and 2.06x (T = 8k)** the XLA chunked form's (the single-kernel version of 2026-11-26 was
1.06-1.10x), and 0.38x fla's ``chunk_gated_delta_rule`` forward. What is left: the state pass still
computes ``Q Kᵀ ⊙ Gamma`` per chunk and per value block inside its serial loop; fla computes it
chunk-parallel and keeps only ``W S`` and ``Kᵀ U`` in the serial pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._util import resolve, tpu_params, triton_params

__all__ = ["delta_chunk"]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


SUB = 16  # sub-block of the in-kernel triangular inverse (the smallest GPU ``dot``)


def _dot(a, b, precision=None):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _dot_t(a, b, transpose_a):  # aᵀ b or a bᵀ without materialising the transpose
    dims = (((0,), (0,)), ((), ())) if transpose_a else (((1,), (1,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _decay(g_i, g_j, seg_i, seg_j, mask=None):
    """``exp(g_t - g_s)`` where ``seg_t == seg_s`` (and ``mask``), else 0; masked *before* ``exp``."""
    same = seg_i[:, None] == seg_j[None, :]
    if mask is not None:
        same = same & mask
    return jnp.where(same, jnp.exp(jnp.where(same, g_i[:, None] - g_j[None, :], 0.0)), 0.0)


def _block_inverse(a, diag):
    """``X = (I + A)^{-1}`` by blocks from the diagonal blocks' inverses ``diag[i]`` and the ``16 x 16``
    blocks ``a[i, j]`` (``j <= i``) of ``A``: ``X_ij = -X_ii sum_{j<=m<i} A_im X_mj`` (float32, HIGHEST)."""
    hi = lax.Precision.HIGHEST
    x = {(i, i): d for i, d in enumerate(diag)}
    for i in range(1, len(diag)):
        for j in range(i - 1, -1, -1):
            acc = sum(_dot(a[i, m], x[m, j], hi) for m in range(j, i))
            x[i, j] = -_dot(x[i, i], acc, hi)
    return x


def _write_wy(x, kb, vb, blk, w_ref, u_ref, x_ref=None):
    """``W = X kb``, ``U = X vb`` block row by block row (``X`` block lower triangular); with ``x_ref``
    (the backward) also ``X`` itself ``[C, C]`` float32, each block row assembled by ``[16, 16] x [16, C]``
    placement matmuls (exact at ``HIGHEST``; no lane-offset stores, which the GPU and TPU lowerings lack)."""
    hi = lax.Precision.HIGHEST
    c = len(blk) * SUB
    for i, rows in enumerate(blk):
        w_ref[rows, :] = sum(_dot(x[i, j], kb[j], hi) for j in range(i + 1)).astype(w_ref.dtype)
        u_ref[rows, :] = sum(_dot(x[i, j], vb[j], hi) for j in range(i + 1)).astype(u_ref.dtype)
        if x_ref is not None:
            r, col = lax.broadcasted_iota(jnp.int32, (SUB, c), 0), lax.broadcasted_iota(jnp.int32, (SUB, c), 1)
            x_ref[rows, :] = sum(_dot(x[i, j], jnp.where(col == r + j * SUB, 1.0, 0.0), hi) for j in range(i + 1))


def _wy_kernel(k_ref, v_ref, b_ref, g_ref, s_ref, w_ref, u_ref, x_ref=None, *, c):
    """One chunk: ``X = (I + tril(diag(beta) K Kᵀ ⊙ Gamma, -1))^{-1}``, ``W = X (beta gamma ⊙ K)``,
    ``U = X (beta ⊙ V)``.

    The inverse is blocked by ``SUB = 16``: each diagonal ``16 x 16`` block is inverted by forward
    substitution (15 dependent row steps, all diagonal blocks in the same loop), the blocks below the
    diagonal follow by block forward substitution ``X_ij = -X_ii sum_{j<=m<i} A_im X_mj`` in small
    matmuls. Every sub-block is loaded from the refs at a static offset (no value slicing).
    """
    f32 = jnp.float32
    nb = c // SUB
    row = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    strict = row > col
    eye = jnp.where(row == col, 1.0, 0.0).astype(f32)
    blk = [pl.ds(i * SUB, SUB) for i in range(nb)]
    k = [k_ref[s, :] for s in blk]
    beta, g, seg = ([r[s] for s in blk] for r in (b_ref, g_ref, s_ref))
    a = {}
    for i in range(nb):
        for j in range(i + 1):
            gam = _decay(g[i], g[j], seg[i], seg[j], strict if i == j else None)
            a[i, j] = beta[i][:, None] * _dot_t(k[i], k[j], False) * gam

    def substitute(r, xs):  # row r of every diagonal block: x_r = e_r - sum_{j<r} a[r, j] x_j
        out = []
        for i, x in enumerate(xs):
            a_r = jnp.sum(jnp.where(row == r, a[i, i], 0.0), axis=0)
            x_r = -jnp.sum(a_r[:, None] * x, axis=0)
            out.append(jnp.where(row == r, eye + x_r[None, :], x))
        return tuple(out)

    diag = lax.fori_loop(1, SUB, substitute, tuple(eye for _ in range(nb)))
    x = _block_inverse(a, diag)
    gamma = [jnp.where(seg[j] == 0.0, jnp.exp(g[j]), 0.0) for j in range(nb)]
    kb = [k[j].astype(f32) * (beta[j] * gamma[j])[:, None] for j in range(nb)]
    vb = [v_ref[s, :].astype(f32) * beta[j][:, None] for j, s in enumerate(blk)]
    _write_wy(x, kb, vb, blk, w_ref, u_ref, x_ref)


def _state_kernel(q_ref, k_ref, w_ref, u_ref, g_ref, r_ref, s_ref, h0_ref, o_ref, ht_ref, *, c, n, scale):
    """Walk the chunks of one (batch, head, value block) with the ``[dk, bv]`` state on chip:
    ``U_new = U - W S``, ``O = (gamma ⊙ Q) S + (Q Kᵀ ⊙ Gamma) U_new``,
    ``S <- gamma_C S + (K ⊙ to_end)ᵀ U_new``. Matmul operands take the input dtype (bf16 allowed),
    every product accumulates in float32 and the state stays float32."""
    f32 = jnp.float32
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    incl = row >= col
    pos = lax.broadcasted_iota(jnp.int32, (c,), 0)
    md = q_ref.dtype

    def chunk(i, S):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, w, u = q_ref[sl, :], k_ref[sl, :], w_ref[sl, :], u_ref[sl, :]
        g, rev, seg = g_ref[sl], r_ref[sl], s_ref[sl]
        seg_last = jnp.max(seg)  # document index of the chunk's last token (non-decreasing)
        g_last = jnp.sum(jnp.where(pos == c - 1, g, 0.0))
        gamma = jnp.where(seg == 0.0, jnp.exp(g), 0.0)
        total = jnp.where(seg_last == 0.0, jnp.exp(g_last), 0.0)
        to_end = jnp.where(seg == seg_last, jnp.exp(rev), 0.0)
        u_new = u.astype(f32) - _dot(w.astype(md), S.astype(md))
        qk = _dot_t(q, k, False) * _decay(g, g, seg, seg, incl)
        o = _dot((q.astype(f32) * gamma[:, None]).astype(md), S.astype(md)) + _dot(qk.astype(md), u_new.astype(md))
        o_ref[sl, :] = (scale * o).astype(o_ref.dtype)
        kt = (k.astype(f32) * to_end[:, None]).astype(md)
        return total * S + _dot_t(kt, u_new.astype(md), True)

    ht_ref[...] = lax.fori_loop(0, n, chunk, h0_ref[...].astype(f32))


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


def wy_factors(kh, vh, bh, g, seg, *, c, interpret, backend, with_x=False):
    """Kernel 1 on either backend: ``W, U`` (input dtype) and, with ``with_x`` (the backward), the
    inverse ``X = (I + A)^{-1}`` per chunk, ``[b, h, Tp, C]`` float32."""
    b, h, tp, dkp = kh.shape
    dvp, n = vh.shape[-1], tp // c
    dtype = jnp.result_type(kh, vh)
    blk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, l: (i, j, l, 0))  # noqa: E731
    out_specs = [blk(dkp), blk(dvp)] + ([blk(c)] if with_x else [])
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, dkp), dtype), jax.ShapeDtypeStruct((b, h, tp, dvp), dtype)]
    out_shape += [jax.ShapeDtypeStruct((b, h, tp, c), jnp.float32)] if with_x else []
    if backend == "mosaic_tpu":
        col = lambda x: x[..., None]  # noqa: E731  [b, h, Tp] -> [b, h, Tp, 1]
        sub_rows = lambda x: x.reshape(b, h, n, c // SUB, SUB)  # noqa: E731
        srows = pl.BlockSpec((None, None, None, c // SUB, SUB), lambda i, j, l: (i, j, l, 0, 0))
        return pl.pallas_call(
            _wy_kernel_tpu, grid=(b, h, n),
            in_specs=[blk(dkp), blk(dvp), blk(1), blk(1), blk(1), srows, srows], out_specs=out_specs,
            out_shape=out_shape, interpret=interpret,
            compiler_params=tpu_params(interpret, "parallel", "parallel", "parallel"), name="delta_chunk_wy_tpu",
        )(kh, vh, col(bh), col(g), col(seg), sub_rows(g), sub_rows(seg))
    cgate = pl.BlockSpec((None, None, c), lambda i, j, l: (i, j, l))
    return pl.pallas_call(
        functools.partial(_wy_kernel, c=c), grid=(b, h, n),
        in_specs=[blk(dkp), blk(dvp), cgate, cgate, cgate], out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=triton_params(interpret, backend, num_warps=4, num_stages=1),
        name="delta_chunk_wy",
    )(kh, vh, bh, g, seg)


def _kernels(qh, kh, vh, bh, g, rev, seg, h0p, *, c, scale, interpret, backend):
    """Both forward kernels on prepared inputs: ``(o [b, h, Tp, Vp] input dtype, S_T [b, h, Kp, Vp] float32)``."""
    b, h, tp, dkp = qh.shape
    dvp, n = vh.shape[-1], tp // c
    dtype = jnp.result_type(qh, kh, vh)
    # 1. chunk-parallel WY factors: grid (batch, heads, chunks)
    w, u = wy_factors(kh, vh, bh, g, seg, c=c, interpret=interpret, backend=backend)
    if backend == "mosaic_tpu":
        return _state_pass_tpu(qh, kh, w, u, g, rev, seg, h0p, c=c, n=n, scale=scale, dtype=dtype, interpret=interpret)
    # 2. the state pass and the outputs: grid (batch, heads, value blocks), chunks walked in order
    bv = min(dvp, 64)
    seq = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))  # noqa: E731
    vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
    gate = pl.BlockSpec((None, None, tp), lambda i, j, l: (i, j, 0))
    state = pl.BlockSpec((None, None, dkp, bv), lambda i, j, l: (i, j, 0, l))
    return pl.pallas_call(
        functools.partial(_state_kernel, c=c, n=n, scale=scale),
        grid=(b, h, dvp // bv),
        in_specs=[seq(dkp), seq(dkp), seq(dkp), vseq, gate, gate, gate, state],
        out_specs=[vseq, state],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dvp), dtype), jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32)],
        interpret=interpret,
        compiler_params=triton_params(interpret, backend, num_warps=4, num_stages=1),
        name="delta_chunk_fwd",
    )(qh, kh, w, u, g, rev, seg, h0p)


def _forward(q, k, v, beta, la, h0, rs, scale, chunk_size, interpret, backend):
    t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    args, c, _ = _prepare(q, k, v, beta, la, h0, rs, chunk_size)
    o, ht = _kernels(*args, c=c, scale=float(scale), interpret=interpret, backend=backend)
    return jnp.moveaxis(o, 1, 2)[:, :t, :, :dv], ht[:, :, :dk, :dv]


# ----------------------------------------------------------------------------- Mosaic TPU
# The TPU tiling wants the last two dims of every block to be multiples of (8, 128) or whole, so the gates
# come as columns ``[.., C, 1]`` and as rows ``[.., n, ·, C]`` (the ``C x C`` masks are then broadcasts, with
# no relayout), values are 2-D throughout, and float32 products ask for ``HIGHEST`` precision (the MXU's
# default passes are bf16).

_HI = lax.Precision.HIGHEST


def _dot_nt(a, b, precision=None):  # a bᵀ
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _dot_tn(a, b, precision=None):  # aᵀ b
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _wy_kernel_tpu(k_ref, v_ref, bc_ref, gc_ref, sc_ref, gr_ref, sr_ref, w_ref, u_ref, x_ref=None):
    """``_wy_kernel`` for Mosaic TPU: sub-block gates as columns ``[16, 1]`` and rows ``[1, 16]``; the
    diagonal blocks' forward substitution as masked ``16 x 16`` matmuls (one row per step)."""
    f32 = jnp.float32
    c = k_ref.shape[0]
    nb = c // SUB
    row = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    strict = row > col
    eye = jnp.where(row == col, 1.0, 0.0).astype(f32)
    blk = [pl.ds(i * SUB, SUB) for i in range(nb)]
    k = [k_ref[s, :] for s in blk]
    beta, gcol, scol = ([r[s, :] for s in blk] for r in (bc_ref, gc_ref, sc_ref))  # [16, 1] each
    grow, srow = ([r[pl.ds(i, 1), :] for i in range(nb)] for r in (gr_ref, sr_ref))  # [1, 16] each
    a = {}
    for i in range(nb):
        for j in range(i + 1):
            same = scol[i] == srow[j]
            if i == j:
                same = same & strict
            gam = jnp.where(same, jnp.exp(jnp.where(same, gcol[i] - grow[j], 0.0)), 0.0)
            a[i, j] = beta[i] * _dot_nt(k[i], k[j]) * gam

    def substitute(r, xs):
        return tuple(jnp.where(row == r, eye - _dot(jnp.where(row == r, a[i, i], 0.0), x, _HI), x) for i, x in enumerate(xs))

    diag = lax.fori_loop(1, SUB, substitute, tuple(eye for _ in range(nb)))
    x = _block_inverse(a, diag)
    gamma = [jnp.where(scol[j] == 0.0, jnp.exp(gcol[j]), 0.0) for j in range(nb)]
    kb = [k[j].astype(f32) * (beta[j] * gamma[j]) for j in range(nb)]
    vb = [v_ref[s, :].astype(f32) * beta[j] for j, s in enumerate(blk)]
    _write_wy(x, kb, vb, blk, w_ref, u_ref, x_ref)


def _state_kernel_tpu(q_ref, k_ref, w_ref, u_ref, gc_ref, rc_ref, sc_ref, gr_ref, sr_ref, h0_ref, o_ref, ht_ref, s_scr, *, scale):
    """``_state_kernel`` for Mosaic TPU: one chunk per grid step (the chunk axis sequential), the state in a
    VMEM scratch across steps."""
    f32 = jnp.float32
    c = q_ref.shape[0]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(f32)

    S = s_scr[...]
    md = q_ref.dtype
    q, k, w, u = q_ref[...], k_ref[...], w_ref[...], u_ref[...]
    gcol, rcol, scol = gc_ref[...], rc_ref[...], sc_ref[...]  # [C, 1]
    grow, srow = gr_ref[...], sr_ref[...]  # [1, C]
    lane = lax.broadcasted_iota(jnp.int32, (1, c), 1)
    g_last = jnp.sum(jnp.where(lane == c - 1, grow, 0.0), axis=1, keepdims=True)  # [1, 1]
    seg_last = jnp.sum(jnp.where(lane == c - 1, srow, 0.0), axis=1, keepdims=True)
    gamma = jnp.where(scol == 0.0, jnp.exp(gcol), 0.0)
    total = jnp.where(seg_last == 0.0, jnp.exp(g_last), 0.0)
    to_end = jnp.where(scol == seg_last, jnp.exp(rcol), 0.0)
    u_new = u.astype(f32) - _dot(w.astype(md), S.astype(md), _HI if md == f32 else None)
    incl = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
    same = incl & (scol == srow)
    qk = _dot_nt(q, k) * jnp.where(same, jnp.exp(jnp.where(same, gcol - grow, 0.0)), 0.0)
    hi = _HI if md == f32 else None
    o = _dot((q.astype(f32) * gamma).astype(md), S.astype(md), hi) + _dot(qk.astype(md), u_new.astype(md), hi)
    o_ref[...] = (scale * o).astype(o_ref.dtype)
    S = total * S + _dot_tn((k.astype(f32) * to_end).astype(md), u_new.astype(md), hi)
    s_scr[...] = S

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = S


def _state_pass_tpu(qh, kh, w, u, g, rev, seg, h0p, *, c, n, scale, dtype, interpret):
    """The state pass on Mosaic TPU; inputs heads-first and padded as in ``_prepare``."""
    from jax.experimental.pallas import tpu as pltpu

    b, h, tp, dkp = qh.shape
    dvp = u.shape[-1]
    col = lambda x: x[..., None]  # noqa: E731  [b, h, Tp] -> [b, h, Tp, 1]
    blk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, l: (i, j, l, 0))  # noqa: E731
    rows = lambda x: x.reshape(b, h, n, 1, c)  # noqa: E731
    rblk = pl.BlockSpec((None, None, None, 1, c), lambda i, j, l: (i, j, l, 0, 0))
    st = pl.BlockSpec((None, None, dkp, dvp), lambda i, j, l: (i, j, 0, 0))
    return pl.pallas_call(
        functools.partial(_state_kernel_tpu, scale=scale),
        grid=(b, h, n),
        in_specs=[blk(dkp), blk(dkp), blk(dkp), blk(dvp), blk(1), blk(1), blk(1), rblk, rblk, st],
        out_specs=[blk(dvp), st],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dvp), dtype), jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((dkp, dvp), jnp.float32)],
        interpret=interpret,
        compiler_params=tpu_params(interpret, "parallel", "parallel", "arbitrary"),
        name="delta_chunk_fwd_tpu",
    )(qh, kh, w, u, col(g), col(rev), col(seg), rows(g), rows(seg), h0p)


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

    This is ``backward="xla"``. Measured on an H200 (``benchmarks/results/NVIDIA_H200_delta.md``): running
    the kernel forward and then the XLA form's VJP (which recomputes its forward) made training 1.3x slower
    than XLA alone, so this path is exactly the XLA chunked form under ``jax.grad``; a forward outside
    ``jax.grad`` (inference, evaluation, prefill) runs the kernel.
    """
    del interpret, backend
    from seqjax.mixers._delta_chunk import delta_rule_chunked

    def f(q, k, v, beta, la, h0):
        return delta_rule_chunked(q, k, v, beta, la, h0=h0, resets=rs, scale=scale, chunk_size=chunk_size)

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
