r"""Annealed gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very Deep
Networks").

At update ``t = 0, 1, 2, ...`` every gradient entry gets independent Gaussian noise:

.. math::  g_t \leftarrow g_t + \mathcal N(0, \sigma_t^2), \qquad \sigma_t^2 = \frac{\eta}{(1 + t)^{\gamma}},

with the paper's ``gamma = 0.55`` and ``eta`` in {0.01, 0.3, 1.0}. Put it after gradient clipping and before
the optimizer: ``optax.chain(optax.clip_by_global_norm(c), gradient_noise(eta), optax.sgd(lr))``.

The transform is ``optax.add_noise``'s, with its key held as raw ``uint32`` data (so that orbax saves the
optimizer state as plain arrays); ``noise_variance`` is its schedule as a function.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

__all__ = ["GAMMA", "noise_variance", "gradient_noise"]

#: the paper's annealing exponent
GAMMA = 0.55


def _check(eta, gamma) -> None:
    if not (isinstance(eta, numbers.Real) and eta >= 0):
        raise ValueError(f"eta (the noise variance at t = 0) must be a number >= 0, got {eta!r}")
    if not (isinstance(gamma, numbers.Real) and gamma >= 0):
        raise ValueError(f"gamma (the annealing exponent) must be a number >= 0, got {gamma!r}")


def noise_variance(t, eta: float, gamma: float = GAMMA) -> Float[Array, "*t"]:
    """``sigma_t^2 = eta / (1 + t)^gamma`` in float32 for update index ``t >= 0`` (an int or an int array)."""
    _check(eta, gamma)
    t = jnp.asarray(t)
    return jnp.float32(eta) / (1.0 + t.astype(jnp.float32)) ** jnp.float32(gamma)


def gradient_noise(eta: float, gamma: float = GAMMA, seed: int = 0) -> optax.GradientTransformation:
    """Add ``N(0, noise_variance(t, eta, gamma))`` to every gradient entry; ``t`` counts this transform's updates.

    State: ``optax.AddNoiseState(count int32 [], rng_key uint32 [2])``.
    """
    _check(eta, gamma)

    def init(params):
        del params
        return optax.AddNoiseState(count=jnp.zeros([], jnp.int32), rng_key=jax.random.key_data(jax.random.key(seed)))

    def update(grads, state, params=None):
        del params
        std = jnp.sqrt(noise_variance(state.count, eta, gamma))
        key, sample = jax.random.split(jax.random.wrap_key_data(state.rng_key))
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.random.split(sample, max(len(leaves), 1))
        noisy = [g + (std * jax.random.normal(k, jnp.shape(g), jnp.float32)).astype(jnp.result_type(g))
                 for g, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, noisy), optax.AddNoiseState(count=state.count + 1, rng_key=jax.random.key_data(key))

    return optax.GradientTransformation(init, update)
