r"""Generalized teacher forcing (GTF; Hess, Monfared, Brenner & Durstewitz, ICML 2023) for a clipped shallow PLRNN.

The model (``seqjax.rnn.cells``, kind ``"shplrnn"``), latent ``M``, hidden ``L``, autonomous:

.. math::  z_t = F(z_{t-1}) = A \odot z_{t-1} + W_1[\mathrm{relu}(W_2 z_{t-1} + h_2) - \mathrm{relu}(W_2 z_{t-1})] + h_1,

observed through the identity on its first ``N`` units, :math:`\hat x_t = z_{t,1:N}`. Training on windows
:math:`x_{1:T}` ``[b, T, N]``: :math:`z_1 = [x_1;\, L_0 x_1]` (a learned ``L0`` ``[M-N, N]`` when ``M > N``), then for
:math:`t = 2..T`

.. math::  z_t = F(\tilde z_{t-1}),\qquad \tilde z_t = (1-\alpha)\, z_t + \alpha\, \hat z_t \ \text{on the first } N
           \text{ units, at forcing steps } (t-1) \bmod \tau = 0 \ (\tilde z_t = z_t \text{ otherwise}),

with the data-inferred state :math:`\hat z_t = x_t` (partial forcing when ``M > N``). The loss is the MSE of the
*unforced* predictions :math:`z_{t,1:N}` against :math:`x_t`. Special cases: ``alpha = 0`` is plain BPTT of the
free-running model from :math:`z_1`; ``alpha = 1, tau = 1`` is full teacher forcing (one-step-ahead prediction
from the data); ``alpha = 1, tau > 1`` is sparse teacher forcing (Mikhaeil et al. 2022).

Since :math:`\partial \tilde z_t / \partial \tilde z_{t-1} = (1-\alpha) J_t`, the Jacobian products stay bounded
when :math:`(1-\alpha)\mathcal N \le 1`. Adaptive GTF (:func:`estimate_alpha`, :func:`anneal_alpha`) sets
:math:`\alpha^* = \max(0, 1 - 1/\mathcal N)` every ``alpha_every`` steps, with :math:`\mathcal N` from the
Jacobians at the forcing signals (``"product_upper_bound"``: the max over the batch of the geometric mean over time
of :math:`\|J(\hat z_t)\|_2`; ``"batch_maximum"``: the max of :math:`\|J\|_2`; ``"jacobian_upper_bound"``:
:math:`\max|A| + \|W_1\|\|W_2\|`), and anneals: :math:`\alpha \leftarrow \alpha^*` if :math:`\alpha^* > \alpha`, else
:math:`\alpha \leftarrow \gamma\alpha + (1-\gamma)\alpha^*` (γ = 0.999, α starts at 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from seqjax import _checks
from seqjax.rnn import cells

__all__ = [
    "ALPHA_METHODS", "check_alpha", "init_params", "step", "jacobian", "initial_state", "forward", "loss",
    "forcing_mask", "generate", "spectral_norm", "estimate_alpha", "anneal_alpha", "GTFConfig", "fit", "fit_many",
]

ALPHA_METHODS = ("constant", "product_upper_bound", "batch_maximum", "jacobian_upper_bound")
UNROLL = 4  # time steps per loop iteration: the cell is tiny, so XLA's per-iteration cost dominates on CPU
POWER_ITERS = 30


def check_alpha(alpha) -> float:
    """``alpha`` as a float in [0, 1], else a ``ValueError`` (checked in Python, before tracing)."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha (the forcing weight) must be in [0, 1], got {alpha}")
    return a


def init_params(key, latent: int, hidden: int, obs_dim: int | None = None) -> dict:
    """The paper's initialisation: ``A`` = diag of ``K/λ_max(K)``, ``K = RᵀR/M + I`` (Talathi & Vartak 2016);
    ``W1`` ~ U(±1/√L) ``[M, L]``, ``W2`` ~ U(±1/√M) ``[L, M]``, ``h2`` ~ U(±1/√L) ``[L]``, ``h1 = 0`` (stored as the
    cell's input bias ``b`` ``[1, 1, M]``); ``L0`` ~ U(±1/√N) ``[M-N, N]`` when ``obs_dim = N < M``."""
    n = latent if obs_dim is None else obs_dim
    if not 1 <= n <= latent or hidden < 1:
        raise ValueError(f"need 1 <= obs_dim <= latent and hidden >= 1, got obs_dim={obs_dim}, latent={latent}, "
                         f"hidden={hidden}")
    kr, k1, k2, k3, k4 = jax.random.split(key, 5)
    r = jax.random.normal(kr, (latent, latent), jnp.float32)
    k = r.T @ r / latent + jnp.eye(latent)
    u = lambda kk, shape, fan: jax.random.uniform(kk, shape, jnp.float32, -1.0, 1.0) / math.sqrt(fan)
    p = {
        "A": jnp.diagonal(k) / jnp.max(jnp.abs(jnp.linalg.eigvalsh(k))),
        "W1": u(k1, (latent, hidden), hidden),
        "W2": u(k2, (hidden, latent), latent),
        "h2": u(k3, (hidden,), hidden),
        "b": jnp.zeros((1, 1, latent), jnp.float32),
    }
    if n < latent:
        p["L0"] = u(k4, (latent - n, n), n)
    return p


