r"""Learnable Commutative Monoids (Ong & Veličković 2022): a learned binary operator, symmetrised, reduced over
a set by a balanced binary tree (depth ⌈log₂ n⌉) instead of a recurrent fold (depth n).

The operator is any binary network :math:`g(x, y)` — here a GRU cell with :math:`x` as the state and :math:`y`
as the input — made commutative by construction,

.. math::  x \oplus y = \tfrac12\,[\,g(x, y) + g(y, x)\,],

with a learned identity :math:`e` (the value of the empty set). Associativity is not built in: training
encourages it, optionally with the penalty :math:`\lVert (a\oplus b)\oplus c - a\oplus(b\oplus c)\rVert^2`
(:func:`associativity_gap`).

:func:`tree_reduce` ``(op, x [b, n, d], mask [b, n]) -> [b, d]``: the real elements are first moved to the
front in their order (a stable compaction), then ``⌈log₂ n⌉`` levels combine neighbours pairwise. Padding is
the identity *handled explicitly* — a node with one real child passes that child up unchanged — so the
result is the same function of the real elements however much padding there is and wherever it sits (up to
the rounding of combines run on arrays of another shape); only an empty set returns ``identity``. For an
associative ``op`` (``+``, ``max``) the tree equals :func:`fold`, the sequential ``lax.scan`` of the recurrent
aggregator (tested). :func:`pool` gives the sum, mean and max aggregators.

:class:`LCM` (the aggregator), :class:`RecurrentAggregator` (the O(n)-depth GRU fold it is compared with) and
:class:`SetModel` (embed → MLP → aggregate → MLP → logits) are the NNX modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.nn import Linear
from seqjax.rnn import cells as _cells
from seqjax.rnn.layers import RNN

__all__ = ["AGGREGATORS", "LCM", "RecurrentAggregator", "SetModel", "tree_reduce", "fold", "pool",
           "symmetrise", "gru_op", "associativity_gap"]

AGGREGATORS = ("sum", "mean", "max", "gru", "lcm")


def _check_set(x, mask):
    _checks.check_ndim("x", x, 3, "[batch, set size, features]")
    if mask is not None:
        _checks.check_shape("mask", mask, np.shape(x)[:2], "[batch, set size]")
        _checks.check_dtype("mask", mask, "bool")


def gru_op(params: dict, x, y):
    """``g(x, y)``: one GRU step from state ``x`` on input ``y`` (``[..., d]`` each; :mod:`seqjax.rnn.cells`
    parameters of a ``d → d`` GRU)."""
    lead, d = x.shape[:-1], x.shape[-1]
    g, k, dh = np.shape(params["b"])
    xp = _cells.project(params, y.reshape(-1, 1, y.shape[-1]))[:, 0]
    s = _cells.step("gru", params, x.reshape(-1, 1, g, dh).astype(jnp.float32), xp)
    return s.reshape(lead + (d,)).astype(x.dtype)


def symmetrise(g: Callable) -> Callable:
    """``x ⊕ y = ½[g(x, y) + g(y, x)]``: commutative for any ``g`` (float addition commutes, so exactly)."""
    return lambda x, y: 0.5 * (g(x, y) + g(y, x))


def _compact(x, mask):
    """Real elements first, in their order (stable); padding after."""
    order = jnp.argsort(~mask, axis=1, stable=True)
    return jnp.take_along_axis(x, order[..., None], axis=1), jnp.take_along_axis(mask, order, axis=1)


def tree_reduce(op: Callable, x, mask=None, identity=None):
    """Balanced-tree reduction of the set ``x`` ``[b, n, d]`` with ``op`` (``[b, m, d] × [b, m, d] -> [b, m, d]``);
    ``mask`` ``[b, n]`` bool marks the real elements; ``identity`` ``[d]`` is returned for an empty set (zeros
    if ``None``). Returns ``[b, d]``."""
    _check_set(x, mask)
    b, n, d = x.shape
    size = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    if mask is None and size == n:  # a full tree: every node combines both children
        while x.shape[1] > 1:
            x = op(x[:, 0::2], x[:, 1::2])
        return x[:, 0]
    if mask is None:
        mask = jnp.ones((b, n), bool)
    else:
        x, mask = _compact(x, mask)
    if size > n:
        x = jnp.concatenate([x, jnp.zeros((b, size - n, d), x.dtype)], 1)
        mask = jnp.concatenate([mask, jnp.zeros((b, size - n), bool)], 1)
    while x.shape[1] > 1:
        left, right, ml, mr = x[:, 0::2], x[:, 1::2], mask[:, 0::2], mask[:, 1::2]
        both = op(left, right)
        x = jnp.where((ml & mr)[..., None], both, jnp.where(ml[..., None], left, right))
        mask = ml | mr
    e = jnp.zeros((d,), x.dtype) if identity is None else jnp.asarray(identity, x.dtype)
    return jnp.where(mask[:, :1], x[:, 0], e)


def fold(op: Callable, x, mask=None, init=None):
    """Sequential left fold ``(((e ⊕ x₀) ⊕ x₁) ⊕ …)`` over the real elements (``lax.scan``, depth ``n``): the
    recurrent aggregator. ``init`` ``[d]`` (zeros if ``None``) starts it. Returns ``[b, d]``."""
    _check_set(x, mask)
    b, n, d = x.shape
    mask = jnp.ones((b, n), bool) if mask is None else mask
    h0 = jnp.broadcast_to(jnp.zeros((d,), x.dtype) if init is None else jnp.asarray(init, x.dtype), (b, d))

    def body(h, inp):
        x_t, m_t = inp
        return jnp.where(m_t[:, None], op(h, x_t), h), None

    h, _ = lax.scan(body, h0, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(mask, 1, 0)))
    return h


def pool(kind: str, x, mask=None):
    """``"sum" | "mean" | "max"`` over the real elements of ``x`` ``[b, n, d]`` (an empty set gives 0)."""
    _checks.check_choice("kind", kind, ("sum", "mean", "max"))
    _check_set(x, mask)
    m = jnp.ones(x.shape[:2], bool) if mask is None else mask
    if kind == "max":
        out = jnp.max(jnp.where(m[..., None], x, -jnp.inf), axis=1)
        return jnp.where(m.any(1, keepdims=True), out, 0.0)
    s = jnp.sum(jnp.where(m[..., None], x, 0.0), axis=1)
    return s if kind == "sum" else s / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1)


def associativity_gap(op: Callable, a, b, c):
    """Mean ``‖(a ⊕ b) ⊕ c − a ⊕ (b ⊕ c)‖²`` over the leading axes (0 for an associative ``op``)."""
    return jnp.mean(jnp.sum((op(op(a, b), c) - op(a, op(b, c))) ** 2, axis=-1))


class LCM(nnx.Module):
    """The LCM aggregator: ``y [b, d] = lcm(x [b, n, d], mask)``; ``lcm.op(a, b)`` is ``⊕``."""

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.cell = RNN("gru", d, d, rngs=rngs)
        self.identity = nnx.Param(jnp.zeros((d,), jnp.float32))

    def op(self, a, b):
        return symmetrise(lambda x, y: gru_op(self.cell.param_dict(), x, y))(a, b)

    def __call__(self, x, mask=None):
        return tree_reduce(self.op, x, mask, self.identity[...])


class RecurrentAggregator(nnx.Module):
    """A GRU read over the set as a sequence (depth ``n``, order-dependent): ``h_n`` of :func:`fold` with ``g``."""

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.cell = RNN("gru", d, d, rngs=rngs)

    def __call__(self, x, mask=None):
        params = self.cell.param_dict()
        return fold(lambda h, y: gru_op(params, h, y), x, mask)


class SetModel(nnx.Module):
    """``logits [b, classes] = model(values [b, n] int, mask [b, n] bool)``: embed each element, an MLP,
    an aggregator (``"sum" | "mean" | "max" | "gru" | "lcm"``), an MLP readout."""

    def __init__(self, vocab: int, classes: int, aggregator: str = "lcm", *, d: int = 64, rngs: nnx.Rngs):
        _checks.check_choice("aggregator", aggregator, AGGREGATORS)
        self.aggregator, self.vocab = aggregator, vocab
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pre = Linear(d, d, use_bias=True, rngs=rngs)
        self.agg = (LCM(d, rngs=rngs) if aggregator == "lcm" else
                    RecurrentAggregator(d, rngs=rngs) if aggregator == "gru" else None)
        self.post1 = Linear(d, d, use_bias=True, rngs=rngs)
        self.post2 = Linear(d, classes, use_bias=True, rngs=rngs)

    def encode(self, values):
        """Per-element latents ``[b, n, d]``."""
        return jax.nn.relu(self.pre(self.embed(values)))

    def __call__(self, values, mask=None):
        _checks.check_ndim("values", values, 2, "[batch, set size]")
        _checks.check_dtype("values", values, "int")
        h = self.encode(values)
        z = pool(self.aggregator, h, mask) if self.agg is None else self.agg(h, mask)
        return self.post2(jax.nn.relu(self.post1(z)))
