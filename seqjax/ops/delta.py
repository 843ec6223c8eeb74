r"""The (gated) delta-rule engine shared by DeltaNet, Gated DeltaNet and DeltaProduct.

Per head, with a matrix state ``S_t`` ``[k, v]``:

.. math::

    S_t = \alpha_t (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top, \qquad
    o_t = \text{scale} \cdot S_t^\top q_t,

``alpha_t = exp(log_alpha_t)`` (``alpha = 1`` for plain DeltaNet). With ``||k_t|| = 1`` the transition
``I - beta k kᵀ`` is a generalised Householder matrix with eigenvalues ``1`` (``k - 1`` times) and
``1 - beta``: ``beta in [0, 1]`` keeps the spectrum in ``[0, 1]``, ``beta in [0, 2]`` extends it to
``[-1, 1]`` (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"); ``beta = 2`` makes it a reflection. The engine accepts any ``beta`` in ``[0, 2]`` and
expects L2-normalised keys (the layers normalise them; unnormalised keys still give the recurrence
above, only without the spectral bound).

Shapes: ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``beta, log_alpha [b, t, h]``, state
``[b, h, dk, dv]`` (float32), ``resets [b, t]`` bool (``alpha_t = 0`` at a document's first token).

Algorithms:

* :func:`recurrent_delta_rule` — the reference, a float32 ``lax.scan`` over time, one line per equation.
* :func:`chunk_delta_rule` — chunkwise parallel via the WY / UT representation (Yang et al. 2024,
  "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; gated: Yang et al. 2025,
  "Gated Delta Networks"). In a chunk of ``C`` tokens started from state ``S_0``, write
  ``S_i = gamma_i S_0 + sum_{j<=i} Gamma_ij k_j u_jᵀ`` with ``g_i = sum_{r<=i} log alpha_r`` (inclusive,
  relative to the chunk start), ``gamma_i = exp(g_i)`` and ``Gamma_ij = exp(g_i - g_j)`` (``i >= j``).
  The pseudo-values solve a unit lower-triangular system

  .. math::  (I + \mathrm{tril}(\mathrm{diag}(\beta) K K^\top \odot \Gamma, -1))\, U_{new}
             = \mathrm{diag}(\beta) (V - (\gamma \odot K) S_0),

  i.e. ``U_new = U - W S_0`` with ``T = (I + tril(...))^{-1} diag(beta)``, ``W = T (gamma ⊙ K)``,
  ``U = T V``. Then ``O = (gamma ⊙ Q) S_0 + (Q Kᵀ ⊙ Gamma) U_new`` and
  ``S_C = gamma_C S_0 + (K ⊙ Gamma_{C,·})ᵀ U_new``. Only the last two equations are sequential
  (a ``lax.scan`` over chunks); everything else is batched matmuls and one batched triangular solve
  (``solve_unit_lower``: forward substitution on CPU, ``triangular_solve`` on GPU/TPU).
  Decays only ever appear as ``exp`` of a non-positive log-space difference (masked before the
  ``exp``), so ``log alpha`` down to ``-20`` per step (and resets, ``alpha = 0``) never overflow or NaN.
* :func:`step_delta_rule` — one token, O(1) state (decoding).
* :func:`materialize_delta_rule` — the ``[b, h, T, T]`` operator ``M[t, s] = scale q_tᵀ
  (prod_{r=s+1..t} alpha_r (I - beta_r k_r k_rᵀ)) beta_s k_s`` with ``o = M v``, built explicitly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax import _checks
from seqjax._linalg import solve_unit_lower
from seqjax.types import AnyArray, Array, Float, Shaped

__all__ = [
    "check_delta_inputs",
    "recurrent_delta_rule",
    "chunk_delta_rule",
    "step_delta_rule",
    "materialize_delta_rule",
    "delta_update",
    "chunk_wy",
]


def check_delta_inputs(q, k, v, beta, log_alpha=None, h0=None, resets=None, *, householder=False):
    """Validate shapes/dtypes in Python (before tracing); raise ValueError/TypeError naming the argument.

    With ``householder=True`` (DeltaProduct) ``k [b, t, h, n, dk]``, ``v [b, t, h, n, dv]``,
    ``beta [b, t, h, n]``: ``n`` (key, value, beta) triples per token.
    """
    _checks.check_ndim("q", q, 4, "[batch, time, heads, dk]")
    b, t, h, dk = np.shape(q)
    if householder:
        _checks.check_ndim("k", k, 5, "[batch, time, heads, householder, dk]")
        n = np.shape(k)[3]
        _checks.check_shape("k", k, (b, t, h, n, dk), "[batch, time, heads, householder, dk] (matching q)")
        _checks.check_ndim("v", v, 5, "[batch, time, heads, householder, dv]")
        _checks.check_shape("v", v, (b, t, h, n, None), "[batch, time, heads, householder, dv] (matching k)")
        _checks.check_shape("beta", beta, (b, t, h, n), "[batch, time, heads, householder]")
    else:
        _checks.check_shape("k", k, (b, t, h, dk), "[batch, time, heads, dk] (same as q)")
        _checks.check_ndim("v", v, 4, "[batch, time, heads, dv]")
        _checks.check_shape("v", v, (b, t, h, None), "[batch, time, heads, dv] (matching q)")
        _checks.check_shape("beta", beta, (b, t, h), "[batch, time, heads]")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _checks.check_dtype(name, x, "float")
    if log_alpha is not None:
        _checks.check_shape("log_alpha", log_alpha, (b, t, h), "[batch, time, heads]")
        _checks.check_dtype("log_alpha", log_alpha, "float")
    if h0 is not None:
        _checks.check_shape("h0", h0, (b, h, dk, np.shape(v)[-1]), "[batch, heads, dk, dv]")
        _checks.check_dtype("h0", h0, "float")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")
        _checks.check_dtype("resets", resets, "int_or_bool")


def _prepare(q, k, v, beta, log_alpha, resets):
    """float32 copies; ``log_alpha`` zeros when absent and zeroed at resets; ``resets`` bool."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    q, k, v, beta = f32(q), f32(k), f32(v), f32(beta)
    la = jnp.zeros(beta.shape, jnp.float32) if log_alpha is None else f32(log_alpha)
    rs = jnp.zeros(beta.shape[:2], bool) if resets is None else jnp.asarray(resets).astype(bool)
    la = jnp.where(rs[..., None], 0.0, la)  # the reset is carried by the mask, not by log(0)
    return q, k, v, beta, la, rs


