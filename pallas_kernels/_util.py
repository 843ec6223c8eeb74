"""Argument handling shared by the chunked kernels' entry points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from seqjax import sharding

BACKENDS = ("triton", "mosaic_tpu")


def platform() -> str:
    """The platform the kernels are traced for: that of the devices of the mesh in the innermost
    ``seqjax.sharding.use_rules`` if there is one, else ``jax.default_backend()``. The mesh decides when
    a train step is compiled ahead of time for a TPU topology from a CPU host
    (``jax.experimental.topologies``, as MaxText's ``train_compile``): its devices are TPUs, the process's
    backend is the CPU, and the kernels must take their TPU bodies."""
    mesh = sharding.current()[0]
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(interpret: bool | None, backend: str | None) -> tuple[bool, str]:
    """``backend=None``: ``"mosaic_tpu"`` on a TPU, else ``"triton"`` (the GPU lowering, and the body the CPU
    interprets). ``interpret=None``: interpret on the CPU, and the TPU bodies anywhere but on a TPU (so their
    tests also run on a GPU machine); an explicit ``interpret=False`` still lowers them (``jax.export``).
    The platform is :func:`platform`'s."""
    platform_ = platform()
    if backend is None:
        backend = "mosaic_tpu" if platform_ == "tpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'triton' or 'mosaic_tpu', got {backend!r}")
    if interpret is None:
        interpret = platform_ == "cpu" or (backend == "mosaic_tpu" and platform_ != "tpu")
    return bool(interpret), backend


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Pallas kernel, got {chunk_size}")


def triton_params(interpret: bool, backend: str, *, num_warps: int = 4, num_stages: int = 2):
    """Compiler params that ask for the **Triton** lowering of a GPU ``pallas_call`` (jax 0.11 defaults
    to Mosaic GPU); ``None`` when interpreting or on the TPU. Chosen by ``backend``, not by the process's
    platform, so the Triton lowering can be exported and checked from a CPU
    (``tests/test_pallas_lowering.py``)."""
    if interpret or backend != "triton":
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def walk_params(interpret: bool, backend: str, kp: int, *, num_warps: int = 4, num_stages: int = 2):
    """:func:`triton_params` of a serial walk over the chunks (one program per value block carrying a
    ``[K, BV]`` state): ``num_warps``, ``num_stages`` up to key dims of 128; above, 8 warps and 1 stage, since
    each pipeline stage holds another chunk of ``[C, K]`` inputs in shared memory (at K = 256, 2 stages ask
    for 242-307 KiB, over the 227 KiB of an H100/H200 block, and 4 warps spill registers)."""
    if kp > 128:
        num_warps, num_stages = 8, 1
    return triton_params(interpret, backend, num_warps=num_warps, num_stages=num_stages)


def column_tile(d: int, backend: str, width: int = 64) -> int:
    """The columns a contraction over a head dim ``d`` takes at a time: all of them, but ``width`` on Triton
    past 128 (at 256, ``[C, 256]`` float32 operands and products spill registers on sm_90; Mosaic TPU blocks
    want whole 128-lane multiples). A kernel with more float32 blocks live per tile asks for 32."""
    return d if backend == "mosaic_tpu" or d <= 128 else width


