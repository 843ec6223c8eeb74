r"""The WY / UT factors of the chunked (gated) delta rule, chunk-parallel (forward and backward).

Per chunk of ``C`` tokens (gates in log space, chunk-local): ``A = tril(diag(beta) K Kᵀ ⊙ Gamma, -1)``
(decays masked before ``exp``), ``X = (I + A)^{-1}``, ``W = X (beta gamma ⊙ K)`` and ``U = X (beta ⊙ V)``.
The inverse is blocked by ``SUB = 16``: each diagonal ``16 x 16`` block by forward substitution (15 row
steps, all diagonal blocks in one loop), the blocks below by block substitution ``X_ij = -X_ii
sum_{j<=m<i} A_im X_mj`` in small matmuls. One body per backend, one driver: ``wy_factors`` (a single
``pallas_call``; for Mosaic GPU ``wy_mosaic_gpu.wy_factors_mosaic_gpu``, whose inverse is forward substitution
row by row over the whole chunk in float32 registers, as ``wgmma`` needs ``M = 64``). The Triton body computes
``A`` as one ``[C, C]`` matmul over key tiles of 64 and cuts it into its ``16 x 16`` blocks with ``jnp.split``
(fla computes the same in ``chunk_scaled_dot_kkt_fwd``, ``solve_tril`` and ``recompute_w_u_fwd``, three
kernels), then writes ``W`` and ``U`` in column tiles of 32: at ``sm_90``, 8 warps, no register spills. The Mosaic TPU body loads each
block of ``K`` and of the gates from the refs at static offsets and builds ``A`` block by block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._util import mm, tpu_params, triton_params
from pallas_kernels.delta_chunk.wy_mosaic_gpu import wy_factors_mosaic_gpu, wy_fits

KT = 64  # the key tile of the Triton body's ``K Kᵀ`` (fla's ``BK``)
BD = 32  # the column tile of the Triton body's ``W``, ``U`` (fla's ``BK``, ``BV``: 64)
SUB = 16  # sub-block of the in-kernel triangular inverse (the smallest GPU ``dot``)


def _dot_t(a, b, transpose_a):  # aᵀ b or a bᵀ without materialising the transpose
    dims = (((0,), (0,)), ((), ())) if transpose_a else (((1,), (1,)), ((), ()))
    return mm(a, b, dims)


def chunk_gamma(g, seg):
    """``γ = e^{g}`` (decay from the chunk's start) where the token is in the chunk's first document
    (``seg == 0``), else 0; any shape."""
    return jnp.where(seg == 0.0, jnp.exp(g), 0.0)


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
            acc = sum(mm(a[i, m], x[m, j], precision=hi) for m in range(j, i))
            x[i, j] = -mm(x[i, i], acc, precision=hi)
    return x


def _write_wy(x, kb, vb, blk, w_ref, u_ref, x_ref=None, *, direct=True):
    """``W = X kb``, ``U = X vb`` block row by block row (``X`` is block lower triangular); ``kb(j, cols)``,
    ``vb(j, cols)`` give block ``j``'s columns ``cols`` in float32, computed where used rather than held (on a
    GPU, ``[C, K]`` float32 values live across the loop spill registers). Per block row ``i`` the products
    are summed over ``j`` outermost: ``X_ij`` is a matmul operand of every column tile before ``X_i,j+1``
    is used, so one block of ``X`` at a time is held in operand form (summed innermost, all of row ``i``'s
    are: the Triton body then took all 255 registers). ``direct`` (Triton) walks ``W`` and ``U`` in column
    tiles of ``BD = 32``: a float32 ``[16, 16] x [16, D]`` matmul is an FMA loop whose right operand each
    thread holds 16 rows deep for its share of the ``D`` columns (tiles of 64 spill 164 bytes per thread
    with float32 inputs, none with bf16). It stores each ``16 x 16`` block of ``X`` at its lane offset.
    With ``x_ref`` (the backward) also ``X`` itself ``[C, C]``, zeros above the diagonal blocks. The Mosaic
    TPU body takes ``W``, ``U`` whole and keeps ``[16, 16] x [16, C]`` placement matmuls for ``X`` (exact at
    ``HIGHEST``; MXU work there) instead: a 16-lane store at a lane offset lowers, but whether Mosaic
    compiles it cannot be checked without a TPU. On a GPU those float32 matmuls are FMA loops: the Triton
    body used them until the sm_90 compile showed 26 KB of register spills per thread."""
    hi = lax.Precision.HIGHEST
    c = len(blk) * SUB
    tiles = []  # (output ref, its float32 operand, a column slice)
    for ref, fb in ((w_ref, kb), (u_ref, vb)):
        d = ref.shape[-1]
        t = min(d, BD) if direct else d
        tiles += [(ref, fb, pl.ds(c0, t)) for c0 in range(0, d, t)]
    for i, rows in enumerate(blk):
        acc = [0.0] * len(tiles)
        for j in range(i + 1):
            acc = [s_ + mm(x[i, j], fb(j, cols), precision=hi) for s_, (_, fb, cols) in zip(acc, tiles)]
        for s_, (ref, _, cols) in zip(acc, tiles):
            ref[rows, cols] = s_.astype(ref.dtype)
        if x_ref is None:
            continue
        if direct:
            zero = jnp.zeros((SUB, SUB), x_ref.dtype)
            for j, cols in enumerate(blk):
                x_ref[rows, cols] = x[i, j].astype(x_ref.dtype) if j <= i else zero
        else:
            r, col = lax.broadcasted_iota(jnp.int32, (SUB, c), 0), lax.broadcasted_iota(jnp.int32, (SUB, c), 1)
            x_ref[rows, :] = sum(mm(x[i, j], jnp.where(col == r + j * SUB, 1.0, 0.0), precision=hi)
                                 for j in range(i + 1)).astype(x_ref.dtype)


def _sub_blocks(c):
    """The ``SUB x SUB`` tiling of a chunk of ``c`` tokens: ``(nb, row iota, strictly lower mask, identity,
    the row slices of the nb sub-blocks)``."""
    row = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    nb = c // SUB
    return nb, row, row > col, jnp.where(row == col, 1.0, 0.0).astype(jnp.float32), [pl.ds(i * SUB, SUB) for i in range(nb)]


def _wy_kernel(k_ref, v_ref, b_ref, g_ref, s_ref, w_ref, u_ref, x_ref=None, *, c):
    """One chunk: ``X = (I + tril(diag(beta) K Kᵀ ⊙ Gamma, -1))^{-1}``, ``W = X (beta gamma ⊙ K)``,
    ``U = X (beta ⊙ V)`` (the Triton body).

    ``A`` is one ``[C, C]`` product ``K Kᵀ`` summed over key tiles of ``KT = 64`` (fla's
    ``chunk_scaled_dot_kkt``), gated and masked whole, then cut into its ``16 x 16`` blocks by value with
    ``jnp.split`` (equal power-of-two parts: a reshape, a transpose and ``tt.split`` in the Triton
    lowering). Built block by block instead (``[16, K] x [K, 16]`` products of blocks loaded from the ref),
    every block of ``K`` stayed a live matmul operand (the loads are shared by all products of a block) and
    every ``16 x 16`` result sat in the MMA layout, which repeats a 16-row tile on each of the 8 warps: the
    ``sm_90`` compile took all 255 registers and spilled, however ``W`` and ``U`` were written. The inverse
    is blocked by ``SUB = 16``: each diagonal block by forward substitution (15 dependent row steps, all
    diagonal blocks in the same loop), the blocks below the diagonal by block forward substitution ``X_ij =
    -X_ii sum_{j<=m<i} A_im X_mj`` in small matmuls. The gates of each block and the operands of ``W``,
    ``U`` are loaded from the refs at static offsets.
    """
    f32 = jnp.float32
    nb, row, _, eye, blk = _sub_blocks(c)
    beta, g, seg = ([ref[s] for s in blk] for ref in (b_ref, g_ref, s_ref))
    dk = k_ref.shape[-1]
    kk = 0.0
    for c0 in range(0, dk, min(dk, KT)):
        kt = k_ref[:, pl.ds(c0, min(dk, KT))]
        kk = kk + _dot_t(kt, kt, False)
    t_i, t_j = lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)
    g_c, s_c = g_ref[...], s_ref[...]
    a_full = b_ref[...][:, None] * kk * _decay(g_c, g_c, s_c, s_c, t_i > t_j)
    a = {(i, j): a_ij for i, a_i in enumerate(jnp.split(a_full, nb, axis=0))
         for j, a_ij in enumerate(jnp.split(a_i, nb, axis=1)) if j <= i}

    def substitute(r, xs):  # row r of every diagonal block: x_r = e_r - sum_{j<r} a[r, j] x_j
        out = []
        for i, x in enumerate(xs):
            a_r = jnp.sum(jnp.where(row == r, a[i, i], 0.0), axis=0)
            x_r = -jnp.sum(a_r[:, None] * x, axis=0)
            out.append(jnp.where(row == r, eye + x_r[None, :], x))
        return tuple(out)

    diag = lax.fori_loop(1, SUB, substitute, tuple(eye for _ in range(nb)))
    x = _block_inverse(a, diag)
    gamma = [chunk_gamma(g[j], seg[j]) for j in range(nb)]
    kb = lambda j, cols: k_ref[blk[j], cols].astype(f32) * (beta[j] * gamma[j])[:, None]
    vb = lambda j, cols: v_ref[blk[j], cols].astype(f32) * beta[j][:, None]
    _write_wy(x, kb, vb, blk, w_ref, u_ref, x_ref, direct=True)


_HI = lax.Precision.HIGHEST


def _dot_nt(a, b, precision=None):  # a bᵀ
    return mm(a, b, (((1,), (1,)), ((), ())), precision=precision)


def _wy_kernel_tpu(k_ref, v_ref, bc_ref, gc_ref, sc_ref, gr_ref, sr_ref, w_ref, u_ref, x_ref=None):
    """``_wy_kernel`` for Mosaic TPU: sub-block gates as columns ``[16, 1]`` and rows ``[1, 16]``; the
    diagonal blocks' forward substitution as masked ``16 x 16`` matmuls (one row per step)."""
    f32 = jnp.float32
    nb, row, strict, eye, blk = _sub_blocks(k_ref.shape[0])
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
        return tuple(jnp.where(row == r, eye - mm(jnp.where(row == r, a[i, i], 0.0), x, precision=_HI), x)
                     for i, x in enumerate(xs))

    diag = lax.fori_loop(1, SUB, substitute, tuple(eye for _ in range(nb)))
    x = _block_inverse(a, diag)
    gamma = [chunk_gamma(gcol[j], scol[j]) for j in range(nb)]
    kb = lambda j, cols: k_ref[blk[j], cols].astype(f32) * (beta[j] * gamma[j])
    vb = lambda j, cols: v_ref[blk[j], cols].astype(f32) * beta[j]
    _write_wy(x, kb, vb, blk, w_ref, u_ref, x_ref, direct=False)