def delta_update(S, k, v, beta, alpha):
    """``S <- alpha (I - beta k kᵀ) S + beta k vᵀ`` for ``S [b, h, dk, dv]``, ``k [b, h, dk]``."""
    kS = jnp.einsum("bhk,bhkv->bhv", k, S)
    b_ = beta[..., None, None]
    return alpha[..., None, None] * (S - b_ * k[..., :, None] * kS[..., None, :]) + b_ * k[..., :, None] * v[..., None, :]


@functools.partial(jax.jit, static_argnames=("scale",))
def step_delta_rule(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    beta: Float[AnyArray, "b h"],
    log_alpha: Float[AnyArray, "b h"] | None = None,
    *,
    scale=1.0,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    """One token: ``h [b, h, dk, dv]`` (or ``None`` = zeros), ``q, k [b, h, dk]``, ``v [b, h, dv]``,
    ``beta, log_alpha [b, h]`` -> ``(o [b, h, dv], h)`` (``h`` float32, ``o`` in the inputs' dtype)."""
    dtype = jnp.result_type(q, k, v)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    q, k, v, beta = f32(q), f32(k), f32(v), f32(beta)
    if h is None:
        h = jnp.zeros((*q.shape, v.shape[-1]), jnp.float32)
    alpha = jnp.ones_like(beta) if log_alpha is None else jnp.exp(f32(log_alpha))
    h = delta_update(f32(h), k, v, beta, alpha)
    return (scale * jnp.einsum("bhk,bhkv->bhv", q, h)).astype(dtype), h


@functools.partial(jax.jit, static_argnames=("scale",))
def recurrent_delta_rule(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
    scale=1.0,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """The reference: ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``,
    ``o_t = scale S_tᵀ q_t``, one ``lax.scan`` step per token in float32. Returns ``(o, h_last)``."""
    dtype = jnp.result_type(q, k, v)
    q, k, v, beta, la, rs = _prepare(q, k, v, beta, log_alpha, resets)
    alpha = jnp.where(rs[..., None], 0.0, jnp.exp(la))
    b, _, h, dk = q.shape
    S0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)

    def step(S, xs):
        q_t, k_t, v_t, beta_t, alpha_t = xs
        S = delta_update(S, k_t, v_t, beta_t, alpha_t)
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, alpha))
    S, o = lax.scan(step, S0, xs)
    return jnp.moveaxis(o, 0, 1).astype(dtype), S


