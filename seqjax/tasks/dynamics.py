r"""Chaotic flows for dynamical-systems reconstruction (Hess et al. 2023, GTF), integrated locally.

Each system is an ODE :math:`\dot s = f(s)`; a trajectory is sampled every ``dt`` time units after a
``burn_in`` of steps that brings it onto the attractor, integrated by SciPy with ``rtol = atol = 1e-10``
(``method="odeint"``, the default: ODEPACK's LSODA through ``scipy.integrate.odeint``, ~8× faster than
``solve_ivp`` on 10⁵ samples; any ``scipy.integrate.solve_ivp`` method, e.g. ``"DOP853"``, otherwise), returned
float32 ``[T, N]``.

- ``lorenz63`` (Lorenz 1963): :math:`\dot x = \sigma(y - x),\ \dot y = x(\rho - z) - y,\ \dot z = xy - \beta z`,
  σ = 10, ρ = 28, β = 8/3 (N = 3; maximal Lyapunov exponent ≈ 0.906).
- ``rossler`` (Rössler 1976): :math:`\dot x = -y - z,\ \dot y = x + ay,\ \dot z = b + z(x - c)`,
  a = b = 0.2, c = 5.7 (N = 3; maximal Lyapunov exponent ≈ 0.07).
- ``lorenz96`` (Lorenz 1996): :math:`\dot x_i = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F`, cyclic, F = 8
  (N = ``dim``, default 10).

:func:`dataset` gives the paper's setting: a training and a test trajectory from two initial conditions,
both standardised by the training trajectory's clean mean and std, and Gaussian observation noise of
``noise`` × (standardised) std on the training copy (the paper: 5 %, 10⁵ steps, dt = 0.01 for Lorenz-63).

The right-hand sides take ``xp`` (``numpy`` or ``jax.numpy``) and :func:`rk4_step` is plain arithmetic, so the
same vector field gives a differentiable map for Lyapunov exponents (``seqjax.analysis.dynamics``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy.integrate import odeint, solve_ivp

from seqjax import _checks

__all__ = [
    "SYSTEMS", "DEFAULT_DT", "lorenz63_rhs", "rossler_rhs", "lorenz96_rhs", "vector_field", "rk4_step", "simulate",
    "standardise", "add_noise", "check_trajectory", "DynamicsData", "dataset",
]

SYSTEMS = ("lorenz63", "rossler", "lorenz96")
#: the sampling step of each system (Lorenz-63 as in the paper's data; Rössler is ~10× slower)
DEFAULT_DT = {"lorenz63": 0.01, "rossler": 0.1, "lorenz96": 0.01}


def _stack(xp, parts):
    # one state (the ODE solver's callback, ~10^6 calls): np.array is ~6x cheaper than stacking
    return np.array(parts) if xp is np and np.ndim(parts[0]) == 0 else xp.stack(parts, axis=-1)


def lorenz63_rhs(s, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0, xp=np):
    x, y, z = s[..., 0], s[..., 1], s[..., 2]
    return _stack(xp, [sigma * (y - x), x * (rho - z) - y, x * y - beta * z])


def rossler_rhs(s, a: float = 0.2, b: float = 0.2, c: float = 5.7, xp=np):
    x, y, z = s[..., 0], s[..., 1], s[..., 2]
    return _stack(xp, [-y - z, x + a * y, b + z * (x - c)])


def lorenz96_rhs(s, forcing: float = 8.0, xp=np):
    return (xp.roll(s, -1, axis=-1) - xp.roll(s, 2, axis=-1)) * xp.roll(s, 1, axis=-1) - s + forcing


_RHS = {"lorenz63": lorenz63_rhs, "rossler": rossler_rhs, "lorenz96": lorenz96_rhs}


def vector_field(system: str, xp=np, **params):
    """``f(s) -> ds/dt`` of ``system`` on arrays of ``xp`` (``numpy`` or ``jax.numpy``), ``s`` ``[..., N]``."""
    _checks.check_choice("system", system, SYSTEMS)
    return functools.partial(_RHS[system], xp=xp, **params)


def rk4_step(f, s, dt: float):
    """One classical Runge–Kutta step of ``ds/dt = f(s)``; plain arithmetic, so it traces under ``jax``."""
    k1 = f(s)
    k2 = f(s + 0.5 * dt * k1)
    k3 = f(s + 0.5 * dt * k2)
    k4 = f(s + dt * k3)
    return s + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _initial_state(system: str, dim: int, rng) -> np.ndarray:
    if system == "lorenz96":
        return 8.0 + rng.normal(0.0, 0.5, dim)
    return rng.normal(0.0, 1.0, 3) + (np.array([0.0, 0.0, 25.0]) if system == "lorenz63" else 0.0)


def simulate(system: str, n_steps: int, *, dt: float | None = None, burn_in: int = 1000, dim: int = 10,
             seed: int = 0, x0=None, method: str = "odeint", rtol: float = 1e-10, atol: float = 1e-10,
             **params) -> np.ndarray:
    """``n_steps`` states ``[n_steps, N]`` float32 of ``system`` sampled every ``dt`` after ``burn_in`` steps.

    ``x0``: the initial state ``[N]`` (default: random from ``seed`` near the attractor); ``dim``: Lorenz-96's N.
    """
    f = vector_field(system, **params)
    dt = DEFAULT_DT[system] if dt is None else float(dt)
    if n_steps < 1 or burn_in < 0 or dt <= 0:
        raise ValueError(f"need n_steps >= 1, burn_in >= 0 and dt > 0, got {n_steps}, {burn_in}, {dt}")
    n = 3 if system != "lorenz96" else dim
    if system == "lorenz96" and dim < 4:
        raise ValueError(f"lorenz96 needs dim >= 4, got {dim}")
    if x0 is None:
        x0 = _initial_state(system, n, np.random.default_rng(seed))
    x0 = np.asarray(x0, np.float64)
    if x0.shape != (n,):
        raise ValueError(f"x0 must have shape [{n}] for {system}, got {list(x0.shape)}")
    t_eval = dt * np.arange(burn_in + n_steps)
    if method == "odeint":
        y, info = odeint(lambda s, t: f(s), x0, t_eval, rtol=rtol, atol=atol, full_output=True, mxstep=100_000)
        if info["message"] != "Integration successful.":
            raise RuntimeError(f"odeint failed on {system}: {info['message']}")
    else:
        sol = solve_ivp(lambda t, s: f(s), (0.0, t_eval[-1]), x0, method=method, t_eval=t_eval, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed on {system}: {sol.message}")
        y = sol.y.T
    return check_trajectory("trajectory", y[burn_in:].astype(np.float32), n)


def check_trajectory(name: str, x, dim: int | None = None) -> np.ndarray:
    """``x`` as a float ``[T, N]`` numpy array with every entry finite (and ``N == dim`` if given), else a
    ``ValueError`` that names the argument."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [T, N] (time, state dim), got {list(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have state dim N = {dim}, got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a float dtype, got {x.dtype}")
    bad = ~np.isfinite(x)
    if bad.any():
        t = int(np.argwhere(bad)[0, 0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite (NaN/inf) entries, the first at time step {t}")
    return x


def standardise(x, mean=None, std=None):
    """``(x - mean) / std`` per state dim (default: ``x``'s own); returns ``(z, mean, std)``."""
    x = check_trajectory("x", x)
    mean = x.mean(0) if mean is None else np.asarray(mean)
    std = x.std(0) if std is None else np.asarray(std)
    return ((x - mean) / std).astype(np.float32), mean, std


def add_noise(x, level: float, seed: int = 0):
    """``x`` plus Gaussian noise of std ``level`` × ``x``'s std per dim (observation noise)."""
    x = check_trajectory("x", x)
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    rng = np.random.default_rng(seed)
    return (x + level * x.std(0) * rng.standard_normal(x.shape)).astype(np.float32)


@dataclasses.dataclass
class DynamicsData:
    train: np.ndarray  # [T, N] standardised, with observation noise
    test: np.ndarray  # [T_test, N] standardised, clean, another initial condition
    train_clean: np.ndarray  # [T, N] the training trajectory before noise
    system: str
    dt: float
    mean: np.ndarray  # [N] the standardisation (clean training trajectory)
    std: np.ndarray


def dataset(system: str = "lorenz63", n_train: int = 100_000, n_test: int | None = None, *, noise: float = 0.05,
            dt: float | None = None, burn_in: int = 1000, dim: int = 10, seed: int = 0) -> DynamicsData:
    """The paper's data: a noisy standardised training trajectory and a clean test one (see module doc)."""
    dt = DEFAULT_DT.get(system, 0.0) if dt is None else dt
    raw = simulate(system, n_train, dt=dt, burn_in=burn_in, dim=dim, seed=2 * seed)
    raw_test = simulate(system, n_train if n_test is None else n_test, dt=dt, burn_in=burn_in, dim=dim,
                        seed=2 * seed + 1)
    clean, mean, std = standardise(raw)
    test, _, _ = standardise(raw_test, mean, std)
    return DynamicsData(add_noise(clean, noise, seed), test, clean, system, float(dt), mean, std)