def wy_factors(kh, vh, bh, g, seg, *, c, interpret, backend, with_x=False):
    """Kernel 1 on any backend (Mosaic GPU: ``wy_mosaic_gpu.py``, the Triton body where its shared memory would pass
    the budget, ``wy_mosaic_gpu.wy_fits``): ``W, U`` (input dtype) and, with ``with_x`` (the backward), the
    inverse ``X = (I + A)^{-1}`` per chunk, ``[b, h, Tp, C]`` in ``kh``'s dtype (the dtype the backward's
    matmuls take it in; computed in float32)."""
    if backend == "mosaic_gpu":
        if wy_fits(c, kh.shape[-1], vh.shape[-1], jnp.result_type(kh, vh)):
            return wy_factors_mosaic_gpu(kh, vh, bh, g, seg, c=c, interpret=interpret, with_x=with_x)
        backend = "triton"  # over the shared-memory budget (C = 128 at a head dim of 256)
    b, h, tp, dkp = kh.shape
    dvp, n = vh.shape[-1], tp // c
    dtype = jnp.result_type(kh, vh)
    blk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, l: (i, j, l, 0))
    out_specs = [blk(dkp), blk(dvp)] + ([blk(c)] if with_x else [])
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, dkp), dtype), jax.ShapeDtypeStruct((b, h, tp, dvp), dtype)]
    out_shape += [jax.ShapeDtypeStruct((b, h, tp, c), kh.dtype)] if with_x else []
    if backend == "mosaic_tpu":
        col = lambda x: x[..., None]
        sub_rows = lambda x: x.reshape(b, h, n, c // SUB, SUB)
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
        interpret=interpret, compiler_params=triton_params(interpret, backend, num_warps=8, num_stages=1),
        name="delta_chunk_wy",
    )(kh, vh, bh, g, seg)

