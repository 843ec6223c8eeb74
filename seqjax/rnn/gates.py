r"""Closed-form LSTM and GRU gradients on XLA: the engine of ``impl="fused"`` for the cells that have one.

The cuDNN / oneDNN recipe, laid out for a CPU:

- time runs in chunks of ``chunk`` steps; per chunk the input projection :math:`x W` is one matmul
  ``[B·chunk, d_in] @ [d_in, G·K·D]`` whose result stays in cache (no ``[B, T, G·K·D]`` buffer);
- each step is one recurrent matmul per head on the *transposed* state, :math:`R_g^\top h_g^\top`
  (``[K·D, D] @ [D, B]``: many rows, few columns, the shape XLA's CPU matmul runs fastest; ``h R`` with the
  batch as rows is about 1.4x slower at ``B = 16``), then the gate nonlinearities, saving the activations;
- the backward walks the chunks in reverse. Per chunk, one vectorised pass turns the saved activations into
  the factors :math:`q_t` of the gate gradients :math:`\partial a_t = m_t \odot q_t` (``Rule.prep``); the
  serial loop then forms :math:`m_t` from the state gradients, that product and
  :math:`\partial h_{t-1} = R\,\partial a_t` (no nonlinearity in the loop and no VJP traced; ``prep``
  recomputes only :math:`\tanh c_t`, in bulk); per chunk,
  :math:`\partial W = x^\top \partial a`, :math:`\partial R = h_{t-1}^\top \partial a`, :math:`\partial b` and
  :math:`\partial x = \partial a\, W^\top` are single matmuls over ``B·chunk`` rows.

Inside, states are ``[G, D, B]`` and gate preactivations ``[G, K, D, B]``. Cells and parameters as in
:mod:`seqjax.rnn.cells` (LSTM without peepholes; GRU in the cuDNN form with ``bhn``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["RULES", "has_rule", "gated_rnn"]

#: Time steps per chunk: the projection and the weight gradients of a chunk are matmuls over ``B·CHUNK``
#: rows, their buffers ``[B, CHUNK, G·K·D]``.
CHUNK = 32


@dataclasses.dataclass(frozen=True)
class Rule:
    """A cell's closed form on per-gate arrays ``[G, D, B]``.

    ``step(p, s, ax, ar) -> (s', saved)``: ``s`` the ``S`` state components, ``ax`` / ``ar`` the ``K`` input
    (bias included) and recurrent preactivations; ``saved`` the ``num_saved`` arrays the backward reads.
    ``prep(p, saved) -> aux``: for a whole chunk at once (``saved`` arrays ``[C, G, D, B]``), the per-step
    factors of the gate gradients (arrays with a leading ``C`` axis), so that the serial loop does no
    nonlinearity and no gate-by-gate arithmetic: on XLA:CPU a step's fusion that stacks per-gate results
    runs about 2.5x slower than one uniform product over ``[G, K, D, B]``.
    ``back(p, aux, ds) -> (dax, dar, ds_prev, dp)``: one step, ``aux`` that step's slice: the gradients of
    the input and recurrent preactivations ``[G, K, D, B]`` (``dar`` is ``None`` where it equals ``dax``:
    ``split_grads=False``), of the previous state through the pointwise map (the driver adds the recurrent
    matmul's share), and of the per-neuron parameters ``params`` (each ``[G, D, B]``; the driver sums over
    the batch). ``p`` holds those parameters ``[G, D, 1]``.
    """

    step: Callable
    prep: Callable
    back: Callable
    num_saved: int
    params: tuple[str, ...] = ()
    split_grads: bool = False


def _lstm_step(p, s, ax, ar):
    h, c = s
    i = jax.nn.sigmoid(ax[0] + ar[0])
    f = jax.nn.sigmoid(ax[1] + ar[1])
    z = jnp.tanh(ax[2] + ar[2])
    o = jax.nn.sigmoid(ax[3] + ar[3])
    c_new = f * c + i * z
    return (o * jnp.tanh(c_new), c_new), (i, f, z, o, c)


def _lstm_prep(p, saved):
    # da_t = m_t * q_t with m = (dc, dc, dc, dh) per gate; dc_t = dc_{t+1} f_{t+1} + dh_t e_t
    i, f, z, o, c = saved
    th = jnp.tanh(f * c + i * z)  # tanh(c_t): c_t recomputed (two FMAs), cheaper than a sixth saved array
    q = jnp.stack([z * i * (1.0 - i), c * f * (1.0 - f), i * (1.0 - z * z), th * o * (1.0 - o)], axis=2)
    return q, o * (1.0 - th * th), f


def _lstm_back(p, aux, ds):
    q, e, f = aux
    dh, dc = ds
    dc = dc + dh * e
    output_gate = (jnp.arange(q.shape[1]) == 3)[:, None, None]
    return jnp.where(output_gate, dh[:, None], dc[:, None]) * q, None, (jnp.zeros_like(dh), dc * f), {}


def _gru_step(p, s, ax, ar):
    (h,) = s
    r = jax.nn.sigmoid(ax[0] + ar[0])
    z = jax.nn.sigmoid(ax[1] + ar[1])
    q = ar[2] + p["bhn"]
    n = jnp.tanh(ax[2] + r * q)
    return (n + z * (h - n),), (r, z, n, q, h)


def _gru_prep(p, saved):
    # every gate gradient is dh times a factor: dn_pre = dh a with a = (1 - z)(1 - n^2)
    r, z, n, q, h = saved
    a = (1.0 - z) * (1.0 - n * n)
    dr = a * q * r * (1.0 - r)
    dz = (h - n) * z * (1.0 - z)
    return jnp.stack([dr, dz, a], axis=2), jnp.stack([dr, dz, a * r], axis=2), z


def _gru_back(p, aux, ds):
    qx, qr, z = aux
    (dh,) = ds
    dar = dh[:, None] * qr
    return dh[:, None] * qx, dar, (dh * z,), {"bhn": dar[:, 2]}


RULES = {
    "lstm": Rule(_lstm_step, _lstm_prep, _lstm_back, num_saved=5),
    "gru": Rule(_gru_step, _gru_prep, _gru_back, num_saved=5, params=("bhn",), split_grads=True),
}


def has_rule(kind: str, params: dict) -> bool:
    """True where ``kind`` has a closed form for these parameters (not for LSTM peepholes)."""
    return kind in RULES and set(params) <= {"W", "b", "R", *RULES[kind].params}


def gated_rnn(kind: str, params: dict, x, s0, *, project: bool = True, unroll: int = 1, chunk: int = CHUNK):
    """Run ``kind`` over ``x`` with the closed-form backward.

    Args:
      x: ``[B, T, d_in]`` inputs (``project=True``: the projection ``x W + b`` runs here, per chunk), or
        ``[B, T, G, K, D]`` input projections with the bias (``project=False``; ``W``, ``b`` unused).
      s0: the initial state ``[B, S, G·D]``.
    Returns ``(y [B, T, G·D], s_last [B, S, G·D])``, float32.
    """
    rule = RULES[kind]
    W, b = (_f32(params["W"]), _f32(params["b"])) if project else (None, None)
    pp = {k: _f32(params[k]) for k in rule.params}
    return _run(kind, unroll, chunk, _f32(x), W, b, _f32(params["R"]), pp, _f32(s0))


def _f32(v):
    return jnp.asarray(v, jnp.float32)


def _dget(a, t, axis):
    return lax.dynamic_index_in_dim(a, t, axis=axis, keepdims=False)


def _dput(a, v, t, axis):
    return lax.dynamic_update_index_in_dim(a, v, t, axis=axis)


def _chunked(fn, t_len, chunk, carry, reverse=False):
    """``carry = fn(t0, size, carry)`` over the chunks of ``[0, t_len)``: a loop over the full chunks and a
    static tail (last in time)."""
    n, tail = divmod(t_len, chunk)

    def loop(carry):
        return lax.fori_loop(0, n, lambda j, c: fn(((n - 1 - j) if reverse else j) * chunk, chunk, c), carry)

    if not reverse and n:
        carry = loop(carry)
    if tail:
        carry = fn(n * chunk, tail, carry)
    if reverse and n:
        carry = loop(carry)
    return carry


def _h_prev(h0, ys, t0, tc):
    """``[h_{t0-1}, ..., h_{t0+tc-2}]`` ``[B, tc, G·D]`` from the outputs, ``h0`` before the first step."""
    first = jnp.where(t0 == 0, h0, _dget(ys, jnp.maximum(t0 - 1, 0), 1))[:, None]
    return jnp.concatenate([first, lax.dynamic_slice_in_dim(ys, t0, tc - 1, axis=1)], axis=1) if tc > 1 else first


def _dims(R, s0):
    g, d, k, _ = R.shape
    return s0.shape[0], g, k, d, s0.shape[1]


def _to_cols(v, g, d):
    """``[B, G·D]`` -> ``[G, D, B]``."""
    return v.T.reshape(g, d, -1)


def _from_cols(v):
    """``[G, D, B]`` -> ``[B, G·D]``."""
    return v.reshape(-1, v.shape[-1]).T


def _gate_grad_bufs(tc, m, bsz, two):
    """Per-chunk stores of the input and (``split_grads``) recurrent gate gradients, ``[tc, m, B]``."""
    buf = jnp.zeros((tc, m, bsz), jnp.float32)
    return buf, (jnp.zeros_like(buf) if two else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _run(kind, unroll, chunk, x, W, b, R, pp, s0):
    return _forward(kind, unroll, chunk, x, W, b, R, pp, s0)[0]


def _forward(kind, unroll, chunk, x, W, b, R, pp, s0):
    rule = RULES[kind]
    bsz, g, k, d, s_n = _dims(R, s0)
    t_len = x.shape[1]
    xf = x.reshape(bsz, t_len, -1)
    W2 = None if W is None else W.reshape(W.shape[0], g * k * d)
    Rt = jnp.swapaxes(R.reshape(g, d, k * d), 1, 2)  # [G, K·D, D]
    bias = jnp.zeros((g, k, d, 1), jnp.float32) if b is None else b[..., None]  # [G, K, D, 1]
    p = {n: v[..., None] for n, v in pp.items()}
    saved = tuple(jnp.zeros((t_len, g, d, bsz), jnp.float32) for _ in range(rule.num_saved))
    ys = jnp.zeros((bsz, t_len, g * d), jnp.float32)

    def chunk_fn(t0, tc, carry):
        xc = lax.dynamic_slice_in_dim(xf, t0, tc, axis=1)
        xp = xc if W2 is None else (xc.reshape(bsz * tc, -1) @ W2).reshape(bsz, tc, -1)
        # one array per gate, [tc, G, D, B], made once per chunk: XLA's CPU loop emitter runs a fusion that
        # slices gates out of a dynamically indexed array about 7x slower than one that indexes whole arrays
        xp = jnp.transpose(xp.reshape(bsz, tc, g, k, d), (3, 1, 2, 4, 0))
        xp = tuple(xp[i] + bias[None, :, i] for i in range(k))

        def body(j, carry):
            s, saved, ys = carry
            ar = jnp.einsum("gmd,gdb->gmb", Rt, s[0]).reshape(g, k, d, bsz)
            s, sv = rule.step(p, s, tuple(_dget(v, j, 0) for v in xp), tuple(ar[:, i] for i in range(k)))
            saved = tuple(_dput(buf, v, t0 + j, 0) for buf, v in zip(saved, sv))
            return s, saved, _dput(ys, _from_cols(s[0]), t0 + j, 1)

        return lax.fori_loop(0, tc, body, carry, unroll=min(unroll, tc))

    s = tuple(_to_cols(s0[:, a], g, d) for a in range(s_n))
    s, saved, ys = _chunked(chunk_fn, t_len, chunk, (s, saved, ys))
    s_last = jnp.stack([_from_cols(v) for v in s], axis=1)
    return (ys, s_last), (x, W, b, R, pp, s0, saved, ys)


def _backward(kind, unroll, chunk, res, cot):
    rule = RULES[kind]
    x, W, b, R, pp, s0, saved, ys = res
    gy, gs = cot
    bsz, g, k, d, s_n = _dims(R, s0)
    t_len = x.shape[1]
    xf = x.reshape(bsz, t_len, -1)
    W2 = None if W is None else W.reshape(W.shape[0], g * k * d)
    W2t = None if W is None else lax.optimization_barrier(W2.T)  # a row-major W^T: XLA's CPU matmul is slow on a transposed RHS
    R2 = R.reshape(g, d, k * d)
    p = {n: v[..., None] for n, v in pp.items()}
    two = rule.split_grads

    def chunk_fn(t0, tc, carry):
        ds, dx, dW, db, dR, dp, bufs = carry
        gyc = jnp.transpose(lax.dynamic_slice_in_dim(gy, t0, tc, axis=1).reshape(bsz, tc, g, d), (1, 2, 3, 0))
        aux = rule.prep(p, tuple(lax.dynamic_slice_in_dim(buf, t0, tc, axis=0) for buf in saved))

        def body(j, carry):
            ds, dax_c, dar_c, dp = carry
            jj = tc - 1 - j
            ds = (ds[0] + _dget(gyc, jj, 0),) + ds[1:]
            dax, dar, ds_prev, dpt = rule.back(p, tuple(_dget(a, jj, 0) for a in aux), ds)
            dax_c = _dput(dax_c, dax.reshape(g * k * d, bsz), jj, 0)
            if two:
                dar_c = _dput(dar_c, dar.reshape(g * k * d, bsz), jj, 0)
            # the matmul reads the row just stored: given the gate gradients themselves, XLA fuses their
            # arithmetic into both the store and the matmul's operand and computes it twice
            dar = _dget(dar_c if two else dax_c, jj, 0).reshape(g, k * d, bsz)
            dh = jnp.einsum("gdm,gmb->gdb", R2, dar)
            dp = {n: dp[n] + dpt[n].sum(-1) for n in dp}
            return (ds_prev[0] + dh,) + ds_prev[1:], dax_c, dar_c, dp

        # [tc, G·K·D, B] in the loop (no transposed write per step), rows in (b, t) order for the matmuls after
        # it. Every row is written before it is read, so full chunks reuse the carried buffers (no zero fill)
        fresh = bufs is None or tc != chunk
        dax_c, dar_c = _gate_grad_bufs(tc, g * k * d, bsz, two) if fresh else bufs
        ds, dax_c, dar_c, dp = lax.fori_loop(0, tc, body, (ds, dax_c, dar_c, dp), unroll=min(unroll, tc))
        if not fresh:
            bufs = (dax_c, dar_c)
        dax_t = jnp.transpose(dax_c, (2, 0, 1))
        dax2 = dax_t.reshape(bsz * tc, g * k * d)
        dar_t = jnp.transpose(dar_c, (2, 0, 1)) if two else dax_t
        dar2 = jnp.swapaxes(dar_t.reshape(bsz * tc, g, k * d), 0, 1)  # [G, B·tc, K·D]
        # the weight gradients contract over the B·tc rows: with the left factor transposed into a row-major
        # copy first, XLA's CPU matmul runs them about 2x faster than on the transposed view
        hc = _h_prev(s0[:, 0], ys, t0, tc).reshape(bsz * tc, g, d)
        dR = dR + jnp.einsum("gdn,gnm->gdm", lax.optimization_barrier(jnp.transpose(hc, (1, 2, 0))), dar2)
        db = db + dax2.sum(0)
        if W2 is None:
            dxc = dax2
        else:
            xc = lax.dynamic_slice_in_dim(xf, t0, tc, axis=1).reshape(bsz * tc, -1)
            dW = dW + lax.optimization_barrier(xc.T) @ dax2
            dxc = dax2 @ W2t
        dx = lax.dynamic_update_slice_in_dim(dx, dxc.reshape(bsz, tc, -1), t0, axis=1)
        return ds, dx, dW, db, dR, dp, bufs

    ds = tuple(_to_cols(gs[:, a], g, d) for a in range(s_n))
    carry = (ds, jnp.zeros_like(xf), None if W2 is None else jnp.zeros_like(W2),
             jnp.zeros((g * k * d,), jnp.float32), jnp.zeros_like(R2), {n: jnp.zeros_like(v) for n, v in pp.items()},
             _gate_grad_bufs(chunk, g * k * d, bsz, two) if t_len >= chunk else None)
    ds, dx, dW, db, dR, dp, _ = _chunked(chunk_fn, t_len, chunk, carry, reverse=True)
    ds0 = jnp.stack([_from_cols(v) for v in ds], axis=1)
    dW = None if W is None else dW.reshape(W.shape)
    db = None if b is None else db.reshape(b.shape)
    return dx.reshape(x.shape), dW, db, dR.reshape(R.shape), dp, ds0


_run.defvjp(_forward, _backward)