def _chunk_decays(la, rs, c):
    """Log-space decays of chunks ``la [b, n, h, c]``, ``rs [b, n, 1, c]``.

    Returns ``Gamma [b, n, h, c, c]`` (``exp(g_i - g_j)`` for ``j <= i`` in one document, else 0),
    ``gamma [b, n, h, c]`` (decay from the chunk start through ``i``) and ``to_end [b, n, h, c]``
    (decay after ``i`` to the chunk end).
    """
    g = jnp.cumsum(la, axis=-1)
    seg = jnp.cumsum(rs.astype(jnp.int32), axis=-1)  # document index inside the chunk
    # The diagonal (exp(g_i - g_i) = 1) is set, not computed: its gradient would be two O(1) terms
    # cancelling in the cumsum's transpose, which swamps the true O(alpha) gradient of a strong decay.
    strict = jnp.tril(jnp.ones((1, 1, 1, c, c), bool), -1)
    same = (seg[..., :, None] == seg[..., None, :]) & strict
    diff = g[..., :, None] - g[..., None, :]
    Gamma = jnp.where(same, jnp.exp(jnp.where(same, diff, 0.0)), 0.0)  # exp only of values <= 0
    Gamma = Gamma + jnp.eye(c, dtype=jnp.float32)[None, None, None]
    gamma = jnp.where(seg == 0, jnp.exp(g), 0.0)
    # g_end - g_i as its own (exclusive, reverse) cumsum, for the same reason: at the last real token
    # (before padding) it is exactly 0 and must not carry two cancelling O(1) gradients.
    rev = jnp.flip(jnp.cumsum(jnp.flip(la, -1), -1), -1)
    rev = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    to_end = jnp.where(seg == seg[..., -1:], jnp.exp(rev), 0.0)
    return Gamma, gamma, to_end


def chunk_wy(k, v, beta, la, rs, c):
    """The within-chunk (intra) part of the chunked form on chunked inputs ``[b, n, h, c, d]``.

    Returns ``(w, u, Gamma, gamma, to_end)`` with ``w = T (gamma ⊙ K)``, ``u = T V``,
    ``T = (I + tril(diag(beta) K Kᵀ ⊙ Gamma, -1))^{-1} diag(beta)`` by one batched triangular solve.
    """
    Gamma, gamma, to_end = _chunk_decays(la, rs, c)
    strict = jnp.tril(jnp.ones((1, 1, 1, c, c), bool), -1)
    kk = jnp.einsum("bnhid,bnhjd->bnhij", k, k)
    a = jnp.where(strict, beta[..., :, None] * kk * Gamma, 0.0) + jnp.eye(c, dtype=jnp.float32)[None, None, None]
    rhs = beta[..., None] * jnp.concatenate([k * gamma[..., None], v], axis=-1)
    wu = solve_unit_lower(a, rhs)
    dk = k.shape[-1]
    return wu[..., :dk], wu[..., dk:], Gamma, gamma, to_end


