r"""Nonlinear RNN cells as pure step functions (FlashRNN layout: Pöppel, Beck & Hochreiter 2024).

Every gated cell splits into a matmul and a per-neuron pointwise map. With ``G`` heads of size ``D``
(hidden ``H = G*D``; ``G = 1`` is the dense cell) and ``K`` gates:

.. math::  x^{proj}_t = W x_t + b \in \mathbb R^{G\times K\times D}\ (\text{all } t \text{ at once}),\qquad
           r_t = R\, h_{t-1} \ (\text{block-diagonal, } R \in \mathbb R^{G\times D\times K\times D}),\qquad
           s_t = \mathrm{pointwise}(s_{t-1}, x^{proj}_t, r_t).

``s`` is the cell state ``[batch, S, G, D]`` (public carry ``[batch, S, H]``); component 0 is always the
output ``h``. Cells (gate order in brackets):

- ``rnn_tanh`` / ``rnn_relu`` (Elman 1990) [a]: :math:`h' = \phi(x + r)`.
- ``leaky`` (Khajehabdollahi et al. 2024, P7) [a]: :math:`h' = (1-1/\tau) h + (1/\tau)\,\mathrm{relu}(x + r)`,
  a trainable :math:`\tau \ge 1` per neuron (``params["tau"]`` ``[G, D]``, clipped at 1).
- ``lstm`` (Hochreiter & Schmidhuber 1997; peepholes Gers & Schmidhuber 2000) [i, f, z, o], S = 2 (h, c):
  :math:`c' = \sigma(\tilde f + p_f c)\, c + \sigma(\tilde i + p_i c) \tanh \tilde z`,
  :math:`h' = \sigma(\tilde o + p_o c') \tanh c'`; peepholes ``params["peep"]`` ``[G, 3, D]`` if present.
- ``gru`` (Cho et al. 2014, cuDNN/PyTorch form) [r, z, n]:
  :math:`n = \tanh(x_n + r \odot (r_n + b_{hn}))`, :math:`h' = (1-z) n + z h` (``params["bhn"]`` ``[G, D]``).
- ``slstm`` (Beck et al. 2024, xLSTM) [i, f, z, o], S = 4 (h, c, n, m): exponential input gate with the
  stabiliser :math:`m' = \max(\tilde i, \log\sigma(\tilde f) + m)`, :math:`i = e^{\tilde i - m'}`,
  :math:`f = e^{\log\sigma(\tilde f) + m - m'}`, :math:`c' = f c + i \tanh\tilde z`, :math:`n' = f n + i`,
  :math:`h' = \sigma(\tilde o)\, c'/n'` (``m' = \tilde i`` where ``n = 0``, i.e. from the zero state).
- ``shplrnn`` (clipped shallow PLRNN, Hess et al. 2023, P21), no heads, latent ``M``, hidden ``L``:
  :math:`z' = A \odot z + W_1[\mathrm{relu}(W_2 z + h_2) - \mathrm{relu}(W_2 z)] + x`, where the input
  projection ``x`` carries :math:`h_1` as its bias.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import _checks

__all__ = ["Cell", "CELLS", "KINDS", "get_cell", "init_params", "project", "step", "recurrent_matmul"]


@dataclasses.dataclass(frozen=True)
class Cell:
    """A cell: ``K`` gates, ``S`` state components and its maps.

    ``split(p, s, xg, rg) -> s'``: the per-neuron map on *lists* — ``s`` a tuple of ``S`` arrays,
    ``xg``/``rg`` tuples of ``K`` gate arrays, all broadcasting to ``[..., D]``; each per-neuron parameter
    in ``p`` is an array broadcasting the same way, or a tuple of such rows when it has a row axis
    (LSTM peepholes ``[G, 3, D]``). No indexing or stacking inside, so the same map runs in XLA and in a
    Pallas GPU kernel (whose Triton lowering has no ``slice``). ``None`` for cells that are not "matmul then
    per-neuron" (shPLRNN), which give ``step`` instead.
    ``pointwise(p, s, xg, rg) -> s'``: the same map on stacked arrays, ``s`` ``[b, S, G, D]``,
    ``xg``/``rg`` ``[b, G, K, D]``, ``p`` values ``[G, ..., D]``.
    ``neuron_params``: the per-neuron parameter names the map reads (each ``[G, ..., D]``).
    """

    name: str
    num_gates: int
    num_states: int
    split: Callable | None = None
    neuron_params: tuple[str, ...] = ()
    step: Callable | None = None  # (params, s [b,S,G,D], xp [b,G,K,D]) -> s'
    diag_jacobian: Callable | None = None  # (params, s, xp) -> d s'/d s diagonal [b, S, G, D]
    headwise: bool = True

    @functools.cached_property  # one object per cell: it is a static (hashed) argument of jitted code
    def pointwise(self) -> Callable | None:
        if self.split is None:
            return None
        return functools.partial(_stacked, self.split)


def _stacked(split, p, s, xg, rg):
    """``split`` on stacked arrays (see ``Cell``)."""
    rows = lambda v: tuple(v[None, :, r] for r in range(v.shape[1])) if v.ndim == 3 else v[None]
    gates = lambda x: tuple(x[:, :, k] for k in range(x.shape[2]))
    out = split({k: rows(v) for k, v in p.items()}, tuple(s[:, a] for a in range(s.shape[1])), gates(xg), gates(rg))
    return jnp.stack(out, axis=1)


def _tanh_pw(p, s, xg, rg):
    return (jnp.tanh(xg[0] + rg[0]),)


def _relu_pw(p, s, xg, rg):
    return (jax.nn.relu(xg[0] + rg[0]),)


def _leaky_pw(p, s, xg, rg):
    inv_tau = 1.0 / jnp.maximum(p["tau"], 1.0)
    drive = jax.nn.relu(xg[0] + rg[0])
    return ((1.0 - inv_tau) * s[0] + inv_tau * drive,)


def _lstm_pw(p, s, xg, rg):
    c = s[1]
    ip, fp, zp, op = (x + r for x, r in zip(xg, rg))
    peep = p.get("peep")
    if peep is not None:
        ip = ip + peep[0] * c
        fp = fp + peep[1] * c
    c_new = jax.nn.sigmoid(fp) * c + jax.nn.sigmoid(ip) * jnp.tanh(zp)
    if peep is not None:
        op = op + peep[2] * c_new
    h_new = jax.nn.sigmoid(op) * jnp.tanh(c_new)
    return h_new, c_new


def _gru_pw(p, s, xg, rg):
    r = jax.nn.sigmoid(xg[0] + rg[0])
    z = jax.nn.sigmoid(xg[1] + rg[1])
    n = jnp.tanh(xg[2] + r * (rg[2] + p["bhn"]))
    return ((1.0 - z) * n + z * s[0],)


def _slstm_pw(p, s, xg, rg):
    ip, fp, zp, op = (x + r for x, r in zip(xg, rg))
    c, n, m = s[1], s[2], s[3]
    logf_m = jax.nn.log_sigmoid(fp) + m
    m_new = jnp.where(n == 0.0, ip, jnp.maximum(ip, logf_m))
    i = jnp.exp(ip - m_new)
    f = jnp.exp(logf_m - m_new)
    c_new = f * c + i * jnp.tanh(zp)
    n_new = f * n + i
    h_new = jax.nn.sigmoid(op) * c_new / n_new
    return h_new, c_new, n_new, m_new


def _shplrnn_step(p, s, xp):
    z = s[:, 0, 0]  # [b, M]
    pre = z @ p["W2"].T  # [b, L]
    phi = jax.nn.relu(pre + p["h2"][None]) - jax.nn.relu(pre)
    z_new = p["A"][None] * z + phi @ p["W1"].T + xp[:, 0, 0]
    return z_new[:, None, None]


def _shplrnn_diag(p, s, xp):
    pre = s[:, 0, 0] @ p["W2"].T
    mask = (pre + p["h2"][None] > 0).astype(pre.dtype) - (pre > 0).astype(pre.dtype)
    diag = p["A"][None] + jnp.einsum("ml,bl,lm->bm", p["W1"], mask, p["W2"])
    return diag[:, None, None]


CELLS = {
    "rnn_tanh": Cell("rnn_tanh", 1, 1, _tanh_pw),
    "rnn_relu": Cell("rnn_relu", 1, 1, _relu_pw),
    "leaky": Cell("leaky", 1, 1, _leaky_pw, ("tau",)),
    "lstm": Cell("lstm", 4, 2, _lstm_pw, ("peep",)),
    "gru": Cell("gru", 3, 1, _gru_pw, ("bhn",)),
    "slstm": Cell("slstm", 4, 4, _slstm_pw),
    "shplrnn": Cell(
        "shplrnn", 1, 1, step=_shplrnn_step, diag_jacobian=_shplrnn_diag, headwise=False
    ),
}
KINDS = tuple(CELLS)


def get_cell(kind: str) -> Cell:
    _checks.check_choice("kind", kind, KINDS)
    return CELLS[kind]


def neuron_params(cell: Cell, params: dict) -> dict:
    return {k: params[k] for k in cell.neuron_params if k in params}


def recurrent_matmul(R, h):
    """Head-wise recurrent matmul: ``h`` ``[b, G, D]``, ``R`` ``[G, D, K, D]`` -> ``[b, G, K, D]``."""
    return jnp.einsum("bgd,gdke->bgke", h, R)


def step(kind: str, params: dict, s, xp):
    """One time step ``s' = f(s, x^{proj}_t)``: ``s`` ``[b, S, G, D]``, ``xp`` ``[b, G, K, D]``."""
    cell = CELLS[kind]
    if cell.step is not None:
        return cell.step(params, s, xp)
    return cell.pointwise(neuron_params(cell, params), s, xp, recurrent_matmul(params["R"], s[:, 0]))


