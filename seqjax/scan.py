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
    blocks of ``chunk_size`` steps, all solved at once: a sweep inside every block (vectorised
    across blocks) gives each block's total decay and end state, a short sequential carry across
    blocks gives each block's incoming state, and a second sweep inside every block writes ``h``.
    ``2 C + T / C`` sequential steps instead of ``T``, each ``C`` times wider.
``"pallas"``
    the Pallas kernel in ``pallas_kernels/linear_scan`` (sequential over time inside the kernel,
    channel blocks on the grid, the carry on chip). Runs interpreted on CPU.
``"auto"``
    picks by platform and shape from ``benchmarks/scan.py``'s evidence (see :func:`choose_impl`).

Every impl runs ``reverse=True`` natively (no flipped copies), and all share one ``custom_vjp``
whose backward pass is itself a linear scan of the cotangents in the other direction,
``dh_t = g_t + a_{t+1} dh_{t+1}`` (the Pallas impl uses its kernel's transposed form), so gradients
w.r.t. ``a``, ``b`` and ``h0`` cost one more scan and never store an associative tree: only ``a``,
``h`` and ``h0`` are kept. ``da_t = dh_t h_{t-1}``, ``db_t = dh_t``, ``dh0 = a_0 dh_0``.

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

from pallas_kernels._util import platform as kernel_platform
from pallas_kernels.linear_scan import linear_scan_bwd, linear_scan_fwd
from seqjax import _checks
from seqjax.types import AnyArray, Array, Inexact, Shaped

IMPLS = ("auto", "sequential", "associative", "chunked", "pallas")

__all__ = ["linear_scan", "choose_impl", "IMPLS"]


# ----------------------------------------------------------------------------- algorithms
# Each takes (a, b, h0) in the compute dtype, time on axis 1, plus (chunk_size, reverse), and returns
# (h, h_last); with reverse=True it evaluates h_t = a_t h_{t+1} + b_t and h_last is the state at t=0.


def _sequential(a, b, h0, chunk_size, reverse):
    del chunk_size

    def step(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    xs = (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0))
    h_last, hs = lax.scan(step, h0, xs, reverse=reverse)
    return jnp.moveaxis(hs, 0, 1), h_last


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _associative(a, b, h0, chunk_size, reverse):
    del chunk_size
    first = -1 if reverse else 0
    b = b.at[:, first].add(a[:, first] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1, reverse=reverse)
    return h, h[:, 0 if reverse else -1]


def _chunked(a, b, h0, chunk_size, reverse):
    """Blocks of C steps, two sweeps of C steps vectorised across all blocks, one carry scan.

    1. Inside every block at once, from a zero state: the block's total decay ``A_j`` and
       end state ``H_j`` (a C-step loop over ``[batch, blocks, ...]`` slices, nothing stored).
    2. Across blocks: ``carry_j = A_j carry_{j-1} + H_j`` (a T/C-step loop), giving each block's
       incoming state.
    3. Inside every block again, from its incoming state, storing ``h``.
    So 2C + T/C sequential steps instead of T, each C x wider; a ``lax.scan`` step costs the same
    few microseconds for 16 or 16,384 numbers on CPU, which is where this wins.
    """
    bsz, t = b.shape[:2]
    rest = b.shape[2:]
    c = max(1, min(chunk_size, t))
    nc = -(-t // c)
    pad = nc * c - t
    if pad:
        # a = 1, b = 0 past the end keeps the state unchanged (in either direction).
        widths = [(0, 0), (0, pad)] + [(0, 0)] * len(rest)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths)
    # [b, nc*c, ...] -> [c, b, nc, ...]: time inside the block leads, blocks are vectorised.
    a = jnp.moveaxis(a.reshape(bsz, nc, c, *rest), 2, 0)
    b = jnp.moveaxis(b.reshape(bsz, nc, c, *rest), 2, 0)

    def block_ends(carry, ab):
        a_cum, h = carry
        a_t, b_t = ab
        return (a_t * a_cum, a_t * h + b_t), None

    zeros = jnp.zeros_like(b[0])
    (a_end, h_end), _ = lax.scan(block_ends, (jnp.ones_like(a[0]), zeros), (a, b), reverse=reverse)

    def across(carry, ab):
        a_j, h_j = ab
        return a_j * carry + h_j, carry

    h_last, carry_in = lax.scan(
        across, h0, (jnp.moveaxis(a_end, 1, 0), jnp.moveaxis(h_end, 1, 0)), reverse=reverse
    )

    def within(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    _, h = lax.scan(within, jnp.moveaxis(carry_in, 0, 1), (a, b), reverse=reverse)
    h = jnp.moveaxis(h, 0, 2).reshape(bsz, nc * c, *rest)[:, :t]
    return h, h_last


def _interpret():
    return kernel_platform() == "cpu"


def _pallas(a, b, h0, chunk_size, reverse):
    del chunk_size
    return linear_scan_fwd(a, b, h0, interpret=_interpret(), reverse=reverse)


_ALGOS = {
    "sequential": _sequential,
    "associative": _associative,
    "chunked": _chunked,
    "pallas": _pallas,
}


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan(a, b, h0, impl, chunk_size, reverse):
    return _ALGOS[impl](a, b, h0, chunk_size, reverse)


def _scan_fwd(a, b, h0, impl, chunk_size, reverse):
    h, h_last = _ALGOS[impl](a, b, h0, chunk_size, reverse)
    return (h, h_last), (a, h, h0)


def _scan_bwd(impl, chunk_size, reverse, res, cts):
    a, h, h0 = res
    g, g_last = cts
    if impl == "pallas":
        return linear_scan_bwd(a, h, h0, g, g_last, interpret=_interpret(), reverse=reverse)
    # Forward: dh_t = g_t + a_{t+1} dh_{t+1}, a scan in the other direction over the decays shifted
    # by one; the decay 1 at the far end with initial state g_last adds h_last's cotangent there.
    # JAX's convention for complex cotangents: the VJP of a*h w.r.t. a is ct * h (no conjugate).
    one = jnp.ones_like(a[:, :1])
    h0_ = h0[:, None]
    if reverse:
        a_shift = jnp.concatenate([one, a[:, :-1]], axis=1)
        h_prev = jnp.concatenate([h[:, 1:], h0_], axis=1)
    else:
        a_shift = jnp.concatenate([a[:, 1:], one], axis=1)
        h_prev = jnp.concatenate([h0_, h[:, :-1]], axis=1)
    dh, _ = _ALGOS[impl](a_shift, g, g_last, chunk_size, not reverse)
    first = -1 if reverse else 0
    return dh * h_prev, dh, dh[:, first] * a[:, first]


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- dispatch


def choose_impl(shape, dtype, platform: str | None = None) -> str:
    """The impl ``"auto"`` uses for ``b`` of ``shape``/``dtype`` on ``platform`` (by default the platform the
    kernels are traced for, ``pallas_kernels._util.platform``).

    Why (``python benchmarks/scan.py``; results in ``benchmarks/results/``):

    - CPU (``cpu_scan.md``): ``lax.scan`` steps are cheap (about 1 ms for 16,384 steps) and the scan is
      memory-bound, so the parallel forms, which move the data more times, lose: the associative
      scan by 1.6-3.1x, the chunked form by 1.2-2.1x (one tie at 32x256x2048 fwd+bwd), on every
      shape measured (T from 256 to 16,384, 16 to 2,048 channels). ``"sequential"`` everywhere.
    - GPU: XLA drives ``lax.scan`` from the host, one launch per step (jax#2491), so the
      log-depth ``"associative"`` form; the custom VJP keeps its memory at O(T) (no stored tree).
    - TPU: the Pallas kernel, as in recurrentgemma, for real dtypes; complex
      falls back to ``lax.scan``, which runs on device there.
    """
    del shape  # the choice depends on the platform and dtype only
    platform = platform or kernel_platform()
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    if platform == "tpu":
        return "sequential" if complex_ else "pallas"
    if platform == "gpu":
        return "associative"
    return "sequential"


def _validate(a, b, h0, resets, impl, chunk_size):
    """Static checks in Python, before anything is traced: each error names the argument."""
    _checks.check_choice("impl", impl, IMPLS)
    if np.ndim(b) < 2:
        raise ValueError(
            f"b must have shape [batch, time, ...] (at least 2 dims), got {list(np.shape(b))}"
        )
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
    bsz, t = np.shape(b)[:2]
    if t < 1:
        raise ValueError(f"b must have at least 1 time step (axis 1), got shape {list(np.shape(b))}")
    if h0 is not None:
        _checks.check_shape("h0", h0, (bsz, *np.shape(b)[2:]), "[batch, ...] (b without time)")
        _checks.check_dtype("h0", h0, "inexact")
    if resets is not None:
        _checks.check_shape("resets", resets, np.shape(b)[:2], "[batch, time]")
        _checks.check_dtype("resets", resets, "int_or_bool")
    if isinstance(chunk_size, bool) or not (
        isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# " b *c": a leading space keeps linters from reading the shape string as the Python expression b * c
def linear_scan(
    a: Inexact[AnyArray, "#b #t *#c"],
    b: Inexact[AnyArray, "b t *c"],
    *,
    h0: Inexact[AnyArray, " b *c"] | None = None,
    reverse: bool = False,
    resets: Shaped[AnyArray, "b t"] | None = None,
    log_decay: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[Inexact[Array, "b t *c"], Inexact[Array, " b *c"]]:
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
    h, h_last = _scan(a, b, h0, impl, int(chunk_size), bool(reverse))
    return h.astype(out_dtype), h_last
