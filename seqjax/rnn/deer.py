r"""Parallel-in-time evaluation of a nonlinear recurrence: DEER, quasi-DEER and quasi-ELK.

Given :math:`s_t = f(s_{t-1}, x_t)` for ``t = 0..T-1`` from :math:`s_{-1} = s_0`, guess all states at once
and refine them with Newton's method on the residual :math:`s_t - f(s_{t-1})` (Lim et al. 2024, "Parallelizing
non-linear sequential models over the sequence length", DEER). Linearising around the guess
:math:`s^{(i)}` gives a *linear* recurrence, solved in parallel over time:

.. math::  s^{(i+1)}_t = J_t\, s^{(i+1)}_{t-1} + r_t,\qquad J_t = \partial f/\partial s\,(s^{(i)}_{t-1}),\quad
           r_t = f(s^{(i)}_{t-1}) - J_t s^{(i)}_{t-1}.

``mode="full"``   DEER: full ``N x N`` Jacobians (``N = S*H``), ``lax.associative_scan`` on ``(J, r)`` pairs
                  with ``(J_1, r_1) . (J_2, r_2) = (J_2 J_1, J_2 r_1 + r_2)``: O(N^3 log T) work, exact Newton
                  (quadratic convergence).
``mode="quasi"``  quasi-DEER (Gonzalez et al. 2024, "Towards scalable and stable parallelization of nonlinear
                  RNNs"): the diagonal of ``J_t`` only, so each iteration is one diagonal linear scan
                  (:func:`seqjax.linear_scan`); O(N) memory per step, linear convergence.
``damping=λ > 0`` quasi-ELK (same paper): a Levenberg–Marquardt step that also pulls towards the current
                  guess, minimising :math:`\sum_t (s_t - a_t s_{t-1} - r_t)^2 + λ (s_t - s^{(i)}_t)^2` per
                  channel. Its normal equations are tridiagonal (the paper solves them as a Kalman smoother);
                  here they are solved **in parallel over time**: the Thomas algorithm's pivots obey a Möbius
                  recurrence :math:`c_t = \mathrm{sup}_t / (\mathrm{diag}_t + a_t c_{t-1})`, i.e. projective
                  products of ``2 x 2`` matrices, one ``lax.associative_scan`` (each product rescaled by its
                  largest entry: only ratios matter); the eliminated right-hand side and the back-substitution
                  are then two diagonal linear scans (:func:`seqjax.linear_scan`). The system is symmetric
                  positive definite, so the pivots are positive and no pivoting is needed.
                  ``_solve_damped_sequential`` is the plain Thomas sweep it is tested against.

Either way the fixed point is the exact sequential solution, reached in at most ``T`` iterations (after
``i`` iterations the first ``i`` states are exact). Iteration stops when
:math:`\max |s^{(i+1)} - s^{(i)}| \le` ``tol`` or at ``max_iters`` (default ``T``); the iterations used and the
last update size are reported.

Gradients do not go through the iterations: at the solution, the implicit function theorem gives the
adjoint recurrence :math:`\lambda_t = \bar s_t + J_{t+1}^\top \lambda_{t+1}` — one more (transposed, reversed)
linear scan (associative over full Jacobians for ``"full"``; for ``"quasi"`` an exact sequential scan of
VJPs, since a diagonal adjoint would be wrong) — then one batched VJP of ``f`` gives the parameter and input
gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import _checks
from seqjax.rnn import cells as _cells
from seqjax.scan import linear_scan

__all__ = ["deer", "MODES"]

MODES = ("full", "quasi")


def _flat_step(kind, params, s, xp):
    """``s`` ``[n, N]`` flat state, ``xp`` ``[n, G, K, D]`` -> ``[n, N]``."""
    n, (g, _, d) = s.shape[0], xp.shape[1:]
    out = _cells.step(kind, params, s.reshape(n, -1, g, d), xp)
    return out.reshape(n, -1)


def _over_time(fn, s, xp):
    """Apply a per-step map to all ``[b, t, ...]`` pairs at once (time folded into batch)."""
    b, t = s.shape[:2]
    out = fn(s.reshape(b * t, *s.shape[2:]), xp.reshape(b * t, *xp.shape[2:]))
    return out.reshape(b, t, *out.shape[1:])


def _full_jacobian(kind, params, s, xp):
    one = lambda s1, x1: _flat_step(kind, params, s1[None], x1[None])[0]
    return jax.vmap(jax.jacfwd(one))(s, xp)  # [n, N, N]


def _diag_jacobian(kind, params, s, xp):
    n, (g, _, d) = s.shape[0], xp.shape[1:]
    return _cells.diag_jacobian(kind, params, s.reshape(n, -1, g, d), xp).reshape(n, -1)


def _solve_full(J, r, h0):
    """``h_t = J_t h_{t-1} + r_t`` with matrix ``J`` ``[b, t, N, N]``, by an associative scan."""
    r = r.at[:, 0].add(jnp.einsum("bij,bj->bi", J[:, 0], h0))

    def combine(e1, e2):
        j1, r1 = e1
        j2, r2 = e2
        return jnp.einsum("...ij,...jk->...ik", j2, j1), jnp.einsum("...ij,...j->...i", j2, r1) + r2

    _, h = lax.associative_scan(combine, (J, r), axis=1)
    return h


def _damped_system(a, r, h0, guess, lam):
    """Normal equations of the damped step: sub-diagonal ``-a_t`` (coefficient of ``s_{t-1}``), super-diagonal
    ``-a_{t+1}``, diagonal ``1 + λ + a_{t+1}²``; ``s_{-1} = h0`` moved to the right-hand side."""
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    r_next = jnp.concatenate([r[:, 1:], jnp.zeros_like(r[:, :1])], axis=1)
    diag = 1.0 + lam + a_next * a_next
    rhs = r + lam * guess - a_next * r_next
    rhs = rhs.at[:, 0].add(a[:, 0] * h0)
    return a_next, diag, rhs


def _solve_damped(a, r, h0, guess, lam, scan_impl="auto"):
    r"""Minimise :math:`\sum_t (s_t - a_t s_{t-1} - r_t)^2 + λ(s_t - g_t)^2` per channel, parallel in time.

    Thomas forward sweep with sub-diagonal ``-a_t`` and super-diagonal ``sup_t = -a_{t+1}``:
    ``c_t = sup_t / den_t``, ``den_t = diag_t + a_t c_{t-1}``. Writing ``c_t = u_t / w_t``,
    ``(u_t, w_t) = [[0, sup_t], [a_t, diag_t]] (u_{t-1}, w_{t-1})`` from ``(0, 1)``: the prefix products come
    from one associative scan. Then ``d_t = (a_t d_{t-1} + rhs_t) / den_t`` and ``x_t = d_t - c_t x_{t+1}``
    are diagonal linear recurrences.
    """
    a_next, diag, rhs = _damped_system(a, r, h0, guess, lam)
    a0 = a.at[:, 0].set(0.0)  # s_{-1} is fixed (moved to the rhs)
    sup = -a_next
    zero = jnp.zeros_like(a0)
    mats = jnp.stack([jnp.stack([zero, sup], -1), jnp.stack([a0, diag], -1)], -2)  # [b, t, n, 2, 2]

    def combine(m1, m2):  # m1 earlier, m2 later: the product m2 @ m1, rescaled (projective)
        p = jnp.einsum("...ij,...jk->...ik", m2, m1)
        return p / jnp.max(jnp.abs(p), axis=(-2, -1), keepdims=True)

    prods = lax.associative_scan(combine, mats, axis=1)
    c = prods[..., 0, 1] / prods[..., 1, 1]  # (u_t, w_t) = P_t (0, 1)
    c_prev = jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=1)
    den = diag + a0 * c_prev
    d = linear_scan(a0 / den, rhs / den, impl=scan_impl)[0]
    return linear_scan(-c, d, reverse=True, impl=scan_impl)[0]


def _solve_damped_sequential(a, r, h0, guess, lam):
    r"""Minimise :math:`\sum_t (s_t - a_t s_{t-1} - r_t)^2 + λ(s_t - g_t)^2` per channel (Thomas algorithm)."""
    a_next, diag, rhs = _damped_system(a, r, h0, guess, lam)

    def fwd(carry, inp):
        c_prev, d_prev = carry
        a_t, diag_t, rhs_t, sup_t = inp
        den = diag_t + a_t * c_prev  # diag_t - sub_t * c_prev with sub_t = -a_t
        c = sup_t / den
        dd = (rhs_t + a_t * d_prev) / den
        return (c, dd), (c, dd)

    zeros = jnp.zeros_like(h0)
    a0 = a.at[:, 0].set(0.0)  # s_{-1} is fixed (moved to the rhs)
    tm = lambda v: jnp.moveaxis(v, 1, 0)
    _, (c, dd) = lax.scan(fwd, (zeros, zeros), (tm(a0), tm(diag), tm(rhs), tm(-a_next)))

    def bwd(x_next, inp):
        c_t, d_t = inp
        x = d_t - c_t * x_next
        return x, x

    _, x = lax.scan(bwd, zeros, (c, dd), reverse=True)
    return jnp.moveaxis(x, 0, 1)


def _newton(kind, mode, damping, scan_impl, params, xp, h0, states):
    prev = jnp.concatenate([h0[:, None], states[:, :-1]], axis=1)
    fs = _over_time(functools.partial(_flat_step, kind, params), prev, xp)
    if mode == "full":
        J = _over_time(functools.partial(_full_jacobian, kind, params), prev, xp)
        return _solve_full(J, fs - jnp.einsum("btij,btj->bti", J, prev), h0)
    a = _over_time(functools.partial(_diag_jacobian, kind, params), prev, xp)
    r = fs - a * prev
    if damping > 0:
        return _solve_damped(a, r, h0, states, damping, scan_impl)
    return linear_scan(a, r, h0=h0, impl=scan_impl)[0]


def _solve(kind, mode, tol, max_iters, damping, scan_impl, params, xp, h0):
    b, t = xp.shape[:2]
    init = jnp.zeros((b, t, h0.shape[1]), jnp.float32)

    def cond(c):
        i, _, err = c
        return (i < max_iters) & (err > tol)

    def body(c):
        i, s, _ = c
        new = _newton(kind, mode, damping, scan_impl, params, xp, h0, s)
        return i + 1, new, jnp.max(jnp.abs(new - s))

    iters, states, err = lax.while_loop(cond, body, (jnp.int32(0), init, jnp.float32(jnp.inf)))
    return states, iters, err


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _deer(kind, mode, tol, max_iters, damping, scan_impl, params, xp, h0):
    return _solve(kind, mode, tol, max_iters, damping, scan_impl, params, xp, h0)


def _deer_fwd(kind, mode, tol, max_iters, damping, scan_impl, params, xp, h0):
    out = _solve(kind, mode, tol, max_iters, damping, scan_impl, params, xp, h0)
    return out, (params, xp, h0, out[0])


def _deer_bwd(kind, mode, tol, max_iters, damping, scan_impl, res, cts):
    params, xp, h0, states = res
    g = cts[0]
    prev = jnp.concatenate([h0[:, None], states[:, :-1]], axis=1)
    if mode == "full":
        J = _over_time(functools.partial(_full_jacobian, kind, params), prev, xp)
        jt_next = jnp.concatenate([jnp.swapaxes(J[:, 1:], -1, -2), jnp.zeros_like(J[:, :1])], axis=1)
        lam = jnp.flip(_solve_full(jnp.flip(jt_next, 1), jnp.flip(g, 1), jnp.zeros_like(h0)), 1)
    else:

        def body(u, inp):  # u = J_{t+1}^T lam_{t+1}
            g_t, prev_t, xp_t = inp
            lam_t = g_t + u
            _, vjp = jax.vjp(lambda s: _flat_step(kind, params, s, xp_t), prev_t)
            return vjp(lam_t)[0], lam_t

        tm = lambda v: jnp.moveaxis(v, 1, 0)
        _, lam = lax.scan(body, jnp.zeros_like(h0), (tm(g), tm(prev), tm(xp)), reverse=True)
        lam = jnp.moveaxis(lam, 0, 1)
    _, vjp = jax.vjp(
        lambda p, s, x: _over_time(functools.partial(_flat_step, kind, p), s, x), params, prev, xp
    )
    dparams, dprev, dxp = vjp(lam)
    return dparams, dxp, dprev[:, 0]


_deer.defvjp(_deer_fwd, _deer_bwd)


def deer(kind: str, params: dict, xp, s0, *, mode: str = "quasi", tol: float = 1e-5,
         max_iters: int | None = None, damping: float = 0.0, scan_impl: str = "auto"):
    """Evaluate cell ``kind`` over ``xp`` ``[b, t, G, K, D]`` from ``s0`` ``[b, S, G, D]`` in parallel.

    Returns ``(states [b, t, S, G, D] float32, info)`` with ``info = {"iters": int32 scalar,
    "residual": max |last update|}``. ``scan_impl`` picks the :func:`seqjax.linear_scan` impl of
    quasi-DEER. Differentiable (implicit function theorem; see the module docstring).
    """
    _checks.check_choice("mode", mode, MODES)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if damping > 0 and mode != "quasi":
        raise ValueError("damping (ELK) is implemented for mode='quasi' only")
    b, t, g, k, d = xp.shape
    max_iters = t if max_iters is None else int(max_iters)
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    states, iters, err = _deer(kind, mode, float(tol), max_iters, float(damping), scan_impl,
                               params, xp, s0.reshape(b, -1))
    return states.reshape(b, t, -1, g, d), {"iters": iters, "residual": err}
