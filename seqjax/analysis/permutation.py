"""Exact learning of permutations (Giapitzakis, Back de Luca & Fountoulakis 2025): 2-layer ReLU networks trained by
gradient descent on only the ``k`` standard basis vectors ``e_j → P e_j`` of a permutation ``P``; the rounded mean
of an ensemble of independently initialised networks is exact on all ``2^k − 1`` nonzero binary inputs.

A member is ``f(x) = W₂ ReLU(W₁ x / √k + b₁) / √m + b₂`` (NTK parameterisation, ``W ~ N(0, σ_w²)``; or the
standard one of the paper's code, ``W ~ N(0, σ_w²/fan_in)`` unscaled; biases start at 0 and are trained), width
``m``, full-batch GD on the squared error. Test inputs are L2-normalised (as the
paper's code does); the ensemble mean is rounded by sign (``> 0 → 1``, the paper's code) or to the input's
number of ones (``"top_s"``, see :func:`round_outputs`). In the infinite-width limit each member is
a Gaussian process whose mean is ``P a(x)`` with ``a`` larger on the input's support than off it; averaging cuts
the noise. The paper bounds the ensemble size by ``O(k log k)`` for one input and ``O(k²)`` for all inputs at once.

Members are trained together (``jax.vmap``), so an ensemble of a few hundred small networks is one jitted scan.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from seqjax import _checks

__all__ = ["MAX_ENUMERATE_K", "ROUNDINGS", "PARAMETERIZATIONS", "permutation_pairs",
           "nonzero_binary_inputs", "init_members", "apply", "train_ensemble",
           "round_outputs", "exact_fraction", "ensemble_size_needed"]

#: largest k whose 2^k − 1 nonzero binary inputs :func:`nonzero_binary_inputs` will list
MAX_ENUMERATE_K = 20


def permutation_pairs(perm) -> tuple[np.ndarray, np.ndarray]:
    """The training set ``X = I_k`` and ``Y`` with ``Y[j] = P e_j = e_{perm[j]}``."""
    perm = np.asarray(perm)
    k = len(perm)
    if perm.ndim != 1 or sorted(perm.tolist()) != list(range(k)):
        raise ValueError(f"perm must be a permutation of 0..k-1 as a [k] int array, got {perm.tolist()}")
    return np.eye(k, dtype=np.float32), np.eye(k, dtype=np.float32)[perm]


def nonzero_binary_inputs(k: int, normalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All ``2^k − 1`` nonzero binary vectors (``[2^k − 1, k]``): the raw 0/1 vectors and the inputs the network
    sees (L2-normalised when ``normalise``)."""
    if not 1 <= k <= MAX_ENUMERATE_K:
        raise ValueError(f"k={k} is too large to enumerate its 2^k - 1 nonzero binary inputs (at most "
                         f"k={MAX_ENUMERATE_K}); sample inputs instead")
    bits = np.array(list(itertools.product((0, 1), repeat=k))[1:], dtype=np.float32)
    x = bits / np.linalg.norm(bits, axis=1, keepdims=True) if normalise else bits
    return bits, x


PARAMETERIZATIONS = ("ntk", "standard")


def init_members(key, n: int, k: int, width: int, sigma_w: float = 1.0, parameterization: str = "ntk") -> dict:
    """``n`` members' parameters, stacked on a leading axis. ``"ntk"``: ``W ~ N(0, σ_w²)`` scaled by
    ``1/√fan_in`` in :func:`apply`; ``"standard"`` (the paper's code): ``W ~ N(0, σ_w²/fan_in)``, unscaled."""
    _checks.check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    k1, k2 = jax.random.split(key)
    s1, s2 = (1.0, 1.0) if parameterization == "ntk" else (k**-0.5, width**-0.5)
    return {"W1": sigma_w * s1 * jax.random.normal(k1, (n, k, width)), "b1": jnp.zeros((n, width)),
            "W2": sigma_w * s2 * jax.random.normal(k2, (n, width, k)), "b2": jnp.zeros((n, k))}


def apply(p: dict, x: Float[Array, "b k"], parameterization: str = "ntk") -> Float[Array, "b k"]:
    """One member's output (unstacked parameters)."""
    k, m = p["W1"].shape
    s1, s2 = (k**-0.5, m**-0.5) if parameterization == "ntk" else (1.0, 1.0)
    h = jax.nn.relu(x @ p["W1"] * s1 + p["b1"][None, :])
    return h @ p["W2"] * s2 + p["b2"][None, :]


