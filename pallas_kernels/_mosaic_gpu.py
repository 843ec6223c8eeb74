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
import math

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

__all__ = ["BV", "JAX_0_11", "SMEM_BUDGET", "SMEM_LIMIT", "WG", "chunk_specs", "copy_in", "interpret_params", "iota", "kernel", "key_pad",
           "linear_walk", "load_state", "loader", "mma", "operand_transforms", "resolve_mosaic_gpu", "smem", "smem_bytes", "store_state",
           "block_program", "check_operand_dtype", "mma_sum", "operand_copy",
           "transposed", "walk_order", "walk_pipeline", "walk_stages"]

BF16 = jnp.bfloat16
F32 = jnp.float32
WG = plgpu.Layout.WGMMA
BV = 64  # value columns per program of a walk
SMEM_LIMIT = 227 * 1024  # the most shared memory one block may have on an H100/H200
SMEM_BUDGET = 200 * 1024  # what a walk asks for with two pipeline slots (the rest: the pipeline's barriers, headroom)
JAX_0_11 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def key_pad(n: int) -> int:
    """A head dim padded for ``wgmma``: a power of two >= 64 (its ``M``; bf16 rows of 128 bytes, the one swizzle
    both operands then share). Padding with zeros is exact."""
    return max(64, 1 << (int(n) - 1).bit_length())


def smem(shape, dtype=BF16, plain=False):
    """A ``wgmma`` operand (or a ``WGMMA``-layout array's home) in shared memory: ``(8, row)`` tiles, swizzled by the
    row's bytes (at most 128); ``plain``: no transforms (Mosaic GPU's interpreter)."""
    return plgpu.SMEM(shape, dtype, transforms=() if plain else operand_transforms(shape, dtype))


def operand_transforms(shape, dtype=BF16) -> tuple:
    """:func:`smem`'s ``wgmma`` operand layout, ``(8, row)`` tiles swizzled by the row's bytes (at most 128), as
    transforms (for a pipeline's ``BlockSpec``)."""
    swizzle = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def interpret_params():
    """Mosaic GPU's own interpreter, to pass as ``plgpu.kernel(interpret=...)``; raises where this jax has none."""
    if InterpretGPUParams is None:  # pragma: no cover - depends on the jax version
        raise NotImplementedError("this jax has no Mosaic GPU interpreter: run backend='mosaic_gpu' on a GPU")
    return InterpretGPUParams()


def check_operand_dtype(backend: str, dtype) -> None:
    """The Mosaic GPU bodies take float32 or bf16 inputs (their ``wgmma`` operands are bf16, and outputs in the input
    dtype leave through bf16 or float32 buffers); other dtypes raise before lowering."""
    if backend == "mosaic_gpu" and jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(BF16)):
        raise ValueError(f"backend='mosaic_gpu' takes float32 or bfloat16 q, k, v, got {jnp.dtype(dtype).name}: cast "
                         "them, or use backend='triton'")


def resolve_mosaic_gpu(interpret, backend, chunk: int, *, default: bool, backends: tuple[str, ...]):
    """``_util.resolve`` plus a Mosaic GPU body. ``backend="mosaic_gpu"`` asks for it (interpreted on the CPU);
    ``None`` takes it on a GPU when ``default`` (the kernel's compiled tests passed and jax >= 0.11) and ``chunk`` is
    64 (larger chunks stay on Triton: at 128 the walks' shared memory passes an H100's at head dim 256, see
    :func:`walk_stages`), else what ``resolve`` picks (Triton on a GPU and in the CPU interpreter, Mosaic on a TPU).
    Returns ``(interpret, backend)``."""
    if backend not in (None, *backends):
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend == "mosaic_gpu":
        if chunk % 64:
            raise ValueError(f"backend='mosaic_gpu' needs chunk_size a multiple of 64, got {chunk}")
        return resolve(interpret, "triton")[0], backend
    interpret, resolved = resolve(interpret, backend)
    if backend is None and resolved == "triton" and not interpret and default and chunk == 64:
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


def operand_copy(src_smem, dst_smem, interpret: bool):
    """A float32 block in shared memory copied into ``dst_smem`` as a ``wgmma`` operand (in ``dst_smem``'s dtype, bf16
    as compiled); returns its float32 values too (the caller commits the copy)."""
    x = loader(interpret)(src_smem, WG)
    dst_smem[...] = x.astype(dst_smem.dtype)
    return x


def mma_sum(pairs, shape):
    """``Σ a @ b`` over ``pairs`` of ``wgmma`` operands into one fresh float32 accumulator of ``shape``, returned in
    registers."""
    def f(acc):
        for a, b in pairs:
            plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(f, plgpu.ACC(shape, F32))


def mma(a, b, shape):
    """``a @ b`` (``wgmma`` operands) into a fresh float32 accumulator of ``shape``, returned in registers."""
    return mma_sum([(a, b)], shape)


