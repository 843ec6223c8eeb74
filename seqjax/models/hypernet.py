r"""Dependency-preserving RNN hypernetworks for continual learning (Chandra, Varshney, Srijith & Gupta, WACV 2023),
on the chunked task-conditioned hypernetwork of von Oswald, Henning, Sacramento & Grewe (ICLR 2020).

A hypernetwork :math:`f_h(e_t, \Theta)` maps a learned task embedding :math:`e_t` to *all* the weights of a
target network. The RNN hypernetwork emits them chunk by chunk: at step :math:`i` an LSTM reads the task
embedding and a learned chunk embedding :math:`c_i`,

.. math::  s_i = \mathrm{LSTM}(s_{i-1}, [e_t; c_i]), \qquad w^{(i)} = W_o h_i + b_o \in \mathbb R^{n_c},

and the chunks :math:`w^{(0)} \Vert w^{(1)} \Vert \dots` cut to the target's size are its flat weights. The
state :math:`s_i` carries every earlier chunk into the next, so a layer's weights depend on the layers before it
(the "dependency preserving" of the paper), with one small recurrent generator for any target size.

The target is any parameter pytree (arrays, ``jax.ShapeDtypeStruct``\ s, an ``nnx.State``) described once by
:func:`target_spec`. Leaf ``j`` of the generated pytree is ``offset_j + scale_j · raw_j`` cast to the leaf's
dtype, where ``raw`` is the hypernetwork's flat output (started at unit variance) and ``offset_j``, ``scale_j``
are the mean and standard deviation of the reference values (of ``1/√fan_in`` and 0 without values), so
every target leaf starts at the scale of its own initialisation. :func:`functional_target` turns any NNX model
into ``(spec tree, apply(weights, *args))``.

Functional core: :func:`init` ``(key, spec, num_tasks, ...) -> params``, :func:`add_task`, :func:`generate`
``(params, spec, task_ids) -> raw [n_tasks, size]``, :func:`unflatten` ``(spec, raw [size]) -> weights``,
:func:`weights` ``(params, spec, task_id) -> weights``. :class:`HyperNetwork` is the NNX module. A task id
without an embedding (one the hypernetwork has not seen) raises a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from seqjax import _checks
from seqjax.rnn import cells as _cells
from seqjax.rnn.functional import rnn

__all__ = ["TargetSpec", "target_spec", "functional_target", "init", "add_task", "generate", "unflatten",
           "weights", "num_tasks", "HyperNetwork"]


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """The target network's parameter layout: tree structure, leaf shapes, dtypes, and the per-leaf
    ``offset``/``scale`` that map the hypernetwork's unit-scale output onto each leaf."""

    treedef: jax.tree_util.PyTreeDef
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[float, ...]
    scales: tuple[float, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)


