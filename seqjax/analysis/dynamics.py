r"""Invariant measures for dynamical-systems reconstruction (Hess et al. 2023, GTF; Koppe et al. 2019;
Mikhaeil et al. 2022): how well a free-running model reproduces an attractor's geometry and its time course.

- :func:`state_space_divergence` (:math:`D_{stsp}`, binned): :math:`\mathrm{KL}(p_{true} \| p_{gen})` between the
  occupation histograms of the two trajectories, ``bins`` per dimension over the true data's range widened by
  0.1 σ on each side, Laplace-smoothed with ``1e-5`` per bin (the paper's choice for N < 6).
- :func:`state_space_divergence_gmm` (:math:`D_{stsp}`, Gaussian mixture; the paper's choice for N ≥ 6): an
  isotropic Gaussian of variance ``sigma2`` on each of the first ``max_T`` states of each trajectory; the KL is the
  Monte-Carlo mean of :math:`\log p(s) - \log q(s)` over ``mc_samples`` draws :math:`s \sim p` (Hershey & Olsen 2007).
- :func:`power_spectrum_distance` (:math:`D_H`): per dimension, z-score, :math:`|\mathrm{rfft}|^2`, Gaussian
  smoothing of width ``sigma`` frequency bins (``scipy.ndimage.gaussian_filter1d``: reflect padding, radius 4σ),
  negatives clipped, normalised to a distribution; the Hellinger distance
  :math:`H(p, q) = \tfrac{1}{\sqrt 2}\|\sqrt p - \sqrt q\|_2`, averaged over dimensions.
- :func:`lyapunov_spectrum` / :func:`max_lyapunov`: the Lyapunov exponents of a map :math:`s_{t+1} = F(s_t)` by the
  QR (Benettin) method: :math:`Q_{t+1} R_{t+1} = J_F(s_t) Q_t`, :math:`\lambda_i = \frac{1}{n\,dt}\sum_t \log|R_{t,ii}|`
  (per unit time with ``dt``; per step with ``dt = 1``).

Inputs are trajectories ``[T, N]``; NaN/inf or mismatched state dimensions raise a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from scipy.ndimage import gaussian_filter1d

__all__ = [
    "state_space_divergence", "state_space_divergence_gmm", "normalized_power_spectrum", "hellinger",
    "power_spectrum_distance", "lyapunov_spectrum", "max_lyapunov",
]

LAPLACE = 1e-5


def _check_pair(x_true, x_gen) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for name, x in (("x_true", x_true), ("x_gen", x_gen)):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{name} must have shape [T, N] (time, state dim), got {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must have a float dtype, got {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} has {int((~np.isfinite(x)).sum())} non-finite (NaN/inf) entries")
        out.append(x.astype(np.float64))
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"x_gen must have the state dim of x_true (N = {out[0].shape[1]}), got {out[1].shape[1]}")
    return out[0], out[1]


def state_space_divergence(x_true: Float[np.ndarray, "t n"], x_gen: Float[np.ndarray, "s n"], bins: int = 30) -> float:
    """Binned :math:`D_{stsp} = \\mathrm{KL}(p_{true}\\|p_{gen})` (see module doc); ``bins`` per dim (``bins**N``
    cells, so for N ≲ 5)."""
    x, y = _check_pair(x_true, x_gen)
    sd = x.std(0)
    edges = [np.linspace(lo, hi, bins + 1) for lo, hi in zip(x.min(0) - 0.1 * sd, x.max(0) + 0.1 * sd)]
    p = np.histogramdd(x, edges)[0].ravel()
    q = np.histogramdd(y, edges)[0].ravel()
    p = (p + LAPLACE) / (p.sum() + LAPLACE * p.size)
    q = (q + LAPLACE) / (q.sum() + LAPLACE * q.size)
    return float(np.sum(p * np.log(p / q)))


def _log_gmm(samples, centres, sigma):
    """log of the mean over ``centres`` of N(samples; centre, sigma² I), ``[S]``."""
    d2 = ((samples[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # [S, T]
    n = samples.shape[1]
    log_k = -0.5 * d2 / sigma**2 - n * np.log(sigma) - 0.5 * n * np.log(2 * np.pi)
    m = log_k.max(1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(log_k - m).mean(1)))


def state_space_divergence_gmm(x_true: Float[np.ndarray, "t n"], x_gen: Float[np.ndarray, "s n"], sigma2: float = 1.0,
                               mc_samples: int = 1000, max_T: int = 10_000, seed: int = 0) -> float:
    """Gaussian-mixture :math:`D_{stsp}` (see module doc); deterministic by ``seed``."""
    x, y = _check_pair(x_true, x_gen)
    if sigma2 <= 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    x, y = x[:max_T], y[:max_T]
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(sigma2)
    s = x[rng.integers(0, len(x), mc_samples)] + sigma * rng.standard_normal((mc_samples, x.shape[1]))
    return float(np.mean(_log_gmm(s, x, sigma) - _log_gmm(s, y, sigma)))


def normalized_power_spectrum(x: Float[np.ndarray, "t n"], sigma: float = 20.0) -> np.ndarray:
    """Per-dim power spectrum ``[T//2 + 1, N]`` of the z-scored series, Gaussian-smoothed (``sigma`` bins, 0 = off),
    clipped at 0 and summing to 1 (see module doc)."""
    x = np.asarray(x, np.float64)
    sd = x.std(0)
    z = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    ps = np.abs(np.fft.rfft(z, axis=0)) ** 2
    if sigma > 0:
        ps = np.maximum(gaussian_filter1d(ps, sigma, axis=0, mode="reflect", truncate=4.0), 0.0)
    total = ps.sum(0)
    return ps / np.where(total > 0, total, 1.0)


def hellinger(p, q, axis: int = 0) -> np.ndarray:
    r""":math:`\tfrac{1}{\sqrt 2}\|\sqrt p - \sqrt q\|_2` along ``axis``."""
    return np.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2, axis=axis))


def power_spectrum_distance(x_true: Float[np.ndarray, "t n"], x_gen: Float[np.ndarray, "t n"], sigma: float = 20.0,
                            reduce: bool = True):
    """:math:`D_H`: the Hellinger distance between smoothed power spectra, mean over dims (``reduce=False``: per
    dim ``[N]``). The two series must have the same length (one frequency grid)."""
    x, y = _check_pair(x_true, x_gen)
    if len(x) != len(y):
        raise ValueError(f"x_gen must have the length of x_true ({len(x)}), got {len(y)}")
    h = hellinger(normalized_power_spectrum(x, sigma), normalized_power_spectrum(y, sigma))
    return float(h.mean()) if reduce else h


def lyapunov_spectrum(step: Callable, s0: Float[Array, " n"], n_steps: int, *, k: int | None = None,
                      burn_in: int = 0, dt: float = 1.0, key=None) -> Float[Array, " k"]:
    """The ``k`` (default all) largest Lyapunov exponents of the map ``step`` along the orbit from ``s0``.

    ``burn_in`` steps first move ``s0`` onto the attractor and align the tangent basis (not averaged); the
    exponents are then the mean log growth per step over ``n_steps`` (QR of the Jacobian products; ``jax.jacfwd`` of
    ``step``), divided by ``dt``. ``key``: the random initial tangent basis (default ``PRNGKey(0)``).
    """
    s0 = jnp.asarray(s0)
    if s0.ndim != 1:
        raise ValueError(f"s0 must have shape [N] (one state), got {list(s0.shape)}")
    n = s0.shape[0]
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N = {n}], got {k}")
    if n_steps < 1 or burn_in < 0:
        raise ValueError(f"need n_steps >= 1 and burn_in >= 0, got {n_steps}, {burn_in}")
    key = jax.random.PRNGKey(0) if key is None else key
    q0, _ = jnp.linalg.qr(jax.random.normal(key, (n, k), s0.dtype))
    jac = jax.jacfwd(step)

    def body(carry, _):
        s, q = carry
        q, r = jnp.linalg.qr(jac(s) @ q)
        return (step(s), q), jnp.log(jnp.abs(jnp.diagonal(r)))

    @jax.jit
    def run(s, q):
        (s, q), _ = jax.lax.scan(body, (s, q), None, length=burn_in)
        _, logs = jax.lax.scan(body, (s, q), None, length=n_steps)
        return logs.mean(0) / dt

    return run(s0, q0)


def max_lyapunov(step: Callable, s0, n_steps: int, *, burn_in: int = 0, dt: float = 1.0, key=None) -> float:
    """The maximal Lyapunov exponent of the map ``step`` (:func:`lyapunov_spectrum` with ``k = 1``)."""
    return float(lyapunov_spectrum(step, s0, n_steps, k=1, burn_in=burn_in, dt=dt, key=key)[0])
