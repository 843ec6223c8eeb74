r"""Autocorrelation timescales of activity (the network-mediated timescale ``τ_net`` of Khajehabdollahi et al. 2024).

For one unit's activity on ``n`` independent trials ``x [n, T]``: subtract each trial's mean, take the
autocovariance at lags ``k = 0..max_lag`` with the unbiased normalisation ``1/(T − k)`` (through an FFT of the
zero-padded series), average over trials, divide by lag 0, and fit

.. math::  \mathrm{AC}(k) \approx a\, e^{-k/\tau}  \quad (k = 0..\mathrm{fit\_lag})

by least squares, ``a ∈ [0, 1]``, ``τ ∈ (0, max_tau]``. With ``double=True`` a two-exponential fit
``a (c e^{-k/τ_1} + (1−c) e^{-k/τ_2})`` competes by AIC (when both components carry weight) and the slower of
its two timescales is returned, as in the paper's analysis. A stationary AR(1) process ``x_t = a x_{t−1} + ε_t``
has ``AC(k) = a^k``, so ``τ = −1/log a``.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Array, Float
from scipy.optimize import curve_fit

__all__ = ["autocorrelation", "fit_timescale", "unit_timescales"]


def autocorrelation(x: Float[Array, "n t"], max_lag: int) -> np.ndarray:
    """Trial-averaged autocovariance of ``x`` ``[n, T]`` at lags ``0..max_lag`` (``[max_lag + 1]``, not normalised)."""
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"x must be [trials, time], got shape {x.shape}")
    t = x.shape[1]
    if not 1 <= max_lag < t:
        raise ValueError(f"max_lag must be in [1, T) with T={t}, got {max_lag}")
    xc = x - x.mean(axis=1, keepdims=True)
    f = np.fft.rfft(xc, n=2 * t, axis=1)
    acov = np.fft.irfft(np.abs(f) ** 2, n=2 * t, axis=1)[:, : max_lag + 1]
    return (acov / (t - np.arange(max_lag + 1))).mean(axis=0)


def _exp1(k, a, tau):
    return a * np.exp(-k / tau)


def _exp2(k, a, tau1, tau2, c):
    return a * (c * np.exp(-k / tau1) + (1 - c) * np.exp(-k / tau2))


def _aic(y, yfit, k):
    rss = max(float(np.sum((yfit - y) ** 2)), 1e-300)
    return 2 * k + len(y) * np.log(rss / len(y))


def fit_timescale(ac, fit_lag: int, *, double: bool = False, max_tau: float = 100.0, min_weight: float = 0.05) -> float:
    """The decay timescale of the autocovariance ``ac`` (lag 0 first) fitted on lags ``0..fit_lag``; NaN when the
    activity does not vary (``ac[0] <= 0``) or no fit converges. A two-exponential fit counts only when each
    component carries at least ``min_weight`` of the amplitude (otherwise its second timescale is unidentified)."""
    ac = np.asarray(ac, np.float64)
    if not 1 <= fit_lag < len(ac):
        raise ValueError(f"fit_lag must be in [1, len(ac)) with len(ac)={len(ac)}, got {fit_lag}")
    if not ac[0] > 1e-12:
        return float("nan")
    k = np.arange(fit_lag + 1, dtype=np.float64)
    y = ac[: fit_lag + 1] / ac[0]
    best_aic, best_tau = np.inf, float("nan")
    try:
        p1, _ = curve_fit(_exp1, k, y, p0=(1.0, 2.0), bounds=((0.0, 1e-6), (1.0, max_tau)), maxfev=2000)
        best_aic, best_tau = _aic(y, _exp1(k, *p1), 2), float(p1[1])
    except (RuntimeError, ValueError):
        pass
    if double:
        try:
            p2, _ = curve_fit(_exp2, k, y, p0=(1.0, 1.0, 10.0, 0.5),
                              bounds=((0.0, 1e-6, 1e-6, 0.0), (1.0, max_tau, max_tau, 1.0)), maxfev=2000)
            aic2 = _aic(y, _exp2(k, *p2), 4)
            if aic2 < best_aic and min(p2[3], 1 - p2[3]) >= min_weight:
                best_aic, best_tau = aic2, float(max(p2[1], p2[2]))
        except (RuntimeError, ValueError):
            pass
    return best_tau


def unit_timescales(activity: Float[Array, "n t h"], *, burn: int = 100, max_lag: int = 50, fit_lag: int = 30,
                    double: bool = True, max_tau: float = 100.0) -> np.ndarray:
    """``τ_net`` of every unit ``[H]`` from activity ``[trials, T, H]`` after dropping the first ``burn`` steps
    (NaN for units whose activity does not vary)."""
    a = np.asarray(activity, np.float64)
    if a.ndim != 3:
        raise ValueError(f"activity must be [trials, time, units], got shape {a.shape}")
    if not 0 <= burn < a.shape[1] - max_lag:
        raise ValueError(f"burn must be in [0, T - max_lag) with T={a.shape[1]}, max_lag={max_lag}, got {burn}")
    a = a[:, burn:]
    return np.array([fit_timescale(autocorrelation(a[:, :, j], max_lag), fit_lag, double=double, max_tau=max_tau)
                     for j in range(a.shape[2])])
