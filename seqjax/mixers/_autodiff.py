"""One function computed by one form and differentiated through another."""

from __future__ import annotations

import jax

__all__ = ["primal_by"]


def primal_by(primal_fn, diff_fn):
    """``f(*args)`` that evaluates ``primal_fn(*args)`` when it is not differentiated and ``diff_fn(*args)``
    (with its own VJP) under ``jax.grad`` / ``jax.vjp``. Both must compute the same function with the same
    output structure and dtypes. Forward-mode autodiff (``jax.jvp``) is not available through ``f``.

    The mixers use it on the CPU for ``impl="auto"``: the ``lax.scan`` reference is the fastest forward there
    (prefill, evaluation), the chunked form the fastest forward+backward (``benchmarks/results/cpu_mixers.md``).
    """

    @jax.custom_vjp
    def f(*args):
        return primal_fn(*args)

    def fwd(*args):
        out, pullback = jax.vjp(diff_fn, *args)
        return out, pullback

    def bwd(pullback, ct):
        return pullback(ct)

    f.defvjp(fwd, bwd)
    return f