def diag_jacobian(kind: str, params: dict, s, xp):
    r"""The diagonal of :math:`\partial s'/\partial s` ``[b, S, G, D]`` (quasi-DEER).

    For "matmul then per-neuron" cells it is exact and cheap: one JVP of ``pointwise`` per state
    component ``a``, with tangent :math:`e_a` on ``s`` and, for ``a = 0`` (the ``h`` that feeds the
    matmul), :math:`\mathrm{diag}(R_k)` on the recurrent preactivation of every gate ``k``.
    """
    cell = CELLS[kind]
    if cell.diag_jacobian is not None:
        return cell.diag_jacobian(params, s, xp)
    pp = neuron_params(cell, params)
    rg = recurrent_matmul(params["R"], s[:, 0])
    r_diag = jnp.broadcast_to(jnp.diagonal(params["R"], axis1=1, axis2=3)[None], rg.shape)
    fn = lambda s_, r_: cell.pointwise(pp, s_, xp, r_)
    out = []
    for a in range(cell.num_states):
        ts = jnp.zeros_like(s).at[:, a].set(1.0)
        tr = r_diag if a == 0 else jnp.zeros_like(rg)
        _, d = jax.jvp(fn, (s, rg), (ts, tr))
        out.append(d[:, a])
    return jnp.stack(out, axis=1)


