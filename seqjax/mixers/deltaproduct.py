r"""DeltaProduct (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via Householder
Products"): each token applies ``n_h`` generalised Householder steps
``S <- (I - beta_{t,j} k_{t,j} k_{t,j}ᵀ) S + beta_{t,j} k_{t,j} v_{t,j}ᵀ`` (``j = 1..n_h``; the optional gate
``alpha_t`` once per token) and reads ``o_t = scale S_tᵀ q_t`` after the last one. The chunked form runs the
``n_h`` steps as consecutive micro-tokens of the delta-rule engine.

Shapes: ``q [b, t, h, dk]``, ``k [b, t, h, n_h, dk]``, ``v [b, t, h, n_h, dv]``, ``beta [b, t, h, n_h]``,
``log_alpha [b, t, h]``; state ``[b, h, dk, dv]`` float32. The family's docstring, negative eigenvalues, the
layers and the registration are in ``seqjax.mixers.deltanet``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.mixers._delta_rule import delta_rule, effective_beta
from seqjax.ops import delta as E
from seqjax.types import AnyArray, Array, Float, ResetsLike

__all__ = ["deltaproduct", "deltaproduct_recurrent", "deltaproduct_step", "deltaproduct_materialize"]


def _micro_tokens(q, k, v, beta, log_alpha, resets):
    """Token-level DeltaProduct inputs -> ``t * n_h`` micro-tokens for the delta-rule engine: the gate
    and the reset act on each token's first micro-step, ``q`` only on its last (zeros elsewhere)."""
    b, t, h, n, dk = k.shape
    flat = lambda x: jnp.moveaxis(x, 3, 2).reshape(b, t * n, h, *x.shape[4:])
    qm = jnp.zeros((b, t, n, h, dk), q.dtype).at[:, :, -1].set(q).reshape(b, t * n, h, dk)
    lam = None
    if log_alpha is not None:
        lam = jnp.zeros((b, t, n, h), jnp.float32).at[:, :, 0].set(log_alpha).reshape(b, t * n, h)
    rsm = None if resets is None else jnp.zeros((b, t, n), bool).at[:, :, 0].set(resets).reshape(b, t * n)
    return qm, flat(k), flat(v), flat(beta), lam, rsm


def deltaproduct(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h j k"],
    v: Float[AnyArray, "b t h j v"],
    beta: Float[AnyArray, "b t h j"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """DeltaProduct, parallel form: ``k [b, t, h, n_h, dk]``, ``v [b, t, h, n_h, dv]``,
    ``beta [b, t, h, n_h]``, optional gate ``log_alpha [b, t, h]``; ``chunk_size`` counts micro-tokens."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets, householder=True)
    b, t, h, n, _ = k.shape
    qm, km, vm, bm, lam, rsm = _micro_tokens(q, k, v, effective_beta(beta, negative_eigen), log_alpha, resets)
    o, h_last = delta_rule(qm, km, vm, bm, lam, h0=h0, resets=rsm, scale=scale, impl=impl, chunk_size=chunk_size)
    return o.reshape(b, t, n, h, -1)[:, :, -1], h_last


def deltaproduct_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h j k"],
    v: Float[AnyArray, "b t h j v"],
    beta: Float[AnyArray, "b t h j"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Reference, token by token: ``n_h`` Householder updates then one read-out per token."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets, householder=True)
    beta = jnp.asarray(effective_beta(beta, negative_eigen), jnp.float32)
    dtype = jnp.result_type(q, k, v)
    b, t, h, n, dk = k.shape
    S0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)
    la = jnp.zeros((b, t, h), jnp.float32) if log_alpha is None else jnp.asarray(log_alpha, jnp.float32)
    alpha = jnp.exp(la)
    if resets is not None:
        alpha = jnp.where(jnp.asarray(resets, bool)[..., None], 0.0, alpha)

    def step(S, xs):
        q_t, k_t, v_t, beta_t, alpha_t = xs
        for j in range(n):
            a_j = alpha_t if j == 0 else jnp.ones_like(alpha_t)
            S = E.delta_update(S, k_t[:, :, j], v_t[:, :, j], beta_t[:, :, j], a_j)
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    f32 = lambda x: jnp.moveaxis(jnp.asarray(x, jnp.float32), 1, 0)
    S, o = jax.lax.scan(step, S0, (f32(q), f32(k), f32(v), f32(beta), f32(alpha)))
    return jnp.moveaxis(o, 0, 1).astype(dtype), S


def deltaproduct_step(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h j k"],
    v: Float[AnyArray, "b h j v"],
    beta: Float[AnyArray, "b h j"],
    log_alpha: Float[AnyArray, "b h"] | None = None,
    *,
    negative_eigen=False,
    scale=1.0,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    """One token: ``k [b, h, n_h, dk]``, ``v [b, h, n_h, dv]``, ``beta [b, h, n_h]`` -> ``(o_t, h)``."""
    beta = effective_beta(beta, negative_eigen)
    n = k.shape[2]
    for j in range(n):
        la = log_alpha if j == 0 else None
        o, h = E.step_delta_rule(h, q, k[:, :, j], v[:, :, j], beta[:, :, j], la, scale=scale)
    return o, h


def deltaproduct_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h j k"],
    v: Float[AnyArray, "b t h j v"],
    beta: Float[AnyArray, "b t h j"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
) -> Float[Array, "b h t t j"]:
    """``M [b, h, T, T, n_h]`` with ``o = einsum("bhtsj,bshjv->bthv", M, v)``: the operator on each
    token's ``n_h`` values (the micro-token operator read at each token's last micro-step): ``T x T``
    per Householder step ``j`` (the contract test sums over ``j``)."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, None, resets, householder=True)
    b, t, h, n, _ = k.shape
    qm, km, _, bm, lam, rsm = _micro_tokens(q, k, v, effective_beta(beta, negative_eigen), log_alpha, resets)
    m = E.materialize_delta_rule(qm, km, bm, lam, resets=rsm, scale=scale)  # [b, h, tn, tn]
    return m.reshape(b, h, t, n, t, n)[:, :, :, -1]
