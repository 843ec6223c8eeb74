r"""A Pallas kernel for the diagonal linear recurrence (recurrentgemma-style, TPU-first).

.. math::  h_t = a_t \odot h_{t-1} + b_t \quad\text{(forward)}, \qquad
           h_t = a_t \odot h_{t+1} + b_t \quad\text{(reverse)}

How it works
    The kernel is a plain *sequential* scan: a ``fori_loop`` over the time steps of one block,
    reading ``a_ref[t]`` / ``b_ref[t]`` and writing ``h_ref[t]``, with the state in registers.
    The grid is ``(batch, channel blocks, time blocks)``; time is the last, sequential
    ("arbitrary") axis. The carry between time blocks lives in the ``h_last`` output, whose
    block index ignores the time axis, so it stays resident on chip (VMEM on TPU) while the grid
    walks the time blocks in order; it is initialised from ``h0`` at the first time block.
    ``reverse=True`` walks the time blocks and the steps inside a block backwards.

Layout
    Outside the kernel, ``[batch, time, ...]`` is flattened to ``[B, T, C]``, time is padded to a
    multiple of the time block and channels to the channel block (``a = 1, b = 0`` padding keeps
    the state unchanged, so ``h_last`` is exact), and ``C`` is viewed as ``[R, L]`` with
    ``L = 128`` lanes (or ``L = C`` when ``C <= 128``). A block is ``(time_block, r, L)`` with
    ``r = min(8, R)``: each step touches one ``(8, 128)`` tile, the TPU vreg shape, and the
    last two block dims are multiples of ``(8, 128)`` or equal to the full dims, as Mosaic TPU
    requires.

Complex numbers
    Pallas has no complex dtype: complex64 inputs are carried as separate float32 real and
    imaginary arrays, and the kernel does the complex multiply-add by hand.

Backward
    The VJP is the *same* kernel run in the opposite direction on the cotangents, in its
    ``transpose`` form: with ``u`` the carry, ``dh_t = g_t + u`` and ``u <- a_t dh_t``, which is
    ``dh_t = g_t + a_{t+1} dh_{t+1}`` without shifting ``a``; the final carry is ``dh0 = a_0 dh_0``.
    Then ``da_t = dh_t h_{t-1}`` (one fused elementwise op outside the kernel) and ``db = dh``.
    Only ``a``, ``h`` and ``h0`` are saved. Complex cotangents follow JAX's convention (the
    transpose, no conjugation), matching autodiff of the ``lax.scan`` reference.

GPU blocks
    On a GPU the grid's programs run in parallel, so a carry across time blocks would be wrong:
    there the default is one time block spanning the whole (padded, power-of-two) sequence and
    power-of-two channel blocks, as recurrentgemma does.

Tests
    Values and gradients in interpret mode (``interpret=True``, CPU) against the seqjax reference
    (``tests/test_pallas_linear_scan.py``); the lowering to Mosaic TPU (``tests/test_pallas_lowering.py``)
    and libtpu's compile for a TPU (``tests/test_tpu_compile.py``). What has run on which device:
    ``benchmarks/results/``.

Reference: De et al. 2024, "Griffin" (arXiv:2402.19427), §2.4 and recurrentgemma's
``jax/pallas.py``; this is an independent implementation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util

LANES = 128
ROWS = 8
DEFAULT_TIME_BLOCK = 128

__all__ = ["linear_scan_fwd", "linear_scan_bwd", "linear_scan_pallas"]


# ----------------------------------------------------------------------------- the kernel


def _cmul(x, y):
    """Complex (or real, one part) product of tuples of parts."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (xr, xi), (yr, yi) = x, y
    return (xr * yr - xi * yi, xr * yi + xi * yr)


def _add(x, y):
    return tuple(u + v for u, v in zip(x, y))


def _scan_kernel(*refs, parts, time_block, reverse, transpose):
    # refs: a[parts], b[parts], h0[parts] | h[parts], h_last[parts]; h_last is the resident carry.
    a_refs, b_refs, h0_refs, h_refs, carry_refs = (
        refs[i * parts : (i + 1) * parts] for i in range(5)
    )

    @pl.when(pl.program_id(2) == 0)
    def _init():
        for src, dst in zip(h0_refs, carry_refs):
            dst[...] = src[...]

    def step(i, carry):
        t = time_block - 1 - i if reverse else i
        a_t = tuple(r[t] for r in a_refs)
        b_t = tuple(r[t] for r in b_refs)
        if transpose:  # dh_t = g_t + u;  u <- a_t dh_t
            out = _add(b_t, carry)
            new = _cmul(a_t, out)
        else:  # h_t = a_t h + b_t
            out = new = _add(_cmul(a_t, carry), b_t)
        for r, o in zip(h_refs, out):
            r[t] = o
        return new

    carry = lax.fori_loop(0, time_block, step, tuple(r[...] for r in carry_refs))
    for r, c in zip(carry_refs, carry):
        r[...] = c


# ----------------------------------------------------------------------------- layout