def project(params: dict, x):
    """The FlashRNN input projection for all time steps at once: ``x`` ``[b, t, d_in]`` ->
    ``[b, t, G, K, D]`` float32 (one big matmul outside the time loop)."""
    xp = jnp.einsum("btd,dgke->btgke", x.astype(jnp.float32), params["W"].astype(jnp.float32))
    return xp + params["b"].astype(jnp.float32)[None, None]


def init_params(
    kind: str,
    key,
    d_in: int,
    hidden: int,
    *,
    heads: int = 1,
    peepholes: bool = False,
    forget_bias: float = 1.0,
    tau_init: float = 2.0,
    plrnn_hidden: int | None = None,
) -> dict:
    """Random float32 parameters for ``kind``.

    ``W`` ``[d_in, G, K, D]`` (lecun normal), ``b`` ``[G, K, D]`` (the LSTM/sLSTM forget gate starts at
    ``forget_bias``), ``R`` ``[G, D, K, D]`` (normal, std ``1/sqrt(D)``), plus the cell's extras.
    shPLRNN: ``hidden`` is the latent size ``M``, ``plrnn_hidden`` the ReLU layer width ``L``
    (default ``2*M``); ``A`` starts in (0.5, 0.9) so ``|A| < 1`` (bounded orbits).
    """
    cell = get_cell(kind)
    if not cell.headwise and heads != 1:
        raise ValueError(f"kind={kind!r} has no head-wise form: heads must be 1, got {heads}")
    _checks.check_divisible("hidden", hidden, "heads", heads)
    g, d, k = heads, hidden // heads, cell.num_gates
    kw, kr, k1, k2 = jax.random.split(key, 4)
    p = {
        "W": jax.random.normal(kw, (d_in, g, k, d), jnp.float32) / np.sqrt(d_in),
        "b": jnp.zeros((g, k, d), jnp.float32),
    }
    if kind in ("lstm", "slstm"):
        p["b"] = p["b"].at[:, 1].set(forget_bias)
    if kind == "shplrnn":
        m, l_ = hidden, plrnn_hidden or 2 * hidden
        p["A"] = jax.random.uniform(kr, (m,), jnp.float32, 0.5, 0.9)
        p["W1"] = jax.random.normal(k1, (m, l_), jnp.float32) * 0.3 / np.sqrt(l_)
        p["W2"] = jax.random.normal(k2, (l_, m), jnp.float32) / np.sqrt(m)
        p["h2"] = jnp.zeros((l_,), jnp.float32)
        return p
    p["R"] = jax.random.normal(kr, (g, d, k, d), jnp.float32) / np.sqrt(d)
    if kind == "lstm" and peepholes:
        p["peep"] = jax.random.normal(k1, (g, 3, d), jnp.float32) * 0.1
    if kind == "gru":
        p["bhn"] = jnp.zeros((g, d), jnp.float32)
    if kind == "leaky":
        p["tau"] = jnp.full((g, d), tau_init, jnp.float32)
    return p


def dims(kind: str, params: dict) -> tuple[int, int, int, int]:
    """``(G, K, D, S)`` of a parameter dict."""
    cell = get_cell(kind)
    g, k, d = np.shape(params["b"])
    return g, k, d, cell.num_states