def block_program(c: int, bk: int, bv: int, nv: int):
    """A chunk-parallel gradient program's place on the grid ``(b, h, n, kv)``, ``kv`` = key block · ``nv`` + value
    block: ``(ib, ih, n, kv, rows, key columns, value columns)``, the slices ``[C]``, ``[bk]``, ``[bv]`` wide."""
    ib, ih, n, kv = (lax.axis_index(a) for a in ("b", "h", "n", "kv"))
    return ib, ih, n, kv, pl.ds(n * c, c), pl.ds(kv // nv * bk, bk), pl.ds(kv % nv * bv, bv)


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


def walk_order(n_chunks: int, reverse: bool):
    """Step ``i`` of a walk -> its chunk (last to first when ``reverse``)."""
    return (lambda i: n_chunks - 1 - i) if reverse else (lambda i: i)


def chunk_specs(c: int, blocks, order, interpret: bool, gate_rows: int) -> list:
    """A walk's TMA pipeline (``plgpu.emit_pipeline``'s ``in_specs``): per step ``i``, chunk ``order(i)``'s ``[C, width]``
    block of each input (``blocks``: ``(width, dtype)`` pairs, for refs whose rows are the tokens; ``wgmma`` operand
    layout in shared memory, none under the interpreter), then its ``[gate_rows, C]`` block of the gates.

    The pipeline refills a slot as soon as the body that used it returns, so a body makes its register reads of
    the slot's buffers before a ``plgpu.commit_smem()`` (a proxy fence and a warpgroup barrier: no warp still
    reading when another issues the next copy), after it only the ``wgmma`` products it awaits read them, and it
    returns after another such barrier (every warp has waited on those products)."""
    tr = (lambda shape, dtype: ()) if interpret else operand_transforms
    return [plgpu.BlockSpec((c, w), lambda i: (order(i), 0), transforms=tr((c, w), dt)) for w, dt in blocks] + [
        plgpu.BlockSpec((gate_rows, c), lambda i: (0, order(i)))]


def smem_bytes(buffers) -> int:
    """Bytes of the shared-memory buffers (``plgpu.SMEM`` refs; ``None`` entries, the interpreter's staging buffers
    when compiling, skipped)."""
    return sum(math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in buffers if b is not None)


def walk_stages(c: int, blocks, gate_rows: int, buffers) -> int:
    """Slots of a walk's TMA pipeline for :func:`chunk_specs` ``(c, blocks, gate_rows)``: two (the next chunk's copies
    in flight while this chunk's matmuls run) where two chunks' inputs and the walk's own ``buffers`` (its scratch as
    compiled, :func:`smem_bytes`) fit :data:`SMEM_BUDGET`, else one. Raises where one slot passes :data:`SMEM_LIMIT`
    (Mosaic GPU would refuse to lower the kernel, naming only its byte count): the GLA forward and the delta-rule
    walks at ``C = 128, Kp = 256``, or at head dim 512. The count leaves out Mosaic GPU's own padding of each buffer
    to 1 KiB and the barriers (under 1.1 KiB in all); :data:`SMEM_BUDGET` leaves room for them."""
    per_chunk = sum(c * w * jnp.dtype(dt).itemsize for w, dt in blocks) + gate_rows * c * 4
    fixed = smem_bytes(buffers)
    if per_chunk + fixed > SMEM_LIMIT:
        widths = ", ".join(f"[{c}, {w}]" for w, _ in blocks)
        raise ValueError(f"a Mosaic GPU walk at chunk_size {c} with per-chunk inputs {widths} needs "
                         f"{(per_chunk + fixed) // 1024} KiB of shared memory, over the {SMEM_LIMIT // 1024} KiB of an "
                         "H100/H200 block: use a smaller chunk_size or head dim, or backend='triton'")
    return 2 if 2 * per_chunk + fixed <= SMEM_BUDGET else 1


def walk_pipeline(body, inputs, gates, *, c: int, order, n_chunks: int, own, interpret: bool, init):
    """Run a walk's ``body(step, *input_slots, gate_slot, carry) -> carry`` over its chunks through a TMA pipeline
    (``plgpu.emit_pipeline`` with the state as its carry; returns the last carry). ``inputs``: views ``[Tp, width]``
    of the per-token inputs, ``gates``: a view ``[rows, Tp]`` of the gate rows; ``own``: the walk's other
    shared-memory buffers (its scratch refs; ``None`` skipped), which with :func:`walk_stages` decide the slots."""
    blocks = [(x.shape[-1], x.dtype) for x in inputs]
    rows = gates.shape[0]
    stages = walk_stages(c, blocks, rows, own)
    specs = chunk_specs(c, blocks, order, interpret, rows)
    return plgpu.emit_pipeline(body, grid=(n_chunks,), max_concurrent_steps=stages, init_carry=init, in_specs=specs)(
        *inputs, gates)


def _linear_walk_kernel(x_ref, y_ref, g_ref, init_ref, hs_ref, last_ref, ys_smem, s32_smem, hs_smem, xt_smem, bar, *,
                        chunk, n_chunks, reverse, time_major, interpret):
    c = chunk
    load = loader(interpret)
    ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(iv * BV, BV)
    own = (ys_smem, s32_smem, hs_smem)  # hs_smem: None when H is float32 (it leaves through s32_smem)
    hs_smem = s32_smem if hs_smem is None else hs_smem
    carry = load_state(init_ref.at[ib, ih, :, cols], s32_smem, bar.at[0], interpret)
    at = (lambda ref, *rest: ref.at[(ib, slice(None), ih, *rest)]) if time_major else (
        lambda ref, *rest: ref.at[(ib, ih, slice(None), *rest)])
    chunk_of = walk_order(n_chunks, reverse)

    def body(step, x_smem, y_smem, g_smem, carry):
        n = chunk_of(step[0])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's carry has left hs_smem
        hs_smem[...] = carry.astype(hs_smem.dtype)  # the carry meeting chunk n
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hs_smem, hs_ref.at[ib, ih, n, :, cols])
        w = load(g_smem.at[0], WG.reduce(1))  # [C], indexed by the token row
        a_n = g_smem[1, c - 1]
        ys_smem[...] = (load(y_smem, WG).astype(F32) * lax.broadcast_in_dim(w, (c, BV), [0])).astype(BF16)
        xt = transposed(x_smem, xt_smem, interpret)
        # every register read of this slot's buffers comes before this barrier (commit_smem: a proxy fence and a
        # warpgroup barrier); after it only the awaited wgmma reads them, so the pipeline may refill the slot
        plgpu.commit_smem()
        carry = a_n * carry + mma(xt, ys_smem, carry.shape)
        # a warpgroup barrier after the wgmma that reads the slot: every warp has waited on it before the pipeline
        # (one issuing thread) refills the slot
        plgpu.commit_smem()
        return carry

    carry = walk_pipeline(body, (at(x_ref), at(y_ref, cols)), g_ref.at[ib, ih], c=c, order=chunk_of, n_chunks=n_chunks,
                          own=own, interpret=interpret, init=carry)
    store_state(carry, s32_smem, last_ref.at[ib, ih, :, cols])


