r"""Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks"): the delta rule with a per-head scalar decay,

``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``,
``alpha_t = exp(log_alpha_t)``.

Shapes as in ``seqjax.mixers.deltanet`` (the family's docstring, negative eigenvalues, the layers and the
registration): ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``beta, log_alpha [b, t, h]``, state
``[b, h, dk, dv]`` float32.
"""

from __future__ import annotations

from seqjax.mixers._delta_rule import delta_rule, effective_beta
from seqjax.ops import delta as E
from seqjax.types import AnyArray, Array, Float, Operator, ResetsLike

__all__ = ["gated_deltanet", "gated_deltanet_recurrent", "gated_deltanet_step", "gated_deltanet_materialize"]


def gated_deltanet(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Gated DeltaNet, parallel form; ``log_alpha [b, t, h]`` (``<= 0``, log of the per-head decay)."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets)
    beta = effective_beta(beta, negative_eigen)
    return delta_rule(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale, impl=impl, chunk_size=chunk_size)


def gated_deltanet_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"],
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Reference: ``S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, h0, resets)
    beta = effective_beta(beta, negative_eigen)
    return E.recurrent_delta_rule(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale)


def gated_deltanet_step(
    h: Float[AnyArray, "b h k v"] | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    beta: Float[AnyArray, "b h"],
    log_alpha: Float[AnyArray, "b h"],
    *,
    negative_eigen=False,
    scale=1.0,
) -> tuple[Float[Array, "b h v"], Float[Array, "b h k v"]]:
    return E.step_delta_rule(h, q, k, v, effective_beta(beta, negative_eigen), log_alpha, scale=scale)


def gated_deltanet_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"],
    *,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    scale=1.0,
) -> Operator:
    """``M[t, s] = scale q_tᵀ (prod_{r=s+1..t} alpha_r (I - beta_r k_r k_rᵀ)) beta_s k_s``."""
    E.check_delta_inputs(q, k, v, beta, log_alpha, None, resets)
    return E.materialize_delta_rule(q, k, effective_beta(beta, negative_eigen), log_alpha, resets=resets, scale=scale)
