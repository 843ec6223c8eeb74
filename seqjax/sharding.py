"""Logical-axis sharding: layers name their axes, one rules table maps names to mesh axes.

Minimal surface used by layers (the pretraining issue grows this module):

- ``constrain(x, ("batch", "length", "embed"))``: a sharding constraint on an activation by logical
  names; a no-op outside a :func:`use_rules` context, so the same layer code runs unsharded.
- ``use_rules(mesh, rules)``: a context in which logical names map to mesh axes.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import NamedSharding, PartitionSpec

_STATE: dict = {"mesh": None, "rules": None}


def logical_to_spec(names, rules) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


@contextlib.contextmanager
def use_rules(mesh, rules):
    old = dict(_STATE)
    _STATE.update(mesh=mesh, rules=tuple(rules))
    try:
        yield
    finally:
        _STATE.update(old)


def constrain(x, names):
    """Constrain activation ``x`` to the sharding its logical axis ``names`` map to (if any)."""
    mesh, rules = _STATE["mesh"], _STATE["rules"]
    if mesh is None or rules is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: names {names} do not match x of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
