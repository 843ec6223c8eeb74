r"""FlashRNN-style fused Pallas kernels for gated nonlinear RNNs (Pöppel, Beck & Hochreiter 2024).

One ``pallas_call`` runs the whole time loop of one head (grid ``(G,)``, heads are independent because the
recurrent matrix is block-diagonal):

- the input projections :math:`W x_t + b` for all ``t`` are precomputed outside (one big matmul) and
  streamed in as ``xp`` ``[B, T, G, K, D]``;
- the head's recurrent weights ``R[g]``, one ``[D, D]`` block per gate, and the per-neuron parameters are
  loaded **once** and stay resident for all ``T`` steps;
- each step is ``r_k = h_{t-1} R_{g,k}`` (``K`` matmuls ``[B, D] x [D, D]``) then the cell's per-neuron map
  ``s_t = split(p, s_{t-1}, xp_t, r)``, in a ``fori_loop`` with ref indexing (no ``lax.scan`` inside the
  kernel: it does not lower there);
- all states ``[B, T, S, G, D]`` are written out (they are the residuals of the backward pass).

Backward: a second kernel runs time in reverse and, per step, recomputes ``r`` from the stored
:math:`h_{t-1}`, takes the VJP of the per-neuron map, writes :math:`\partial xp_t`, and accumulates
:math:`\partial R_{g,k} \mathrel{+}= h_{t-1}^\top \partial r_{t,k}` and the per-neuron parameter gradients
in the loop carry (on chip), writing them once at the end; :math:`\partial h_{t-1}` gets
:math:`\sum_k \partial r_{t,k} R_{g,k}^\top`.

The cell enters only through ``Cell.split(p, s, xg, rg) -> s'`` on *lists* (``S`` state arrays and ``K``
gate arrays ``[B, D]``, parameters ``[1, D]`` or tuples of rows), so LSTM, GRU, sLSTM, Elman and the leaky
RNN share one kernel; ``seqjax.rnn.cells`` supplies the maps. Lists, because the GPU (Triton) lowering has
no ``slice`` on values and wants power-of-two sizes for every array: gates, states and parameter rows are
loaded from refs one by one, and ``B``, ``D`` are padded to powers of two ``>= 16``.

On a GPU a head must fit on chip (:func:`check_fits`). The kernel sees its arrays heads-first with ``[B, D]``
trailing (``fused_rnn`` transposes them), so a head's blocks have whole trailing dims, as Mosaic TPU requires.

Tests: in interpret mode (``interpret=True``, CPU; ``tests/test_rnn_kernel.py``), forward states and all
gradients equal the ``lax.scan`` reference; the Triton lowering (``tests/test_pallas_lowering.py``); libtpu
compiles the forward and backward for a TPU v5e without a TPU (``tests/test_tpu_compile.py``). What has run
on which device: ``benchmarks/results/``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _util
from pallas_kernels._util import mm, tpu_params, triton_params

__all__ = ["fused_rnn"]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


# On-chip memory per program (H100/H200: 227 KiB of shared memory per block); the backward keeps a head's
# recurrent weights and their gradient accumulator resident, 2 * 4 * K * D^2 bytes (D padded).
GPU_ONCHIP_BYTES = 200 * 1024
NW = 16


def check_fits(d: int, k: int, platform: str) -> None:
    """Raise a clear error before tracing if a head of size ``d`` with ``k`` gates cannot stay on chip."""
    dp = _pow2(d)
    need = 2 * 4 * k * dp * dp
    if platform == "gpu" and need > GPU_ONCHIP_BYTES:
        raise ValueError(
            f"impl='pallas' keeps each head's recurrent weights and their gradient on chip: head size D={d} "
            f"(padded to {dp}) with {k} gates needs {need // 1024} KiB > {GPU_ONCHIP_BYTES // 1024} KiB on a GPU; "
            f"use more heads (D <= {_max_head(k)} for {k} gates) or impl='fused'")


def _max_head(k: int) -> int:
    d = 16
    while 2 * 4 * k * (2 * d) ** 2 <= GPU_ONCHIP_BYTES:
        d *= 2
    return d


def _head_spec(shape):
    """BlockSpec of head ``g`` of a heads-first array: ``[G, …]`` -> ``[…]``, the trailing dims whole (Mosaic
    TPU wants the last two dims of a block whole or tiled by (8, 128))."""
    return pl.BlockSpec((None, *shape[1:]), lambda g: (g,) + (0,) * (len(shape) - 1))


def _load_params(pp_refs, rows):
    """Per-neuron parameters as the cell's split map wants them: a dict of ``[1, D]`` arrays or tuples of
    rows (``rows``: ``(name, number of rows or 0)`` per parameter, in the order of the refs)."""
    return {name: tuple(ref[pl.ds(r, 1), :] for r in range(n)) if n else ref[...]
            for ref, (name, n) in zip(pp_refs, rows)}


def _fwd_kernel(split, rows, n_state, n_gate, xp_ref, r_ref, s0_ref, *rest):
    pp_refs, states_ref = rest[:-1], rest[-1]
    t_len = xp_ref.shape[0]
    rk = [r_ref[k] for k in range(n_gate)]  # [D, D] per gate, resident for the whole loop
    pp = _load_params(pp_refs, rows)

    def body(t, s):
        xg = tuple(xp_ref[t, k] for k in range(n_gate))  # [B, D] each
        rg = tuple(mm(s[0], w) for w in rk)
        s = tuple(split(pp, s, xg, rg))
        for a in range(n_state):
            states_ref[t, a] = s[a]
        return s

    lax.fori_loop(0, t_len, body, tuple(s0_ref[a] for a in range(n_state)))


def _bwd_kernel(split, rows, n_state, n_gate, xp_ref, r_ref, s0_ref, states_ref, g_ref, *rest):
    n_pp = len(rows)
    pp_refs = rest[:n_pp]
    dxp_ref, dr_ref, ds0_ref = rest[n_pp:n_pp + 3]
    dpp_refs = rest[n_pp + 3:]
    t_len = xp_ref.shape[0]
    rk = [r_ref[k] for k in range(n_gate)]
    pp = _load_params(pp_refs, rows)
    s0 = tuple(s0_ref[a] for a in range(n_state))

    def body(i, carry):
        ds, dr, dpp = carry
        t = t_len - 1 - i
        tp = jnp.maximum(t - 1, 0)
        s_prev = tuple(jnp.where(t > 0, states_ref[tp, a], s0[a]) for a in range(n_state))
        xg = tuple(xp_ref[t, k] for k in range(n_gate))
        rg = tuple(mm(s_prev[0], w) for w in rk)
        ds_t = tuple(ds[a] + g_ref[t, a] for a in range(n_state))
        _, vjp = jax.vjp(lambda p_, s_, x_, r_: tuple(split(p_, s_, x_, r_)), pp, s_prev, xg, rg)
        dpp_t, ds_prev, dxg, drg = vjp(ds_t)
        for k in range(n_gate):
            dxp_ref[t, k] = dxg[k]
        dh = ds_prev[0]
        for k in range(n_gate):
            dh = dh + mm(drg[k], rk[k].T)
        dr = tuple(a + mm(s_prev[0].T, b) for a, b in zip(dr, drg))
        dpp = jax.tree.map(jnp.add, dpp, dpp_t)
        return (dh,) + tuple(ds_prev[1:]), dr, dpp

    d = rk[0].shape[0]
    init = (tuple(jnp.zeros_like(x) for x in s0), tuple(jnp.zeros((d, d), jnp.float32) for _ in rk),
            jax.tree.map(jnp.zeros_like, pp))
    ds, dr, dpp = lax.fori_loop(0, t_len, body, init)
    for a in range(n_state):
        ds0_ref[a] = ds[a]
    for k in range(n_gate):
        dr_ref[k] = dr[k]
    for ref, (name, n) in zip(dpp_refs, rows):
        v = dpp[name]
        if n:
            for r in range(n):
                ref[pl.ds(r, 1), :] = v[r]
        else:
            ref[...] = v


def _params(interpret, backend, num_warps=4):
    """Heads are independent: ``"parallel"`` on a TPU (megacore chips split them); the Triton lowering
    asked for by name on a GPU (jax >= 0.11 would otherwise take Mosaic GPU, which has no ``dot`` here)."""
    if backend == "mosaic_tpu":
        return tpu_params(interpret, "parallel")
    return triton_params(interpret, backend, num_warps=num_warps)


def _forward(split, rows, interpret, backend, R, pp, xp, s0):
    """Heads-first (see :func:`fused_rnn`): ``xp [G, T, K, B, D]``, ``R [G, K, D, D]``, ``s0 [G, S, B, D]``,
    parameters ``[G, rows, D]``; returns the states ``[G, T, S, B, D]``."""
    g, t_len, k, bsz, d = xp.shape
    n_state = s0.shape[1]
    out_shape = jax.ShapeDtypeStruct((g, t_len, n_state, bsz, d), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, split, rows, n_state, k),
        grid=(g,),
        in_specs=[_head_spec(x.shape) for x in (xp, R, s0, *pp)],
        out_specs=_head_spec(out_shape.shape),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_params(interpret, backend),
        name="fused_rnn_fwd",
    )(xp, R, s0, *pp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(split, rows, interpret, backend, R, pp, xp, s0):
    return _forward(split, rows, interpret, backend, R, pp, xp, s0)


def _fused_fwd(split, rows, interpret, backend, R, pp, xp, s0):
    states = _forward(split, rows, interpret, backend, R, pp, xp, s0)
    return states, (R, pp, xp, s0, states)


def _fused_bwd(split, rows, interpret, backend, res, g):
    R, pp, xp, s0, states = res
    g_heads, n_state, n_gate = xp.shape[0], s0.shape[1], xp.shape[2]
    out_shape = [jax.ShapeDtypeStruct(xp.shape, jnp.float32), jax.ShapeDtypeStruct(R.shape, jnp.float32),
                 jax.ShapeDtypeStruct(s0.shape, jnp.float32)] + [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in pp]
    dxp, dR, ds0, *dpp = pl.pallas_call(
        functools.partial(_bwd_kernel, split, rows, n_state, n_gate),
        grid=(g_heads,),
        in_specs=[_head_spec(x.shape) for x in (xp, R, s0, states, g, *pp)],
        out_specs=[_head_spec(x.shape) for x in (xp, R, s0, *pp)],
        out_shape=out_shape,
        interpret=interpret,
        # 8 warps: at the largest head a GPU takes, the resident R and its gradient accumulator spilled 84-680 B
        # of registers per thread at 4 warps on sm_90 (benchmarks/triton_resources.py --kernels=rnn), none at 8
        compiler_params=_params(interpret, backend, num_warps=8),
        name="fused_rnn_bwd",
    )(xp, R, s0, states, g, *pp)
    return dR, list(dpp), dxp, ds0


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_rnn(split, R, pp: dict, xp, s0, *, interpret: bool = False):
    """All states ``[B, T, S, G, D]`` of the cell whose per-neuron map is ``split`` (module docstring).

    Args:
      split: ``(p, s, xg, rg) -> s'`` per-neuron map of the cell on lists (``seqjax.rnn.cells.Cell.split``).
      R: recurrent weights ``[G, D, K, D]``.
      pp: per-neuron parameters, each ``[G, D]`` or ``[G, rows, D]`` (e.g. LSTM peepholes ``[G, 3, D]``).
      xp: input projections ``[B, T, G, K, D]`` (``W x_t + b``, computed outside).
      s0: initial state ``[B, S, G, D]``.
      interpret: run the kernel in Pallas interpret mode (CPU tests).
    Differentiable in ``R``, ``pp``, ``xp`` and ``s0`` (custom VJP with a reverse-time kernel).

    On a GPU a head must fit on chip (``check_fits``: ``D <= 64`` for LSTM/sLSTM/GRU, ``<= 128`` for
    one-gate cells); larger heads raise a ``ValueError`` naming the limit.
    ``B`` and ``D`` are zero-padded to powers of two ``>= 16`` (GPU ``dot`` tiles; the padded neurons see
    zero recurrent weights, zero inputs and parameters 1, so they stay finite and never reach the real
    ones); the padding is sliced off, and its gradients with it.
    """
    names = tuple(sorted(pp))
    check_fits(xp.shape[-1], xp.shape[-2], "cpu" if interpret else _util.platform())
    interpret, backend = _util.resolve(bool(interpret), None)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    R, xp, s0 = f32(R), f32(xp), f32(s0)
    params = [f32(pp[n]) for n in names]
    bsz, t_len, g, k, d = xp.shape
    bp, dp = _pow2(bsz), _pow2(d)
    pad = lambda x, widths, value=0.0: jnp.pad(x, widths, constant_values=value)
    Rp = pad(R, [(0, 0), (0, dp - d), (0, 0), (0, dp - d)])
    xpp = pad(xp, [(0, bp - bsz), (0, 0), (0, 0), (0, 0), (0, dp - d)])
    s0p = pad(s0, [(0, bp - bsz), (0, 0), (0, 0), (0, dp - d)])
    pps = [pad(p, [(0, 0)] * (p.ndim - 1) + [(0, dp - d)], 1.0) for p in params]
    rows = tuple((n, p.shape[1] if p.ndim == 3 else 0) for n, p in zip(names, pps))
    # heads first, [B, D] trailing: one head's blocks then have whole trailing dims on either backend
    heads_first = [p if p.ndim == 3 else p[:, None] for p in pps]
    states = _fused(split, rows, interpret, backend, Rp.transpose(0, 2, 1, 3), heads_first,
                    xpp.transpose(2, 1, 3, 0, 4), s0p.transpose(2, 1, 0, 3))
    return states.transpose(3, 1, 2, 0, 4)[:bsz, ..., :d]
