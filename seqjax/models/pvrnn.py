r"""PV-RNN (Ahmadi & Tani 2019, "A novel predictive-coding-inspired variational RNN model for online prediction and
recognition"): a multiple-timescale RNN whose layers carry deterministic units :math:`d` and stochastic units
:math:`z`, with a learned prior, a posterior of free *adaptive vectors* and a meta-prior :math:`w` weighting the KL.

Layers are indexed ``l = 0`` (bottom, read out) to ``L − 1`` (top); each step runs top-down.

- Prior :math:`p(z^l_t \mid d^l_{t-1}) = \mathcal N(\tanh(W^\mu d^l_{t-1} + b^\mu),\ \exp(W^\sigma d^l_{t-1} + b^\sigma))`;
  the unit Gaussian at ``t = 0``.
- Posterior :math:`q(z^l_t) = \mathcal N(\tanh A^{\mu,l}_t,\ \exp A^{\sigma,l}_t)`: ``A`` is a free vector per
  sequence, step and layer (no encoder); data reach it only through back-propagated prediction error.
- MTRNN update :math:`h^l_t = (1 - 1/\tau_l)\,h^l_{t-1} + (1/\tau_l)(W_{dd} d^l_{t-1} + W_{zd} z^l_t +
  W_{top} d^{l+1}_t + b)`, :math:`d^l_t = \tanh h^l_t`, :math:`h_{-1} = d_{-1} = 0`; :math:`z` is drawn by
  reparameterisation, :math:`z = \mu + \sigma\epsilon`.
- Output :math:`\hat x_t = W_{out} d^0_t + b_{out}` (Gaussian likelihood of fixed variance, i.e. MSE).
- Loss (the negative ELBO with the meta-prior), averaged over batch and steps, reconstruction normalised by the
  output size and each KL by its ``z`` size:
  :math:`\mathcal L = \tfrac1T\sum_t \big[\tfrac1{D_x}\lVert x_t - \hat x_t\rVert^2 + \sum_l w_l\,
  \tfrac1{D_{z,l}}\mathrm{KL}(q(z^l_t)\,\Vert\,p(z^l_t \mid d^l_{t-1}))\big]`.
- Error regression (test time): weights frozen, only the adaptive vectors of the last ``window`` observed steps
  are optimised (Adam) on the same loss restricted to the window; then :func:`predict` runs the posterior over the
  observed steps and samples the prior beyond them.

Functional core: :func:`init_params`, :func:`init_adaptive`, :func:`run`, :func:`loss`, :func:`generate`,
:func:`error_regression`, :func:`predict`, :func:`extend_adaptive`, :func:`kl_diag_gaussian`, :func:`mtrnn_update`. :class:`PVRNN` is the
NNX module holding the weights and the training sequences' adaptive vectors.

Shapes: ``x [batch, time, x_dim]``; adaptive vectors ``A = {"mu": (a_0, …), "sigma": (s_0, …)}`` with
``a_l, s_l [batch, time, z_l]``; ``taus`` one float ≥ 1 per layer; ``w`` a float or one float ≥ 0 per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jaxtyping import Array, Float

from seqjax import _checks

__all__ = ["PVRNN", "init_params", "init_adaptive", "run", "loss", "generate", "error_regression", "predict",
           "extend_adaptive", "kl_diag_gaussian", "mtrnn_update"]


# ----------------------------------------------------------------------------------------------------------- checks

def _layers(params) -> int:
    return len(params["layers"])


def _check_taus(taus, n_layers: int) -> tuple[float, ...]:
    taus = tuple(float(t) for t in np.ravel(np.asarray(taus, dtype=np.float64)))
    if len(taus) != n_layers:
        raise ValueError(f"taus must give one time constant per layer ({n_layers}), got {len(taus)}")
    if not all(np.isfinite(t) and t >= 1.0 for t in taus):
        raise ValueError(f"taus must all be finite and >= 1 (tau = 1 is a plain RNN step), got {taus}")
    return taus


def _check_w(w, n_layers: int) -> tuple[float, ...]:
    arr = np.ravel(np.asarray(w, dtype=np.float64))
    if arr.size == 1:
        arr = np.repeat(arr, n_layers)
    if arr.size != n_layers:
        raise ValueError(f"w must be one float or one per layer ({n_layers}), got {arr.size} values")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"w (the meta-prior) must be finite and >= 0, got {tuple(arr)}")
    return tuple(float(v) for v in arr)


def _z_sizes(params) -> tuple[int, ...]:
    return tuple(int(np.shape(p["w_zd"])[0]) for p in params["layers"])


def _check_adaptive(A, params, batch: int | None, steps: int | None, name: str = "A") -> tuple[int, int]:
    if not isinstance(A, dict) or set(A) != {"mu", "sigma"}:
        raise ValueError(f"{name} must be a dict with keys 'mu' and 'sigma' (one [batch, time, z_l] array per layer)")
    zs = _z_sizes(params)
    for key in ("mu", "sigma"):
        if len(A[key]) != len(zs):
            raise ValueError(f"{name}[{key!r}] must hold one array per layer ({len(zs)}), got {len(A[key])}")
        for layer, (a, z) in enumerate(zip(A[key], zs)):
            _checks.check_shape(f"{name}[{key!r}][{layer}]", a, (batch, steps, z), "[batch, time, z_l]")
            _checks.check_dtype(f"{name}[{key!r}][{layer}]", a, "float")
            batch, steps = np.shape(a)[:2]
    return int(batch), int(steps)


def _check_x(x, params):
    _checks.check_ndim("x", x, 3, "[batch, time, x_dim]")
    _checks.check_dtype("x", x, "float")
    x_dim = int(np.shape(params["w_out"])[1])
    if np.shape(x)[2] != x_dim:
        raise ValueError(f"x must have shape [batch, time, {x_dim}] (x_dim of the read-out), got {list(np.shape(x))}")
    xv = _checks.concrete_or_none(x)
    if xv is not None and not np.all(np.isfinite(xv)):
        raise ValueError("x must be finite (no NaN or inf)")


# ----------------------------------------------------------------------------------------------------------- math

def kl_diag_gaussian(mu_q: Float[Array, "*b z"], logsig_q: Float[Array, "*b z"], mu_p: Float[Array, "*b z"],
                     logsig_p: Float[Array, "*b z"]) -> Float[Array, "*b"]:
    r""":math:`\mathrm{KL}(\mathcal N(\mu_q, \sigma_q^2)\,\Vert\,\mathcal N(\mu_p, \sigma_p^2))` of diagonal Gaussians,
    summed over the last axis: :math:`\sum \log\frac{\sigma_p}{\sigma_q} + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}
    {2\sigma_p^2} - \frac12`, from log standard deviations."""
    var_ratio = jnp.exp(2.0 * (logsig_q - logsig_p))
    maha = jnp.square(mu_q - mu_p) * jnp.exp(-2.0 * logsig_p)
    return jnp.sum(logsig_p - logsig_q + 0.5 * (var_ratio + maha) - 0.5, axis=-1)


def mtrnn_update(h_prev: Float[Array, "*b d"], pre: Float[Array, "*b d"], tau: float) -> Float[Array, "*b d"]:
    r"""Leaky integration :math:`h_t = (1 - 1/\tau) h_{t-1} + (1/\tau)\,\mathrm{pre}_t`; ``tau = 1`` gives
    ``h_t = pre_t`` (a plain RNN step, ``d_t = tanh(pre_t)``)."""
    if tau == 1.0:
        return pre
    return (1.0 - 1.0 / tau) * h_prev + (1.0 / tau) * pre


def init_params(key, x_dim: int, d_sizes: Sequence[int], z_sizes: Sequence[int]) -> dict:
    """Weights for layers ``d_sizes[l]`` deterministic and ``z_sizes[l]`` stochastic units (``l = 0`` bottom).
    Matrices ``[in, out]`` with ``N(0, 1/in)`` entries, zero biases."""
    if len(d_sizes) != len(z_sizes) or len(d_sizes) < 1:
        raise ValueError(f"d_sizes and z_sizes must name the same number (>= 1) of layers, got {d_sizes}, {z_sizes}")
    if min(d_sizes) < 1 or min(z_sizes) < 1 or x_dim < 1:
        raise ValueError(f"x_dim, d_sizes and z_sizes must be positive, got {x_dim}, {d_sizes}, {z_sizes}")
    n = len(d_sizes)
    keys = iter(jax.random.split(key, 5 * n + 1))

    def mat(i, o):
        return jax.random.normal(next(keys), (i, o), jnp.float32) / np.sqrt(i)

    layers = []
    for layer, (d, z) in enumerate(zip(d_sizes, z_sizes)):
        p = {"w_dd": mat(d, d), "w_zd": mat(z, d), "b": jnp.zeros((d,)),
             "w_mu": mat(d, z), "b_mu": jnp.zeros((z,)), "w_sig": mat(d, z), "b_sig": jnp.zeros((z,))}
        if layer < n - 1:
            p["w_top"] = mat(d_sizes[layer + 1], d)
        else:
            next(keys)
        layers.append(p)
    return {"layers": layers, "w_out": mat(d_sizes[0], x_dim), "b_out": jnp.zeros((x_dim,))}


def init_adaptive(batch: int, steps: int, z_sizes: Sequence[int]) -> dict:
    """Adaptive vectors at zero: posterior ``N(0, 1)`` at every step."""
    return {"mu": tuple(jnp.zeros((batch, steps, z)) for z in z_sizes),
            "sigma": tuple(jnp.zeros((batch, steps, z)) for z in z_sizes)}


def _scan(params, A, eps, use_post, taus, h0):
    """One top-down pass. ``use_post [T]`` bool: posterior ``z`` where true, prior ``z`` where false."""
    n = _layers(params)

    def body(h, inp):
        a_mu, a_sig, e, post, first = inp
        d_prev = [jnp.tanh(hl) for hl in h]
        new_h, stats = [None] * n, [None] * n
        d_above = None
        for layer in reversed(range(n)):
            p = params["layers"][layer]
            mu_p = jnp.where(first, 0.0, jnp.tanh(d_prev[layer] @ p["w_mu"] + p["b_mu"][None]))
            ls_p = jnp.where(first, 0.0, d_prev[layer] @ p["w_sig"] + p["b_sig"][None])
            mu_q, ls_q = jnp.tanh(a_mu[layer]), a_sig[layer]
            mu = jnp.where(post, mu_q, mu_p)
            z = mu + jnp.exp(jnp.where(post, ls_q, ls_p)) * e[layer]
            pre = d_prev[layer] @ p["w_dd"] + z @ p["w_zd"] + p["b"][None]
            if d_above is not None:
                pre = pre + d_above @ p["w_top"]
            new_h[layer] = mtrnn_update(h[layer], pre, taus[layer])
            d_above = jnp.tanh(new_h[layer])
            stats[layer] = (mu_q, ls_q, mu_p, ls_p)
        x_hat = d_above @ params["w_out"] + params["b_out"][None]
        return new_h, (x_hat, stats)

    steps = use_post.shape[0]
    tm = lambda a: jnp.moveaxis(a, 1, 0)
    xs = ([tm(a) for a in A["mu"]], [tm(a) for a in A["sigma"]], [tm(e) for e in eps], use_post,
          jnp.arange(steps) == 0)
    h_last, (x_hat, stats) = lax.scan(body, list(h0), xs)
    stats = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), stats)
    return jnp.moveaxis(x_hat, 0, 1), stats, h_last


def _noise(key, batch, steps, z_sizes):
    keys = jax.random.split(key, len(z_sizes))
    return [jax.random.normal(k, (batch, steps, z)) for k, z in zip(keys, z_sizes)]


def run(params: dict, A: dict, key, taus: Sequence[float], *, horizon: int = 0, h0=None, sample: bool = True):
    """Posterior pass over the ``A``'s steps, then ``horizon`` steps from the prior. Returns ``(x_hat [b, T + horizon,
    x_dim], stats, h_last)``; ``stats[l] = (mu_q, logsig_q, mu_p, logsig_p)`` each ``[b, T + horizon, z_l]`` (the
    posterior entries past ``T`` are zero and unused). ``sample=False`` uses the means (no noise)."""
    taus = _check_taus(taus, _layers(params))
    batch, steps = _check_adaptive(A, params, None, None)
    if horizon < 0:
        raise ValueError(f"horizon must be >= 0, got {horizon}")
    zs = _z_sizes(params)
    if horizon:
        pad = lambda a: jnp.concatenate([a, jnp.zeros((batch, horizon, a.shape[2]), a.dtype)], 1)
        A = {"mu": tuple(map(pad, A["mu"])), "sigma": tuple(map(pad, A["sigma"]))}
    total = steps + horizon
    eps = _noise(key, batch, total, zs)
    if not sample:
        eps = [jnp.zeros_like(e) for e in eps]
    if h0 is None:
        h0 = [jnp.zeros((batch, np.shape(p["b"])[0])) for p in params["layers"]]
    return _scan(params, A, eps, jnp.arange(total) < steps, taus, h0)


def _loss_terms(x_hat, stats, x, w):
    rec = jnp.mean(jnp.square(x - x_hat), axis=-1)  # [b, T]
    kl = sum(wl * kl_diag_gaussian(*s) / s[0].shape[-1] for wl, s in zip(w, stats))
    return rec, kl


def loss(params: dict, A: dict, x: Float[Array, "b t x"], key, taus: Sequence[float], w, *, sample: bool = True):
    """The meta-prior-weighted negative ELBO (module docstring) and ``aux = {"rec", "kl"}`` per step ``[b, T]``
    (``kl`` already weighted by ``w``)."""
    _check_x(x, params)
    _check_adaptive(A, params, x.shape[0], x.shape[1])
    w = _check_w(w, _layers(params))
    x_hat, stats, _ = run(params, A, key, taus, sample=sample)
    rec, kl = _loss_terms(x_hat, stats, x, w)
    return jnp.mean(rec + kl), {"rec": rec, "kl": kl}


def generate(params: dict, key, taus: Sequence[float], steps: int, batch: int = 1):
    """Sample ``[batch, steps, x_dim]`` from the prior alone (no adaptive vectors)."""
    empty = init_adaptive(batch, 0, _z_sizes(params))
    return run(params, empty, key, taus, horizon=steps)[0]


def error_regression(params: dict, A: dict, x: Float[Array, "b t x"], key, taus: Sequence[float], w, *, window: int,
                     iters: int = 50, lr: float = 0.09, sample: bool = True):
    """Optimise only the adaptive vectors of the last ``window`` steps of ``x`` (weights and earlier ``A`` frozen)
    with ``iters`` Adam steps on the loss restricted to the window. Returns ``(A_new, window_losses [iters + 1])``:
    ``A_new`` equals ``A`` bit for bit outside the window; ``window_losses[i]`` is the window's loss before step
    ``i`` (the last one after the final step). Iteration ``i`` samples with ``fold_in(key, i)``."""
    _check_x(x, params)
    batch, steps = _check_adaptive(A, params, x.shape[0], x.shape[1])
    w = _check_w(w, _layers(params))
    taus = _check_taus(taus, _layers(params))
    if not (isinstance(window, (int, np.integer)) and 1 <= window <= steps):
        raise ValueError(f"window must be an int in [1, {steps}] (the sequence length), got {window!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    start = steps - window
    frozen = jax.tree.map(lambda a: a[:, :start], A)
    A_win = jax.tree.map(lambda a: a[:, start:], A)

    def win_loss(a_win, k):
        full = jax.tree.map(lambda f, a: jnp.concatenate([f, a], 1), frozen, a_win)
        x_hat, stats, _ = run(params, full, k, taus, sample=sample)
        rec, kl = _loss_terms(x_hat, stats, x, w)
        return jnp.mean((rec + kl)[:, start:])

    opt = optax.adam(lr)

    def body(carry, i):
        a_win, state = carry
        value, g = jax.value_and_grad(win_loss)(a_win, jax.random.fold_in(key, i))
        upd, state = opt.update(g, state, a_win)
        return (optax.apply_updates(a_win, upd), state), value

    (A_win, _), losses = lax.scan(body, (A_win, opt.init(A_win)), jnp.arange(iters))
    final = win_loss(A_win, jax.random.fold_in(key, iters))
    A_new = {k: tuple(a if start == 0 else jnp.concatenate([f, a], 1) for f, a in zip(frozen[k], A_win[k]))
             for k in ("mu", "sigma")}
    return A_new, jnp.concatenate([losses, final[None]])


def predict(params: dict, A: dict, key, taus: Sequence[float], horizon: int, *, sample: bool = False):
    """After (error-regressed) posteriors over the observed steps, predict ``horizon`` steps from the prior:
    ``[b, horizon, x_dim]`` (the prior means when ``sample=False``)."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    x_hat = run(params, A, key, taus, horizon=horizon, sample=sample)[0]
    return x_hat[:, -horizon:]


