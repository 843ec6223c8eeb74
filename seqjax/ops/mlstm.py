r"""The mLSTM engine: the matrix-memory cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

Per head, with exponential input gate ``i``, sigmoid forget gate ``f`` (both pre-activations
``[b, t, h]``), stabiliser ``m``, normaliser ``n`` and matrix memory ``C`` (stabilised copies
``C' = C e^{-m}``, ``n' = n e^{-m}``):

.. math::

    m_t = \max(\log\sigma(f_t) + m_{t-1},\; i_t), \quad
    i'_t = e^{i_t - m_t}, \quad f'_t = e^{\log\sigma(f_t) + m_{t-1} - m_t},

    C_t = f'_t C_{t-1} + i'_t k_t v_t^\top, \quad n_t = f'_t n_{t-1} + i'_t k_t, \quad
    h_t = \frac{C_t^\top q_t}{\max(|n_t^\top q_t|,\, e^{-m_t})}, \qquad k_t \leftarrow k_t / \sqrt{d_k}.

The output does not depend on the stabiliser (it cancels between numerator and ``max``); ``m`` only keeps
the exponentials finite. The recurrent ``m_t`` unrolls to ``max(b_t + m_0, max_{s≤t} b_t − b_s + i_s)``
(``b`` the cumulative log forget gate), which the chunked form computes exactly: per row the max over the
chunk's log weights and the carried ``m``, so its final state ``(C', n', m)`` equals the reference's. A
reset (packed documents) zeroes ``(C, n, m)`` before the token, as a fresh sequence starts. The chunkwise
form follows NX-AI's ``mlstm_kernels`` reference (intra-chunk log-weight matrix, per-chunk states with a
local max, a ``lax.scan`` carrying ``(C', n', m)``), with the chunk layout of ``seqjax.ops.gla``.

Shapes: ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``i, f [b, t, h]``; state ``(C [b, h, dk, dv],
n [b, h, dk], m [b, h])`` float32.

Algorithms: :func:`recurrent_mlstm` (the reference), :func:`chunk_mlstm` (chunkwise parallel),
:func:`step_mlstm` (one token), :func:`materialize_mlstm` (the ``[b, h, T, T]`` operator).
The layer, the ``impl=`` dispatch and the registration are in ``seqjax.mixers.mlstm``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import _checks
from seqjax.ops import gla as eng
from seqjax.types import AnyArray, Array, Float, Shaped

# the state (C [b, h, k, v], n [b, h, k], m [b, h])
State = tuple[Float[Array, "b h k v"], Float[Array, "b h k"], Float[Array, "b h"]]

__all__ = ["check_mlstm_inputs", "zero_state_mlstm", "recurrent_mlstm", "step_mlstm", "chunk_mlstm",
           "materialize_mlstm", "NEG"]

NEG = -1e30  # "minus infinity" that keeps differences and gradients finite
f32 = lambda x: x.astype(jnp.float32)


def check_mlstm_inputs(q, k, v, i, f, h0, resets, chunk_size=None):
    """Shape checks in Python (before tracing); errors name the argument."""
    eng.check_gla_inputs(q, k, v, None, None, None, resets, chunk_size)
    b, t, h, dk = q.shape
    _checks.check_shape("i", i, (b, t, h), "[batch, time, heads] (input gate pre-activation)")
    _checks.check_shape("f", f, (b, t, h), "[batch, time, heads] (forget gate pre-activation)")
    if h0 is not None:
        if not (isinstance(h0, (tuple, list)) and len(h0) == 3):
            raise ValueError("h0 must be a tuple (C [b, h, dk, dv], n [b, h, dk], m [b, h])")
        _checks.check_shape("h0[0] (C)", h0[0], (b, h, dk, v.shape[-1]), "[batch, heads, key_dim, value_dim]")
        _checks.check_shape("h0[1] (n)", h0[1], (b, h, dk), "[batch, heads, key_dim]")
        _checks.check_shape("h0[2] (m)", h0[2], (b, h), "[batch, heads]")


def zero_state_mlstm(b, h, dk, dv):
    """The empty state ``(C [b, h, dk, dv], n [b, h, dk], m [b, h])``, float32 zeros."""
    return (jnp.zeros((b, h, dk, dv), jnp.float32), jnp.zeros((b, h, dk), jnp.float32), jnp.zeros((b, h), jnp.float32))


def recurrent_mlstm(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    i: Float[AnyArray, "b t h"],
    f: Float[AnyArray, "b t h"],
    *,
    h0=None,
    resets: Shaped[AnyArray, "b t"] | None = None,
) -> tuple[Float[Array, "b t h v"], State]:
    """Reference: the stabilised mLSTM recurrence above as a float32 ``lax.scan``.

    Returns ``(y [b, t, h, dv] in v's dtype, (C, n, m))``."""
    b, t, h, dk = q.shape
    state = zero_state_mlstm(b, h, dk, v.shape[-1]) if h0 is None else tuple(f32(x) for x in h0)
    cut = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)

    def step(carry, xs):
        C, n, m = carry
        q_t, k_t, v_t, i_t, f_t, r_t = xs
        keep = ~r_t[:, None]
        C, n, m = C * keep[..., None, None], n * keep[..., None], m * keep
        logf = jax.nn.log_sigmoid(f_t)
        m_new = jnp.maximum(logf + m, i_t)
        ig, fg = jnp.exp(i_t - m_new), jnp.exp(logf + m - m_new)
        k_t = k_t / math.sqrt(dk)
        C = fg[..., None, None] * C + ig[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n = fg[..., None] * n + ig[..., None] * k_t
        num = jnp.einsum("bhkv,bhk->bhv", C, q_t)
        den = jnp.maximum(jnp.abs(jnp.einsum("bhk,bhk->bh", n, q_t)), jnp.exp(-m_new))
        return (C, n, m_new), num / den[..., None]

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (f32(q), f32(k), f32(v), f32(i), f32(f), cut))
    state, y = lax.scan(step, state, xs)
    return jnp.moveaxis(y, 0, 1).astype(v.dtype), state


