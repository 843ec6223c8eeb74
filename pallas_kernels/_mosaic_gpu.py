r"""What the kernels' Mosaic GPU bodies share: shared-memory operand types, head-dim padding, loads, ``wgmma`` and
state-copy helpers, the one linear walk over the chunks (:func:`linear_walk`), Mosaic GPU's CPU interpreter and the
backend choice.

jax >= 0.11 deprecates the Pallas Triton lowering; Mosaic GPU (warpgroup ``wgmma``, TMA copies) is its successor.
A kernel with a Mosaic GPU body takes it when asked (``backend="mosaic_gpu"``) and, once that body has passed its
tests compiled on a GPU (the ``tests`` stage of ``benchmarks/gpu_check.sh``; each kernel keeps its own flag), by
default on a GPU under jax >= 0.11. On the CPU, ``backend="mosaic_gpu"`` runs Mosaic GPU's own interpreter
(``InterpretGPUParams``, private in jax 0.10: TMA copies, barriers, shared memory and ``wgmma`` simulated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._util import resolve

try:  # Mosaic GPU's interpreter: private in jax 0.10
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover - depends on the jax version
    InterpretGPUParams = None

__all__ = ["BV", "JAX_0_11", "WG", "copy_in", "interpret_params", "iota", "kernel", "key_pad", "linear_walk", "load_state", "loader",
           "mma", "resolve_mosaic_gpu", "smem", "store_state", "transposed"]

BF16 = jnp.bfloat16
F32 = jnp.float32
WG = plgpu.Layout.WGMMA
BV = 64  # value columns per program of a walk
JAX_0_11 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def key_pad(n: int) -> int:
    """A head dim padded for ``wgmma``: a power of two >= 64 (its ``M``; bf16 rows of 128 bytes, the one swizzle
    both operands then share). Padding with zeros is exact."""
    return max(64, 1 << (int(n) - 1).bit_length())


def smem(shape, dtype=BF16, plain=False):
    """A ``wgmma`` operand (or a ``WGMMA``-layout array's home) in shared memory: ``(8, row)`` tiles, swizzled by the
    row's bytes (at most 128); ``plain``: no transforms (Mosaic GPU's interpreter)."""
    if plain:
        return plgpu.SMEM(shape, dtype)
    minor = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = min(128, minor)
    tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def interpret_params():
    """Mosaic GPU's own interpreter, to pass as ``plgpu.kernel(interpret=...)``; raises where this jax has none."""
    if InterpretGPUParams is None:  # pragma: no cover - depends on the jax version
        raise NotImplementedError("this jax has no Mosaic GPU interpreter: run backend='mosaic_gpu' on a GPU")
    return InterpretGPUParams()


def resolve_mosaic_gpu(interpret, backend, chunk: int, *, default: bool, backends: tuple[str, ...]):
    """``_util.resolve`` plus a Mosaic GPU body. ``backend="mosaic_gpu"`` asks for it (interpreted on the CPU);
    ``None`` takes it on a GPU when ``default`` (the kernel's compiled tests passed and jax >= 0.11) and ``chunk`` is a
    multiple of 64, else what ``resolve`` picks (Triton on a GPU and in the CPU interpreter, Mosaic on a TPU).
    Returns ``(interpret, backend)``."""
    if backend not in (None, *backends):
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend == "mosaic_gpu":
        if chunk % 64:
            raise ValueError(f"backend='mosaic_gpu' needs chunk_size a multiple of 64, got {chunk}")
        return resolve(interpret, "triton")[0], backend
    interpret, resolved = resolve(interpret, backend)
    if backend is None and resolved == "triton" and not interpret and default and chunk % 64 == 0:
        resolved = "mosaic_gpu"
    return interpret, resolved


def kernel(body, out_type, scratch, grid, grid_names, interpret: bool):
    """``plgpu.kernel`` as every body here calls it: exact math (``approx_math=False``), Mosaic GPU's interpreter
    when ``interpret``."""
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                        compiler_params=plgpu.CompilerParams(approx_math=False),
                        interpret=interpret_params() if interpret else None)


def loader(interpret: bool):
    """``load(ref, layout)``: a register load in ``layout``; register layouts matter to the lowering only, so Mosaic GPU's
    interpreter reads the ref plainly."""
    if interpret:
        return lambda ref, layout: ref[...]
    return lambda ref, layout: plgpu.load(ref, (), layout=layout)


def iota(c: int, interpret: bool):
    """``iota(d)``: the ``[c, c]`` index along ``d``, in the ``WGMMA`` layout when compiled."""
    if interpret:
        return lambda d: lax.broadcasted_iota(jnp.int32, (c, c), d)
    return lambda d: plgpu.broadcasted_iota(jnp.int32, (c, c), d, layout=WG)


def transposed(x_smem, xt_smem, interpret: bool):
    """``Xᵀ`` as a ``wgmma`` operand: a transposed shared-memory view; under the interpreter, which has no such view, a
    transposed copy in ``xt_smem`` (the caller commits it)."""
    if interpret:
        xt_smem[...] = x_smem[...].T
        return xt_smem
    return plgpu.transpose_ref(x_smem, (1, 0))


def mma(a, b, shape):
    """``a @ b`` (``wgmma`` operands) into a fresh float32 accumulator of ``shape``, returned in registers."""
    def f(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(f, plgpu.ACC(shape, F32))


def copy_in(bars, first: int, *pairs):
    """TMA each ``(src, dst)`` pair from HBM into shared memory on its own barrier (``bars[first]`` on), then wait for
    them all."""
    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[first + i])
    for i in range(len(pairs)):
        plgpu.barrier_wait(bars.at[first + i])