def target_spec(tree, *, min_scale: float = 0.1) -> TargetSpec:
    """Describe a target parameter pytree. With values (arrays), each leaf's offset/scale are its mean and
    standard deviation (at least ``min_scale``); with shapes only (``jax.ShapeDtypeStruct``), offset 0 and
    scale ``1/√shape[0]`` for leaves of 2+ dims, ``min_scale`` for vectors and scalars."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError("tree has no leaves: the target needs at least one parameter")
    shapes, dtypes, offsets, scales = [], [], [], []
    for i, leaf in enumerate(leaves):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(f"leaf {i} of tree is {type(leaf).__name__}; expected an array or jax.ShapeDtypeStruct")
        _checks.check_dtype(f"leaf {i} of tree", leaf, "float")
        shapes.append(tuple(int(s) for s in leaf.shape))
        dtypes.append(np.dtype(leaf.dtype))
        if isinstance(leaf, jax.ShapeDtypeStruct):
            offsets.append(0.0)
            scales.append(1.0 / math.sqrt(leaf.shape[0]) if len(leaf.shape) >= 2 and leaf.shape[0] else min_scale)
        else:
            v = np.asarray(leaf, np.float64)
            offsets.append(float(v.mean()) if v.size else 0.0)
            scales.append(max(float(v.std()) if v.size else 0.0, min_scale))
    return TargetSpec(treedef, tuple(shapes), tuple(dtypes), tuple(offsets), tuple(scales))


def functional_target(model: nnx.Module, wrt=nnx.Param) -> tuple[object, Callable]:
    """``(params, apply)`` for an NNX model: ``params`` is its ``wrt`` state (give it to :func:`target_spec`)
    and ``apply(weights, *args, **kw)`` calls the model with ``weights`` (a pytree of that structure) in place
    of its own — a pure function of the weights."""
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def apply(w, *args, **kw):
        return nnx.merge(graphdef, w, rest)(*args, **kw)

    return params, apply


def unflatten(spec: TargetSpec, raw: Float[Array, " size"]):
    """Flat unit-scale hypernetwork output ``[spec.size]`` -> the target's weight pytree (``offset + scale·raw``
    per leaf, in the leaf's shape and dtype)."""
    _checks.check_shape("raw", raw, (spec.size,), "[target size]")
    out, start = [], 0
    for shape, dtype, off, sc, n in zip(spec.shapes, spec.dtypes, spec.offsets, spec.scales, spec.sizes):
        out.append((off + sc * raw[start : start + n].astype(jnp.float32)).reshape(shape).astype(dtype))
        start += n
    return jax.tree.unflatten(spec.treedef, out)


def num_tasks(params: dict) -> int:
    """The number of tasks with an embedding (ids ``0 .. num_tasks − 1``)."""
    return int(params["task_emb"].shape[0])


