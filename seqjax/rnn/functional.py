r"""The functional entry point: run a cell over a sequence.

``rnn(kind, params, x, h0=None, impl=..., reverse=False) -> (y, h_last)``

- ``x`` ``[batch, time, d_in]`` is projected once (``W x_t + b`` for all ``t``, one matmul), then
- the recurrence runs with one of these interchangeable impls:

``"sequential"``  ``lax.scan`` over time, differentiated by JAX: the reference (``unroll=`` optional).
``"fused"``       a hand-written backward. LSTM (without peepholes) and GRU: closed-form gate gradients
                  (:mod:`seqjax.rnn.gates`: the state carried transposed, the projection and the weight
                  gradients as matmuls per chunk of time steps, the gate-gradient factors made per chunk
                  in bulk, and only :math:`R\,\partial a_t` and one product per step in the reverse
                  loop). Other cells: the same forward
                  ``lax.scan`` (it also keeps the recurrent preactivations) and a reverse scan that does one
                  matmul per step (:math:`\partial h_{t-1} = \partial r_t R^\top`) and the pointwise VJP, then
                  :math:`\partial R = \sum_t h_{t-1}^\top \partial r_t` as one big matmul after the loop.
``"auto"``        ``"fused"`` where the cell has the closed form, else ``"sequential"`` (measured on CPU,
                  ``benchmarks/results/cpu_rnn.md``; the Pallas kernel stays opt-in until it is timed).
``"parallel"``    DEER / quasi-DEER / quasi-ELK Newton iterations, parallel over time
                  (:mod:`seqjax.rnn.deer`), gradients by the implicit function theorem.
``"pallas"``      the fused FlashRNN-style kernel in ``pallas_kernels/rnn`` (lstm, gru, slstm,
                  rnn_tanh, rnn_relu, leaky), interpreted on CPU.

Shapes: ``y`` ``[batch, time, H]`` (``H = G*D``, the ``h`` component of the state), in ``x``'s dtype;
``h0``/``h_last`` ``[batch, S, H]`` float32 (``S`` = 1, 2 for LSTM ``(h, c)``, 4 for sLSTM
``(h, c, n, m)``). With ``reverse=True`` time runs from ``T-1`` down to 0 and ``h_last`` is the
state after ``t = 0``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._util import platform as kernel_platform
from pallas_kernels.rnn import fused_rnn
from seqjax import _checks
from seqjax.rnn import cells as _cells
from seqjax.rnn import deer, gates

__all__ = ["rnn", "rnn_scan", "IMPLS", "resolve_impl"]

IMPLS = ("sequential", "fused", "parallel", "pallas", "auto")


def resolve_impl(kind: str, params: dict, impl: str) -> str:
    """The impl that ``impl`` stands for (``"auto"``: see the module docstring)."""
    _checks.check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "fused" if gates.has_rule(kind, params) else "sequential"
    return impl


def _validate_params(kind, params):
    cell = _cells.get_cell(kind)
    for name in ("W", "b") + (() if cell.step is not None else ("R",)):
        if name not in params:
            raise ValueError(f"params for kind={kind!r} must contain {name!r}, got {sorted(params)}")
    g, k, d = np.shape(params["b"])
    if k != cell.num_gates:
        raise ValueError(f"params['b'] must have shape [G, {cell.num_gates}, D] for {kind!r}, got {list(np.shape(params['b']))}")
    if "R" in params:
        _checks.check_shape("params['R']", params["R"], (g, d, k, d), "[heads, head_dim, gates, head_dim]")
    return g, k, d, cell.num_states


def _validate_state(name, h0, bsz, s, h):
    if h0 is not None:
        _checks.check_shape(name, h0, (bsz, s, h), "[batch, state components, hidden]")
        _checks.check_dtype(name, h0, "float")


def rnn_scan(kind: str, params: dict, xp, *, h0=None, impl: str = "sequential", reverse: bool = False,
             unroll: int = 1, return_info: bool = False, **parallel_kw):
    """Run the recurrence on precomputed input projections ``xp`` ``[b, t, G, K, D]``.

    Returns ``(y [b, t, H] float32, h_last [b, S, H] float32)`` (plus an info dict with
    ``return_info=True``: ``{"iters", "residual"}`` for ``impl="parallel"``, empty otherwise).
    """
    impl = resolve_impl(kind, params, impl)
    g, k, d, s = _validate_params(kind, params)
    _checks.check_ndim("xp", xp, 5, "[batch, time, heads, gates, head_dim]")
    bsz, t = np.shape(xp)[:2]
    _checks.check_shape("xp", xp, (bsz, t, g, k, d), "[batch, time, heads, gates, head_dim]")
    _validate_state("h0", h0, bsz, s, g * d)
    if impl != "parallel" and parallel_kw:
        raise ValueError(f"options {sorted(parallel_kw)} only apply to impl='parallel'")
    xp = jnp.asarray(xp, jnp.float32)
    s0 = jnp.zeros((bsz, s, g, d), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32).reshape(bsz, s, g, d)
    if reverse:
        xp = jnp.flip(xp, 1)
    info = {}
    if impl == "sequential":
        states, s_last = _sequential(kind, params, xp, s0, unroll)
    elif impl == "parallel":
        states, info = deer.deer(kind, params, xp, s0, **parallel_kw)
        s_last = states[:, -1]
    elif impl == "fused" and gates.has_rule(kind, params):
        states = None
        y_f, s_last = gates.gated_rnn(kind, params, xp, s0.reshape(bsz, s, g * d), project=False, unroll=unroll)
    elif impl == "fused":
        cell = _cells.CELLS[kind]
        if cell.pointwise is None:
            raise ValueError(f"impl='fused' supports kinds with a pointwise form, not {kind!r}")
        states = _fused(cell.pointwise, unroll, params["R"], _cells.neuron_params(cell, params), xp, s0)
        s_last = states[:, -1]
    else:
        if _cells.CELLS[kind].pointwise is None:
            raise ValueError(f"impl='pallas' supports kinds with a pointwise form, not {kind!r}")
        cell = _cells.CELLS[kind]
        states = fused_rnn(cell.split, params["R"], _cells.neuron_params(cell, params), xp, s0,
                           interpret=kernel_platform() == "cpu")
        s_last = states[:, -1]
    y = y_f if states is None else states[:, :, 0].reshape(bsz, t, g * d)
    if reverse:
        y = jnp.flip(y, 1)
    out = (y, s_last.reshape(bsz, s, g * d))
    return out + (info,) if return_info else out


def _sequential(kind, params, xp, s0, unroll=1):
    """The reference: ``lax.scan`` of :func:`seqjax.rnn.cells.step`; returns all states."""

    def body(s, xp_t):
        s = _cells.step(kind, params, s, xp_t)
        return s, s

    s_last, states = lax.scan(body, s0, jnp.moveaxis(xp, 1, 0), unroll=unroll)
    return jnp.moveaxis(states, 0, 1), s_last


def _fused_fwd_scan(pointwise, unroll, R, pp, xp, s0):
    def body(s, xp_t):
        rg = _cells.recurrent_matmul(R, s[:, 0])
        s = pointwise(pp, s, xp_t, rg)
        return s, (s, rg)

    _, (states, rg) = lax.scan(body, s0, jnp.moveaxis(xp, 1, 0), unroll=unroll)
    return jnp.moveaxis(states, 0, 1), jnp.moveaxis(rg, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(pointwise, unroll, R, pp, xp, s0):
    return _fused_fwd_scan(pointwise, unroll, R, pp, xp, s0)[0]


def _fused_fwd(pointwise, unroll, R, pp, xp, s0):
    states, rg = _fused_fwd_scan(pointwise, unroll, R, pp, xp, s0)
    return states, (R, pp, xp, s0, states, rg)


def _fused_bwd(pointwise, unroll, res, g):
    R, pp, xp, s0, states, rg = res
    prev = jnp.concatenate([s0[:, None], states[:, :-1]], axis=1)
    tm = lambda v: jnp.moveaxis(v, 1, 0)

    def body(carry, inp):
        ds, dpp = carry
        g_t, s_prev, xp_t, rg_t = inp
        _, vjp = jax.vjp(pointwise, pp, s_prev, xp_t, rg_t)
        dpp_t, ds_prev, dxg, drg = vjp(ds + g_t)
        ds_prev = ds_prev.at[:, 0].add(jnp.einsum("bgke,gdke->bgd", drg, R))
        return (ds_prev, jax.tree.map(jnp.add, dpp, dpp_t)), (dxg, drg)

    init = (jnp.zeros_like(s0), jax.tree.map(jnp.zeros_like, pp))
    (ds0, dpp), (dxp, drg) = lax.scan(body, init, (tm(g), tm(prev), tm(xp), tm(rg)), reverse=True,
                                      unroll=unroll)
    dR = jnp.einsum("tbgd,tbgke->gdke", tm(prev[:, :, 0]), drg)  # one big matmul over (t, b)
    return dR, dpp, tm(dxp), ds0


_fused.defvjp(_fused_fwd, _fused_bwd)


def rnn(kind: str, params: dict, x, *, h0=None, impl: str = "sequential", reverse: bool = False,
        unroll: int = 1, return_info: bool = False, **parallel_kw):
    """Run cell ``kind`` over ``x`` ``[batch, time, d_in]``; see the module docstring.

    ``parallel_kw`` (``impl="parallel"`` only): ``mode="full"|"quasi"``, ``tol``, ``max_iters``,
    ``damping`` (quasi-ELK), ``scan_impl`` — see :func:`seqjax.rnn.deer.deer`.
    """
    _checks.check_ndim("x", x, 3, "[batch, time, d_in]")
    _checks.check_dtype("x", x, "float")
    _validate_params(kind, params)
    _checks.check_shape("params['W']", params["W"], (np.shape(x)[2], None, None, None), "[d_in, heads, gates, head_dim]")
    if resolve_impl(kind, params, impl) == "fused" and gates.has_rule(kind, params) and not parallel_kw:
        return _gated(kind, params, x, h0, reverse, unroll, return_info)
    out = rnn_scan(kind, params, _cells.project(params, x), h0=h0, impl=impl, reverse=reverse,
                   unroll=unroll, return_info=return_info, **parallel_kw)
    return (out[0].astype(x.dtype),) + tuple(out[1:])


def _gated(kind, params, x, h0, reverse, unroll, return_info):
    """``impl="fused"`` with the closed form: the input projection runs inside, per chunk of time steps."""
    g, k, d, s = _validate_params(kind, params)
    bsz = np.shape(x)[0]
    _validate_state("h0", h0, bsz, s, g * d)
    s0 = jnp.zeros((bsz, s, g * d), jnp.float32) if h0 is None else h0
    xs = jnp.flip(x, 1) if reverse else x
    y, s_last = gates.gated_rnn(kind, params, xs, s0, unroll=unroll)
    if reverse:
        y = jnp.flip(y, 1)
    out = (y.astype(x.dtype), s_last)
    return out + ({},) if return_info else out
