r"""The chunkwise-parallel engine for gated linear attention (GLA, RetNet, linear attention, Mamba-2).

One recurrence, matrix state ``S [b, h, k, v]``:

.. math::  S_t = \mathrm{diag}(\sigma_t \alpha_t) S_{t-1} + k_t v_t^\top, \qquad o_t = S_t^\top q_t,

with log decays ``g_t = log|α_t|`` either per channel ``[b, t, h, k]`` (GLA) or per head ``[b, t, h]``
(Mamba-2/SSD, RetNet, linear attention), and an optional sign ``σ_t ∈ {±1}`` of the same shape (the
negative-eigenvalue transitions ``2a − 1`` of Grazzi et al. 2025, which cannot live in log space:
the engine carries sign and log-magnitude separately and uses the cumulative sign product
``p_t = Π_{r≤t} σ_r`` in each chunk, so the sign from ``s`` to ``t`` is ``p_t p_s``).

The chunked algorithm (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training", §4; Dao & Gu 2024, SSD's four steps), chunk length ``C``:

1. *intra-chunk*: ``O_intra = (Q K^T ⊙ D) V`` with the decay mask ``D_ts = exp(b_t − b_s)`` for
   ``s ≤ t``, where ``b`` is the inclusive cumulative log decay *relative to the chunk start*, so
   every exponent that is ever evaluated is ``≤ 0`` (no overflow; fla's most reported bug comes from
   factoring ``exp(b_t) exp(−b_s)`` with exclusive decays over a whole chunk).
   Per-channel decays cannot form ``D`` as a ``C × C`` matrix; we use the **secondary-chunk**
   factorisation (GLA paper §4.3): the chunk is cut into sub-chunks of ``16``; a sub-chunk ``i``
   against every earlier position ``s`` uses the reference point ``r`` = the token before sub-chunk
   ``i``: ``(q_t e^{b_t − b_r}) · (k_s e^{b_r − b_s})`` with both exponents ``≤ 0``; the diagonal
   ``16 × 16`` blocks are computed directly in log space (``Σ_k q_tk k_sk e^{b_tk − b_sk}``).
2. *chunk states*: ``U_n = Σ_s diag(e^{b_C − b_s}) k_s v_s^T`` (exponents ``≤ 0``).
3. *inter-chunk pass*: ``S_n = diag(e^{b_C}) S_{n−1} + U_n`` — a ``lax.scan`` over ``T / C`` chunks.
4. *state to output*: ``O_inter = (Q ⊙ e^{b}) S_{n−1}``.

Resets (packed documents) are a decay of exactly 0 at a token. They never enter the logs: within a
chunk a reset bumps a segment counter ``seg``; a factor from ``s`` to ``t`` is used only where
``seg_s == seg_t`` (masked with ``where`` *before* ``exp``, so no ``inf − inf`` and no NaN gradient).
A log decay of ``-inf`` is read as a reset at that entry, so ``decay = 0`` is exact.

Precision: decays, cumulative sums, masks and states are float32; the ``Q K^T`` and ``· V`` matmuls
take the input dtype (bf16 allowed) with float32 accumulation. The intra-chunk block is wrapped in
``jax.checkpoint``, so under autodiff its ``C × C`` (and ``16 × 16 × k``) temporaries are recomputed
in the backward pass instead of stored: memory stays linear in ``T`` (inputs plus one state per chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax import _checks
from seqjax.types import AnyArray, Array, Float, Shaped

__all__ = ["check_gla_inputs", "chunk_gla", "recurrent_gla", "step_gla", "prepare_chunks", "SUB_CHUNK"]

SUB_CHUNK = 16


def _f32(x):
    return x.astype(jnp.float32)


def check_gla_inputs(q, k, v, g, sign, h0, resets, chunk_size=None):
    """Shape checks shared by the mixers built on this engine (Python, before tracing)."""
    _checks.check_ndim("q", q, 4, "[batch, time, heads, key_dim]")
    b, t, h, dk = np.shape(q)
    _checks.check_shape("k", k, (b, t, h, dk), "[batch, time, heads, key_dim] (like q)")
    _checks.check_ndim("v", v, 4, "[batch, time, heads, value_dim]")
    _checks.check_shape("v", v, (b, t, h, None), "[batch, time, heads, value_dim]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_dtype(name, x, "float")
    dv = np.shape(v)[-1]
    if g is not None:
        if np.ndim(g) == 3:
            _checks.check_shape("log_decay", g, (b, t, h), "[batch, time, heads] (per-head decay)")
        else:
            _checks.check_shape("log_decay", g, (b, t, h, dk), "[batch, time, heads, key_dim] (per-channel decay)")
    if sign is not None:
        _checks.check_shape("sign", sign, (b, t, h), "[batch, time, heads]")
    if h0 is not None:
        _checks.check_shape("h0", h0, (b, h, dk, dv), "[batch, heads, key_dim, value_dim]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")
        _checks.check_dtype("resets", resets, "int_or_bool")
    if chunk_size is not None:
        if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if chunk_size > SUB_CHUNK and chunk_size % SUB_CHUNK:
            raise ValueError(f"chunk_size must be <= {SUB_CHUNK} or a multiple of {SUB_CHUNK}, got {chunk_size}")


def _cuts(g, resets):
    """Per-entry reset mask (shape of ``g``) and the log decay with resets zeroed."""
    g = _f32(g)
    cut = jnp.isneginf(g)
    if resets is not None:
        r = jnp.asarray(resets).astype(bool)
        cut = cut | r.reshape(r.shape + (1,) * (g.ndim - 2))
    return cut, jnp.where(cut, 0.0, g)


# ----------------------------------------------------------------------------- reference


def recurrent_gla(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    g: Float[AnyArray, "b t h"] | Float[AnyArray, "b t h k"] | None,
    *,
    sign: Float[AnyArray, "b t h"] | None = None,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Float32 ``lax.scan`` reference: ``S_t = diag(σ_t e^{g_t}) S_{t-1} + k_t v_t^T; o_t = S_t^T q_t``.

    ``g`` ``[b, t, h]`` or ``[b, t, h, k]`` (or ``None`` for no decay). Returns ``(o float32, S_T)``.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if g is None:
        g = jnp.zeros((b, t, h), jnp.float32)
    if g.ndim == 3:
        g = g[..., None]
    a = jnp.exp(_f32(g))
    if sign is not None:
        a = a * _f32(sign)[..., None]
    if resets is not None:
        a = jnp.where(jnp.asarray(resets).astype(bool)[:, :, None, None], 0.0, a)
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if h0 is None else _f32(h0)

    def step(s, xs):
        q_t, k_t, v_t, a_t = xs
        s = a_t[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    xs = tuple(jnp.moveaxis(_f32(x), 1, 0) for x in (q, k, v, jnp.broadcast_to(a, (b, t, h, dk))))
    s_last, o = lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s_last


def step_gla(
    s: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    g: Float[AnyArray, "b h"] | Float[AnyArray, "b h k"] | None = None,
    *,
    sign: Float[AnyArray, "b h"] | None = None,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    """One token (time axis removed): ``q, k [b, h, k]``, ``v [b, h, v]``, ``g [b, h]`` or ``[b, h, k]``."""
    b, h, dk = q.shape
    if s is None:
        s = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    a = jnp.ones((b, h, 1), jnp.float32) if g is None else jnp.exp(_f32(g))
    if a.ndim == 2:
        a = a[..., None]
    if sign is not None:
        a = a * _f32(sign)[..., None]
    s = a[..., None] * _f32(s) + _f32(k)[..., :, None] * _f32(v)[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", _f32(q), s), s


# ----------------------------------------------------------------------------- chunked


def prepare_chunks(g, sign, resets, t, chunk_size, pad_front=False):
    """Chunk layout of the gates. ``g`` ``[b, t, h, kd]`` (kd = 1 for per-head decays).

    Returns ``c`` (chunk length), ``n`` (chunks), and ``[b, n, c, h, kd]`` arrays: ``bc`` inclusive
    cumulative log decay within the chunk, ``seg`` segment counter within the chunk, ``p`` cumulative
    sign product (``None`` without signs). The ``n c − t`` padding tokens (decay 1, sign +1, no reset)
    go at the end, or at the front with ``pad_front`` (see ``chunk_gla``).
    """
    sub = min(SUB_CHUNK, chunk_size)
    c = min(chunk_size, -(-t // sub) * sub)
    n = -(-t // c)
    pad = n * c - t
    cut, g = _cuts(g, resets)
    if sign is not None:
        sign = jnp.where(cut, 1.0, jnp.broadcast_to(_f32(sign), g.shape))
    b, _, h, kd = g.shape

    def resh(x, fill=0):  # padded tokens: decay 1, sign +1, no reset
        x = jnp.pad(x, [(0, 0), (pad, 0) if pad_front else (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(b, n, c, h, kd)

    bc = jnp.cumsum(resh(g), axis=2)
    seg = jnp.cumsum(resh(cut.astype(jnp.int32)), axis=2)
    p = None if sign is None else jnp.cumprod(resh(sign, 1), axis=2)
    return c, n, bc, seg, p


def _factor(b_hi, s_hi, b_lo, s_lo, p_hi=None, p_lo=None, causal=None, same=None):
    """``σ e^{b_hi − b_lo}`` where the pair is in one segment (and causal), else 0 — never ``exp(>0)``.

    ``same`` (static bool mask): pairs that are one token, whose factor is exactly 1. It is written as the
    constant 1 rather than ``exp(b_t − b_t)``: otherwise autodiff sends ``+ct`` and ``−ct`` to ``b_t`` along
    two paths, and under strong decay (log −20 every step) the true gradient of ``g`` is ~1e-9 while the
    rounding of those O(1) terms that should cancel is ~1e-7 — a 100% relative error.
    """
    ok = s_hi == s_lo
    if causal is not None:
        ok = ok & causal
    live = ok if same is None else ok & ~same
    out = jnp.where(live, jnp.exp(jnp.where(live, b_hi - b_lo, 0.0)), 0.0)
    if same is not None:
        out = jnp.where(same, 1.0, out)
    if p_hi is not None:
        out = out * p_hi * p_lo
    return out


def _intra_scalar(q, k, bc, seg, p):
    """``[b, n, c, h, k]`` q/k, ``[b, n, c, h, 1]`` gates -> attention ``[b, n, h, c, c]`` (float32)."""
    c = q.shape[2]
    causal = jnp.tril(jnp.ones((c, c), bool))[None, None, None]
    tr = lambda x: jnp.moveaxis(x[..., 0], 2, 3)  # [b, n, h, c]
    bt, st = tr(bc), tr(seg)
    pt = None if p is None else tr(p)
    d = _factor(
        bt[..., :, None], st[..., :, None], bt[..., None, :], st[..., None, :],
        None if pt is None else pt[..., :, None], None if pt is None else pt[..., None, :], causal,
        jnp.eye(c, dtype=bool)[None, None, None],
    )
    qk = jnp.einsum("bnthk,bnshk->bnhts", q, k, preferred_element_type=jnp.float32)
    return qk * d


def _intra_channel(q, k, bc, seg, p):
    """Per-channel decays via secondary chunks of ``SUB_CHUNK`` (see module docstring)."""
    bsz, n, c, h, dk = q.shape
    s = min(SUB_CHUNK, c)
    m = c // s
    cd = q.dtype
    qf, kf = _f32(q), _f32(k)
    sub = lambda x: x.reshape(bsz, n, m, s, h, x.shape[-1])
    # diagonal sub-blocks, directly in log space: [b, n, m, h, t, s, k]
    qs, ks, bs, ss = sub(qf), sub(kf), sub(bc), sub(seg)
    ps = None if p is None else sub(p)
    tr = lambda x: jnp.moveaxis(x, 3, 4)  # [b, n, m, h, s, k]
    qs, ks, bs, ss = tr(qs), tr(ks), tr(bs), tr(ss)
    ps = None if ps is None else tr(ps)
    causal = jnp.tril(jnp.ones((s, s), bool)).reshape(1, 1, 1, 1, s, s, 1)
    d = _factor(
        bs[..., :, None, :], ss[..., :, None, :], bs[..., None, :, :], ss[..., None, :, :],
        None if ps is None else ps[..., :, None, :], None if ps is None else ps[..., None, :, :], causal,
        jnp.eye(s, dtype=bool).reshape(1, 1, 1, 1, s, s, 1),
    )
    a_diag = jnp.einsum("bnihtk,bnihsk,bnihtsk->bnihts", qs, ks, d)
    eye = jnp.eye(m, dtype=jnp.float32)
    a = jnp.einsum("bnihts,ij->bnhitjs", a_diag, eye).reshape(bsz, n, h, c, c)
    if m == 1:
        return a
    # off-diagonal: sub-chunk i against all s < i*s, reference r = token before sub-chunk i
    ridx = np.arange(m) * s - 1  # [m]; -1 = chunk start (b = 0, seg = 0, p = 1)
    zero = jnp.zeros_like(bc[:, :, :1])
    bpad = jnp.concatenate([zero, bc], axis=2)
    spad = jnp.concatenate([zero.astype(seg.dtype), seg], axis=2)
    br, sr = bpad[:, :, ridx + 1], spad[:, :, ridx + 1]  # [b, n, m, h, k]
    pr = None if p is None else jnp.concatenate([jnp.ones_like(zero), p], axis=2)[:, :, ridx + 1]
    # q side: t in sub-chunk i, factor e^{b_t - b_r}  ([b, n, m, s, h, k])
    qt = qf.reshape(bsz, n, m, s, h, dk) * _factor(
        sub(bc), sub(seg), br[:, :, :, None], sr[:, :, :, None],
        None if p is None else sub(p), None if p is None else pr[:, :, :, None],
    )
    # k side: all s in the chunk with s <= r_i, factor e^{b_r - b_s}  ([b, n, m, c, h, k])
    before = (np.arange(c)[None, :] <= ridx[:, None])[None, None, :, :, None, None]
    kt = kf[:, :, None] * _factor(
        br[:, :, :, None], sr[:, :, :, None], bc[:, :, None], seg[:, :, None],
        None if p is None else pr[:, :, :, None], None if p is None else p[:, :, None], before,
    )
    a_off = jnp.einsum(
        "bnithk,bnishk->bnhits", qt.astype(cd), kt.astype(cd), preferred_element_type=jnp.float32
    ).reshape(bsz, n, h, c, c)
    return a + a_off


def _intra(q, k, v, bc, seg, p):
    a = (_intra_scalar if bc.shape[-1] == 1 else _intra_channel)(q, k, bc, seg, p)
    return jnp.einsum("bnhts,bnshv->bnthv", a.astype(v.dtype), v, preferred_element_type=jnp.float32)


def chunk_gla(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    g: Float[AnyArray, "b t h"] | Float[AnyArray, "b t h k"] | None,
    *,
    sign: Float[AnyArray, "b t h"] | None = None,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Chunkwise-parallel ``S_t = diag(σ_t e^{g_t}) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t``.

    Args:
      q, k: ``[b, t, h, dk]``; v: ``[b, t, h, dv]`` (float32 or bf16; matmuls in that dtype with
        float32 accumulation).
      g: log decays ``[b, t, h]`` (per head) or ``[b, t, h, dk]`` (per channel), ``≤ 0``; ``-inf``
        means decay exactly 0 (a reset of that entry); ``None`` = no decay.
      sign: optional ``[b, t, h]`` ``±1`` transition signs (negative eigenvalues).
      h0: ``[b, h, dk, dv]`` initial state. resets: ``[b, t]`` bool, zero the carry into that token.
      chunk_size: ``C`` (``≤ 16`` or a multiple of 16). ``T`` need not be a multiple of ``C``.

    Returns:
      ``(o [b, t, h, dv] float32, S_T [b, h, dk, dv] float32)``.
    """
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    if g is None:
        g = jnp.zeros((bsz, t, h), jnp.float32)
    g = _f32(g)
    if g.ndim == 3:
        g = g[..., None]
    if sign is not None:
        sign = _f32(sign)[..., None]
    # padding goes at the front (k = v = 0, decay 1: h0 passes through unchanged), so every chunk ends on
    # a real token. At the end, a padded last token has b_C = b_s of the last real one, exp(b_C - b_s) = 1
    # is not recognised as "same token", and its gradient suffers the cancellation `_factor` describes.
    c, n, bc, seg, p = prepare_chunks(g, sign, resets, t, chunk_size, pad_front=True)
    pad = n * c - t
    cd = jnp.result_type(q.dtype, k.dtype, v.dtype)
    chunks = lambda x: jnp.pad(x.astype(cd), [(0, 0), (pad, 0), (0, 0), (0, 0)]).reshape(bsz, n, c, h, x.shape[-1])
    qc, kc, vc = chunks(q), chunks(k), chunks(v)

    # 1. intra-chunk (recomputed in the backward pass)
    o = jax.checkpoint(_intra)(qc, kc, vc, bc, seg, p)

    # 2. chunk states: U_n = sum_s (k_s e^{b_C - b_s}) v_s^T over s in the last segment
    last = lambda x: x[:, :, -1:]
    is_last = (np.arange(c) == c - 1)[None, None, :, None, None]
    fe = _factor(last(bc), last(seg), bc, seg, None if p is None else last(p), p, same=is_last)  # [b, n, c, h, kd]
    u = jnp.einsum("bnshk,bnshv->bnhkv", (_f32(kc) * fe).astype(cd), vc, preferred_element_type=jnp.float32)
    # whole-chunk decay (0 if the chunk holds a reset)
    a = jnp.where(last(seg) == 0, jnp.exp(last(bc)), 0.0)[:, :, 0]  # [b, n, h, kd]
    if p is not None:
        a = a * last(p)[:, :, 0]

    # 3. inter-chunk pass: S_n = a_n S_{n-1} + U_n, keeping the state entering each chunk
    s0 = jnp.zeros((bsz, h, dk, dv), jnp.float32) if h0 is None else _f32(h0)

    def carry(s, au):
        a_n, u_n = au
        return a_n[..., None] * s + u_n, s

    s_last, s_in = lax.scan(carry, s0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(u, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1)  # [b, n, h, dk, dv]

    # 4. state to output: (q_t e^{b_t}) S_{n-1} for tokens before the chunk's first reset
    fs = _factor(bc, seg, jnp.zeros_like(bc), jnp.zeros_like(seg), p, None if p is None else jnp.ones_like(p))
    o = o + jnp.einsum("bnthk,bnhkv->bnthv", _f32(qc) * fs, s_in)
    return o.reshape(bsz, n * c, h, dv)[:, pad:], s_last