def linear_walk(x, y, w, a, init, *, chunk: int, reverse: bool, interpret, out_dtype=F32, time_major: bool = False):
    r"""The linear walk over the chunks on Mosaic GPU: per chunk ``n`` (first to last, or last to first when
    ``reverse``), write the carry meeting it, ``H_n = S``, then ``S ← a_n S + Xᵀ (Y ⊙ w)``; return every ``H_n`` and
    the carry left at the end.

    ``x [b, h, Tp, Kp]``, ``y [b, h, Tp, Vp]`` (``time_major``: ``[b, Tp, h, ·]``, read in place with strided TMA
    boxes), per-row weights ``w [b, h, Tp]``, per-chunk carries ``a [b, h, N]``, ``init [b, h, Kp, Vp]``; both head
    dims padded to :func:`key_pad` and ``chunk`` a multiple of 64 (the callers check). Returns ``H [b, h, N, Kp, Vp]``
    in ``out_dtype`` and the final carry ``[b, h, Kp, Vp]`` float32.

    Grid ``(batch, heads, value blocks of 64)``: one warpgroup owns one head's ``[Kp, 64]`` slice and walks the chunks,
    the float32 carry in registers in the ``WGMMA`` accumulator layout. The chunks' ``X [C, Kp]``, ``Y [C, 64]`` and
    ``w``, ``a`` rows come through a TMA pipeline (``plgpu.emit_pipeline`` with the carry): with two slots, chunk
    ``n + 1``'s copies are in flight while chunk ``n``'s matmul runs; one slot where two would pass the shared-memory
    budget (:func:`walk_stages`). ``H_n`` leaves through shared memory with a TMA store (from the float32 state
    buffer when ``out_dtype`` is float32); the rows of ``Y`` are scaled in registers and stored as bf16, and one
    ``wgmma`` (``Xᵀ`` a transposed shared-memory view, ``M = Kp``) adds the update. Matmul operands are bf16 with
    float32 accumulation. Mosaic GPU's interpreter (``interpret``) has no transposed view for ``wgmma``: under it
    ``Xᵀ`` is staged through shared memory."""
    b, h = init.shape[:2]
    kp, vp = x.shape[-1], y.shape[-1]
    tp = x.shape[1] if time_major else x.shape[2]
    interpret = bool(interpret)
    gates = jnp.stack([w, jnp.repeat(a, chunk, axis=2)], axis=2).astype(F32)  # [b, h, 2, Tp]: w, a on each token
    sm = functools.partial(smem, plain=interpret)
    f32_out = jnp.dtype(out_dtype) == F32
    scratch = [sm((chunk, BV)), sm((kp, BV), F32), None if f32_out else sm((kp, BV), out_dtype),
               sm((kp, chunk)) if interpret else None, plgpu.Barrier(num_barriers=1)]
    out = [jax.ShapeDtypeStruct((b, h, tp // chunk, kp, vp), out_dtype), jax.ShapeDtypeStruct((b, h, kp, vp), F32)]
    body = functools.partial(_linear_walk_kernel, chunk=chunk, n_chunks=tp // chunk, reverse=reverse,
                             time_major=time_major, interpret=interpret)
    return kernel(body, out, scratch, (b, h, vp // BV), ("b", "h", "v"), interpret)(
        x.astype(BF16), y.astype(BF16), gates, init.astype(F32))
