r"""The delta-rule family: DeltaNet, Gated DeltaNet, DeltaProduct (+ negative-eigenvalue variants).

Per head, state ``S_t`` ``[dk, dv]``, L2-normalised keys (``||k_t|| = 1``):

* **DeltaNet** (Schlag et al. 2021; chunked: Yang et al. 2024, "Parallelizing Linear Transformers
  with the Delta Rule over Sequence Length"):
  ``S_t = (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``.
* **Gated DeltaNet** (Yang et al. 2025, "Gated Delta Networks"): a per-head scalar decay in front,
  ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``alpha_t = exp(log_alpha_t)``;
  the layer makes it Mamba-2 style, ``log alpha = -softplus(a + dt_bias) exp(A_log)``.
* **DeltaProduct** (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via
  Householder Products"): each token applies ``n_h`` generalised Householder steps
  ``S <- (I - beta_{t,j} k_{t,j} k_{t,j}ᵀ) S + beta_{t,j} k_{t,j} v_{t,j}ᵀ`` (``j = 1..n_h``; the
  optional gate ``alpha_t`` once per token) and reads ``o_t = scale S_tᵀ q_t`` after the last one.
  The chunked form runs the ``n_h`` steps as consecutive micro-tokens.

**Negative eigenvalues** (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues"): ``I - beta k kᵀ`` has eigenvalue ``1 - beta``; ``beta in (0, 1)`` keeps it in
``(0, 1)``, ``beta in (0, 2)`` extends it to ``(-1, 1)`` which lets the recurrence track parity.
The functional forms accept any ``beta`` in ``[0, 2]``; with ``negative_eigen=True`` they read
``beta`` as the gate ``sigma in [0, 1]`` and use ``2 beta`` (so the layers' ``beta = sigmoid(.)``
becomes ``2 sigmoid(.)``, as in fla's ``allow_neg_eigval``).

Shapes: ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``beta, log_alpha [b, t, h]``; DeltaProduct
``k [b, t, h, n_h, dk]``, ``v [b, t, h, n_h, dv]``, ``beta [b, t, h, n_h]``; state ``[b, h, dk, dv]``
float32. The engine (reference scan, WY/UT chunked form, step, materialize) is
``seqjax.mixers._delta_chunk``; the NNX layers are in ``seqjax.mixers._delta_layer``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.mixers import _delta_chunk as E
from seqjax.mixers._delta_layer import (
    DeltaNet,
    DeltaNetNegEig,
    DeltaProduct,
    DeltaProductNegEig,
    GatedDeltaNet,
    GatedDeltaNetNegEig,
)
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import l2_normalize

__all__ = [
    "deltanet", "deltanet_recurrent", "deltanet_step", "deltanet_materialize",
    "gated_deltanet", "gated_deltanet_recurrent", "gated_deltanet_step", "gated_deltanet_materialize",
    "deltaproduct", "deltaproduct_recurrent", "deltaproduct_step", "deltaproduct_materialize",
    "make_inputs", "DeltaNet", "GatedDeltaNet", "DeltaProduct",
]  # fmt: skip


def _beta(beta, negative_eigen):
    if not isinstance(negative_eigen, (bool, np.bool_)):
        raise ValueError(f"negative_eigen must be a bool, got {negative_eigen!r}")
    return 2 * beta if negative_eigen else beta


# ----------------------------------------------------------------------------- DeltaNet


def deltanet(q, k, v, beta, *, h0=None, impl="auto", resets=None, negative_eigen=False, scale=1.0, chunk_size=64):
    """DeltaNet, parallel form: ``(o [b, t, h, dv], h_last [b, h, dk, dv])``. ``impl``: ``"auto"``
    (= ``"chunked"``), ``"sequential"`` (the reference), ``"chunked"`` (WY/UT), ``"pallas"``."""
    E.check_delta_inputs(q, k, v, beta, None, h0, resets)
    beta = _beta(beta, negative_eigen)
    return E.delta_rule(q, k, v, beta, None, h0=h0, resets=resets, scale=scale, impl=impl, chunk_size=chunk_size)


def deltanet_recurrent(q, k, v, beta, *, h0=None, resets=None, negative_eigen=False, scale=1.0):
    """Reference: ``S_t = (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``."""
    E.check_delta_inputs(q, k, v, beta, None, h0, resets)
    return E.delta_rule_recurrent(q, k, v, _beta(beta, negative_eigen), h0=h0, resets=resets, scale=scale)


def deltanet_step(h, q, k, v, beta, *, negative_eigen=False, scale=1.0):
    """One token (``q, k [b, h, dk]``, ``v [b, h, dv]``, ``beta [b, h]``) -> ``(o_t, h)``."""
    return E.delta_rule_step(h, q, k, v, _beta(beta, negative_eigen), scale=scale)


def deltanet_materialize(q, k, v, beta, *, resets=None, negative_eigen=False, scale=1.0):
    """``M [b, h, T, T]`` with ``o = M v``: ``M[t, s] = scale q_tᵀ (prod_{r=s+1..t} (I - beta_r k_r k_rᵀ)) beta_s k_s``."""
    E.check_delta_inputs(q, k, v, beta, None, None, resets)
    return E.delta_rule_materialize(q, k, _beta(beta, negative_eigen), resets=resets, scale=scale)


# ----------------------------------------------------------------------------- Gated DeltaNet


def gated_deltanet(
    q, k, v, beta, log_alpha, *, h0=None, impl="auto", resets=None, negative_eigen=False, scale=1.0, chunk_size=64
):
    """Gated DeltaNet, parallel form; ``log_alpha [b, t, h]`` (``<= 0``, log of the per-head decay)."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets)
    beta = _beta(beta, negative_eigen)
    return E.delta_rule(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale, impl=impl, chunk_size=chunk_size)


def gated_deltanet_recurrent(q, k, v, beta, log_alpha, *, h0=None, resets=None, negative_eigen=False, scale=1.0):
    """Reference: ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets)
    beta = _beta(beta, negative_eigen)
    return E.delta_rule_recurrent(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale)


def gated_deltanet_step(h, q, k, v, beta, log_alpha, *, negative_eigen=False, scale=1.0):
    return E.delta_rule_step(h, q, k, v, _beta(beta, negative_eigen), log_alpha, scale=scale)


def gated_deltanet_materialize(q, k, v, beta, log_alpha, *, resets=None, negative_eigen=False, scale=1.0):
    """``M[t, s] = scale q_tᵀ (prod_{r=s+1..t} alpha_r (I - beta_r k_r k_rᵀ)) beta_s k_s``."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, None, resets)
    return E.delta_rule_materialize(q, k, _beta(beta, negative_eigen), log_alpha, resets=resets, scale=scale)


# ----------------------------------------------------------------------------- DeltaProduct


def _micro_tokens(q, k, v, beta, log_alpha, resets):
    """Token-level DeltaProduct inputs -> ``t * n_h`` micro-tokens for the delta-rule engine: the gate
    and the reset act on each token's first micro-step, ``q`` only on its last (zeros elsewhere)."""
    b, t, h, n, dk = k.shape
    flat = lambda x: jnp.moveaxis(x, 3, 2).reshape(b, t * n, h, *x.shape[4:])  # noqa: E731
    qm = jnp.zeros((b, t, n, h, dk), q.dtype).at[:, :, -1].set(q).reshape(b, t * n, h, dk)
    lam = None
    if log_alpha is not None:
        lam = jnp.zeros((b, t, n, h), jnp.float32).at[:, :, 0].set(log_alpha).reshape(b, t * n, h)
    rsm = None if resets is None else jnp.zeros((b, t, n), bool).at[:, :, 0].set(resets).reshape(b, t * n)
    return qm, flat(k), flat(v), flat(beta), lam, rsm


def deltaproduct(
    q, k, v, beta, log_alpha=None, *, h0=None, impl="auto", resets=None, negative_eigen=False, scale=1.0,
    chunk_size=64,
):  # fmt: skip
    """DeltaProduct, parallel form: ``k [b, t, h, n_h, dk]``, ``v [b, t, h, n_h, dv]``,
    ``beta [b, t, h, n_h]``, optional gate ``log_alpha [b, t, h]``; ``chunk_size`` counts micro-tokens."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets, householder=True)
    b, t, h, n, _ = k.shape
    qm, km, vm, bm, lam, rsm = _micro_tokens(q, k, v, _beta(beta, negative_eigen), log_alpha, resets)
    o, h_last = E.delta_rule(qm, km, vm, bm, lam, h0=h0, resets=rsm, scale=scale, impl=impl, chunk_size=chunk_size)
    return o.reshape(b, t, n, h, -1)[:, :, -1], h_last


def deltaproduct_recurrent(q, k, v, beta, log_alpha=None, *, h0=None, resets=None, negative_eigen=False, scale=1.0):
    """Reference, token by token: ``n_h`` Householder updates then one read-out per token."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets, householder=True)
    beta = jnp.asarray(_beta(beta, negative_eigen), jnp.float32)
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
            S = E._delta_update(S, k_t[:, :, j], v_t[:, :, j], beta_t[:, :, j], a_j)
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    f32 = lambda x: jnp.moveaxis(jnp.asarray(x, jnp.float32), 1, 0)  # noqa: E731
    S, o = jax.lax.scan(step, S0, (f32(q), f32(k), f32(v), f32(beta), f32(alpha)))
    return jnp.moveaxis(o, 0, 1).astype(dtype), S


def deltaproduct_step(h, q, k, v, beta, log_alpha=None, *, negative_eigen=False, scale=1.0):
    """One token: ``k [b, h, n_h, dk]``, ``v [b, h, n_h, dv]``, ``beta [b, h, n_h]`` -> ``(o_t, h)``."""
    beta = _beta(beta, negative_eigen)
    n = k.shape[2]
    for j in range(n):
        la = log_alpha if j == 0 else None
        o, h = E.delta_rule_step(h, q, k[:, :, j], v[:, :, j], beta[:, :, j], la, scale=scale)
    return o, h


def deltaproduct_materialize(q, k, v, beta, log_alpha=None, *, resets=None, negative_eigen=False, scale=1.0):
    """``M [b, h, T, T, n_h]`` with ``o = einsum("bhtsj,bshjv->bthv", M, v)``: the operator on each
    token's ``n_h`` values (the micro-token operator read at each token's last micro-step): ``T x T``
    per Householder step ``j`` (the contract test sums over ``j``)."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, None, resets, householder=True)
    b, t, h, n, _ = k.shape
    qm, km, _, bm, lam, rsm = _micro_tokens(q, k, v, _beta(beta, negative_eigen), log_alpha, resets)
    m = E.delta_rule_materialize(qm, km, bm, lam, resets=rsm, scale=scale)  # [b, h, tn, tn]
    return m.reshape(b, h, t, n, t, n)[:, :, :, -1]


# ----------------------------------------------------------------------------- test inputs + registry


def make_inputs(key, batch, time, *, heads=2, dk=7, dv=5, gated=False, householder=None, decay=(-6.0, 0.0)):
    """Random inputs: unit keys, ``beta = sigmoid(N(0,1))``, ``log_alpha = -exp(U(decay))`` if gated;
    ``householder=n`` gives DeltaProduct shapes with ``n`` triples per token."""
    kq, kk, kv, kb, ka = jax.random.split(key, 5)
    hh = () if householder is None else (householder,)
    out = {
        "q": jax.random.normal(kq, (batch, time, heads, dk)),
        "k": l2_normalize(jax.random.normal(kk, (batch, time, heads, *hh, dk))),
        "v": jax.random.normal(kv, (batch, time, heads, *hh, dv)),
        "beta": jax.nn.sigmoid(jax.random.normal(kb, (batch, time, heads, *hh))),
    }
    if gated:
        out["log_alpha"] = -jnp.exp(jax.random.uniform(ka, (batch, time, heads), minval=decay[0], maxval=decay[1]))
    return out


def _make(**fixed):
    def make(key, batch, time, **kw):
        return make_inputs(key, batch, time, **{**fixed, **kw})

    return make


_IMPLS = ("sequential", "chunked")
_FAMILY = {
    "deltanet": dict(
        fn=deltanet, recurrent=deltanet_recurrent, step=deltanet_step, materialize=deltanet_materialize,
        make_inputs=_make(), layers=(DeltaNet, DeltaNetNegEig), doc="DeltaNet (Yang et al. 2024)",
    ),
    "gated_deltanet": dict(
        fn=gated_deltanet, recurrent=gated_deltanet_recurrent, step=gated_deltanet_step,
        materialize=gated_deltanet_materialize, make_inputs=_make(gated=True),
        layers=(GatedDeltaNet, GatedDeltaNetNegEig), doc="Gated DeltaNet (Yang et al. 2025)",
    ),
    "deltaproduct": dict(
        fn=deltaproduct, recurrent=deltaproduct_recurrent, step=deltaproduct_step, materialize=deltaproduct_materialize,
        make_inputs=_make(gated=True, householder=2), layers=(DeltaProduct, DeltaProductNegEig),
        doc="gated DeltaProduct, n_h = 2 (Siems et al. 2025)",
    ),
}  # fmt: skip

for _name, _f in _FAMILY.items():
    for _neg, _layer in zip((False, True), _f["layers"]):
        register(
            MixerSpec(
                name=_name + ("_negeig" if _neg else ""),
                fn=_f["fn"],
                recurrent=_f["recurrent"],
                step=_f["step"],
                make_inputs=_f["make_inputs"],
                layer=_layer,
                materialize=_f["materialize"],
                value_arg="v",
                impls=_IMPLS,
                options={"negative_eigen": True} if _neg else {},
                negative_eigen=True,
                doc=_f["doc"] + (", beta in (0, 2) (Grazzi et al. 2025)" if _neg else ""),
            )
        )
