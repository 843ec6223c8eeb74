r"""FlashRNN-style fused Pallas kernels for gated nonlinear RNNs (Pöppel, Beck & Hochreiter 2024).

One ``pallas_call`` runs the whole time loop of one head (grid ``(G,)``, heads are independent because the
recurrent matrix is block-diagonal):

- the input projections :math:`W x_t + b` for all ``t`` are precomputed outside (one big matmul) and
  streamed in as ``xp`` ``[B, T, G, K, D]``;
- the head's recurrent weights ``R[g]`` ``[D, K*D]`` and per-neuron parameters are loaded **once** and stay
  resident for all ``T`` steps;
- each step is ``r = h_{t-1} R_g`` (one ``[B, D] x [D, K*D]`` matmul) then the cell's pointwise map
  ``s_t = pointwise(p, s_{t-1}, xp_t, r)``, in a ``fori_loop`` with ref indexing (no ``lax.scan`` inside the
  kernel: it does not lower there);
- all states ``[B, T, S, G, D]`` are written out (they are the residuals of the backward pass).

Backward: a second kernel runs time in reverse and, per step, recomputes ``r`` from the stored
:math:`h_{t-1}`, takes the VJP of the pointwise map, writes :math:`\partial xp_t`, and accumulates
:math:`\partial R_g \mathrel{+}= h_{t-1}^\top \partial r_t` and the per-neuron parameter gradients in the loop
carry (on chip), writing them once at the end; :math:`\partial h_{t-1}` gets :math:`\partial r_t R_g^\top`.

The cell enters only through ``pointwise(p, s, xg, rg) -> s'`` (``s`` ``[B, S, 1, D]``, ``xg``/``rg``
``[B, 1, K, D]``, ``p`` a dict of ``[1, ..., D]`` arrays), so LSTM, GRU, sLSTM, Elman and the leaky RNN
share one kernel; ``seqjax.rnn.cells`` supplies the maps.

Verified: in interpret mode (``interpret=True``, CPU), forward states and all gradients equal the
``lax.scan`` reference (``tests/test_rnn_kernel.py``). Not verified: Mosaic-GPU / Triton / TPU lowering
(``jnp.dot`` of non-tile-aligned ``D``, the in-kernel reshapes and the ``jax.vjp`` of the pointwise map may need
work), memory limits for large ``D`` and speed — to be checked when an accelerator is lent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["fused_rnn"]


def _head_spec(shape, axis):
    """BlockSpec taking head ``g`` (block size 1) along ``axis`` and everything else whole."""
    block = tuple(1 if i == axis else n for i, n in enumerate(shape))

    def index_map(g):
        return tuple(g if i == axis else 0 for i in range(len(shape)))

    return pl.BlockSpec(block, index_map)


def _fwd_kernel(pointwise, n_pp, xp_ref, r_ref, s0_ref, *rest):
    pp_refs, (states_ref,) = rest[:n_pp], rest[n_pp:]
    bsz, t_len, _, k, d = xp_ref.shape
    r2 = r_ref[...].reshape(d, k * d)  # resident for the whole loop
    pp = [ref[...] for ref in pp_refs]

    def body(t, s):
        xg = xp_ref[:, t]  # [B, 1, K, D]
        rg = jnp.dot(s[:, 0, 0], r2, preferred_element_type=jnp.float32).reshape(bsz, 1, k, d)
        s = pointwise(pp, s, xg, rg)
        states_ref[:, t] = s
        return s

    lax.fori_loop(0, t_len, body, s0_ref[...])


def _bwd_kernel(pointwise, n_pp, xp_ref, r_ref, s0_ref, states_ref, g_ref, *rest):
    pp_refs = rest[:n_pp]
    dxp_ref, dr_ref, ds0_ref = rest[n_pp:n_pp + 3]
    dpp_refs = rest[n_pp + 3:]
    bsz, t_len, _, k, d = xp_ref.shape
    r2 = r_ref[...].reshape(d, k * d)
    pp = [ref[...] for ref in pp_refs]
    s0 = s0_ref[...]

    def body(i, carry):
        ds, dr, dpp = carry
        t = t_len - 1 - i
        s_prev = jnp.where(t > 0, states_ref[:, jnp.maximum(t - 1, 0)], s0)
        h_prev = s_prev[:, 0, 0]  # [B, D]
        xg = xp_ref[:, t]
        rg = jnp.dot(h_prev, r2, preferred_element_type=jnp.float32).reshape(bsz, 1, k, d)
        ds_t = ds + g_ref[:, t]
        _, vjp = jax.vjp(lambda p_, s_, x_, r_: pointwise(p_, s_, x_, r_), pp, s_prev, xg, rg)
        dpp_t, ds_prev, dxg, drg = vjp(ds_t)
        dxp_ref[:, t] = dxg
        drg2 = drg.reshape(bsz, k * d)
        dh = jnp.dot(drg2, r2.T, preferred_element_type=jnp.float32)
        ds_prev = ds_prev.at[:, 0, 0].add(dh)
        dr = dr + jnp.dot(h_prev.T, drg2, preferred_element_type=jnp.float32)
        dpp = [a + b for a, b in zip(dpp, dpp_t)]
        return ds_prev, dr, dpp

    init = (jnp.zeros_like(s0), jnp.zeros((d, k * d), jnp.float32), [jnp.zeros_like(p) for p in pp])
    ds, dr, dpp = lax.fori_loop(0, t_len, body, init)
    ds0_ref[...] = ds
    dr_ref[...] = dr.reshape(1, d, k, d)
    for ref, v in zip(dpp_refs, dpp):
        ref[...] = v


def _pw_list(pointwise, names):
    """Adapt ``pointwise(dict, ...)`` to a list of leaves (refs are positional in a kernel)."""
    return lambda pp, s, xg, rg: pointwise(dict(zip(names, pp)), s, xg, rg)


def _forward(pointwise, names, interpret, R, pp, xp, s0):
    bsz, t_len, g, k, d = xp.shape
    n_state = s0.shape[1]
    out_shape = jax.ShapeDtypeStruct((bsz, t_len, n_state, g, d), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, _pw_list(pointwise, names), len(pp)),
        grid=(g,),
        in_specs=[_head_spec(xp.shape, 2), _head_spec(R.shape, 0), _head_spec(s0.shape, 2)]
        + [_head_spec(p.shape, 0) for p in pp],
        out_specs=_head_spec(out_shape.shape, 3),
        out_shape=out_shape,
        interpret=interpret,
    )(xp, R, s0, *pp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(pointwise, names, interpret, R, pp, xp, s0):
    return _forward(pointwise, names, interpret, R, pp, xp, s0)


def _fused_fwd(pointwise, names, interpret, R, pp, xp, s0):
    states = _forward(pointwise, names, interpret, R, pp, xp, s0)
    return states, (R, pp, xp, s0, states)


def _fused_bwd(pointwise, names, interpret, res, g):
    R, pp, xp, s0, states = res
    g_heads = xp.shape[2]
    out_shape = [jax.ShapeDtypeStruct(xp.shape, jnp.float32), jax.ShapeDtypeStruct(R.shape, jnp.float32),
                 jax.ShapeDtypeStruct(s0.shape, jnp.float32)] + [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in pp]
    dxp, dR, ds0, *dpp = pl.pallas_call(
        functools.partial(_bwd_kernel, _pw_list(pointwise, names), len(pp)),
        grid=(g_heads,),
        in_specs=[_head_spec(xp.shape, 2), _head_spec(R.shape, 0), _head_spec(s0.shape, 2),
                  _head_spec(states.shape, 3), _head_spec(g.shape, 3)] + [_head_spec(p.shape, 0) for p in pp],
        out_specs=[_head_spec(xp.shape, 2), _head_spec(R.shape, 0), _head_spec(s0.shape, 2)]
        + [_head_spec(p.shape, 0) for p in pp],
        out_shape=out_shape,
        interpret=interpret,
    )(xp, R, s0, states, g, *pp)
    return dR, list(dpp), dxp, ds0


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_rnn(pointwise, R, pp: dict, xp, s0, *, interpret: bool = False):
    """All states ``[B, T, S, G, D]`` of the cell ``pointwise`` (see the module docstring).

    Args:
      pointwise: ``(p: dict, s, xg, rg) -> s'`` per-neuron map of the cell (``seqjax.rnn.cells``).
      R: recurrent weights ``[G, D, K, D]``.
      pp: per-neuron parameters, each ``[G, ..., D]`` (e.g. LSTM peepholes ``[G, 3, D]``).
      xp: input projections ``[B, T, G, K, D]`` (``W x_t + b``, computed outside).
      s0: initial state ``[B, S, G, D]``.
      interpret: run the kernel in Pallas interpret mode (CPU tests).
    Differentiable in ``R``, ``pp``, ``xp`` and ``s0`` (custom VJP with a reverse-time kernel).
    """
    names = tuple(sorted(pp))
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return _fused(pointwise, names, bool(interpret), f32(R), [f32(pp[n]) for n in names], f32(xp), f32(s0))