def _round_up(n, m):
    return -(-n // m) * m


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def _blocks(t, c, time_block, platform):
    """(time block, padded T, lanes L, rows per block r, padded rows R)."""
    if platform == "gpu":  # grid programs run in parallel: one time block, power-of-two tiles
        if time_block is not None and time_block < t:
            raise ValueError(
                f"time_block={time_block} must be >= T={t} on GPU, where grid programs run in "
                "parallel and cannot pass a carry between time blocks"
            )
        lanes = LANES
        rows_total = -(-c // lanes)
        r = min(ROWS, _next_pow2(rows_total))
        tb = time_block or _next_pow2(t)
    else:
        lanes = c if c <= LANES else LANES
        rows_total = -(-c // lanes)
        r = min(ROWS, rows_total)
        tb = time_block or min(DEFAULT_TIME_BLOCK, _round_up(t, 8))
    return tb, _round_up(t, tb), lanes, r, _round_up(rows_total, r)


def _split(x, complex_):
    return (jnp.real(x), jnp.imag(x)) if complex_ else (x,)


def _to_tiles(x, t_pad, c_pad, lanes, fill):
    """[B, T, C] -> [B, T_pad, R, L], padding time and channels with ``fill``."""
    bsz, t, c = x.shape
    if t_pad != t or c_pad != c:
        x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, c_pad - c)), constant_values=fill)
    return x.reshape(bsz, t_pad, c_pad // lanes, lanes)


def _run(a, b, h0, *, reverse, transpose, interpret, time_block):
    """The pallas_call on ``[B, T, C]`` arrays of one dtype (float32 or complex64)."""
    bsz, t, c = b.shape
    complex_ = jnp.iscomplexobj(b)
    platform = "cpu" if interpret else _util.platform()
    tb, t_pad, lanes, r, rows = _blocks(t, c, time_block, platform)
    c_pad = rows * lanes
    n_t = t_pad // tb
    parts = 2 if complex_ else 1

    a_parts = [_to_tiles(x, t_pad, c_pad, lanes, 1.0 if k == 0 else 0.0)
               for k, x in enumerate(_split(a, complex_))]
    b_parts = [_to_tiles(x, t_pad, c_pad, lanes, 0.0) for x in _split(b, complex_)]
    h0_parts = [
        _to_tiles(x[:, None], 1, c_pad, lanes, 0.0)[:, 0] for x in _split(h0, complex_)
    ]

    def t_index(ti):
        return n_t - 1 - ti if reverse else ti

    seq_spec = pl.BlockSpec((None, tb, r, lanes), lambda bi, ci, ti: (bi, t_index(ti), ci, 0))
    state_spec = pl.BlockSpec((None, r, lanes), lambda bi, ci, ti: (bi, ci, 0))
    seq_shape = jax.ShapeDtypeStruct((bsz, t_pad, rows, lanes), jnp.float32)
    state_shape = jax.ShapeDtypeStruct((bsz, rows, lanes), jnp.float32)

    compiler_params = None
    if platform == "tpu":
        compiler_params = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        )
    kernel = functools.partial(
        _scan_kernel, parts=parts, time_block=tb, reverse=reverse, transpose=transpose
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=[seq_shape] * parts + [state_shape] * parts,
        grid=(bsz, rows // r, n_t),
        in_specs=[seq_spec] * (2 * parts) + [state_spec] * parts,
        out_specs=[seq_spec] * parts + [state_spec] * parts,
        interpret=interpret,
        compiler_params=compiler_params,
        name="linear_scan_transpose" if transpose else "linear_scan",
    )(*a_parts, *b_parts, *h0_parts)

    h_parts, last_parts = outs[:parts], outs[parts:]
    h = [x.reshape(bsz, t_pad, c_pad)[:, :t, :c] for x in h_parts]
    last = [x.reshape(bsz, c_pad)[:, :c] for x in last_parts]
    if complex_:
        return lax.complex(*h), lax.complex(*last)
    return h[0], last[0]


def _flat(x, bsz, t):
    return x.reshape(bsz, t, math.prod(x.shape[2:]))


def _compute_dtype(*xs):
    return jnp.complex64 if any(jnp.iscomplexobj(x) for x in xs) else jnp.float32


# ----------------------------------------------------------------------------- entry points


def linear_scan_fwd(a, b, h0, *, interpret=False, reverse=False, time_block=None):
    """The forward kernel: ``(h, h_last)`` for ``a``, ``b`` ``[B, T, ...]`` and ``h0`` ``[B, ...]``.

    Inputs are float32 or complex64 (others are cast); ``h`` and ``h_last`` come back in that
    dtype. No custom VJP: :mod:`seqjax.scan` wraps it in its own, and :func:`linear_scan_pallas`
    is the differentiable entry point.
    """
    bsz, t = b.shape[:2]
    cdtype = _compute_dtype(a, b, h0)
    a = jnp.broadcast_to(a, b.shape).astype(cdtype)
    h, h_last = _run(
        _flat(a, bsz, t),
        _flat(b.astype(cdtype), bsz, t),
        jnp.asarray(h0, cdtype).reshape(bsz, -1),
        reverse=reverse,
        transpose=False,
        interpret=interpret,
        time_block=time_block,
    )
    return h.reshape(b.shape), h_last.reshape(b.shape[:1] + b.shape[2:])


def linear_scan_bwd(a, h, h0, g, g_last, *, interpret=False, reverse=False, time_block=None):
    """Cotangents ``(da, db, dh0)`` of ``(h, h_last) = scan(a, b, h0)`` given ``(g, g_last)``.

    One transposed kernel run in the opposite direction gives ``dh`` (= ``db``) and ``dh0``;
    then ``da_t = dh_t h_{t-1}`` with ``h_{-1} = h0`` (``h_{t+1}``, ``h_T = h0`` in reverse).
    Everything in float32 / complex64.
    """
    bsz, t = h.shape[:2]
    cdtype = _compute_dtype(a, h, g)
    dh, dh0 = _run(
        _flat(jnp.broadcast_to(a, h.shape).astype(cdtype), bsz, t),
        _flat(g.astype(cdtype), bsz, t),
        jnp.asarray(g_last, cdtype).reshape(bsz, -1),
        reverse=not reverse,
        transpose=True,
        interpret=interpret,
        time_block=time_block,
    )
    dh = dh.reshape(h.shape)
    h0 = jnp.asarray(h0, cdtype)[:, None]
    h_prev = (
        jnp.concatenate([h[:, 1:], h0], axis=1)
        if reverse
        else jnp.concatenate([h0, h[:, :-1]], axis=1)
    )
    return dh * h_prev, dh, dh0.reshape(h0.shape[:1] + h0.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_scan(a, b, h0, reverse, interpret, time_block):
    return linear_scan_fwd(a, b, h0, interpret=interpret, reverse=reverse, time_block=time_block)


def _pallas_scan_fwd(a, b, h0, reverse, interpret, time_block):
    h, h_last = _pallas_scan(a, b, h0, reverse, interpret, time_block)
    return (h, h_last), (a, h, h0)


def _pallas_scan_bwd(reverse, interpret, time_block, res, cts):
    a, h, h0 = res
    g, g_last = cts
    return linear_scan_bwd(
        a, h, h0, g, g_last, interpret=interpret, reverse=reverse, time_block=time_block
    )


_pallas_scan.defvjp(_pallas_scan_fwd, _pallas_scan_bwd)


def linear_scan_pallas(a, b, h0=None, *, reverse=False, interpret=False, time_block=None):
    """Differentiable ``h_t = a_t h_{t-1} + b_t`` (``h_{t+1}`` if ``reverse``) with the kernel.

    Args:
      a: decays ``[B, T, ...]`` (or broadcastable to ``b``), float or complex.
      b: inputs ``[B, T, ...]``.
      h0: initial state ``[B, ...]``, zeros if ``None``.
      reverse: scan from ``t = T-1`` down to 0; ``h_last`` is then the state at ``t = 0``.
      interpret: run the kernel as HLO (CPU tests).
      time_block: time steps per grid step (default 128; on GPU the whole sequence, padded to a
        power of two, and any value must be >= T there).

    Returns:
      ``(h, h_last)``: ``h`` ``[B, T, ...]`` in ``b``'s dtype (complex64 if any input is
      complex), ``h_last`` ``[B, ...]`` in float32 / complex64. Gradients w.r.t. ``a``, ``b``,
      ``h0`` come back in their dtypes.
    """
    if b.ndim < 2:
        raise ValueError(f"b must have shape [batch, time, ...], got {list(b.shape)}")
    state_shape = b.shape[:1] + b.shape[2:]
    if jnp.broadcast_shapes(jnp.shape(a), b.shape) != b.shape:
        raise ValueError(f"a must broadcast to b's shape {list(b.shape)}, got {list(jnp.shape(a))}")
    if h0 is not None and tuple(jnp.shape(h0)) != state_shape:
        raise ValueError(f"h0 must have shape {list(state_shape)} [batch, ...], got "
                         f"{list(jnp.shape(h0))}")
    cdtype = _compute_dtype(a, b, *(() if h0 is None else (h0,)))
    out_dtype = cdtype if cdtype == jnp.complex64 else b.dtype
    a = jnp.broadcast_to(jnp.asarray(a), b.shape)
    h0_ = jnp.zeros(state_shape, cdtype) if h0 is None else h0
    h, h_last = _cast_vjp(a, b, h0_, cdtype, reverse, interpret, time_block)
    return h.astype(out_dtype), h_last


def _cast_vjp(a, b, h0, cdtype, reverse, interpret, time_block):
    # Cast outside the custom_vjp so that autodiff casts the cotangents back to each input's dtype.
    return _pallas_scan(
        a.astype(cdtype), b.astype(cdtype), h0.astype(cdtype), reverse, interpret, time_block
    )