def _to_chunks(x, c):
    """``[b, t, h, ...]`` (t a multiple of c) -> ``[b, n, h, c, ...]``."""
    b, t = x.shape[:2]
    x = x.reshape(b, t // c, c, *x.shape[2:])
    return jnp.moveaxis(x, 2, 3)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size"))
def chunk_delta_rule(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
    scale=1.0,
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Chunkwise-parallel (WY / UT) form of :func:`recurrent_delta_rule`; same arguments and results.

    ``T`` need not be a multiple of ``chunk_size`` (the tail is padded with ``beta = 0, k = v = q = 0``,
    which leaves the state unchanged).
    """
    dtype = jnp.result_type(q, k, v)
    q, k, v, beta, la, rs = _prepare(q, k, v, beta, log_alpha, resets)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, beta, la, rs = map(padt, (q, k, v, beta, la, rs))
    qc, kc, vc = _to_chunks(q, c), _to_chunks(k, c), _to_chunks(v, c)  # [b, n, h, c, d]
    bc, lac = _to_chunks(beta, c), _to_chunks(la, c)  # [b, n, h, c]
    rsc = rs.reshape(b, n, 1, c)
    w, u, Gamma, gamma, to_end = chunk_wy(kc, vc, bc, lac, rsc, c)
    S0 = jnp.zeros((b, h, dk, dv), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)

    def chunk_step(S, xs):
        w_n, u_n, k_end, total = xs
        u_new = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, S)
        S_next = total[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", k_end, u_new)
        return S_next, (S, u_new)

    xs = (w, u, kc * to_end[..., None], gamma[..., -1])
    S_last, (S_start, u_new) = lax.scan(chunk_step, S0, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    S_start, u_new = jnp.moveaxis(S_start, 0, 1), jnp.moveaxis(u_new, 0, 1)
    qk = jnp.einsum("bnhid,bnhjd->bnhij", qc, kc) * Gamma
    o = jnp.einsum("bnhck,bnhkv->bnhcv", qc * gamma[..., None], S_start) + jnp.einsum(
        "bnhij,bnhjv->bnhiv", qk, u_new
    )
    o = jnp.moveaxis(o, 3, 2).reshape(b, n * c, h, dv)[:, :t]
    return (scale * o).astype(dtype), S_last


@functools.partial(jax.jit, static_argnames=("scale",))
def materialize_delta_rule(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    resets: Shaped[AnyArray, "b t"] | None = None,
    scale=1.0,
) -> Float[Array, "b h t t"]:
    """The ``[b, h, T, T]`` operator ``M`` with ``o = einsum("bhts,bshv->bthv", M, v)`` (``h0 = 0``).

    Built explicitly: the columns ``x_s = beta_s k_s`` enter at time ``s`` and are carried forward by
    the transitions, ``X_t = alpha_t (I - beta_t k_t k_tᵀ) X_{t-1} + beta_t k_t e_tᵀ``; then
    ``M[t, :] = scale q_tᵀ X_t``.
    """
    zeros_v = jnp.zeros((*np.shape(k)[:3], 1), jnp.float32)
    q, k, _, beta, la, rs = _prepare(q, k, zeros_v, beta, log_alpha, resets)
    alpha = jnp.where(rs[..., None], 0.0, jnp.exp(la))
    b, t, h, dk = q.shape
    eye = jnp.eye(t, dtype=jnp.float32)

    def step(X, xs):
        q_t, k_t, beta_t, alpha_t, e_t = xs
        X = delta_update(X, k_t, jnp.broadcast_to(e_t, (b, h, t)), beta_t, alpha_t)
        return X, scale * jnp.einsum("bhk,bhks->bhs", q_t, X)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, beta, alpha)) + (eye,)
    _, rows = lax.scan(step, jnp.zeros((b, h, dk, t), jnp.float32), xs)
    return jnp.moveaxis(rows, 0, 2)  # [b, h, T, T]
