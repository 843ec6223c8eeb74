r"""mLSTM, the matrix-memory cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

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
local max, a ``lax.scan`` carrying ``(C', n', m)``), with the chunk layout of ``seqjax.mixers._gla_chunk``.

Shapes: ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``i, f [b, t, h]``; state ``(C [b, h, dk, dv],
n [b, h, dk], m [b, h])`` float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from seqjax import _checks, nn
from seqjax._platform import AUTO_BACKWARD, auto_pallas, kernel_call
from seqjax.mixers import _gla_chunk as eng
from seqjax.mixers.registry import MixerSpec, register

__all__ = ["mlstm", "mlstm_recurrent", "mlstm_step", "mlstm_materialize", "MLSTM"]

NEG = -1e30  # "minus infinity" that keeps differences and gradients finite
f32 = lambda x: x.astype(jnp.float32)


def _validate(q, k, v, i, f, h0, resets, negative_eigen):
    if negative_eigen:
        raise ValueError("mlstm does not support negative_eigen=True (its forget gate is a sigmoid in (0, 1))")
    eng.validate(q, k, v, None, None, None, resets)
    b, t, h, dk = q.shape
    _checks.check_shape("i", i, (b, t, h), "[batch, time, heads] (input gate pre-activation)")
    _checks.check_shape("f", f, (b, t, h), "[batch, time, heads] (forget gate pre-activation)")
    if h0 is not None:
        if not (isinstance(h0, (tuple, list)) and len(h0) == 3):
            raise ValueError("h0 must be a tuple (C [b, h, dk, dv], n [b, h, dk], m [b, h])")
        _checks.check_shape("h0[0] (C)", h0[0], (b, h, dk, v.shape[-1]), "[batch, heads, key_dim, value_dim]")
        _checks.check_shape("h0[1] (n)", h0[1], (b, h, dk), "[batch, heads, key_dim]")
        _checks.check_shape("h0[2] (m)", h0[2], (b, h), "[batch, heads]")


def _zero_state(b, h, dk, dv):
    return (jnp.zeros((b, h, dk, dv), jnp.float32), jnp.zeros((b, h, dk), jnp.float32), jnp.zeros((b, h), jnp.float32))


def mlstm_recurrent(q, k, v, i, f, *, h0=None, resets=None, negative_eigen=False):
    """Reference: the stabilised mLSTM recurrence above as a float32 ``lax.scan``."""
    _validate(q, k, v, i, f, h0, resets, negative_eigen)
    b, t, h, dk = q.shape
    state = _zero_state(b, h, dk, v.shape[-1]) if h0 is None else tuple(f32(x) for x in h0)
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


def mlstm_step(h, q, k, v, i, f, *, negative_eigen=False):
    """One token: ``q, k [b, h, dk]``, ``v [b, h, dv]``, ``i, f [b, h]`` -> ``(y [b, h, dv], (C, n, m))``."""
    y, s = mlstm_recurrent(q[:, None], k[:, None], v[:, None], i[:, None], f[:, None], h0=h, negative_eigen=negative_eigen)
    return y[:, 0], s


def _chunk(q, k, v, i, f, h0, resets, chunk_size):
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

    C0, n0, m0 = _zero_state(b, h, dk, dv) if h0 is None else tuple(f32(x) for x in h0)

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


def mlstm(q, k, v, i, f, *, h0=None, resets=None, impl="auto", chunk_size=64, negative_eigen=False):
    """mLSTM: ``impl="chunked"`` (chunkwise-parallel XLA), ``"sequential"`` (the reference), ``"pallas"``
    (``pallas_kernels/mlstm_chunk`` and its Pallas backward) or ``"auto"`` (the kernel on a GPU once its current
    forward has passed the GPU tests, ``seqjax._platform.GPU_TESTED`` — one device, or inside ``shard_map``
    under a ``use_rules`` mesh — differentiated through the chunked form until its
    backward is timed, see ``seqjax._platform``; else chunked).

    Returns ``(y [b, t, h, dv] in v's dtype, (C, n, m))``.
    """
    _checks.check_choice("impl", impl, ("auto", "sequential", "chunked", "pallas"))
    _validate(q, k, v, i, f, h0, resets, negative_eigen)
    eng.validate(q, k, v, None, None, None, resets, chunk_size)
    if impl == "sequential":
        return mlstm_recurrent(q, k, v, i, f, h0=h0, resets=resets)
    if impl == "pallas" or (impl == "auto" and auto_pallas(chunk_size, kernel="mlstm")):
        from pallas_kernels.mlstm_chunk import mlstm_chunk  # imported only on this branch

        backward = "pallas" if impl == "pallas" else AUTO_BACKWARD["mlstm"]
        y, s = kernel_call(
            lambda q, k, v, i, f, h0, resets: mlstm_chunk(
                q, k, v, i, f, h0=h0, resets=resets, chunk_size=chunk_size, backward=backward),
            q, k, v, i, f, h0, resets, layouts="tttttst", out_layouts="ts")
        return y.astype(v.dtype), s
    y, s = _chunk(q, k, v, i, f, h0, resets, chunk_size)
    return y.astype(v.dtype), s


def mlstm_materialize(q, k, v, i, f, *, negative_eigen=False):
    """``M[b, h, t, s] = (q_t·k_s/√d) e^{b_t − b_s + i_s − m_t} / max(|Σ_s …|, e^{−m_t})`` (``h0 = 0``)."""
    del v, negative_eigen
    b, t, h, dk = q.shape
    cf = jnp.cumsum(jax.nn.log_sigmoid(f32(f)), axis=1)  # [b, t, h]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, :, :, None]
    w = jnp.where(causal, cf[:, :, None] - cf[:, None, :] + f32(i)[:, None, :], NEG)  # [b, t, s, h]
    m = jnp.maximum(jnp.max(w, axis=2), cf)  # the zero state's m = 0, decayed
    att = jnp.einsum("bthk,bshk->btsh", f32(q), f32(k) / math.sqrt(dk)) * jnp.exp(w - m[:, :, None])
    den = jnp.maximum(jnp.abs(jnp.sum(att, axis=2)), jnp.exp(-m))
    return jnp.moveaxis(att / den[:, :, None], 3, 1)


def make_inputs(key, batch, time, heads=2, dk=7, dv=5):
    ks = jax.random.split(key, 5)
    return dict(
        q=jax.random.normal(ks[0], (batch, time, heads, dk)),
        k=jax.random.normal(ks[1], (batch, time, heads, dk)),
        v=jax.random.normal(ks[2], (batch, time, heads, dv)),
        i=2.0 * jax.random.normal(ks[3], (batch, time, heads)),
        f=1.5 + 2.0 * jax.random.normal(ks[4], (batch, time, heads)),
    )


class MLSTM(nnx.Module):
    """mLSTM layer: q/k/v projections, scalar input/forget gates per head (forget bias init in [3, 6]),
    per-head RMSNorm, sigmoid output gate, output projection. Cache ``{"state": (C, n, m)}``."""

    def __init__(self, d_model, *, num_heads=2, expand=1, chunk_size=64, impl="auto", rngs: nnx.Rngs, dtype=jnp.float32):
        inner = expand * d_model
        _checks.check_divisible("inner", inner, "num_heads", num_heads)
        self.num_heads, self.head_dim, self.chunk_size, self.impl = num_heads, inner // num_heads, chunk_size, impl
        lin = lambda i, o, ax, bias=False: nn.Linear(i, o, axes=ax, use_bias=bias, rngs=rngs, dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj = (lin(d_model, inner, ("embed", "heads")) for _ in range(3))
        self.i_proj = lin(d_model, num_heads, ("embed", "heads"), True)
        self.f_proj = lin(d_model, num_heads, ("embed", "heads"), True)
        self.f_proj.bias[...] = jnp.linspace(3.0, 6.0, num_heads)
        self.o_proj_gate = lin(d_model, inner, ("embed", "heads"))
        self.norm = nn.RMSNorm(self.head_dim, axis_name="head_dim")
        self.out_proj = lin(inner, d_model, ("heads", "embed"))

    def __call__(self, x, *, segment_ids=None, cache=None):
        h = self.num_heads
        q, k, v = (nn.split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        ig, fg = self.i_proj(x).astype(jnp.float32), self.f_proj(x).astype(jnp.float32)
        resets = nn.resets_from_segment_ids(segment_ids)
        if cache is not None and resets is not None:
            resets = resets.at[:, 0].set(False)
        h0 = None if cache is None else cache["state"]
        if cache is not None and x.shape[1] == 1 and resets is None:
            y, s = mlstm_step(h0, q[:, 0], k[:, 0], v[:, 0], ig[:, 0], fg[:, 0])
            y = y[:, None]
        else:
            y, s = mlstm(q, k, v, ig, fg, h0=h0, resets=resets, impl=self.impl, chunk_size=self.chunk_size)
        y = nn.merge_heads(self.norm(y)) * jax.nn.sigmoid(self.o_proj_gate(x))
        return self.out_proj(y), (None if cache is None else {"state": s})

    def init_cache(self, batch_size, max_len=None):
        del max_len
        return {"state": _zero_state(batch_size, self.num_heads, self.head_dim, self.head_dim)}


register(MixerSpec(
    name="mlstm", fn=mlstm, recurrent=mlstm_recurrent, step=mlstm_step, make_inputs=make_inputs, layer=MLSTM,
    materialize=mlstm_materialize, value_arg="v", impls=("sequential", "chunked"),
    doc="mLSTM (Beck et al. 2024, xLSTM)",
))
