r"""Mosaic GPU body of the chunked delta rule's WY / UT factors (``wy.py``'s kernel 1, forward and backward).

Per chunk of ``C`` tokens (``wy.py``'s notation): ``A = tril(diag(β) K Kᵀ ⊙ Γ, −1)``, ``X = (I + A)^{-1}``,
``W = X (βγ ⊙ K)``, ``U = X (β ⊙ V)``. :func:`wy_factors_mosaic_gpu`: grid ``(batch, heads, chunks)``, one
warpgroup per chunk, no pipeline (nothing is carried between chunks). The chunk's ``K`` and ``V`` come by TMA into
shared memory as tiles of 64 columns, ``β, g, seg`` as three rows of ``C`` floats.

1. ``K Kᵀ``: one ``wgmma`` per key tile into one float32 accumulator (``Kᵀ`` a transposed shared-memory view),
   scaled by ``β`` on the rows and masked and decayed in registers strictly below the diagonal within a document
   (the exponent masked before ``exp``), stored float32 ``[C, C]`` in shared memory (no swizzle: its rows are read
   back one at a time).
2. ``X = (I + A)^{-1}`` by forward substitution, row by row, in float32 registers (the ``WGMMA`` layout): from
   ``X = I``, for ``i = 1 … C−1``, ``x_i = e_i − Σ_{j<i} A_ij x_j``: row ``i`` of ``A`` is loaded from shared memory
   as a column vector, multiplied into ``X`` and summed over its rows (a reduction across the warpgroup's four
   warps, through Mosaic GPU's reduction scratch), and the result replaces row ``i`` (a ``fori_loop`` with ``X``
   as its carry). ``C − 1`` dependent steps, each ``C²`` multiply-adds spread over 128 threads: at ``C = 64``
   some 63 × 32 FMAs per thread, small beside the chunk's matmuls. Every operation is float32, as the reference:
   the inverse carries float32 rounding only (measured below).
3. ``W`` and ``U`` by ``wgmma``, one tile of 64 columns at a time, from ``X`` with its columns scaled by ``βγ`` (for
   ``W``) or ``β`` (for ``U``) in registers (``X (βγ ⊙ K) = (X ⊙ βγ_s) K``: the raw tiles are the right operands),
   stored in shared memory as two bf16 pieces, ``hi`` and ``lo = X_s − hi``, both ``wgmma``\ s into one accumulator:
   the operand then carries ``2^-17`` of rounding instead of bf16's ``2^-9``. Where the second piece would pass the
   shared-memory budget (``C = 128`` at head dims of 128) it is left out. Each ``[C, 64]`` float32 result leaves
   through one shared-memory output tile with a TMA store, reused once its store has read it. With ``with_x`` (the
   backward) ``X`` itself leaves too, in ``K``'s dtype (through the float32 ``A`` buffer, no longer read, or the
   operand buffer's first piece).

Why row-by-row substitution. ``wgmma`` needs ``M = 64`` and bf16 (or tf32) operands; the schemes with a ``wgmma``
form were weighed in XLA against a float64 inverse, on ``A`` of unit-norm keys (rounded to bf16 first, so only the
inverse errs), ``β ∈ [0.9, 1]``, three draws, the largest error of ``X`` over its largest entry (``|X| ≤ 1`` in all
of them). The nilpotent product ``(I + A)^{-1} = Π_k (I + (−A)^{2^k})`` (six squarings at ``C = 64``), bf16
operands and float32 accumulation: 1.5e-3 with random keys and weak decay (``log α ≈ −0.05`` per token), 2.5e-5
under strong decay (``≈ −5``), 4.9e-3 with keys sharing a direction (0.26 at ``C = 128``), and with strongly
correlated keys (``log α ≈ −0.01``) it diverges (2e7; 1e18 at ``C = 128``): the powers of ``A`` grow far past
``X`` and the rounding of each factor no longer cancels. A blocked scheme (``16 x 16`` diagonal blocks ``D`` by
float32 substitution, then ``X = (I − N)(I + N²) D``, ``N = D A_off``, by bf16 ``wgmma``): 9.3e-4, 2.5e-5, 1.6e-3
and 3.5e-3 (2.7e-2 at ``C = 128``). Forward substitution in float32: 4.3e-8, 2.9e-10, 3.9e-8, 6.9e-8 (as the
Triton body), with only lane and warp reductions, which Mosaic GPU lowers.

Rounding elsewhere: ``K`` and ``V`` (float32 inputs too) are bf16 ``wgmma`` operands with float32 accumulation, as in
every Mosaic GPU body here, in ``K Kᵀ`` and as the right operands of ``W``, ``U``; the Triton body multiplies float32
inputs in float32 at ``HIGHEST``. On keys and values exact in bf16 (``tests/test_pallas_mosaic_gpu_delta.py``),
``X`` agrees with the float64 reference to 1.5e-7 of its largest entry and ``W``, ``U`` to 4e-6 (1.7e-3 with one
piece).

Shared memory (:func:`wy_smem`): ``C (Kp + Vp)`` bf16, ``C²`` float32 (``A``), one or two ``C²`` bf16 pieces, one
``[C, 64]`` output tile and the gates: at ``C = 64`` (two pieces), 73 KiB at head dims of 128 (81 with float32
inputs) and 113 KiB at 256 (float32); at ``C = 128`` and head dims of 128 (one piece), 194 KiB (float32). At
``C = 128`` with a head dim of 256 (from 210 KiB, over ``_mosaic_gpu.SMEM_BUDGET``) ``wy.wy_factors`` runs the
Triton body (:func:`wy_fits`). Mosaic GPU's interpreter takes
no transposed shared-memory view: under it ``Kᵀ`` is staged through shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic_gpu as mg
from pallas_kernels.delta_chunk.mosaic_gpu import _helpers, check_shapes

__all__ = ["wy_factors_mosaic_gpu", "wy_fits", "wy_smem"]

_BF16 = jnp.bfloat16
f32 = jnp.float32
BK = 64  # columns per tile of K, V, W, U


def _buffers(c, kp, vp, dtype, interpret=False, parts=2):
    """The kernel's shared-memory buffers as compiled: ``K``, ``V`` as ``[tiles, C, 64]`` bf16, ``A`` ``[C, C]``
    float32 (plain: read back by rows), the scaled ``X`` operand ``[C, C]`` bf16, a ``[C, 64]`` output tile in
    ``dtype``, the gate rows."""
    sm = functools.partial(mg.smem, plain=interpret)
    return [sm((kp // BK, c, BK)), sm((vp // BK, c, BK)), plgpu.SMEM((c, c), f32), sm((parts, c, c)),
            sm((c, BK), dtype), plgpu.SMEM((3, c), f32)]


def wy_smem(c: int, kp: int, vp: int, dtype=_BF16, parts: int = 1) -> int:
    """Shared-memory bytes of :func:`wy_factors_mosaic_gpu` as compiled (``_mosaic_gpu.smem_bytes``), the scaled
    ``X`` in ``parts`` bf16 pieces."""
    return mg.smem_bytes(_buffers(c, kp, vp, dtype, parts=parts))


def _parts(c, kp, vp, dtype) -> int:
    """The scaled ``X`` as two bf16 pieces (``hi + lo``) where their shared memory fits the budget, else one."""
    return 2 if wy_smem(c, kp, vp, dtype, 2) <= mg.SMEM_BUDGET else 1


def wy_fits(c: int, kp: int, vp: int, dtype=_BF16) -> bool:
    """Whether :func:`wy_factors_mosaic_gpu` fits ``_mosaic_gpu.SMEM_BUDGET`` (which leaves room for Mosaic GPU's
    padding, barriers and reduction scratch), with one piece: at ``C = 64`` up to head dims of 256, at ``C = 128`` up
    to 128 (``wy.wy_factors`` runs the Triton body where it does not)."""
    return wy_smem(c, kp, vp, dtype) <= mg.SMEM_BUDGET


def _substitute(a_smem, c, interpret):
    """``X = (I + A)^{-1}`` for strictly lower ``A`` (float32 ``[C, C]`` in ``a_smem``) by forward substitution row by
    row, float32 in registers: ``x_i = e_i − Σ_j A_ij x_j`` for ``i = 1 … C−1`` (row ``i`` of ``X`` is ``e_i`` until
    step ``i``, and rows ``j < i`` are final by then)."""
    load = mg.loader(interpret)
    idx = mg.iota(c, interpret)
    eye = lambda r, s: jnp.where(r == s, 1.0, 0.0).astype(f32)

    def step(i, x):  # the iotas made in the step: only X is live across it (at C = 128, 128 registers a thread)
        r, s = idx(0), idx(1)
        a_i = load(a_smem.at[i], mg.WG.reduce(1))  # row i of A, indexed by X's row j
        y = jnp.sum(lax.broadcast_in_dim(a_i, (c, c), [0]) * x, axis=0)  # Σ_j A_ij x_j, indexed by column
        return jnp.where(r == i, jnp.where(s == i, 1.0, 0.0) - lax.broadcast_in_dim(y, (c, c), [1]), x)

    return lax.fori_loop(1, c, step, eye(idx(0), idx(1)))


def _wy_kernel(k_ref, v_ref, g_ref, w_ref, u_ref, *rest, chunk, nk, nv, with_x, interpret):
    """One chunk per program (grid ``(batch, heads, chunk)``): ``W``, ``U`` and, ``with_x``, ``X``."""
    x_ref, rest = (rest[0], rest[1:]) if with_x else (None, rest)
    k_smem, v_smem, a_smem, x_smem, o_smem, g_smem, kt_smem, bars = rest
    c, bk = chunk, BK
    _, col, row = _helpers(interpret)
    ib, ih, n = (lax.axis_index(a) for a in ("b", "h", "n"))
    rows = pl.ds(n * c, c)
    tile = lambda ref, j: ref.at[ib, ih, rows, pl.ds(j * bk, bk)]
    mg.copy_in(bars, 0, (g_ref.at[ib, ih, :, rows], g_smem), *((tile(k_ref, j), k_smem.at[j]) for j in range(nk)),
               *((tile(v_ref, j), v_smem.at[j]) for j in range(nv)))
    stage = lambda j: kt_smem.at[j] if interpret else None
    kt = [mg.transposed(k_smem.at[j], stage(j), interpret) for j in range(nk)]
    plgpu.commit_smem()
    idx = mg.iota(c, interpret)
    full = lambda x, d: lax.broadcast_in_dim(x, (c, c), [d])
    bc, gc, sc = col(g_smem, 0), col(g_smem, 1), col(g_smem, 2)
    br, gr, sr = row(g_smem, 0), row(g_smem, 1), row(g_smem, 2)
    ok = (idx(0) > idx(1)) & (full(sc, 0) == full(sr, 1))
    dec = jnp.where(ok, jnp.exp(jnp.where(ok, full(gc, 0) - full(gr, 1), 0.0)), 0.0)  # Γ, strictly lower
    a_smem[...] = full(bc, 0) * mg.mma_sum([(k_smem.at[j], kt[j]) for j in range(nk)], (c, c)) * dec
    plgpu.commit_smem()
    x = _substitute(a_smem, c, interpret)

    def emit(i, val, dst_ref, buf=o_smem):  # a tile through buf, once its last store has read it
        if i:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        buf[...] = val.astype(buf.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, dst_ref)

    if with_x:  # X through A's buffer (float32; every read of it is done) or the bf16 operand buffer
        plgpu.commit_smem()  # a warpgroup barrier: no warp still reads A's rows
        emit(0, x, x_ref.at[ib, ih, rows], a_smem if x_ref.dtype == f32 else x_smem.at[0])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    parts = x_smem.shape[0]

    def operand(xs):  # the scaled X as bf16 pieces: hi, and lo = xs − hi where there are two
        hi = xs.astype(_BF16)
        x_smem.at[0][...] = hi
        if parts == 2:
            x_smem.at[1][...] = (xs - hi.astype(f32)).astype(_BF16)
        plgpu.commit_smem()

    gam_r = jnp.where(sr == 0, jnp.exp(gr), 0.0)  # γ of the key columns: decay from the chunk's start, first document
    operand(x * full(br * gam_r, 1))  # X (βγ ⊙ K) = (X ⊙ βγ_s) K
    for j in range(nk):
        emit(j, mg.mma_sum([(x_smem.at[p], k_smem.at[j]) for p in range(parts)], (c, bk)), tile(w_ref, j))
    operand(x * full(br, 1))  # X (β ⊙ V) = (X ⊙ β_s) V
    for j in range(nv):
        emit(1, mg.mma_sum([(x_smem.at[p], v_smem.at[j]) for p in range(parts)], (c, bk)), tile(u_ref, j))
    plgpu.wait_smem_to_gmem(0)


def wy_factors_mosaic_gpu(kh, vh, bh, g, seg, *, c, interpret, with_x=False):
    """``wy.wy_factors``' contract on Mosaic GPU: ``k [b, h, Tp, Kp]``, ``v [b, h, Tp, Vp]``, ``β, g, seg [b, h, Tp]``
    float32 (:func:`check_shapes`; raises where :func:`wy_fits` does not hold). Returns
    ``W [b, h, Tp, Kp]``, ``U [b, h, Tp, Vp]`` (the input dtype) and, ``with_x``, ``X [b, h, Tp, C]`` in ``k``'s dtype."""
    b, h, tp, kp = kh.shape
    vp = vh.shape[-1]
    check_shapes(c, kp, vp)
    nk, nv = kp // BK, vp // BK
    dtype = jnp.result_type(kh, vh)
    if not wy_fits(c, kp, vp, dtype):
        raise ValueError(f"the Mosaic GPU WY factors at chunk_size {c}, head dims {kp}, {vp} need "
                         f"{wy_smem(c, kp, vp, dtype) // 1024} KiB of shared memory, over the "
                         f"{mg.SMEM_BUDGET // 1024} KiB they budget: use a smaller chunk_size or head dim, "
                         "or backend='triton'")
    interpret = bool(interpret)
    sm = functools.partial(mg.smem, plain=interpret)
    scratch = [*_buffers(c, kp, vp, dtype, interpret, _parts(c, kp, vp, dtype)), sm((nk, BK, c)) if interpret else None,
               plgpu.Barrier(num_barriers=1 + nk + nv)]
    out = [jax.ShapeDtypeStruct((b, h, tp, kp), dtype), jax.ShapeDtypeStruct((b, h, tp, vp), dtype)]
    out += [jax.ShapeDtypeStruct((b, h, tp, c), kh.dtype)] if with_x else []
    kern = functools.partial(_wy_kernel, chunk=c, nk=nk, nv=nv, with_x=with_x, interpret=interpret)
    call = mg.kernel(kern, out, scratch, (b, h, tp // c), ("b", "h", "n"), interpret)
    gates = jnp.stack([bh, g, seg], axis=2).astype(f32)
    return call(kh.astype(_BF16), vh.astype(_BF16), gates)