def step(params: dict, z: Float[Array, "b m"]) -> Float[Array, " *batch"]:
    """One step of the autonomous clipped shPLRNN, ``z`` ``[b, M]``."""
    xp = jnp.broadcast_to(params["b"][None], (z.shape[0], *params["b"].shape))
    return cells.step("shplrnn", params, z[:, None, None], xp)[:, 0, 0]


def jacobian(params: dict, z: Float[Array, "... m"]) -> Float[Array, "... m m"]:
    r""":math:`\partial F/\partial z = \mathrm{diag}(A) + W_1\,\mathrm{diag}(1[W_2 z > -h_2] - 1[W_2 z > 0])\,W_2`."""
    pre = z @ params["W2"].T
    h2 = jnp.reshape(params["h2"], (1,) * (pre.ndim - 1) + (-1,))
    mask = (pre + h2 > 0).astype(z.dtype) - (pre > 0).astype(z.dtype)
    a = jnp.reshape(jnp.diag(params["A"]), (1,) * (pre.ndim - 1) + 2 * (params["A"].shape[0],))
    return jnp.einsum("ml,...l,lk->...mk", params["W1"], mask, params["W2"]) + a


def initial_state(params: dict, x1: Float[Array, "b n"]) -> Float[Array, " *batch"]:
    """:math:`z_1 = [x_1;\\, L_0 x_1]` (just :math:`x_1` when ``M = N``)."""
    return jnp.concatenate([x1, x1 @ params["L0"].T], -1) if "L0" in params else x1


def _check_obs(params: dict, x, name: str = "x") -> None:
    m = params["A"].shape[0]
    n = m - (params["L0"].shape[0] if "L0" in params else 0)
    if np.ndim(x) != 3 or np.shape(x)[-1] != n or np.shape(x)[1] < 2:
        raise ValueError(f"{name} must have shape [batch, T >= 2, N = {n}] (the observed dim of a latent-{m} "
                         f"model), got {list(np.shape(x))}")
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        raise ValueError(f"{name} has non-finite (NaN/inf) entries")


def forcing_mask(seq_len: int, tau: int = 1) -> Float[Array, " *batch"]:
    """``[T-1]`` 1.0 where prediction ``i`` (time ``t = i + 2``) is forced, :math:`(t-1) \bmod \tau = 0`, else 0.0."""
    return (jnp.arange(1, seq_len) % tau == 0).astype(jnp.float32)


def forward(params: dict, x: Float[Array, "b t n"], alpha, tau: int = 1, *, force=None) -> Float[Array, "b t1 m"]:
    """The unforced predictions :math:`z_{2..T}` ``[b, T-1, M]`` under GTF with weight ``alpha`` every ``tau``
    steps (see module doc); ``force``: a ``[T-1]`` mask instead of ``tau`` (:func:`forcing_mask`). ``alpha`` may
    be a traced scalar (adaptive GTF); a concrete scalar (a Python or numpy number, a jax array) is checked to lie
    in [0, 1]."""
    _check_obs(params, x)
    a = _checks.concrete_or_none(alpha)
    if a is not None and a.ndim == 0:
        check_alpha(a)
    n = x.shape[-1]
    z1 = initial_state(params, x[:, 0])
    force = forcing_mask(x.shape[1], tau) if force is None else force

    def body(z_tilde, inp):
        x_t, f = inp
        z = step(params, z_tilde)
        w = f * alpha
        mixed = (1.0 - w) * z[:, :n] + w * x_t
        return jnp.concatenate([mixed, z[:, n:]], -1), z

    _, zs = jax.lax.scan(body, z1, (jnp.swapaxes(x[:, 1:], 0, 1), force), unroll=UNROLL)
    return jnp.swapaxes(zs, 0, 1)


def loss(params: dict, x: Float[Array, "b t n"], alpha, tau: int = 1, *, force=None) -> Float[Array, ""]:
    """MSE of the unforced predictions of the observed units against :math:`x_{2..T}`."""
    z = forward(params, x, alpha, tau, force=force)
    return jnp.mean((z[..., : x.shape[-1]] - x[:, 1:]) ** 2)


