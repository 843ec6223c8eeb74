"""The protocol every sequence layer keeps, and the plumbing around its math that every layer shares.

A sequence layer (every mixer's ``layer`` in ``seqjax.mixers``, ``seqjax.attention.Attention``) is a Flax
NNX module::

    y, cache = layer(x, *, segment_ids=None, cache=None)   # x, y: [b, t, d_model]
    cache = layer.init_cache(batch_size, max_len)          # a NamedTuple of arrays (a pytree)

With ``cache=None`` it returns ``None`` for the cache; with a cache it continues from it (prefill with
``t > 1``, decode with ``t == 1``) and returns the updated one. ``segment_ids [b, t]`` (int) mark packed
documents: no token sees another document.

Around its math every layer does the same three things; :func:`plan` does them once:

1. **segment ids to resets**: ``resets [b, t]`` is ``True`` at each document's first token, except at the
   first token of a continued cache, which continues the cached document. A layer whose fresh cache
   starts a document (``fresh=``: JRT's prefix, RG-LRU's normalisation) says so.
2. **the carried state**: ``h0`` is ``cache.state`` (``None`` without a cache). A recurrent layer's
   cache keeps the functional form's state in a field named ``state`` (:class:`StateCache` when that is
   all it keeps; a family with more, e.g. short-convolution states, has its own NamedTuple).
3. **the form**: the one-token step (a cache, ``t == 1``, no reset), the context-parallel form (no
   cache, the layer has one, and the time axis is split over the ``context`` axis of the mesh of the
   innermost ``seqjax.sharding.use_rules``, see ``seqjax.sharding.context_mesh``), else the parallel form.

:func:`update` returns the continued cache (``None`` without one).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from seqjax import sharding
from seqjax.nn import resets_from_segment_ids

__all__ = ["StateCache", "Plan", "plan", "update"]


class StateCache(NamedTuple):
    """The cache of a layer whose only memory is its recurrence's state (the functional form's ``h``)."""

    state: Any


class Plan(NamedTuple):
    """How a layer runs one call (see the module docstring)."""

    resets: Any  # [b, t] bool or None
    h0: Any  # the carried state, None without a cache
    decode: bool  # take the one-token step form
    mesh: Any  # a jax.sharding.Mesh: take the context-parallel form


def plan(x, *, segment_ids=None, cache=None, context_parallel: bool = False, fresh=None) -> Plan:
    """Resets, carried state and form for one call of a layer on ``x [b, t, ...]``.

    ``context_parallel``: whether the layer has a context-parallel form for this call.
    ``fresh``: ``[b]`` or ``[]`` bool, whether the cache is fresh (its first token starts a document);
    only for layers whose document start is more than a zero state.
    """
    t = x.shape[1]
    resets = resets_from_segment_ids(segment_ids)
    if cache is not None:
        if resets is not None:
            resets = resets.at[:, 0].set(False)  # the block continues the cached document
        if fresh is not None:
            first = jnp.broadcast_to(jnp.asarray(fresh, bool), (x.shape[0],))
            resets = jnp.zeros((x.shape[0], t), bool) if resets is None else resets
            resets = resets.at[:, 0].set(resets[:, 0] | first)
    h0 = getattr(cache, "state", None)
    decode = cache is not None and t == 1 and resets is None
    mesh = sharding.context_mesh(t) if cache is None and context_parallel else None
    return Plan(resets, h0, decode, mesh)


def update(cache, **fields):
    """``cache`` with ``fields`` replaced (``cache._replace``), or ``None`` without a cache."""
    return None if cache is None else cache._replace(**fields)