def train_ensemble(key, perm, n: int, width: int, steps: int = 1000, lr: float | None = None, sigma_w: float = 1.0,
                   parameterization: str = "ntk") -> dict:
    """``n`` members trained by full-batch GD on ``L = ½ Σ_j ‖f(e_j) − P e_j‖²`` for ``steps`` steps. ``lr``
    defaults to ``0.9 / λ_max`` of the kernel ``Θ(X, X)`` at infinite width: ``0.9 / k`` (NTK) or
    ``0.9 / (σ_w² m (1/2k + 1/2π) + 2 + k)`` (standard: the weights' part ``σ_w² m (1/2k + 1/2π)`` plus a bound
    ``2 + k`` on the biases' part, which the width does not scale down)."""
    X, Y = (jnp.asarray(a) for a in permutation_pairs(perm))
    k = len(perm)
    if lr is None:
        lr = 0.9 / k if parameterization == "ntk" else 0.9 / (sigma_w**2 * width * (0.5 / k + 0.5 / np.pi) + 2 + k)
    params = init_members(key, n, k, width, sigma_w, parameterization)
    return _train(params, X, Y, jnp.float32(lr), steps, parameterization)


@functools.partial(jax.jit, static_argnames=("steps", "parameterization"))
def _train(params, X, Y, lr, steps, parameterization):
    loss = lambda p: 0.5 * jnp.sum((apply(p, X, parameterization) - Y) ** 2)

    def step(p, _):
        g = jax.vmap(jax.grad(loss))(p)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), None

    return jax.lax.scan(step, params, None, length=steps)[0]


ROUNDINGS = ("sign", "top_s")


def round_outputs(mean, bits=None, rounding: str = "sign") -> np.ndarray:
    """``"sign"`` (the paper's code): ``1`` where the ensemble mean is positive, else ``0``. ``"top_s"``: the ``s``
    largest coordinates, ``s`` the number of ones of the input (``bits``), since ``P x`` has as many ones as ``x``;
    it needs only the mean's on-support level above its off-support level, which also holds on the training
    inputs, where the sign rule sits on its boundary (off-support outputs fitted to exactly 0)."""
    _checks.check_choice("rounding", rounding, ROUNDINGS)
    mean = np.asarray(mean)
    if rounding == "sign":
        return (mean > 0).astype(np.int32)
    if bits is None:
        raise ValueError("rounding='top_s' needs bits (the 0/1 inputs) to know how many ones each output has")
    s = np.asarray(bits).sum(1).astype(int)
    rank = np.argsort(np.argsort(-mean, axis=1, kind="stable"), axis=1)
    return (rank < s[:, None]).astype(np.int32)


def exact_fraction(mean, bits, perm, rounding: str = "sign") -> float:
    """Fraction of inputs (``bits [n, k]`` 0/1) whose rounded output equals ``P x`` in every coordinate."""
    target = np.asarray(bits)[:, np.argsort(np.asarray(perm))]  # (P x)_i = x_{perm⁻¹(i)}
    return float((round_outputs(mean, bits, rounding) == target).all(axis=1).mean())


def ensemble_size_needed(outputs, bits, perm, delta: float = 0.0, rounding: str = "sign") -> int:
    """The smallest ``N`` such that the mean of the first ``N`` members' ``outputs`` (``[members, inputs, k]``)
    is exact on at least ``1 − delta`` of the inputs (and stays so for every larger N up to all members); ``-1`` if
    never."""
    outputs = np.asarray(outputs, np.float64)
    if outputs.ndim != 3 or outputs.shape[1:] != np.shape(bits):
        raise ValueError(f"outputs must be [members, inputs, k] matching bits {list(np.shape(bits))}, got "
                         f"{list(outputs.shape)}")
    means = np.cumsum(outputs, axis=0) / np.arange(1, len(outputs) + 1)[:, None, None]
    ok = np.array([exact_fraction(m, bits, perm, rounding) >= 1 - delta - 1e-12 for m in means])
    if not ok[-1]:
        return -1
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 2) if len(bad) else 1