def generate(params: dict, x1: Float[Array, " n"], n_steps: int) -> Float[Array, " *batch"]:
    """The free-running latent trajectory ``[n_steps, M]`` from :math:`z_1 = [x_1; L_0 x_1]` (its first row)."""
    z1 = initial_state(params, jnp.asarray(x1, jnp.float32)[None])

    def body(z, _):
        return step(params, z), z[0]

    return jax.lax.scan(body, z1, None, length=n_steps)[1]


def estimate_alpha(params: dict, x: Float[Array, "b t n"], method: str = "product_upper_bound") -> tuple[Array, Array]:
    """``(α*, 𝒩)``: the forcing that bounds the gradients, :math:`\\max(0, 1 - 1/\\mathcal N)`, with the Jacobian
    norm bound :math:`\\mathcal N` of ``method`` at the forcing signals :math:`\\hat z_t = [x_t; 0]`, ``t >= 2``."""
    _checks.check_choice("method", method, ALPHA_METHODS[1:])
    if method == "jacobian_upper_bound":
        norm = jnp.max(jnp.abs(params["A"])) + jnp.linalg.norm(params["W1"], 2) * jnp.linalg.norm(params["W2"], 2)
    else:
        m = params["A"].shape[0]
        zh = jnp.pad(x[:, 1:], ((0, 0), (0, 0), (0, m - x.shape[-1])))
        norms = spectral_norm(jacobian(params, zh))  # [b, T-1]
        norm = jnp.max(jnp.exp(jnp.mean(jnp.log(norms), 1)) if method == "product_upper_bound" else norms)
    return jnp.maximum(0.0, 1.0 - 1.0 / norm), norm


def spectral_norm(j: Float[Array, "*batch m k"], iters: int = POWER_ITERS) -> Float[Array, " *batch"]:
    r""":math:`\|J\|_2` of a batch of small matrices by power iteration on :math:`J^T J` (batched SVDs of tiny
    matrices are ~10x slower on CPU); converges like :math:`(\sigma_2/\sigma_1)^{2\,iters}`."""
    v = jnp.broadcast_to(jnp.linspace(1.0, 0.5, j.shape[-1], dtype=j.dtype), (*j.shape[:-2], j.shape[-1]))
    jtj = jnp.swapaxes(j, -1, -2) @ j

    def body(_, v):
        w = jnp.einsum("...ij,...j->...i", jtj, v)
        return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-30)

    v = jax.lax.fori_loop(0, iters, body, v / jnp.linalg.norm(v, axis=-1, keepdims=True))
    return jnp.linalg.norm(jnp.einsum("...ij,...j->...i", j, v), axis=-1)


def anneal_alpha(alpha: float, alpha_est: float, gamma: float = 0.999) -> float:
    """Jump up to ``alpha_est`` at once; decay towards it with weight ``gamma`` otherwise."""
    return float(alpha_est) if alpha_est > alpha else float(gamma * alpha + (1.0 - gamma) * alpha_est)


@dataclasses.dataclass
class GTFConfig:
    latent: int = 3  # M
    hidden: int = 50  # L
    alpha: float = 1.0  # the (initial, for an adaptive method) forcing weight
    alpha_method: str = "product_upper_bound"  # "constant" or an adaptive estimator (ALPHA_METHODS)
    alpha_every: int = 5  # steps between α estimates
    gamma: float = 0.999  # α annealing
    tau: int = 1  # force every tau steps (sparse TF: alpha = 1, tau > 1)
    steps: int = 20_000
    batch_size: int = 16
    seq_len: int = 200
    lr: float = 1e-3
    end_lr: float = 1e-6  # exponential decay from lr to end_lr over the steps (RAdam)
    clip: float = 0.0  # global-norm gradient clipping (0 = none, as in the paper)
    seed: int = 0


SHARED = ("latent", "hidden", "steps", "batch_size", "seq_len", "lr", "end_lr", "clip")


def fit(x: Float[np.ndarray, "t n"], cfg: GTFConfig, log: Callable[[str], None] | None = None,
        log_every: int = 1000) -> tuple[dict, list[dict]]:
    """Train a shPLRNN on windows of the trajectory ``x`` ``[T, N]`` with GTF as configured; returns
    ``(params, history)``. A non-finite loss or gradient stops the training (the history's last entry says so), as
    exploding gradients do in the paper's BPTT baseline."""
    return fit_many(x, [cfg], log, log_every)[0]


