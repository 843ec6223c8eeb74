r"""The task networks of Khajehabdollahi et al. 2024 (learnable single-neuron τ; GRU / LSTM) with readout heads.

Cells (``x_t`` the scalar input, ``τ = max(τ_raw, 1)`` per neuron, trained with the weights):

- ``leaky_paper``, the paper's network: :math:`r_t = \phi\big((1 - 1/\tau) r_{t-1} + (W r_{t-1} + w_{in} x_t + b)/\tau\big)`,
  :math:`\phi` = leaky ReLU (slope 0.01); ``τ_raw`` starts uniform in ``tau_range`` (the paper: [1, 2]).
- ``leaky``, ``seqjax.rnn``'s cell (the paper's "τ outside the nonlinearity" variant):
  :math:`r_t = (1 - 1/\tau) r_{t-1} + \mathrm{relu}(W r_{t-1} + w_{in} x_t + b)/\tau`.
- ``gru``, ``lstm``: ``seqjax.rnn`` cells (no τ parameter; their timescales are measured from activity only).

``zero_diag=True`` holds the diagonal of ``W`` at zero (the paper's networks have no self-connections, so a neuron's
own memory is its τ and every other timescale is network-mediated). Readouts: ``heads`` linear maps to 2 classes
on every step, ``[b, t, heads, 2]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from seqjax import _checks, rnn

CELLS = ("leaky_paper", "leaky", "gru", "lstm")
TAU_CELLS = ("leaky_paper", "leaky")
LEAK_SLOPE = 0.01

__all__ = ["CELLS", "TAU_CELLS", "init_params", "states", "logits", "trained_tau"]


def init_params(cell: str, key, hidden: int, heads: int, *, tau_range: tuple[float, float] = (1.0, 2.0)) -> dict:
    """``{"cell": <cell parameters>, "readout": [H, heads, 2], "readout_b": [heads, 2]}``, float32.

    ``leaky_paper`` draws like PyTorch's ``nn.Linear`` (the paper's code): ``W ~ U(±1/√H)``, ``w_in, b ~ U(±1)``.
    """
    _checks.check_choice("cell", cell, CELLS)
    lo, hi = tau_range
    if not 1.0 <= lo <= hi:
        raise ValueError(f"tau_range must satisfy 1 <= lo <= hi, got {tau_range}")
    kc, kt, kr = jax.random.split(key, 3)
    if cell == "leaky_paper":
        k1, k2, k3 = jax.random.split(kc, 3)
        s = 1.0 / np.sqrt(hidden)
        p = {"W": jax.random.uniform(k1, (hidden, hidden), jnp.float32, -s, s),
             "w_in": jax.random.uniform(k2, (hidden,), jnp.float32, -1.0, 1.0),
             "b": jax.random.uniform(k3, (hidden,), jnp.float32, -1.0, 1.0)}
    else:
        p = rnn.init_params(cell, kc, 1, hidden)
    if cell in TAU_CELLS:
        tau = jax.random.uniform(kt, (hidden,), jnp.float32, lo, hi)
        p["tau"] = tau if cell == "leaky_paper" else tau[None]
    s = 1.0 / np.sqrt(hidden)
    return {"cell": p, "readout": jax.random.uniform(kr, (hidden, heads, 2), jnp.float32, -s, s),
            "readout_b": jnp.zeros((heads, 2), jnp.float32)}


def _no_diag(w):
    return w * (1.0 - jnp.eye(w.shape[0], dtype=w.dtype))


def states(params: dict, x: Float[Array, "b t"], *, cell: str, zero_diag: bool = False) -> Float[Array, "b t h"]:
    """The hidden activity ``r_t`` (for ``lstm`` the output ``h_t``) on inputs ``x`` ``[b, t]``, from a zero state."""
    _checks.check_choice("cell", cell, CELLS)
    _checks.check_ndim("x", x, 2, "[batch, time]")
    x = jnp.asarray(x, jnp.float32)
    p = params["cell"]
    if cell != "leaky_paper":
        if zero_diag:
            if cell != "leaky":
                raise ValueError(f"zero_diag applies to the leaky cells, got cell={cell!r}")
            d = p["R"].shape[1]
            p = {**p, "R": p["R"] * (1.0 - jnp.eye(d, dtype=jnp.float32))[None, :, None, :]}
        return rnn.rnn(cell, p, x[..., None])[0]
    w = _no_diag(p["W"]) if zero_diag else p["W"]
    inv_tau = (1.0 / jnp.maximum(p["tau"], 1.0))[None]

    def step(r, x_t):
        pre = (1.0 - inv_tau) * r + (r @ w.T + x_t[:, None] * p["w_in"][None] + p["b"][None]) * inv_tau
        r = jax.nn.leaky_relu(pre, LEAK_SLOPE)
        return r, r

    r0 = jnp.zeros((x.shape[0], w.shape[0]), jnp.float32)
    return jnp.swapaxes(jax.lax.scan(step, r0, jnp.swapaxes(x, 0, 1))[1], 0, 1)


def logits(params: dict, r: Float[Array, "b t h"]) -> Float[Array, "b t k 2"]:
    """Every head's class logits on every step."""
    return jnp.einsum("bth,hkc->btkc", r, params["readout"]) + params["readout_b"][None, None]


def trained_tau(params: dict) -> np.ndarray | None:
    """The single-neuron τ the network runs with (``max(τ_raw, 1)``), ``[H]``; ``None`` for cells without τ."""
    tau = params["cell"].get("tau")
    return None if tau is None else np.maximum(np.asarray(tau, np.float32).reshape(-1), 1.0)