def extend_adaptive(params: dict, A: dict, taus: Sequence[float], steps: int) -> dict:
    """Append ``steps`` adaptive vectors initialised from the prior (as error regression does for each new
    observation): ``A^mu = artanh(mu_p)``, ``A^sigma = log sigma_p`` along the prior-mean path after ``A``'s steps.
    The existing vectors are kept bit for bit."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = _check_adaptive(A, params, None, None)[1]
    _, stats, _ = run(params, A, jax.random.key(0), taus, horizon=steps, sample=False)
    mu = tuple(jnp.concatenate([a, jnp.arctanh(jnp.clip(s[2][:, n:], -1 + 1e-6, 1 - 1e-6))], 1)
               for a, s in zip(A["mu"], stats))
    sigma = tuple(jnp.concatenate([a, s[3][:, n:]], 1) for a, s in zip(A["sigma"], stats))
    return {"mu": mu, "sigma": sigma}


# ----------------------------------------------------------------------------------------------------------- NNX

class PVRNN(nnx.Module):
    """The weights (``self.params``) and the adaptive vectors of ``n_seq`` training sequences of ``steps`` steps
    (``self.A``), both trained jointly by :meth:`loss`."""

    def __init__(self, x_dim: int, d_sizes: Sequence[int], z_sizes: Sequence[int], taus: Sequence[float], *,
                 n_seq: int, steps: int, rngs: nnx.Rngs):
        self.taus = _check_taus(taus, len(d_sizes))
        self.params = nnx.data(jax.tree.map(nnx.Param, init_params(rngs.params(), x_dim, d_sizes, z_sizes)))
        self.A = nnx.data(jax.tree.map(nnx.Param, init_adaptive(n_seq, steps, z_sizes)))

    def param_dict(self) -> dict:
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def adaptive(self) -> dict:
        return jax.tree.map(lambda v: v[...], self.A, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def loss(self, x, key, w):
        """Loss of the training sequences ``x [n_seq, steps, x_dim]`` under their adaptive vectors."""
        return loss(self.param_dict(), self.adaptive(), x, key, self.taus, w)

    def generate(self, key, steps: int, batch: int = 1):
        return generate(self.param_dict(), key, self.taus, steps, batch)