def fit_many(x: Float[np.ndarray, "t n"], cfgs: list[GTFConfig], log: Callable[[str], None] | None = None,
             log_every: int = 1000, names: list[str] | None = None) -> list[tuple[dict, list[dict]]]:
    """:func:`fit` for several forcing settings at once, ``jax.vmap``-ed over the models: they differ in ``alpha``,
    ``alpha_method``, ``tau``, ``gamma``, ``alpha_every`` and ``seed`` (the initialisation) and share the rest
    (``SHARED``) and the training batches (from the first config's seed), so a comparison is paired. A model whose
    loss or gradient turns non-finite keeps its last finite parameters and stops; the others go on."""
    x = np.asarray(x, np.float32)
    if not cfgs:
        raise ValueError("cfgs must hold at least one GTFConfig")
    c0 = cfgs[0]
    if x.ndim != 2 or x.shape[0] <= c0.seq_len:
        raise ValueError(f"x must have shape [T > seq_len = {c0.seq_len}, N], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("x has non-finite (NaN/inf) entries")
    alphas = [check_alpha(c.alpha) for c in cfgs]
    for c in cfgs:
        _checks.check_choice("alpha_method", c.alpha_method, ALPHA_METHODS)
        if c.tau < 1:
            raise ValueError(f"tau must be >= 1, got {c.tau}")
        for f in SHARED:
            if getattr(c, f) != getattr(c0, f):
                raise ValueError(f"every config must share {f}: {getattr(c, f)} != {getattr(c0, f)}")
    names = names or [f"model {i}" for i in range(len(cfgs))]
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    params = stack([init_params(jax.random.PRNGKey(c.seed), c.latent, c.hidden, x.shape[1]) for c in cfgs])
    masks = jnp.stack([forcing_mask(c0.seq_len, c.tau) for c in cfgs])
    sched = optax.exponential_decay(c0.lr, max(c0.steps, 1), c0.end_lr / c0.lr)
    tx = optax.radam(sched)
    if c0.clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(c0.clip), tx)
    opt_state = jax.vmap(tx.init)(params)

    def one(p, o, xb, a, m, alive):
        val, grads = jax.value_and_grad(loss)(p, xb, a, force=m)
        gn = optax.tree.norm(grads)
        updates, o_new = tx.update(grads, o, p)
        keep = alive & jnp.isfinite(val) & jnp.isfinite(gn)
        pick = lambda new, old: jnp.where(keep, new, old)
        return jax.tree.map(pick, optax.apply_updates(p, updates), p), jax.tree.map(pick, o_new, o), val, gn

    train_step = jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0, 0, 0)))
    methods = sorted({c.alpha_method for c in cfgs} - {"constant"})
    est = {m: jax.jit(jax.vmap(functools.partial(estimate_alpha, method=m), in_axes=(0, None))) for m in methods}
    rng = np.random.default_rng(c0.seed)
    idx = np.arange(c0.seq_len)
    k = len(cfgs)
    alive = np.ones(k, bool)
    history = [[] for _ in cfgs]
    losses, gnorms = [], []
    for it in range(1, c0.steps + 1):
        xb = jnp.asarray(x[rng.integers(0, len(x) - c0.seq_len, c0.batch_size)[:, None] + idx])
        for m in methods:
            due = [i for i, c in enumerate(cfgs) if c.alpha_method == m and it % c.alpha_every == 0 and alive[i]]
            if due:
                a_est = np.asarray(est[m](params, xb)[0])
                for i in due:
                    alphas[i] = anneal_alpha(alphas[i], float(a_est[i]), cfgs[i].gamma)
        params, opt_state, vals, gns = train_step(params, opt_state, xb, jnp.asarray(alphas, jnp.float32), masks,
                                                  jnp.asarray(alive))
        vals, gns = np.asarray(vals), np.asarray(gns)
        for i in np.flatnonzero(alive & ~(np.isfinite(vals) & np.isfinite(gns))):
            alive[i] = False
            history[i].append({"step": it, "loss": float(vals[i]), "grad_norm": float(gns[i]), "alpha": alphas[i],
                               "diverged": True})
            if log:
                log(f"  {names[i]} step {it}: non-finite loss/gradient, training stopped")
        losses.append(vals)
        gnorms.append(gns)
        if it % log_every == 0 or it == c0.steps:
            lv, gv = np.stack(losses), np.stack(gnorms)
            for i in np.flatnonzero(alive):
                row = {"step": it, "loss": float(lv[:, i].mean()), "grad_norm": float(np.median(gv[:, i])),
                       "grad_norm_max": float(gv[:, i].max()), "alpha": alphas[i]}
                history[i].append(row)
                if log:
                    log(f"  {names[i]} step {it}: loss {row['loss']:.4f} |g| median {row['grad_norm']:.3g} max "
                        f"{row['grad_norm_max']:.3g} alpha {alphas[i]:.3f}")
            losses, gnorms = [], []
        if not alive.any():
            break
    return [(jax.tree.map(lambda a, i=i: a[i], params), history[i]) for i in range(k)]