def init(key, spec: TargetSpec, num_tasks: int = 1, *, task_dim: int = 32, chunk_dim: int = 16,
         hidden: int = 64, chunk_size: int = 1024) -> dict:
    """Random float32 parameters of an LSTM hypernetwork for ``spec``: ``task_emb`` ``[num_tasks, task_dim]``,
    ``chunk_emb`` ``[ceil(size / chunk_size), chunk_dim]`` (both N(0, 1)), ``rnn`` (an LSTM
    ``task_dim + chunk_dim → hidden``, :mod:`seqjax.rnn.cells` layout) and the chunk head ``w_out``
    ``[hidden, chunk_size]``, ``b_out`` ``[chunk_size]``. The head is rescaled so the raw output of task 0 (the
    first ``spec.size`` values) has unit standard deviation (then every target leaf starts at its ``scale``);
    with ``num_tasks == 0`` it is rescaled on the output of a random N(0, 1) embedding instead, which stands
    for the first task :func:`add_task` adds."""
    for name, v in (("task_dim", task_dim), ("chunk_dim", chunk_dim), ("hidden", hidden), ("chunk_size", chunk_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    k_task, k_chunk, k_rnn, k_out = jax.random.split(key, 4)
    chunks = -(-spec.size // chunk_size)
    params = {
        "task_emb": jax.random.normal(k_task, (num_tasks, task_dim), jnp.float32),
        "chunk_emb": jax.random.normal(k_chunk, (chunks, chunk_dim), jnp.float32),
        "rnn": _cells.init_params("lstm", k_rnn, task_dim + chunk_dim, hidden),
        "w_out": jax.random.normal(k_out, (hidden, chunk_size), jnp.float32) / math.sqrt(hidden),
        "b_out": jnp.zeros((chunk_size,), jnp.float32),
    }
    emb0 = params["task_emb"][:1] if num_tasks >= 1 else jax.random.normal(k_task, (1, task_dim), jnp.float32)
    probe = dict(params, task_emb=emb0)
    params["w_out"] = params["w_out"] / jnp.std(_generate(probe, jnp.zeros((1,), jnp.int32))[0, : spec.size])
    return params


def add_task(params: dict, key) -> dict:
    """``params`` with one more task embedding (N(0, 1)); the new task's id is ``num_tasks(params)`` before."""
    new = jax.random.normal(key, (1, params["task_emb"].shape[1]), jnp.float32)
    return dict(params, task_emb=jnp.concatenate([params["task_emb"], new], 0))


def _check_ids(params: dict, task_ids):
    ids = _checks.concrete_or_none(task_ids)
    if ids is None:  # traced ids: the caller's jit owns the range
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"task_ids must be integers, got dtype {ids.dtype}")
    n = num_tasks(params)
    bad = ids[(ids < 0) | (ids >= n)]
    if bad.size:
        raise ValueError(f"task id {int(bad.flat[0])} has not been seen by this hypernetwork: it has embeddings for "
                         f"tasks 0..{n - 1} (add_task() gives a new task its embedding)")


def _generate(params: dict, ids):
    emb = params["task_emb"][ids]  # [n, e]
    chunks = params["chunk_emb"]  # [c, k]
    x = jnp.concatenate([jnp.broadcast_to(emb[:, None], (emb.shape[0], chunks.shape[0], emb.shape[1])),
                         jnp.broadcast_to(chunks[None], (emb.shape[0],) + chunks.shape)], -1)
    h, _ = rnn("lstm", params["rnn"], x)  # [n, c, hidden]: chunk i sees every chunk before it through the state
    out = h @ params["w_out"] + params["b_out"][None, None]  # [n, c, chunk]
    return out.reshape(out.shape[0], -1)


def generate(params: dict, spec: TargetSpec, task_ids: int | Sequence[int]) -> Float[Array, "n size"]:
    """The raw (unit-scale) flat weights for each of ``task_ids`` ``[n, spec.size]`` (an int gives ``n = 1``)."""
    _check_ids(params, task_ids)
    ids = jnp.atleast_1d(jnp.asarray(task_ids, jnp.int32))
    out = _generate(params, ids)
    if out.shape[1] < spec.size:
        raise ValueError(f"params generate {out.shape[1]} weights, fewer than the target's {spec.size}: they were "
                         "made by init() for another spec")
    return out[:, : spec.size]


def weights(params: dict, spec: TargetSpec, task_id: int):
    """The target's weight pytree for ``task_id`` (:func:`generate` then :func:`unflatten`)."""
    return unflatten(spec, generate(params, spec, task_id)[0])


class HyperNetwork(nnx.Module):
    """An LSTM hypernetwork for the target ``target`` (a parameter pytree, or an NNX model whose ``nnx.Param``
    state is the target). ``hnet(task_id)`` -> the target's weight pytree; ``hnet.raw(task_ids)`` -> ``[n, size]``;
    ``hnet.add_task(rngs)`` -> the new task's id. With an NNX model, ``hnet.apply(weights, *args)`` runs it."""

    def __init__(self, target, num_tasks: int = 1, *, task_dim: int = 32, chunk_dim: int = 16, hidden: int = 64,
                 chunk_size: int = 1024, rngs: nnx.Rngs):
        if isinstance(target, nnx.Module):
            target, self.apply = functional_target(target)
        self.spec = target_spec(target)
        p = init(rngs.params(), self.spec, num_tasks, task_dim=task_dim, chunk_dim=chunk_dim, hidden=hidden,
                 chunk_size=chunk_size)
        self.task_emb = nnx.Param(p["task_emb"])
        self.chunk_emb = nnx.Param(p["chunk_emb"])
        self.rnn = nnx.data({k: nnx.Param(v) for k, v in p["rnn"].items()})
        self.w_out = nnx.Param(p["w_out"])
        self.b_out = nnx.Param(p["b_out"])

    def param_dict(self) -> dict:
        return {"task_emb": self.task_emb[...], "chunk_emb": self.chunk_emb[...],
                "rnn": {k: v[...] for k, v in self.rnn.items()}, "w_out": self.w_out[...], "b_out": self.b_out[...]}

    @property
    def num_tasks(self) -> int:
        return int(self.task_emb.shape[0])

    def add_task(self, rngs: nnx.Rngs) -> int:
        self.task_emb = nnx.Param(add_task(self.param_dict(), rngs.params())["task_emb"])
        return self.num_tasks - 1

    def raw(self, task_ids) -> jax.Array:
        return generate(self.param_dict(), self.spec, task_ids)

    def __call__(self, task_id: int):
        return unflatten(self.spec, self.raw(task_id)[0])
