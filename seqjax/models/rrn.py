r"""Recurrent Relational Networks (Palm, Paquet & Winther 2018): message passing over a graph, repeated for
``T`` steps, with an LSTM node update and an output (and a loss) at every step.

With node inputs :math:`x_j` (here an embedding of a categorical node value and an MLP,
:math:`x_j = \mathrm{pre}(\mathrm{emb}(v_j))`), :math:`h^0_j = x_j` and a zero LSTM state, step ``t`` is

.. math::  m^t_{ij} = f(h^{t-1}_i, h^{t-1}_j),\qquad
           m^t_j = \sum_{i:\,(i\to j) \in E} m^t_{ij},\qquad
           h^t_j, s^t_j = \mathrm{LSTM}\big(g(m^t_j, x_j),\ s^{t-1}_j\big),\qquad
           o^t_j = r(h^t_j),

``f`` (messages) and ``g`` (the node input) MLPs, ``r`` a linear readout to class logits; the loss is the
cross-entropy of :math:`o^t` averaged over the ``T`` steps (:func:`rrn_loss`), so every step learns to answer.

:func:`message_passing` gathers the node states at the two ends of each edge of an edge list
(``senders``, ``receivers`` ``[E]``, one graph shared by the batch) and sums the messages into their receivers
with ``jax.ops.segment_sum`` — any graph, batched, jittable. A batch of different graphs is one disjoint union
(batch 1, node ids offset per graph). :func:`message_passing_dense` is the reference: every ordered pair, weighted
by an adjacency matrix ``A[i, j]`` (the number of edges ``i → j``). The first layer of ``f`` acts on the
concatenation ``[h_i, h_j]``, so it is split into a per-node sender and receiver projection
(:math:`W [h_i; h_j] + b = W_s h_i + (W_r h_j + b)`) computed once per node rather than once per edge.

:func:`rrn` is the functional core on a parameter dict (``embed``, ``pre``, ``msg``, ``post``: lists of
``(w, b)`` layers; ``lstm``: a :mod:`seqjax.rnn.cells` parameter dict; ``out``: ``(w, b)``); :class:`RRN` owns
the parameters. The paper's Sudoku network: 16-dim digit embeddings, MLPs of three 96-unit ReLU layers and a
linear 96-unit layer, hidden 96, 32 steps in training and 64 at test.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from seqjax import _checks
from seqjax.nn import Linear
from seqjax.rnn import cells as _cells
from seqjax.rnn.layers import RNN

__all__ = ["RRN", "rrn", "rrn_loss", "mlp", "message_passing", "message_passing_dense", "pair_messages"]


def _affine(x, w, b):
    return x @ w + b[(None,) * (x.ndim - 1)]


def mlp(layers, x):
    """ReLU between the ``(w, b)`` layers, none after the last."""
    for k, (w, b) in enumerate(layers):
        x = _affine(x, w, b)
        if k < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def _check_edges(senders, receivers, num_nodes: int | None = None):
    _checks.check_ndim("senders", senders, 1, "[edges]")
    _checks.check_dtype("senders", senders, "int")
    _checks.check_dtype("receivers", receivers, "int")
    _checks.check_same_shape("senders", senders, "receivers", receivers)
    if num_nodes is not None:
        for name, idx in (("senders", senders), ("receivers", receivers)):
            idx = _checks.concrete_or_none(idx)
            if idx is not None and idx.size:
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= num_nodes:
                    raise ValueError(f"{name} must hold node ids in [0, {num_nodes}), got values in [{lo}, {hi}]")


def message_passing(h, senders: Int[Array, " e"], receivers: Int[Array, " e"], message_fn: Callable):
    """``m_j = Σ_{e: receivers[e] = j} message_fn(h[:, senders[e]], h[:, receivers[e]])``.

    ``h``: an array ``[b, n, ...]`` or a pytree of them (e.g. per-node precomputed projections); ``message_fn``
    maps the sender and receiver leaves of ``E`` edges (``[b, E, ...]`` each) to messages ``[b, E, d_m]``.
    Returns ``[b, n, d_m]`` (zero at a node with no incoming edge)."""
    leaves = jax.tree.leaves(h)
    n = leaves[0].shape[1]
    _check_edges(senders, receivers, n)
    src = jax.tree.map(lambda x: jnp.take(x, senders, axis=1), h)
    dst = jax.tree.map(lambda x: jnp.take(x, receivers, axis=1), h)
    m = message_fn(src, dst)  # [b, E, d_m]
    return jnp.moveaxis(jax.ops.segment_sum(jnp.moveaxis(m, 1, 0), receivers, num_segments=n), 0, 1)


def message_passing_dense(h, adjacency: Float[Array, "n n"], message_fn: Callable):
    """The reference of :func:`message_passing`: ``m_j = Σ_i A[i, j] · message_fn(h_i, h_j)`` over all ``n²``
    ordered pairs (``message_fn`` sees sender leaves ``[b, n, 1, ...]`` and receiver leaves ``[b, 1, n, ...]``
    and must broadcast them)."""
    leaves = jax.tree.leaves(h)
    n = leaves[0].shape[1]
    _checks.check_shape("adjacency", adjacency, (n, n), "[senders, receivers]")
    src = jax.tree.map(lambda x: x[:, :, None], h)
    dst = jax.tree.map(lambda x: x[:, None], h)
    m = message_fn(src, dst)  # [b, n_i, n_j, d_m]
    m = jnp.broadcast_to(m, (m.shape[0], n, n, m.shape[-1]))
    return jnp.einsum("bijd,ij->bjd", m, jnp.asarray(adjacency, m.dtype))


def pair_messages(layers, h: Float[Array, "b n d"], senders=None, receivers=None, *, adjacency=None):
    """``m_j = Σ_{i → j} f(h_i, h_j)`` with ``f(h_i, h_j) = mlp(layers, [h_i; h_j])``, by :func:`message_passing`
    over ``(senders, receivers)`` or :func:`message_passing_dense` over ``adjacency``.

    Two linear maps are moved off the edges: the first layer splits into per-node sender and receiver halves
    (``W [h_i; h_j] + b = W_s h_i + (W_r h_j + b)``), and the last (linear) layer commutes with the sum
    (``Σ_i (W z_ij + b) = W Σ_i z_ij + deg_j · b``), so an edge costs the middle layers only — with two layers,
    an add and a ReLU."""
    (w0, b0), last = layers[0], layers[-1]
    d = h.shape[-1]
    if w0.shape[0] != 2 * d:
        raise ValueError(f"the first message layer must take [h_i; h_j] of width {2 * d}, got {w0.shape[0]}")
    node = (h @ w0[:d], _affine(h, w0[d:], b0))
    if len(layers) == 1:
        edge_fn = lambda src, dst: src[0] + dst[1]
    else:  # every layer but the last, with its ReLU
        edge_fn = lambda src, dst: jax.nn.relu(mlp(layers[1:-1], jax.nn.relu(src[0] + dst[1])) if len(layers) > 2
                                               else src[0] + dst[1])
    if adjacency is None:
        z = message_passing(node, senders, receivers, edge_fn)
        degree = jax.ops.segment_sum(jnp.ones(receivers.shape, h.dtype), receivers, num_segments=h.shape[1])
    else:
        z = message_passing_dense(node, adjacency, edge_fn)
        degree = jnp.sum(jnp.asarray(adjacency, h.dtype), axis=0)
    if len(layers) == 1:
        return z
    w, b = last
    return z @ w + (degree[:, None] * b[None])[None]


def _check_nodes(nodes, vocab: int | None = None):
    _checks.check_ndim("nodes", nodes, 2, "[batch, nodes]")
    _checks.check_dtype("nodes", nodes, "int")
    values = None if vocab is None else _checks.concrete_or_none(nodes)
    if values is not None and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"nodes must hold values in [0, {vocab}), got values in [{lo}, {hi}]")


def rrn(params: dict, nodes: Int[Array, "b n"], senders=None, receivers=None, *, steps: int,
        adjacency=None, remat: bool = False) -> Float[Array, "t b n c"]:
    """Per-step logits ``[steps, b, n, classes]`` of the RRN on categorical node values ``nodes`` ``[b, n]``
    over the graph ``(senders, receivers)`` ``[E]`` — or, with ``adjacency`` ``[n, n]``, the dense reference.
    ``remat`` recomputes each step in the backward pass (memory ``O(n)`` steps of node states, not of edges)."""
    _check_nodes(nodes, params["embed"].shape[0])
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if adjacency is None:
        if senders is None or receivers is None:
            raise ValueError("give the graph as senders and receivers [edges], or as adjacency [nodes, nodes]")
        _check_edges(senders, receivers, nodes.shape[1])
    b, n = nodes.shape
    x0 = mlp(params["pre"], jnp.take(params["embed"], nodes, axis=0))  # [b, n, d]
    d = x0.shape[-1]
    lstm = params["lstm"]

    def step(carry, _):
        h, s = carry
        m = pair_messages(params["msg"], h, senders, receivers, adjacency=adjacency)
        u = mlp(params["post"], jnp.concatenate([m, x0], -1))
        xp = _cells.project(lstm, u.reshape(b * n, 1, d))[:, 0]
        s = _cells.step("lstm", lstm, s, xp)
        h = s[:, 0, 0].reshape(b, n, d)
        return (h, s), _affine(h, *params["out"])

    s0 = jnp.zeros((b * n, 2, 1, d), jnp.float32)
    body = jax.checkpoint(step) if remat else step
    _, logits = jax.lax.scan(body, (x0, s0), None, length=steps)
    return logits


def rrn_loss(logits: Float[Array, "t b n c"], labels: Int[Array, "b n"]):
    """``(loss, per_step)``: the cross-entropy averaged over nodes and batch at each step ``[t]``, and its mean
    over the steps (the paper's loss: every step is trained to answer)."""
    _checks.check_ndim("logits", logits, 4, "[steps, batch, nodes, classes]")
    _checks.check_shape("labels", labels, logits.shape[1:3], "[batch, nodes]")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_step = -jnp.take_along_axis(logp, labels[None, ..., None], axis=-1)[..., 0].mean((1, 2))
    return per_step.mean(), per_step


class _MLP(nnx.Module):
    def __init__(self, d_in: int, d: int, num_layers: int, *, rngs: nnx.Rngs):
        dims = [d_in] + [d] * num_layers
        self.layers = nnx.List([Linear(a, o, use_bias=True, rngs=rngs) for a, o in zip(dims[:-1], dims[1:])])

    def params(self):
        return [(lin.kernel[...], lin.bias[...]) for lin in self.layers]


class RRN(nnx.Module):
    """``logits [steps, b, n, classes] = RRN(vocab, classes)(nodes [b, n] int, senders, receivers, steps=T)``.

    ``d``: node state and MLP width; ``mlp_layers``: linear layers per MLP (the paper: 4, i.e. three ReLU
    layers and a linear one); ``msg_layers``: those of the message MLP ``f`` (default ``mlp_layers``);
    ``d_embed``: the node-value embedding."""

    def __init__(self, vocab: int, classes: int, *, d: int = 96, d_embed: int = 16, mlp_layers: int = 4,
                 msg_layers: int | None = None, remat: bool = False, rngs: nnx.Rngs):
        msg_layers = mlp_layers if msg_layers is None else msg_layers
        if min(mlp_layers, msg_layers) < 1:
            raise ValueError(f"mlp_layers and msg_layers must be >= 1, got {mlp_layers} and {msg_layers}")
        self.vocab, self.classes, self.remat = vocab, classes, remat
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (vocab, d_embed), jnp.float32))
        self.pre = _MLP(d_embed, d, mlp_layers, rngs=rngs)
        self.msg = _MLP(2 * d, d, msg_layers, rngs=rngs)
        self.post = _MLP(2 * d, d, mlp_layers, rngs=rngs)
        self.lstm = RNN("lstm", d, d, rngs=rngs)
        self.out = Linear(d, classes, use_bias=True, rngs=rngs)

    def param_dict(self) -> dict:
        return {"embed": self.embed[...], "pre": self.pre.params(), "msg": self.msg.params(),
                "post": self.post.params(), "lstm": self.lstm.param_dict(),
                "out": (self.out.kernel[...], self.out.bias[...])}

    def __call__(self, nodes, senders=None, receivers=None, *, steps: int, adjacency=None):
        return rrn(self.param_dict(), nodes, senders, receivers, steps=steps, adjacency=adjacency, remat=self.remat)
