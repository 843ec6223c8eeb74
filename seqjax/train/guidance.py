r"""Guidance (Subramaniam et al. 2024, "Training the Untrainable: Introducing Inductive Bias via Representational
Alignment"): train a target network on its task loss plus the dissimilarity of its layer representations to
those of a frozen guide network, trained or random.

.. math::  L = L_\text{task}(\theta_T) + \lambda \sum_{(j, i) \in I} \bigl(1 - \mathrm{CKA}(A^\text{target}_j, A^\text{guide}_i)\bigr)

on the activations of one mini-batch (``seqjax.analysis.cka``; linear or RBF kernel). The guide's activations
are constants (``stop_gradient``). Layer pairing by depth (the paper's mapping): with ``n_t`` target and
``n_g`` guide layers, guide layer ``i`` pairs with target layer ``round(i (n_t - 1) / (n_g - 1))`` (a one-layer
guide pairs with the last target layer); a guide deeper than its target cannot be paired one-to-one and is an
error. ``tokenwise=True`` takes sequence activations ``[b, t, d]`` position by position (CKA on each ``[b, d]``
slice, averaged over positions) instead of flattening each example.

Any seqjax model works: the caller collects the layer activations it wants (e.g. each layer's output of a
``StackedRNN``, or each block's of an MLP) as a list, the guide's the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from seqjax.analysis import cka as cka_lib

__all__ = ["pair_layers", "guidance_loss", "guided_loss"]


def pair_layers(n_target: int, n_guide: int) -> list[tuple[int, int]]:
    """``[(target layer, guide layer), ...]``: guide layer ``i`` to target ``round(i (n_t - 1) / (n_g - 1))``."""
    if n_target < 1 or n_guide < 1:
        raise ValueError(f"cannot pair layers: the target has {n_target} and the guide {n_guide} (both need >= 1)")
    if n_guide > n_target:
        raise ValueError(
            f"cannot pair a guide of {n_guide} layers with a target of {n_target} by depth (two guide layers would share "
            f"one target layer); pass fewer guide layers or explicit pairs=[(target, guide), ...]")
    if n_guide == 1:
        return [(n_target - 1, 0)]
    return [(int(np.floor(i * (n_target - 1) / (n_guide - 1) + 0.5)), i) for i in range(n_guide)]


def _check_pairs(pairs, n_t: int, n_g: int) -> None:
    for j, i in pairs:
        if not (0 <= j < n_t and 0 <= i < n_g):
            raise ValueError(f"pair (target {j}, guide {i}) is out of range: the target has {n_t} layers, the guide {n_g}")


def guidance_loss(target_acts: Sequence[Float[Array, "b ..."]], guide_acts: Sequence[Float[Array, "b ..."]], *,
                  pairs: Sequence[tuple[int, int]] | None = None, kernel: str = "linear", tokenwise: bool = False,
                  debiased: bool = False, threshold: float = 1.0) -> Float[Array, ""]:
    """``sum over pairs (j, i) of 1 - CKA(target_acts[j], stop_gradient(guide_acts[i]))``.

    ``pairs`` default :func:`pair_layers` by depth. Every activation's axis 0 is the batch (the same examples in
    both networks); ``tokenwise`` needs ``[b, t, d]`` activations of equal ``t``.
    """
    target_acts, guide_acts = list(target_acts), list(guide_acts)
    pairs = pair_layers(len(target_acts), len(guide_acts)) if pairs is None else list(pairs)
    if not pairs:
        raise ValueError("cannot pair layers: pairs is empty")
    _check_pairs(pairs, len(target_acts), len(guide_acts))
    total = jnp.zeros((), jnp.float32)
    for j, i in pairs:
        a, g = target_acts[j], jax.lax.stop_gradient(guide_acts[i])
        if np.shape(a)[0] != np.shape(g)[0]:
            raise ValueError(f"target layer {j} has {np.shape(a)[0]} examples and guide layer {i} has {np.shape(g)[0]}: "
                             "both networks must see the same batch")
        if tokenwise:
            if np.ndim(a) != 3 or np.ndim(g) != 3 or np.shape(a)[1] != np.shape(g)[1]:
                raise ValueError(f"tokenwise needs [b, t, d] activations of equal t, got target layer {j} "
                                 f"{list(np.shape(a))} and guide layer {i} {list(np.shape(g))}")
            one = lambda x, y: cka_lib.cka(x, y, kernel, threshold=threshold, debiased=debiased)
            total = total + 1.0 - jnp.mean(jax.vmap(one, in_axes=1)(a, g))
        else:
            total = total + 1.0 - cka_lib.cka(a, g, kernel, threshold=threshold, debiased=debiased)
    return total


def guided_loss(task_loss, target_acts, guide_acts, weight: float, **kw) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``(task_loss + weight * guidance_loss(...), guidance_loss(...))``; ``weight = 0`` skips the CKA terms."""
    if weight == 0:
        return task_loss, jnp.zeros((), jnp.float32)
    g = guidance_loss(target_acts, guide_acts, **kw)
    return task_loss + weight * g, g
