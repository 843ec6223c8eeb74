"""Criticality (Roberts, Yaida & Hanin, *The Principles of Deep Learning Theory*, ch. 2–5; for RNNs the mean-field
theory of Chen, Pennington & Schoenholz 2018): initialisation constants that keep signals and gradients from
exploding or vanishing with depth, the infinite-width kernel recursion, and measurements at finite width.

An MLP ``z^(ℓ+1) = b^(ℓ+1) + W^(ℓ+1) σ(z^(ℓ))`` with ``W_ij ~ N(0, C_W / n_ℓ)``, ``b ~ N(0, C_b)`` has, at infinite
width, Gaussian preactivations whose kernel obeys

    K^(1)_αβ = C_b + C_W x_α·x_β / n_0,        K^(ℓ+1)_αβ = C_b + C_W ⟨σ(z_α) σ(z_β)⟩_{K^(ℓ)}.

Susceptibilities: ``χ_∥(K) = C_W d⟨σ²⟩_K/dK`` and ``χ_⊥(K) = C_W ⟨σ'(z)²⟩_K``; squared gradients ``‖∂L/∂z^(ℓ)‖²``
pick up a factor ``χ_⊥`` per layer. Criticality is a fixed point ``K*`` with ``χ_∥ = χ_⊥ = 1``:

- scale-invariant class (ReLU, leaky ReLU with slopes a₊, a₋): ``C_b = 0``, ``C_W = 2 / (a₊² + a₋²)`` (ReLU: 2, He);
- ``K* = 0`` class (tanh, sin, linear): ``C_b = 0``, ``C_W = 1 / σ'(0)²`` (tanh: 1); there ``K^(ℓ) ≈ 1/(2ℓ)``.

A vanilla RNN ``z_t = W h_{t−1} + U x_t + b``, ``h_t = σ(z_t)`` (``W ~ N(0, C_W/n)``, ``U ~ N(0, C_U/n_in)``) has
``K_t = C_b + C_U ‖x_t‖²/n_in + C_W ⟨σ²⟩_{K_{t−1}}`` and the same ``χ_⊥`` per time step: critical at the
same ``C_W`` with small inputs (the edge of chaos, Sompolinsky et al. 1988).

Expectations use Gauss–Hermite quadrature (ReLU in closed form, the arc-cosine kernel).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from seqjax import _checks

__all__ = ["ACTIVATIONS", "Diagnostics", "critical_init", "gauss_expect", "kernel_recursion", "kernel_recursion_pair",
           "fixed_point", "susceptibilities", "rnn_kernel_recursion", "init_mlp", "mlp_forward", "mlp_diagnostics",
           "init_rnn", "rnn_diagnostics"]

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "linear": lambda z: z,
    "sin": jnp.sin,
}
_NP_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0), "linear": lambda z: z, "sin": np.sin}
# scale-invariant activations: (a₊, a₋) slopes
_SCALE_INVARIANT = {"relu": (1.0, 0.0), "linear": (1.0, 1.0)}
_GH = np.polynomial.hermite_e.hermegauss(101)  # nodes/weights for E over N(0, 1)


def _check_activation(activation: str):
    _checks.check_choice("activation", activation, tuple(ACTIVATIONS))


def critical_init(activation: str) -> tuple[float, float]:
    """The critical ``(C_b, C_W)``: tanh, sin and linear ``(0, 1)``; ReLU ``(0, 2)``."""
    _check_activation(activation)
    if activation in _SCALE_INVARIANT and activation != "linear":
        ap, am = _SCALE_INVARIANT[activation]
        return 0.0, 2.0 / (ap**2 + am**2)
    d = float(jax.grad(ACTIVATIONS[activation])(0.0))  # K* = 0 class: C_W = 1/σ'(0)²
    return 0.0, 1.0 / d**2


def gauss_expect(f, K: float) -> float:
    """``⟨f(z)⟩`` over ``z ~ N(0, K)`` by 101-point Gauss–Hermite quadrature."""
    z, w = _GH
    return float(np.sum(w * np.asarray(f(np.sqrt(max(K, 0.0)) * z))) / np.sqrt(2 * np.pi))


def _g(activation: str, K: float) -> float:
    """``⟨σ(z)²⟩_K``."""
    if activation in _SCALE_INVARIANT:
        ap, am = _SCALE_INVARIANT[activation]
        return 0.5 * (ap**2 + am**2) * K
    s = _NP_ACTIVATIONS[activation]
    return gauss_expect(lambda z: s(z) ** 2, K)


def kernel_recursion(activation: str, C_W: float, C_b: float, K1: float, depth: int) -> np.ndarray:
    """``K^(1..depth)`` for one input at infinite width, starting from ``K1 = C_b + C_W ‖x‖²/n_0``."""
    _check_activation(activation)
    K = [float(K1)]
    for _ in range(depth - 1):
        K.append(C_b + C_W * _g(activation, K[-1]))
    return np.asarray(K)


def _pair_expect(activation: str, K11: float, K12: float, K22: float) -> float:
    """``⟨σ(z₁)σ(z₂)⟩`` over ``(z₁, z₂) ~ N(0, [[K11, K12], [K12, K22]])``."""
    if activation == "relu":  # arc-cosine kernel of degree 1
        r = np.sqrt(K11 * K22)
        cos = np.clip(K12 / r, -1.0, 1.0) if r > 0 else 1.0
        th = np.arccos(cos)
        return float(r * (np.sin(th) + (np.pi - th) * cos) / (2 * np.pi))
    L = np.linalg.cholesky(np.array([[K11, K12], [K12, K22]]) + 1e-12 * np.eye(2))
    z, w = _GH
    u1, u2 = np.meshgrid(z, z, indexing="ij")
    ww = np.outer(w, w) / (2 * np.pi)
    s = _NP_ACTIVATIONS[activation]
    z1 = L[0, 0] * u1
    z2 = L[1, 0] * u1 + L[1, 1] * u2
    return float(np.sum(ww * s(z1) * s(z2)))


def kernel_recursion_pair(activation: str, C_W: float, C_b: float, K1, depth: int) -> np.ndarray:
    """The 2×2 kernel of two inputs through ``depth`` layers: ``[depth, 2, 2]``, from ``K1`` (``[2, 2]``)."""
    _check_activation(activation)
    K1 = np.asarray(K1, np.float64)
    _checks.check_shape("K1", K1, (2, 2), "[2, 2] (the first layer's kernel of two inputs)")
    out = [K1]
    for _ in range(depth - 1):
        k = out[-1]
        g11, g22 = _g(activation, k[0, 0]), _g(activation, k[1, 1])
        g12 = _pair_expect(activation, k[0, 0], k[0, 1], k[1, 1])
        out.append(C_b + C_W * np.array([[g11, g12], [g12, g22]]))
    return np.stack(out)


def susceptibilities(activation: str, C_W: float, K: float) -> tuple[float, float]:
    """``(χ_∥, χ_⊥)`` at kernel ``K`` (see the module docstring); at ``K = 0`` the limits ``C_W σ'(0)²``."""
    _check_activation(activation)
    s = ACTIVATIONS[activation]
    ds = jax.vmap(jax.grad(s))
    if activation in _SCALE_INVARIANT:
        ap, am = _SCALE_INVARIANT[activation]
        chi = C_W * 0.5 * (ap**2 + am**2)
        return chi, chi
    if K <= 0:
        d0 = float(jax.grad(s)(0.0)) ** 2
        return C_W * d0, C_W * d0
    chi_perp = C_W * gauss_expect(lambda z: np.asarray(ds(jnp.asarray(z))) ** 2, K)
    sn = _NP_ACTIVATIONS[activation]
    chi_par = C_W / (2 * K**2) * gauss_expect(lambda z: sn(z) ** 2 * (z**2 - K), K)
    return chi_par, chi_perp