def step_mlstm(
    h,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    i: Float[AnyArray, "b h"],
    f: Float[AnyArray, "b h"],
) -> tuple[Float[Array, "b h v"], State]:
    """One token: ``q, k [b, h, dk]``, ``v [b, h, dv]``, ``i, f [b, h]`` -> ``(y [b, h, dv], (C, n, m))``."""
    y, s = recurrent_mlstm(q[:, None], k[:, None], v[:, None], i[:, None], f[:, None], h0=h)
    return y[:, 0], s


def chunk_mlstm(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    i: Float[AnyArray, "b t h"],
    f: Float[AnyArray, "b t h"],
    h0,
    resets: Shaped[AnyArray, "b t"] | None,
    chunk_size,
) -> tuple[Float[Array, "b t h v"], State]:
    """Chunkwise-parallel form of :func:`recurrent_mlstm`: ``(y [b, t, h, dv] float32, (C, n, m))``."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    logf = jax.nn.log_sigmoid(f32(f))
    c, n, bc, seg, _ = eng.prepare_chunks(logf[..., None], None, resets, t, chunk_size)
    pad = n * c - t
    cut = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    # e: the log weight each token brings to the stabiliser; a reset also brings the fresh state's m = 0,
    # decayed by its own forget gate (exactly what the recurrence does after zeroing the state)
    e = jnp.where(cut[..., None], jnp.maximum(f32(i), logf), f32(i))
    tr = lambda x, fill: jnp.moveaxis(
        jnp.pad(x, [(0, 0), (0, pad), (0, 0)], constant_values=fill).reshape(b, n, c, h), 2, 3)  # [b, n, h, c]
    ic, ec = tr(f32(i), NEG), tr(e, NEG)
    bt, st = jnp.moveaxis(bc[..., 0], 2, 3), jnp.moveaxis(seg[..., 0], 2, 3)
    cd = jnp.result_type(q.dtype, k.dtype, v.dtype)
    chunks = lambda x: jnp.pad(x.astype(cd), [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, n, c, h, x.shape[-1])
    qc, kc, vc = chunks(q), chunks((f32(k) / math.sqrt(dk)).astype(k.dtype)), chunks(v)

    ok = (st[..., :, None] == st[..., None, :]) & jnp.tril(jnp.ones((c, c), bool))[None, None, None]
    diff = bt[..., :, None] - bt[..., None, :]  # [b, n, h, t, s]
    w = jnp.where(ok, diff + ic[..., None, :], NEG)
    m_intra = jnp.max(jnp.where(ok, diff + ec[..., None, :], NEG), axis=-1)  # [b, n, h, c]

    # chunk-local end states, stabilised by their own max
    m_loc = m_intra[..., -1]  # [b, n, h]
    we = jnp.exp(w[..., -1, :] - m_loc[..., None])  # [b, n, h, s]
    u = jnp.einsum("bnshk,bnhs,bnshv->bnhkv", f32(kc), we, f32(vc))
    nloc = jnp.einsum("bnshk,bnhs->bnhk", f32(kc), we)
    a = jnp.where(st[..., -1] == 0, bt[..., -1], NEG)  # whole-chunk log decay [b, n, h]

    C0, n0, m0 = zero_state_mlstm(b, h, dk, dv) if h0 is None else tuple(f32(x) for x in h0)

    def carry(state, xs):
        C, nn_, m = state
        a_n, u_n, nl_n, ml_n = xs
        m_new = jnp.maximum(a_n + m, ml_n)
        fo, fl = jnp.exp(a_n + m - m_new), jnp.exp(ml_n - m_new)
        C = fo[..., None, None] * C + fl[..., None, None] * u_n
        nn_ = fo[..., None] * nn_ + fl[..., None] * nl_n
        return (C, nn_, m_new), state

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (a, u, nloc, m_loc))
    last, (C_in, n_in, m_in) = lax.scan(carry, (C0, n0, m0), xs)
    C_in, n_in, m_in = (jnp.moveaxis(x, 0, 1) for x in (C_in, n_in, m_in))  # entering each chunk

    inter = jnp.where(st == 0, bt + m_in[..., None], NEG)  # [b, n, h, c]
    m_t = jnp.maximum(m_intra, inter)
    att = jnp.einsum("bnthk,bnshk->bnhts", qc, kc, preferred_element_type=jnp.float32) * jnp.exp(w - m_t[..., None])
    w0 = jnp.exp(inter - m_t)  # [b, n, h, c]
    num = jnp.einsum("bnhts,bnshv->bnthv", att.astype(cd), vc, preferred_element_type=jnp.float32)
    num = num + jnp.einsum("bnthk,bnhkv,bnht->bnthv", f32(qc), C_in, w0)
    den = jnp.sum(att, axis=-1) + jnp.einsum("bnthk,bnhk,bnht->bnht", f32(qc), n_in, w0)
    den = jnp.maximum(jnp.abs(den), jnp.exp(-m_t))
    y = num / jnp.moveaxis(den, 2, 3)[..., None]
    return y.reshape(b, n * c, h, dv)[:, :t], last


def materialize_mlstm(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    i: Float[AnyArray, "b t h"],
    f: Float[AnyArray, "b t h"],
) -> Float[Array, "b h t t"]:
    """``M[b, h, t, s] = (q_t·k_s/√d) e^{b_t − b_s + i_s − m_t} / max(|Σ_s …|, e^{−m_t})`` (``h0 = 0``)."""
    b, t, h, dk = q.shape
    cf = jnp.cumsum(jax.nn.log_sigmoid(f32(f)), axis=1)  # [b, t, h]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, :, :, None]
    w = jnp.where(causal, cf[:, :, None] - cf[:, None, :] + f32(i)[:, None, :], NEG)  # [b, t, s, h]
    m = jnp.maximum(jnp.max(w, axis=2), cf)  # the zero state's m = 0, decayed
    att = jnp.einsum("bthk,bshk->btsh", f32(q), f32(k) / math.sqrt(dk)) * jnp.exp(w - m[:, :, None])
    den = jnp.maximum(jnp.abs(jnp.sum(att, axis=2)), jnp.exp(-m))
    return jnp.moveaxis(att / den[:, :, None], 3, 1)
