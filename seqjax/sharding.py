"""Logical-axis sharding: layers name their axes, one rules table maps names to mesh axes.

The mesh has four axes, outer (slow network) to inner: ``data`` (pure data parallel), ``fsdp``
(data parallel with parameters, gradients and optimizer state sharded), ``context`` (sequence
parallel) and ``tensor`` (heads / MLP width). Sizes come from config with at most one ``-1``.

Parameters carry logical names (``nnx.with_partitioning`` / ``nnx.Param(..., out_sharding=...)``, from
``seqjax.types.LOGICAL_AXES``); activations are constrained at block boundaries with
``constrain(x, ("batch", "length", "embed"))``. Weights and activations use *separate* tables in
:class:`Rules` (MaxText's lesson: ``embed -> fsdp`` for weights would collide with
``batch -> (data, fsdp)`` on an activation).

Resolution (:func:`logical_to_spec`): each logical name maps to a tuple of mesh axes; a mesh axis used
twice in one spec is a rules bug and raises; mesh axes whose product does not divide the dimension are
dropped (so ``kv_heads=2`` on ``tensor=4`` stays replicated) and reported by :func:`validate`.

Sharded initialisation (:func:`sharded_init`): ``nnx.eval_shape`` gives abstract parameters with their
logical names -> ``NamedSharding`` per leaf -> ``jax.jit(init, out_shardings=...)``, so a model too big
for one device is never materialised on one.

Layers call ``constrain`` / ``use_rules``; outside a :func:`use_rules` context ``constrain`` is a
no-op, so the same layer code runs unsharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Parameters carry logical names as metadata only; this module turns them into shardings (under jit
# with out_shardings). Flax >= 0.12 would otherwise try to shard each variable eagerly at creation and
# refuse to build a model outside a mesh.
flax.config.update("flax_always_shard_variable", False)

__all__ = [
    "MESH_AXES",
    "Rules",
    "DEFAULT_RULES",
    "make_mesh",
    "resolve_mesh_shape",
    "logical_to_spec",
    "logical_axes",
    "param_shardings",
    "validate",
    "sharded_init",
    "use_rules",
    "constrain",
    "current",
]

MESH_AXES = ("data", "fsdp", "context", "tensor")

Axes = Any  # None | str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical name -> mesh axes, one table for parameters and one for activations."""

    params: tuple[tuple[str, Axes], ...]
    activations: tuple[tuple[str, Axes], ...]

    def table(self, kind: str) -> dict:
        return dict(self.params if kind == "params" else self.activations)


DEFAULT_RULES = Rules(
    params=(
        ("vocab", "tensor"),
        ("embed", ("fsdp", "context")),  # context devices also shard weights (ZeRO-3 style), as in MaxText
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("state", None),
        ("conv", None),
        ("layers", None),
        ("norm", None),
    ),
    activations=(
        ("batch", ("data", "fsdp")),
        ("length", "context"),
        ("embed", None),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("state", None),
        ("conv", None),
        ("layers", None),
        ("norm", None),
    ),
)


# --------------------------------------------------------------------------------------------- mesh
def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
    """Fill the one ``-1`` in ``shape`` (one size per axis of :data:`MESH_AXES`) from ``num_devices``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must give one size per axis {MESH_AXES}")
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} uses {math.prod(shape)} devices, have {num_devices}")
    return shape


def make_mesh(shape=(1, -1, 1, 1), devices=None) -> Mesh:
    """A ``(data, fsdp, context, tensor)`` mesh over ``devices`` (default: all), axis types Auto.

    ``jax.devices()`` is ordered by process, so the outer axes (``data``, then ``fsdp``) span hosts
    and the inner ones (``context``, ``tensor``) stay on the fast local interconnect.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# -------------------------------------------------------------------------------------- resolution