def fixed_point(activation: str, C_W: float, C_b: float, K0: float = 1.0, iters: int = 10_000, tol: float = 1e-12) -> float:
    """The fixed point ``K* = C_b + C_W ⟨σ²⟩_{K*}`` reached by iterating the recursion from ``K0``;
    ``inf`` when the kernel grows without bound (e.g. ReLU with ``C_W > 2``)."""
    _check_activation(activation)
    K = float(K0)
    for _ in range(iters):
        new = C_b + C_W * _g(activation, K)
        if not np.isfinite(new) or new > 1e12:
            return float("inf")
        if abs(new - K) <= tol * max(1.0, abs(K)):
            return new
        K = new
    return K


def rnn_kernel_recursion(activation: str, C_W: float, C_b: float, C_U: float, x_sq, K0: float = 0.0) -> np.ndarray:
    """``K_t`` of a vanilla RNN for inputs with ``x_sq[t] = ‖x_t‖²/n_in`` (``[T]``), from ``h_0`` with
    ``⟨σ²⟩ = ``σ(·)² at kernel ``K0`` (``K0 = 0`` and tanh/ReLU: ``h_0 = 0``)."""
    _check_activation(activation)
    K, out = float(K0), []
    for t, xs in enumerate(np.asarray(x_sq, np.float64)):
        prev = _g(activation, K) if (t > 0 or K0 > 0) else float(ACTIVATIONS[activation](0.0)) ** 2
        K = C_b + C_U * xs + C_W * prev
        out.append(K)
    return np.asarray(out)