def load_state(src, s32_smem, bar, interpret: bool):
    """A walk's prologue: TMA the float32 state block ``src`` into ``s32_smem``, wait, load it in the ``WGMMA`` layout."""
    plgpu.copy_gmem_to_smem(src, s32_smem, bar)
    plgpu.barrier_wait(bar)
    return loader(interpret)(s32_smem, WG)


def store_state(state, s32_smem, dst):
    """A walk's epilogue: the float32 ``state`` through ``s32_smem`` (once earlier stores have left) to ``dst``."""
    plgpu.wait_smem_to_gmem(0)
    s32_smem[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s32_smem, dst)
    plgpu.wait_smem_to_gmem(0)


def _linear_walk_kernel(x_ref, y_ref, g_ref, init_ref, hs_ref, last_ref, x_smem, y_smem, ys_smem, g_smem, s32_smem,
                        hs_smem, xt_smem, bars, *, chunk, n_chunks, reverse, time_major, interpret):
    c = chunk
    load = loader(interpret)
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * BV, BV)
    hs_smem = s32_smem if hs_smem is None else hs_smem
    carry = load_state(init_ref.at[ib, ih, :, cols], s32_smem, bars.at[0], interpret)

    def body(i, carry):
        n = n_chunks - 1 - i if reverse else i
        rows = pl.ds(n * c, c)
        tok = (ib, rows, ih) if time_major else (ib, ih, rows)
        plgpu.copy_gmem_to_smem(x_ref.at[tok], x_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(y_ref.at[(*tok, cols)], y_smem, bars.at[2])
        plgpu.copy_gmem_to_smem(g_ref.at[ib, ih, :, rows], g_smem, bars.at[3])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's carry has left hs_smem
        hs_smem[...] = carry.astype(hs_smem.dtype)  # the carry meeting chunk n
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hs_smem, hs_ref.at[ib, ih, n, :, cols])
        for j in range(1, 4):
            plgpu.barrier_wait(bars.at[j])

        w = load(g_smem.at[0], WG.reduce(1))  # [C], indexed by the token row
        ys_smem[...] = (load(y_smem, WG).astype(F32) * lax.broadcast_in_dim(w, (c, BV), [0])).astype(BF16)
        xt = transposed(x_smem, xt_smem, interpret)
        plgpu.commit_smem()
        return g_smem[1, c - 1] * carry + mma(xt, ys_smem, carry.shape)

    carry = lax.fori_loop(0, n_chunks, body, carry)
    store_state(carry, s32_smem, last_ref.at[ib, ih, :, cols])


def linear_walk(x, y, w, a, init, *, chunk: int, reverse: bool, interpret, out_dtype=F32, time_major: bool = False):
    r"""The linear walk over the chunks on Mosaic GPU: per chunk ``n`` (first to last, or last to first when
    ``reverse``), write the carry meeting it, ``H_n = S``, then ``S ← a_n S + Xᵀ (Y ⊙ w)``; return every ``H_n`` and
    the carry left at the end.

    ``x [b, h, Tp, Kp]``, ``y [b, h, Tp, Vp]`` (``time_major``: ``[b, Tp, h, ·]``, read in place with strided TMA
    boxes), per-row weights ``w [b, h, Tp]``, per-chunk carries ``a [b, h, N]``, ``init [b, h, Kp, Vp]``; both head
    dims padded to :func:`key_pad` and ``chunk`` a multiple of 64 (the callers check). Returns ``H [b, h, N, Kp, Vp]``
    in ``out_dtype`` and the final carry ``[b, h, Kp, Vp]`` float32.

    Grid ``(batch, heads, value blocks of 64)``: one warpgroup owns one head's ``[Kp, 64]`` slice and walks the chunks
    with a ``fori_loop``, the float32 carry in registers in the ``WGMMA`` accumulator layout. Per chunk, TMA copies
    ``X [C, Kp]``, ``Y [C, 64]`` and the chunk's ``w`` and ``a`` rows into shared memory; ``H_n`` leaves through
    shared memory with a TMA store (from the float32 state buffer when ``out_dtype`` is float32); the rows of ``Y``
    are scaled in registers and stored as bf16, and one ``wgmma`` (``Xᵀ`` a transposed shared-memory view,
    ``M = Kp``) adds the update. Matmul operands are bf16 with float32 accumulation. Mosaic GPU's interpreter
    (``interpret``) has no transposed view for ``wgmma``: under it ``Xᵀ`` is staged through shared memory."""
    b, h = init.shape[:2]
    kp, vp = x.shape[-1], y.shape[-1]
    tp = x.shape[1] if time_major else x.shape[2]
    interpret = bool(interpret)
    gates = jnp.stack([w, jnp.repeat(a, chunk, axis=2)], axis=2).astype(F32)  # [b, h, 2, Tp]: w, a on each token
    sm = functools.partial(smem, plain=interpret)
    f32_out = jnp.dtype(out_dtype) == F32
    scratch = [sm((chunk, kp)), sm((chunk, BV)), sm((chunk, BV)), plgpu.SMEM((2, chunk), F32), sm((kp, BV), F32),
               None if f32_out else sm((kp, BV), out_dtype), sm((kp, chunk)) if interpret else None,
               plgpu.Barrier(num_barriers=4)]
    out = [jax.ShapeDtypeStruct((b, h, tp // chunk, kp, vp), out_dtype), jax.ShapeDtypeStruct((b, h, kp, vp), F32)]
    body = functools.partial(_linear_walk_kernel, chunk=chunk, n_chunks=tp // chunk, reverse=reverse,
                             time_major=time_major, interpret=interpret)
    return kernel(body, out, scratch, (b, h, vp // BV), ("b", "h", "v"), interpret)(
        x.astype(BF16), y.astype(BF16), gates, init.astype(F32))