def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names, rules, shape=None, mesh=None, *, kind="params", notes=None) -> PartitionSpec:
    """Resolve logical axis ``names`` to a ``PartitionSpec``.

    ``rules`` is a :class:`Rules` (``kind`` picks its table) or a sequence of ``(name, axes)`` pairs.
    With ``shape`` and ``mesh``, size-1 mesh axes are omitted and mesh axes that do not divide their
    dimension are dropped (a message is appended to ``notes``). Unknown names and a mesh axis used
    twice raise ``ValueError``.
    """
    table = rules.table(kind) if isinstance(rules, Rules) else dict(rules)
    if shape is not None and len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in the {kind} table {sorted(table)}")
        axes = _as_tuple(table[name])
        dup = used.intersection(axes)
        if dup:
            raise ValueError(f"logical names {tuple(names)} map mesh axis {sorted(dup)} twice ({kind} rules)")
        used.update(axes)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None:
                while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    if notes is not None:
                        notes.append(f"{name}={shape[i]} not divisible by mesh axis {axes[-1]}={mesh.shape[axes[-1]]}")
                    axes = axes[:-1]
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _var_names(v: nnx.Variable):
    md = v.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if md.get(key) is not None:
            return tuple(md[key])
    return None


def logical_axes(state) -> dict:
    """Pure dict (same structure as ``state.to_pure_dict()``) of each variable's logical names (or None)."""
    axes = jax.tree.map(lambda v: _LogicalLeaf(_var_names(v)), state, is_leaf=_is_var)
    return jax.tree.map(lambda leaf: leaf.names, nnx.to_pure_dict(axes), is_leaf=lambda x: isinstance(x, _LogicalLeaf))


@dataclasses.dataclass(frozen=True)
class _LogicalLeaf:
    names: Any


def _specs(state, mesh, rules, notes=None):
    """Pure dicts of (PartitionSpec, logical names) for each leaf of an (abstract) nnx.State."""
    values = nnx.to_pure_dict(state)
    names = logical_axes(state)

    def one(path, value, nm):
        if nm is None:
            return PartitionSpec()
        sub = [] if notes is not None else None
        spec = logical_to_spec(nm, rules, value.shape, mesh, notes=sub)
        if sub:
            notes.extend(f"{jax.tree_util.keystr(path)}: {s}" for s in sub)
        return spec

    specs = jax.tree_util.tree_map_with_path(one, values, names, is_leaf=lambda x: x is None)
    return values, names, specs