# ----------------------------------------------------------------------------- finite width


class Diagnostics(NamedTuple):
    """Per layer (MLP) or per time step (RNN): the mean squared preactivation ``K̂ = mean_i z_i²`` averaged over
    samples, and the squared gradient norm ``‖∂L/∂z‖²`` per sample for ``L = ⟨v, z^(out)⟩`` with a random
    ``v ~ N(0, I/n)`` (``≈ 1`` at the output; its ratio between neighbouring layers estimates ``χ_⊥``)."""

    K: np.ndarray  # [depth] or [T]
    grad_sq: np.ndarray  # [depth] or [T]


def init_mlp(key, widths, C_W: float, C_b: float) -> list[tuple[Array, Array]]:
    """``[(W, b)]`` with ``W ~ N(0, C_W/fan_in)`` (``[fan_in, fan_out]``) and ``b ~ N(0, C_b)``; ``widths`` =
    ``(n_0, n_1, ..., n_L)``."""
    if len(widths) < 2:
        raise ValueError(f"widths must list the input width and at least one layer, got {widths}")
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(widths) - 1), zip(widths[:-1], widths[1:])):
        kw, kb = jax.random.split(k)
        params.append((jax.random.normal(kw, (n_in, n_out)) * jnp.sqrt(C_W / n_in),
                       jax.random.normal(kb, (n_out,)) * jnp.sqrt(C_b)))
    return params


def _run(params, x, activation, shifts=None):
    """Preactivations of every layer; the run of square layers of the first layer's output width after the first
    is a ``lax.scan`` (compile time independent of depth); any layers after that run are applied one by one."""
    s = ACTIVATIONS[activation]
    W0, b0 = params[0]
    zs = [x @ W0 + b0[None, :] + (0 if shifts is None else shifts[0])]
    rest = list(params[1:])
    run = 0
    square = (zs[0].shape[-1],) * 2  # a scan's carry keeps its shape: only n -> n layers
    while run < len(rest) and rest[run][0].shape == square:
        run += 1
    if run:
        Ws = jnp.stack([w for w, _ in rest[:run]])
        bs = jnp.stack([b for _, b in rest[:run]])
        sh = jnp.zeros((run,) + zs[0].shape) if shifts is None else jnp.stack(shifts[1 : run + 1])

        def body(z, p):
            W, b, d = p
            z = s(z) @ W + b[None, :] + d
            return z, z

        _, out = jax.lax.scan(body, zs[0], (Ws, bs, sh))
        zs += [out[i] for i in range(run)]
    for i, (W, b) in enumerate(rest[run:]):
        zs.append(s(zs[-1]) @ W + b[None, :] + (0 if shifts is None else shifts[1 + run + i]))
    return zs