def key_blocks(kp: int, backend: str):
    """The key-axis split of a walk whose key channels are independent (the per-channel GLA state and its
    gradient): ``(bk, grid, kb)``: blocks of :func:`column_tile` columns; ``grid`` the extra grid axis
    (``()`` for one block: a fourth axis of size 1 still costs sm_90 registers, 206 -> 233 in the state
    walk at K = 128); ``kb(m)``, from the index map's trailing ``*m``, the key block's index."""
    bk = column_tile(kp, backend)
    return bk, ((kp // bk,) if bk < kp else ()), (lambda m: m[0] if m else 0)


def key_tiles(d: int, width: int) -> list:
    """Static row slices of ``d`` rows in tiles of ``width``: ``[slice(None)]`` for one tile (the whole axis,
    indexed as before), else ``pl.ds`` tiles; for a state carried as a tuple of row tiles."""
    return [slice(None)] if width == d else [pl.ds(j * width, width) for j in range(d // width)]


def tile_sum(d: int, width: int, term):
    """``Σ_j term(cols_j)`` over ``d`` columns in tiles of ``width``, in tile order; ``term`` reads its operands
    from refs through the column slice and returns an array or a tuple of them. ``width = d``: one
    ``term(slice(None))``; else a ``fori_loop`` from the first tile (one tile's operands live at a time)."""
    if width == d:
        return term(slice(None))
    tile = lambda j: pl.ds(pl.multiple_of(j * width, width), width)
    add = lambda j, acc: jax.tree.map(jnp.add, acc, term(tile(j)))
    return jax.lax.fori_loop(1, d // width, add, term(pl.ds(0, width)))


def column_products(prods: dict, d: int, width: int, whole):
    """``get(name)``: ``prods[name](at)`` summed over the ``d`` columns of the refs it reads. Each product is a
    function of ``at(ref)``, its operands' columns; with ``width < d`` all of them are summed in one
    :func:`tile_sum` loop over column tiles of ``width`` (one tile of each operand live at a time) and ``get``
    returns the sums; else ``get`` computes the named product where it is called, reading the whole axis
    through ``whole(ref)`` (which may hand back values the kernel loaded once)."""
    if width < d:
        sums = tile_sum(d, width, lambda sl: tuple(f(lambda r: r[:, sl]) for f in prods.values()))
        return dict(zip(prods, sums)).__getitem__
    return lambda name: prods[name](whole)


def once_on_tpu(tpu: bool, kernel, in_specs, args, copies: dict[int, int]):
    """``(kernel, in_specs, args)`` of a gradient kernel whose inputs ``copies`` (``{index: index of the input
    it repeats}``) are whole-key-axis copies of earlier ones (GPU programs take a block of 64 key channels
    each, and read the whole axis again for the terms that contract over it). On Mosaic TPU a program's key
    block is the whole axis, so each copy is the same block as its original: it is passed (and copied into
    VMEM) once, and the kernel gets the original's ref in its place. Elsewhere unchanged."""
    if not tpu:
        return kernel, in_specs, args

    def once(*refs):
        refs = list(refs)
        for i in sorted(copies):
            refs.insert(i, refs[copies[i]])
        return kernel(*refs)

    keep = [i for i in range(len(args)) if i not in copies]
    return once, [in_specs[i] for i in keep], [args[i] for i in keep]


def tpu_params(interpret: bool, *dimension_semantics: str):
    """Mosaic TPU compiler params (``"parallel"`` / ``"arbitrary"`` per grid axis); ``None`` interpreted."""
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


NN = (((1,), (0,)), ((), ()))  # x y: contract x's last axis with y's first
NT = (((1,), (1,)), ((), ()))  # x yᵀ
TN = (((0,), (0,)), ((), ()))  # xᵀ y


def mm(x, y, dims=NN, *, precision=None):
    """``lax.dot_general(x, y, dims)`` with float32 accumulation: the kernels' one matmul. Operands below
    float32 (bf16 ``q, k, v``) multiply at the matrix unit's native precision, *explicitly*: left at
    ``None``, ``jax_default_matmul_precision="highest"`` (common in research code) would ask Mosaic TPU to
    contract bf16 operands at fp32, which it refuses ("Bad lhs type"). Float32 operands take ``precision``
    (``None``: the config's)."""
    if x.dtype != jnp.float32 or y.dtype != jnp.float32:
        precision = jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32, precision=precision)


def masked_exp(ok, x):
    """``exp(x)`` where ``ok``, else 0 — masked *before* the ``exp``, so a masked-out ``x`` (``b_t − b_s``
    against a later token, across a document boundary) can neither overflow nor send NaN gradients."""
    return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def token_loop(lo: int, hi: int, body, init, *, rolled: bool):
    """``body(j, carry)`` for the tokens ``j`` of ``[lo, hi)``: a ``fori_loop`` when ``rolled`` (Triton: one
    loop body instead of ``hi - lo`` unrolled copies, whose loads the scheduler hoists and whose values
    then spill registers), else a Python loop with static row offsets (Mosaic TPU, where a dynamic
    single-row offset into a packed bf16 block is not a given)."""
    if rolled:
        return jax.lax.fori_loop(lo, hi, body, init)
    for j in range(lo, hi):
        init = body(j, init)
    return init


def chunk_block(c: int, d: int, reverse_of: int | None = None):
    """``BlockSpec`` of chunk ``l`` (``[C, d]``) of a heads-first ``[b, h, Tp, d]`` array on the grid
    ``(batch, head, chunk)``; with ``reverse_of=N`` chunk ``N − 1 − l`` (the backward's walk)."""
    if reverse_of is None:
        return pl.BlockSpec((None, None, c, d), lambda i, j, l: (i, j, l, 0))
    return pl.BlockSpec((None, None, c, d), lambda i, j, l: (i, j, reverse_of - 1 - l, 0))


def out_specs(c: int, vp: int, *, interpret: bool, backend: str):
    """The pieces of a chunk-parallel output kernel on the grid ``(batch, head, chunk, value block)``:
    ``(bv, blk, rblk, vblk, params)`` — the value block ``bv = min(vp, 128)`` (each program holds a
    ``[K, bv]`` state slice and a ``[C, bv]`` accumulator), ``blk(d)``: chunk ``l``'s ``[C, d]`` rows of a
    heads-first ``[b, h, Tp, d]`` array, ``rblk``: its gates as a row ``[1, C]`` of ``[b, h, N, 1, C]``,
    ``vblk``: its ``[C, bv]`` value block, and the compiler params of either backend."""
    bv = min(vp, 128)
    blk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, l, z: (i, j, l, 0))
    rblk = pl.BlockSpec((None, None, None, 1, c), lambda i, j, l, z: (i, j, l, 0, 0))
    vblk = pl.BlockSpec((None, None, c, bv), lambda i, j, l, z: (i, j, l, z))
    params = (tpu_params(interpret, "parallel", "parallel", "parallel", "parallel") if backend == "mosaic_tpu"
              else triton_params(interpret, backend, num_warps=8, num_stages=2))
    return bv, blk, rblk, vblk, params