def param_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """``NamedSharding`` for each leaf of an (abstract) ``nnx.State``, as a pure dict."""
    _, _, specs = _specs(state, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


@dataclasses.dataclass
class ShardingReport:
    num_params: int
    unannotated: list[str]  # leaves with no logical names
    dropped: list[str]  # mesh axes dropped for divisibility
    replicated_fraction: float  # fraction of parameter elements with no mesh axis at all
    max_shard_fraction: float  # largest per-device share of parameter elements (1 / devices if perfect)

    def __str__(self):
        return (
            f"{self.num_params / 1e6:.2f}M params; replicated {100 * self.replicated_fraction:.1f}%, "
            f"per-device share {100 * self.max_shard_fraction:.1f}%"
            + (f"; unannotated: {self.unannotated}" if self.unannotated else "")
            + (f"; dropped: {len(self.dropped)} axis assignments" if self.dropped else "")
        )


def validate(state, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, tolerance: float | None = None) -> ShardingReport:
    """Check every parameter resolves to a valid spec; report replicated / unannotated parameters.

    Raises ``ValueError`` on unknown logical names or duplicated mesh axes, and if ``tolerance`` is
    given and more than that fraction of parameter elements is unsharded while the mesh has
    model-sharding axes (``fsdp``, ``context``, ``tensor``) larger than 1.
    """
    notes: list[str] = []
    values, names, specs = _specs(state, mesh, rules, notes)
    total = replicated = 0
    per_device = 0.0
    unannotated = []
    flat_v = jax.tree_util.tree_leaves_with_path(values)
    flat_s = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_n = jax.tree_util.tree_leaves(names, is_leaf=lambda x: x is None or isinstance(x, tuple))
    for (path, v), spec, nm in zip(flat_v, flat_s, flat_n):
        n = math.prod(v.shape)
        total += n
        if nm is None and v.ndim > 0:
            unannotated.append(jax.tree_util.keystr(path))
        axes = [a for entry in spec for a in _as_tuple(entry)]
        if not axes:
            replicated += n
        per_device += n / math.prod(mesh.shape[a] for a in axes) if axes else n
    report = ShardingReport(total, unannotated, notes, replicated / max(total, 1), per_device / max(total, 1))
    model_axes = mesh.shape["fsdp"] * mesh.shape["context"] * mesh.shape["tensor"]
    if tolerance is not None and model_axes > 1 and report.replicated_fraction > tolerance:
        raise ValueError(f"{100 * report.replicated_fraction:.1f}% of parameters are unsharded (> {tolerance:.1%})")
    return report


# ------------------------------------------------------------------------------------------- init
def sharded_init(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Build ``make_model()`` directly into its shardings.

    Returns ``(graphdef, params, rest, param_shardings)``: ``params`` a pure dict of sharded
    ``nnx.Param`` arrays, ``rest`` the other variables (replicated). ``make_model`` runs once under
    ``nnx.eval_shape`` (no memory) and once inside ``jax.jit(..., out_shardings=...)``.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    p_shard = param_shardings(abs_params, mesh, rules)
    r_shard = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), nnx.to_pure_dict(abs_rest))

    def init():
        _, p, r = nnx.split(make_model(), nnx.Param, ...)
        return nnx.to_pure_dict(p), nnx.to_pure_dict(r)

    init = jax.jit(init, out_shardings=(p_shard, r_shard))
    with use_rules(mesh, rules):
        params, rest = init()
    return graphdef, params, rest, p_shard


def abstract_params(make_model: Callable[[], nnx.Module]):
    """``(graphdef, abstract params state, abstract rest state)`` without allocating anything."""
    abstract = nnx.eval_shape(make_model)
    return nnx.split(abstract, nnx.Param, ...)


# ------------------------------------------------------------------------------------ activations
_STATE: dict = {"mesh": None, "rules": None}


def current():
    """``(mesh, rules)`` of the innermost :func:`use_rules` context (``(None, None)`` outside)."""
    return _STATE["mesh"], _STATE["rules"]


@contextlib.contextmanager
def use_rules(mesh, rules=DEFAULT_RULES):
    """A context in which :func:`constrain` maps logical names to ``mesh`` axes.

    ``rules`` is a :class:`Rules` (its activation table is used) or a sequence of ``(name, axes)``.
    """
    old = dict(_STATE)
    _STATE.update(mesh=mesh, rules=rules if isinstance(rules, Rules) else tuple(rules))
    try:
        yield
    finally:
        _STATE.update(old)


def context_mesh(t: int, axis: str = "context"):
    """The mesh of the innermost :func:`use_rules` if its ``axis`` splits a length-``t`` time axis (size > 1
    and dividing ``t``), else ``None``. Layers use it to take their context-parallel forms
    (``seqjax.ops.context_parallel``) instead of leaving a sharded time axis to GSPMD."""
    mesh = _STATE["mesh"]
    p = 1 if mesh is None else dict(mesh.shape).get(axis, 1)
    return mesh if p > 1 and t % p == 0 else None


def constrain(x, names):
    """Constrain activation ``x`` to the sharding its logical axis ``names`` map to (if any)."""
    mesh, rules = _STATE["mesh"], _STATE["rules"]
    if mesh is None or rules is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: names {names} do not match x of shape {x.shape}")
    spec = logical_to_spec(names, rules, x.shape, mesh, kind="activations")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