def mlp_forward(params, x: Float[Array, "b n0"], activation: str) -> list[Array]:
    """The preactivations ``z^(1..L)``; the first layer reads ``x`` itself, the rest ``σ(z)``."""
    _check_activation(activation)
    return _run(params, x, activation)


def mlp_diagnostics(key, x: Float[Array, "b n0"], activation: str, width: int, depth: int, C_W: float,
                    C_b: float) -> Diagnostics:
    """:class:`Diagnostics` of a freshly initialised MLP of ``depth`` layers of ``width`` units on inputs ``x``."""
    _checks.check_ndim("x", x, 2, "[batch, n0]")
    _check_activation(activation)
    K, g = _mlp_diag(key, jnp.asarray(x, jnp.float32), activation, width, depth, C_W, C_b)
    return Diagnostics(np.asarray(K), np.asarray(g))


@functools.partial(jax.jit, static_argnames=("activation", "width", "depth"))
def _mlp_diag(key, x, activation, width, depth, C_W, C_b):
    kp, kv = jax.random.split(key)
    params = init_mlp(kp, (x.shape[1],) + (width,) * depth, C_W, C_b)
    v = jax.random.normal(kv, (width,)) / np.sqrt(width)
    zs = _run(params, x, activation)
    grads = jax.grad(lambda sh: jnp.sum(_run(params, x, activation, sh)[-1] @ v))([jnp.zeros_like(z) for z in zs])
    return jnp.stack([jnp.mean(z**2) for z in zs]), jnp.stack([jnp.mean(jnp.sum(gz**2, -1)) for gz in grads])


def init_rnn(key, n_in: int, width: int, C_W: float, C_b: float, C_U: float) -> dict:
    kw, ku, kb = jax.random.split(key, 3)
    return {"W": jax.random.normal(kw, (width, width)) * jnp.sqrt(C_W / width),
            "U": jax.random.normal(ku, (n_in, width)) * jnp.sqrt(C_U / n_in),
            "b": jax.random.normal(kb, (width,)) * jnp.sqrt(C_b)}


def rnn_diagnostics(key, x: Float[Array, "b t n_in"], activation: str, width: int, C_W: float, C_b: float,
                    C_U: float = 1.0) -> Diagnostics:
    """:class:`Diagnostics` over time of a freshly initialised vanilla RNN (``h_0 = 0``) on ``x``; the gradient is
    of ``⟨v, z_T⟩`` with respect to each ``z_t`` (backpropagation through time)."""
    _checks.check_ndim("x", x, 3, "[batch, time, n_in]")
    _check_activation(activation)
    K, g = _rnn_diag(key, jnp.asarray(x, jnp.float32), activation, width, C_W, C_b, C_U)
    return Diagnostics(np.asarray(K), np.asarray(g))


@functools.partial(jax.jit, static_argnames=("activation", "width"))
def _rnn_diag(key, x, activation, width, C_W, C_b, C_U):
    kp, kv = jax.random.split(key)
    p = init_rnn(kp, x.shape[2], width, C_W, C_b, C_U)
    s = ACTIVATIONS[activation]
    v = jax.random.normal(kv, (width,)) / np.sqrt(width)
    xu = x @ p["U"] + p["b"][None, None, :]  # [b, t, n]

    def run(shifts):
        def step(h, inp):
            xt, dt = inp
            z = h @ p["W"] + xt + dt
            return s(z), z

        _, zs = jax.lax.scan(step, jnp.zeros((x.shape[0], width)), (jnp.swapaxes(xu, 0, 1), shifts))
        return zs  # [t, b, n]

    shifts = jnp.zeros((x.shape[1], x.shape[0], width))
    zs = run(shifts)
    g = jax.grad(lambda sh: jnp.sum(run(sh)[-1] @ v))(shifts)
    return jnp.mean(zs**2, axis=(1, 2)), jnp.mean(jnp.sum(g**2, -1), 1)
