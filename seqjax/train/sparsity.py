r"""Sparse RNNs (Darji 2021, "Investigating Sparsity in Recurrent Neural Networks"): magnitude pruning on a
schedule, and recurrent connectivity drawn from random graphs.

Works on any parameter pytree: a pure ``nnx.State`` (what ``nnx.Optimizer`` hands optax), a plain dict, a list.
A leaf is named by its path joined with dots (``"rnn.layers.0.R"``); a **filter** ``(name, leaf) -> bool``
selects the weights to sparsify. :func:`rnn_weights` selects the input (``W``) and/or recurrent (``R``)
matrices of ``seqjax.rnn`` layers; :func:`by_name` takes any regular expression.

A **mask** is a dict ``{name: bool array of the leaf's shape}`` over the selected leaves (``True`` = kept).

- :func:`magnitude_mask`: keep the largest ``|w|``; exactly ``round(sparsity * N)`` weights pruned, ``N``
  pooled over all selected leaves (``scope="global"``, the thesis's pooled percentile) or per leaf.
- :func:`prune`: an optax transform (chain it last) that keeps the selected weights masked after every update
  (``p + u`` is ``0`` wherever the mask is off, exactly) and recomputes the mask by magnitude at
  ``begin, begin + every, ..., end`` with the target ``sparsity(t)`` — a constant (one-shot) or
  :func:`polynomial_schedule` (gradual pruning, Zhu & Gupta 2017). Pruned weights stay pruned: they are zero,
  so the next mask drops them first.
- :func:`fixed_mask`: the same transform with a given mask (random-graph connectivity).
- :func:`graph`, :func:`recurrent_mask`: the recurrent matrix ``R`` ``[G, D, K, D]`` of every selected layer
  masked by the adjacency of a Watts–Strogatz, Barabási–Albert or Erdős–Rényi graph on its ``H = G*D`` units
  (``A_ij = 1``: unit ``i`` feeds every gate of unit ``j``); :func:`graph_properties` gives the features that
  the thesis regresses accuracy on (clustering, path length, degree statistics, ...). ``networkx`` is needed
  for these (``pip install networkx``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import _checks

__all__ = [
    "GRAPHS", "leaf_name", "by_name", "rnn_weights", "select", "magnitude_mask", "apply_mask", "sparsity_of",
    "polynomial_schedule", "prune", "fixed_mask", "PruneState", "graph", "graph_properties", "recurrent_mask",
]

GRAPHS = ("watts_strogatz", "barabasi_albert", "erdos_renyi")

Filter = Callable[[str, object], bool]


# ----------------------------------------------------------------------------- selecting weights


def leaf_name(path) -> str:
    """Dotted name of a pytree path (``nnx.Variable``'s ``.value`` attribute is dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def by_name(pattern: str, min_ndim: int = 2) -> Filter:
    """Leaves whose dotted name matches the regular expression ``pattern`` (``re.search``), of ``>= min_ndim`` dims."""
    rx = re.compile(pattern)
    return lambda name, leaf: bool(rx.search(name)) and np.ndim(leaf) >= min_ndim


def rnn_weights(recurrent: bool = True, inputs: bool = True) -> Filter:
    """``seqjax.rnn`` layers' recurrent ``R`` ``[G, D, K, D]`` and/or input ``W`` ``[d_in, G, K, D]`` weights."""
    names = [n for n, on in (("R", recurrent), ("W", inputs)) if on]
    if not names:
        raise ValueError("rnn_weights: select at least one of recurrent=True, inputs=True")
    return by_name(r"(^|\.)(" + "|".join(names) + r")$", min_ndim=4)


def select(params, filter: Filter) -> dict:
    """``{name: leaf}`` of the leaves ``filter`` selects; a clear error if it selects none."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {leaf_name(p): leaf for p, leaf in flat if filter(leaf_name(p), leaf)}
    if not out:
        names = [leaf_name(p) for p, _ in flat]
        raise ValueError(f"the filter selects no parameter; the leaves are {names[:20]}{' ...' if len(names) > 20 else ''}")
    return out


# ----------------------------------------------------------------------------- masks


def _check_sparsity(sparsity) -> None:
    if isinstance(sparsity, (int, float, np.floating)) and not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity (the fraction of weights pruned) must be in [0, 1), got {sparsity}")


def _keep_largest(mags: list, sparsity):
    """Masks keeping all but the ``round(sparsity * N)`` smallest of ``mags`` pooled (ties: lower index pruned first)."""
    flat = jnp.concatenate([m.reshape(-1) for m in mags])
    n = flat.shape[0]
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
    rank = jnp.zeros(n, jnp.int32).at[jnp.argsort(flat, stable=True)].set(jnp.arange(n, dtype=jnp.int32))
    keep = rank >= k
    out, i = [], 0
    for m in mags:
        out.append(keep[i : i + m.size].reshape(m.shape))
        i += m.size
    return out


def magnitude_mask(params, sparsity, filter: Filter | None = None, *, scope: str = "global", mask: dict | None = None) -> dict:
    """Mask of the selected weights keeping the largest ``|w|``: exactly ``round(sparsity * N)`` pruned.

    ``scope="global"``: one threshold over all selected weights pooled (``N`` their total count);
    ``"layer"``: ``round(sparsity * N_leaf)`` pruned in each leaf. ``mask``: an existing mask whose pruned weights
    count as zero. ``sparsity`` in ``[0, 1)`` (may be a traced scalar under ``jit``).
    """
    _check_sparsity(sparsity)
    _checks.check_choice("scope", scope, ("global", "layer"))
    leaves = select(params, filter or rnn_weights())
    names = list(leaves)
    mags = [jnp.abs(jnp.asarray(leaves[n], jnp.float32)) * (mask[n] if mask is not None else 1.0) for n in names]
    if scope == "global":
        return dict(zip(names, _keep_largest(mags, sparsity)))
    return {n: _keep_largest([m], sparsity)[0] for n, m in zip(names, mags)}


def apply_mask(params, mask: dict):
    """``params`` with every masked leaf multiplied by its mask (unmasked leaves unchanged)."""
    _check_mask(params, mask)

    def one(path, leaf):
        m = mask.get(leaf_name(path))
        return leaf if m is None else jnp.where(m, leaf, jnp.zeros((), leaf.dtype))

    return jax.tree_util.tree_map_with_path(one, params)


def sparsity_of(params, filter: Filter | None = None) -> float:
    """Fraction of exactly-zero entries among the selected weights."""
    leaves = select(params, filter or rnn_weights())
    zeros = sum(int(np.sum(np.asarray(v) == 0)) for v in leaves.values())
    return zeros / sum(int(np.size(v)) for v in leaves.values())


def _check_mask(params, mask: dict) -> None:
    shapes = {leaf_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name, m in mask.items():
        if name not in shapes:
            raise ValueError(f"mask entry {name!r} is not a parameter; the parameters are {list(shapes)[:20]}")
        if np.shape(m) != shapes[name]:
            raise ValueError(f"mask[{name!r}] has shape {list(np.shape(m))}, the parameter {list(shapes[name])}")


# ----------------------------------------------------------------------------- optax transforms


def polynomial_schedule(final: float, begin: int, end: int, initial: float = 0.0, power: float = 3.0) -> Callable:
    """Gradual pruning (Zhu & Gupta 2017): ``s_t = final + (initial - final) (1 - (t - begin)/(end - begin))^power``
    for ``begin <= t <= end`` (``initial`` before, ``final`` after)."""
    _check_sparsity(final)
    _check_sparsity(initial)
    if end <= begin:
        raise ValueError(f"end must be > begin, got begin={begin}, end={end}")

    def sched(t):
        frac = jnp.clip((jnp.asarray(t, jnp.float32) - begin) / (end - begin), 0.0, 1.0)
        return final + (initial - final) * (1.0 - frac) ** power

    return sched


class PruneState(NamedTuple):
    count: jax.Array  # updates seen, int32 []
    mask: dict  # {name: bool array}, True = kept


def _masked_updates(updates, params, mask):
    """``u`` where kept, ``-p`` where pruned: ``p + u`` is then exactly 0 wherever the mask is off."""

    def one(path, u, p):
        m = mask.get(leaf_name(path))
        return u if m is None else jnp.where(m, u, -p)

    return jax.tree_util.tree_map_with_path(one, updates, params)


def prune(sparsity, filter: Filter | None = None, *, begin: int = 0, end: int | None = None, every: int = 1,
          scope: str = "global") -> optax.GradientTransformation:
    """Magnitude pruning as an optax transform (chain it after the optimizer, so it sees the final updates).

    At update ``t`` in ``{begin, begin + every, ...} ∩ [begin, end]`` (``end`` default ``begin``: one-shot) the mask
    is recomputed from ``|p + u|`` (the weights the update is about to write) with ``round(sparsity(t) * N)``
    pruned; every update keeps ``p + u = 0`` off the mask. ``sparsity``: a float in ``[0, 1)`` or a schedule
    ``t -> float``. State: ``PruneState(count, mask)``.
    """
    if not callable(sparsity):
        _check_sparsity(sparsity)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    end = begin if end is None else end
    sched = sparsity if callable(sparsity) else (lambda t: sparsity)
    filt = filter or rnn_weights()

    def init(params):
        leaves = select(params, filt)
        return PruneState(jnp.zeros([], jnp.int32), {n: jnp.ones(np.shape(v), bool) for n, v in leaves.items()})

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prune needs the parameters: call tx.update(grads, state, params)")
        t = state.count
        due = (t >= begin) & (t <= end) & ((t - begin) % every == 0)
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        mask = jax.lax.cond(due, lambda: magnitude_mask(new, sched(t), filt, scope=scope, mask=state.mask),
                            lambda: state.mask)
        return _masked_updates(updates, params, mask), PruneState(t + 1, mask)

    return optax.GradientTransformation(init, update)


def fixed_mask(mask: dict) -> optax.GradientTransformation:
    """Keep ``p + u = 0`` wherever ``mask`` is off, every update (chain it after the optimizer)."""
    mask = {k: jnp.asarray(v, bool) for k, v in mask.items()}

    def init(params):
        _check_mask(params, mask)
        return PruneState(jnp.zeros([], jnp.int32), mask)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("fixed_mask needs the parameters: call tx.update(grads, state, params)")
        return _masked_updates(updates, params, state.mask), PruneState(state.count + 1, state.mask)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- random-graph connectivity


def graph(kind: str, n: int, seed: int = 0, **kw) -> np.ndarray:
    """Adjacency ``bool [n, n]`` (symmetric, no self-loops) of a networkx random graph.

    ``"watts_strogatz"`` (``k`` neighbours, rewiring ``p``; default k=4, p=0.1), ``"barabasi_albert"``
    (``m`` edges per new node; default 2), ``"erdos_renyi"`` (edge probability ``p``; default 0.1).
    """
    import networkx as nx

    _checks.check_choice("kind", kind, GRAPHS)
    if n < 2:
        raise ValueError(f"n (the number of units) must be >= 2, got {n}")
    if kind == "watts_strogatz":
        g = nx.watts_strogatz_graph(n, kw.get("k", 4), kw.get("p", 0.1), seed=seed)
    elif kind == "barabasi_albert":
        g = nx.barabasi_albert_graph(n, kw.get("m", 2), seed=seed)
    else:
        g = nx.gnp_random_graph(n, kw.get("p", 0.1), seed=seed)
    return nx.to_numpy_array(g, nodelist=range(n), dtype=bool)


def graph_properties(adj) -> dict:
    """Features of an undirected graph: nodes, edges, density, degree mean/std/max, average clustering,
    transitivity, the average shortest-path length and diameter of the largest connected component, and the
    fraction of nodes in it."""
    import networkx as nx

    adj = np.asarray(adj, bool)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adj must be a square [n, n] adjacency, got shape {list(adj.shape)}")
    g = nx.from_numpy_array(adj.astype(np.int8))
    deg = np.array([d for _, d in g.degree()], float)
    comp = g.subgraph(max(nx.connected_components(g), key=len))
    return {
        "nodes": g.number_of_nodes(),
        "edges": g.number_of_edges(),
        "density": nx.density(g),
        "degree_mean": float(deg.mean()),
        "degree_std": float(deg.std()),
        "degree_max": float(deg.max()),
        "clustering": nx.average_clustering(g),
        "transitivity": nx.transitivity(g),
        "path_length": nx.average_shortest_path_length(comp) if len(comp) > 1 else 0.0,
        "diameter": nx.diameter(comp) if len(comp) > 1 else 0,
        "giant_fraction": len(comp) / g.number_of_nodes(),
    }


def recurrent_mask(params, adj, filter: Filter | None = None) -> dict:
    """Mask of every selected recurrent matrix ``R`` ``[G, D, K, D]`` from the unit adjacency ``adj`` ``[H, H]``
    (``H = G*D``): ``R[g, i, k, j]`` is kept iff ``adj[g*D + i, g*D + j]``, for every gate ``k`` (head-wise cells
    keep the diagonal blocks)."""
    adj = np.asarray(adj, bool)
    out = {}
    for name, r in select(params, filter or rnn_weights(inputs=False)).items():
        if np.ndim(r) != 4:
            raise ValueError(f"{name}: a recurrent matrix [G, D, K, D] is expected, got shape {list(np.shape(r))}")
        g, d, k, _ = np.shape(r)
        if adj.shape != (g * d, g * d):
            raise ValueError(f"adj must be [{g * d}, {g * d}] for {name} (G={g} heads of D={d}), got {list(adj.shape)}")
        blocks = np.stack([adj[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(g)])  # [G, D, D]
        out[name] = jnp.asarray(np.broadcast_to(blocks[:, :, None, :], (g, d, k, d)))
    return out
