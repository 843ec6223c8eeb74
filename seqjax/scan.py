r"""The scan engine: one entry point for the diagonal linear recurrence

.. math::  h_t = a_t \odot h_{t-1} + b_t, \qquad t = 0 \dots T-1, \quad h_{-1} = h_0,

the workhorse of S4D, S5, LRU, RG-LRU, Mamba, HGRN and of every chunk carry in the matrix-state mixers.

``linear_scan(a, b, h0=..., impl=...)`` evaluates it with one of four interchangeable algorithms:

``"sequential"``
    ``lax.scan`` over time: the reference, O(T) steps, O(1) extra memory.
``"associative"``
    ``lax.associative_scan`` with the operator ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``:
    O(log T) depth, more memory traffic.
``"chunked"``
    blocks of ``chunk_size`` steps solved in parallel (an associative scan inside each block), then a
    short sequential carry across blocks and one elementwise correction.
``"pallas"``
    the Pallas kernel in ``pallas_kernels/linear_scan`` (sequential over time inside the kernel,
    channel blocks on the grid, the carry on chip). Runs interpreted on CPU.
``"auto"``
    picks by platform and shape from ``benchmarks/scan.py``'s evidence (see :func:`choose_impl`).

All impls share one ``custom_vjp`` whose backward pass is itself a reverse linear scan of the
cotangents, ``dh_t = g_t + a_{t+1} dh_{t+1}``, so gradients w.r.t. ``a``, ``b`` and ``h0`` cost one
more scan and never store an associative tree: only ``a``, ``h`` and ``h0`` are kept.

Accumulation is float32 (complex64 for complex inputs) whatever the input dtype; ``h`` comes back in
the caller's dtype (that of ``b``), ``h_last`` in the float32/complex64 state dtype so that carrying
state across a split sequence is exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax import _checks

IMPLS = ("auto", "sequential", "associative", "chunked", "pallas")

__all__ = ["linear_scan", "choose_impl", "IMPLS"]


# ----------------------------------------------------------------------------- algorithms
# Each takes (a, b, h0) in the compute dtype, time on axis 1, forward in time, and returns (h, h_last).


def _sequential(a, b, h0, chunk_size):
    del chunk_size

    def step(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    h_last, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), h_last


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _associative(a, b, h0, chunk_size):
    del chunk_size
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return h, h[:, -1]


def _chunked(a, b, h0, chunk_size):
    bsz, t = b.shape[:2]
    rest = b.shape[2:]
    c = max(1, min(chunk_size, t))
    nc = -(-t // c)
    pad = nc * c - t
    if pad:
        # a = 1, b = 0 past the end keeps h constant, so the final carry equals h[T-1].
        widths = [(0, 0), (0, pad)] + [(0, 0)] * len(rest)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths)
    a = a.reshape(bsz, nc, c, *rest)
    b = b.reshape(bsz, nc, c, *rest)
    # Inside each block, from a zero state: cumulative decay A and local state H.
    a_cum, h_loc = lax.associative_scan(_combine, (a, b), axis=2)

    # Across blocks: carry_{j} = A_{j, end} carry_{j-1} + H_{j, end}, a short sequential scan.
    def step(carry, ab):
        a_end, h_end = ab
        new = a_end * carry + h_end
        return new, carry

    h_last, carry_in = lax.scan(
        step, h0, (jnp.moveaxis(a_cum[:, :, -1], 1, 0), jnp.moveaxis(h_loc[:, :, -1], 1, 0))
    )
    carry_in = jnp.moveaxis(carry_in, 0, 1)[:, :, None]  # [b, nc, 1, ...]
    h = (h_loc + a_cum * carry_in).reshape(bsz, nc * c, *rest)[:, :t]
    return h, h_last


def _pallas(a, b, h0, chunk_size):
    del chunk_size
    from pallas_kernels.linear_scan import linear_scan_fwd  # imported only on this branch

    return linear_scan_fwd(a, b, h0, interpret=jax.default_backend() == "cpu")


_ALGOS = {
    "sequential": _sequential,
    "associative": _associative,
    "chunked": _chunked,
    "pallas": _pallas,
}


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a, b, h0, impl, chunk_size):
    return _ALGOS[impl](a, b, h0, chunk_size)


def _scan_fwd(a, b, h0, impl, chunk_size):
    h, h_last = _ALGOS[impl](a, b, h0, chunk_size)
    return (h, h_last), (a, h, h0)


def _scan_bwd(impl, chunk_size, res, cts):
    a, h, h0 = res
    g, g_last = cts
    g = g.at[:, -1].add(g_last)
    # dh_t = g_t + a_{t+1} dh_{t+1}: a reverse scan of the cotangents with the decays shifted by one.
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    dh_rev, _ = _ALGOS[impl](
        jnp.flip(a_next, 1), jnp.flip(g, 1), jnp.zeros_like(h0), chunk_size
    )
    dh = jnp.flip(dh_rev, 1)
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    # JAX's convention for complex cotangents: the VJP of a*h w.r.t. a is ct * h (no conjugate).
    da = dh * h_prev
    dh0 = dh[:, 0] * a[:, 0]
    return da, dh, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- dispatch


def choose_impl(shape, dtype, platform: str | None = None) -> str:
    """The impl ``"auto"`` uses for ``b`` of ``shape``/``dtype`` on ``platform``.

    Evidence (``python benchmarks/scan.py``, results in ``benchmarks/results/``):

    - CPU: ``lax.scan`` is memory-bound and cheap per step; the associative scan does ~log T more
      memory traffic and loses by an order of magnitude at large T. ``"sequential"`` wins except at
      short T with few channels, where the chunked form's shorter loop pays off.
    - GPU: XLA drives ``lax.scan`` from the host (one launch per step, jax#2491), so the parallel
      forms win; ``"chunked"`` keeps memory low.
    - TPU: the Pallas kernel (as in recurrentgemma), for real dtypes.
    """
    platform = platform or jax.default_backend()
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    t = shape[1]
    channels = int(np.prod(shape)) // max(1, t)
    if platform == "tpu" and not complex_:
        return "pallas"
    if platform == "gpu":
        return "chunked" if t > 64 else "associative"
    # CPU
    if t >= 256 and channels <= 64:
        return "chunked"
    return "sequential"


def _validate(a, b, h0, resets, impl, chunk_size):
    _checks.check_choice("impl", impl, IMPLS)
    _checks.check_ndim("b", b, range(2, 16), "[batch, time, ...]")
    _checks.check_dtype("b", b, "inexact")
    _checks.check_dtype("a", a, "inexact")
    try:
        shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    except ValueError:
        shape = None
    if shape != tuple(np.shape(b)):
        raise ValueError(
            f"a must have (or broadcast to) the shape of b {list(np.shape(b))} "
            f"[batch, time, ...], got {list(np.shape(a))}"
        )
    bsz, _ = np.shape(b)[:2]
    if h0 is not None:
        _checks.check_shape("h0", h0, (bsz, *np.shape(b)[2:]), "[batch, ...] (b without time)")
        _checks.check_dtype("h0", h0, "inexact")
    if resets is not None:
        _checks.check_shape("resets", resets, np.shape(b)[:2], "[batch, time]")
        _checks.check_dtype("resets", resets, "int_or_bool")
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def linear_scan(
    a,
    b,
    *,
    h0=None,
    reverse: bool = False,
    resets=None,
    log_decay: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
):
    """Evaluate ``h_t = a_t * h_{t-1} + b_t`` over axis 1.

    Args:
      a: decays ``[batch, time, ...]`` (or broadcastable to ``b``), real or complex. With
        ``log_decay=True`` it holds ``log a`` instead (real or complex), which is how decays should
        be produced (``a = exp(log_a)`` never overflows and underflows gracefully to 0).
      b: inputs ``[batch, time, ...]``, float32/bf16/float16 or complex64.
      h0: initial state ``[batch, ...]``; zeros if ``None``.
      reverse: run from ``t = T-1`` down to 0 (``h_t = a_t h_{t+1} + b_t``); ``h_last`` is then the
        state at ``t = 0``.
      resets: ``[batch, time]`` bool, ``True`` at the first token of each packed document: the
        carry into that token is zeroed (in reverse mode, the carry out of it into the previous
        token), so documents never leak state. A reset at ``t = 0`` discards ``h0``.
      log_decay: whether ``a`` is given in log space.
      impl: ``"auto" | "sequential" | "associative" | "chunked" | "pallas"``.
      chunk_size: block length of the ``"chunked"`` impl.

    Returns:
      ``(h, h_last)``: all states ``[batch, time, ...]`` in ``b``'s dtype (complex if either input
      is complex), and the final state ``[batch, ...]`` in float32 / complex64.
    """
    _validate(a, b, h0, resets, impl, chunk_size)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    complex_ = any(jnp.iscomplexobj(x) for x in (a, b, h0) if x is not None)
    cdtype = jnp.complex64 if complex_ else jnp.float32
    out_dtype = jnp.result_type(b.dtype, jnp.complex64) if complex_ else b.dtype
    if complex_ and b.dtype == jnp.complex128:
        cdtype = out_dtype = jnp.complex128

    a = a.astype(cdtype)
    if log_decay:
        a = jnp.exp(a)
    a = jnp.broadcast_to(a, b.shape)
    b = b.astype(cdtype)
    h0 = jnp.zeros((b.shape[0], *b.shape[2:]), cdtype) if h0 is None else jnp.asarray(h0, cdtype)

    if resets is not None:
        cut = jnp.asarray(resets).astype(bool)
        if reverse:  # the carry from t+1 into t is cut when t+1 starts a document
            cut = jnp.concatenate([cut[:, 1:], jnp.zeros_like(cut[:, :1])], axis=1)
        cut = cut.reshape(cut.shape + (1,) * (b.ndim - 2))
        a = jnp.where(cut, jnp.zeros((), cdtype), a)

    if impl == "auto":
        impl = choose_impl(b.shape, cdtype)
    if reverse:
        a, b = jnp.flip(a, 1), jnp.flip(b, 1)
    h, h_last = _scan(a, b, h0, impl, int(chunk_size))
    if reverse:
        h = jnp.flip(h, 1)
    return h.astype(out_dtype), h_last
