r"""Read–Process–Write (Vinyals, Bengio & Kudlur 2016, "Order Matters: Sequence to sequence for sets"): a
set-to-sequence model whose encoding of the input set does not depend on the order the set is given in.

- **Read**: each element ``x_i`` ``[d_in]`` is embedded on its own by a small MLP into a memory vector
  :math:`m_i = W_2\,\mathrm{relu}(W_1 x_i + b_1) + b_2` ``[H]``.
- **Process**: an LSTM with no inputs runs ``P`` steps from the zero state; at each step it reads the memory
  by content attention (Set2Set),

  .. math::  q_t = \mathrm{LSTM}(q^*_{t-1}),\quad e_{i,t} = \langle m_i, q_t\rangle,\quad
             a_{i,t} = \mathrm{softmax}_i(e_{i,t}),\quad r_t = \textstyle\sum_i a_{i,t} m_i,\quad
             q^*_t = [q_t, r_t],

  with :math:`q^*_0 = 0`. Softmax and sum run over the real elements only, so :math:`q^*_P` is invariant to
  permuting the set (and to padding), up to float rounding.
- **Write**: the pointer-network decoder of :mod:`seqjax.models.pointer`, started from the state
  :math:`s_0 = W_s q^*_P + b_s` (``[S, H]``: the LSTM's ``h`` and ``c``), reading the memory vector of the
  element it chose last, pointing over the memory :math:`m` with
  :math:`u_j = v^\top \tanh(W_1 m_j + W_2 d_i)` under the pointer's validity masks (never padding, never an
  element already chosen). With ``P = 0`` the decoder starts from a learned constant state and learns about
  the set only through its pointer attention.

So the model is permutation *equivariant*: permuting the input permutes the pointers the same way.

The order-search loss (the paper's training for outputs that are sets, §5): given ``K`` candidate output
orders of each example's target, :func:`order_search_loss` trains on the order the model already finds most
likely — :math:`\min_\pi -\log p(Y_\pi \mid X)` over ``sample`` orders drawn per example (all ``K`` by default)
— or, while exploring, on one order drawn uniformly.

Functions take a parameter dict ``{"read": {"w1", "b1", "w2", "b2"}, "process", "init": {"w", "b"}, "dec",
"start", "w1", "w2", "v", "end"}`` (``process``/``dec`` are :mod:`seqjax.rnn.cells` parameter dicts; the
pointer's keys as in :mod:`seqjax.models.pointer`); :class:`ReadProcessWrite` owns the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from seqjax import _checks
from seqjax.models import pointer as _pointer
from seqjax.models.rrn import mlp
from seqjax.nn import Linear
from seqjax.rnn import cells as _cells
from seqjax.rnn.layers import RNN

__all__ = ["ReadProcessWrite", "read", "process", "write_memory", "rpw_logits", "rpw_decode", "per_example_nll",
           "order_search_loss"]

_NEG = -1e9


def _check(params, x, mask, steps):
    d_in = np.shape(params["read"]["w1"])[0]
    _checks.check_ndim("x", x, 3, f"[batch, elements, {d_in}]")
    _checks.check_shape("x", x, (None, None, d_in), f"[batch, elements, {d_in}] (elements of dimension {d_in})")
    _checks.check_dtype("x", x, "float")
    if mask is not None:
        _checks.check_shape("mask", mask, np.shape(x)[:2], "[batch, elements]")
        _checks.check_dtype("mask", mask, "bool")
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps (process steps P) must be an int >= 0, got {steps!r}")


def read(params: dict, x: Float[Array, "b n d"]) -> Float[Array, "b n h"]:
    """The memory ``m`` ``[b, n, H]``: each element embedded on its own by a two-layer MLP."""
    p = params["read"]
    return mlp([(p["w1"], p["b1"]), (p["w2"], p["b2"])], x.astype(jnp.float32))


def process(kind: str, params: dict, m: Float[Array, "b n h"], mask: Bool[Array, "b n"] | None,
            steps: int) -> tuple[Float[Array, "b h2"], Float[Array, "b n"] | None]:
    """``(q*_P [b, 2H], the last step's attention [b, n] or None for P = 0)``: ``steps`` steps of the input-less
    LSTM attending over the real elements of ``m`` (see the module docstring)."""
    b, n, h = m.shape
    mask = jnp.ones((b, n), bool) if mask is None else mask
    cp = params["process"]
    g, _, d = np.shape(cp["b"])
    s0 = jnp.zeros((b, _cells.CELLS[kind].num_states, g, d), jnp.float32)
    q0 = jnp.zeros((b, 2 * h), jnp.float32)
    if steps == 0:
        return q0, None

    def body(carry, _):
        s, q_star = carry
        s = _cells.step(kind, cp, s, _cells.project(cp, q_star[:, None])[:, 0])
        q = s[:, 0].reshape(b, h)
        e = jnp.where(mask, jnp.einsum("bnh,bh->bn", m, q), _NEG)
        a = jax.nn.softmax(e, -1) * mask  # an empty set reads r = 0
        r = jnp.einsum("bn,bnh->bh", a, m)
        return (s, jnp.concatenate([q, r], -1)), a

    (_, q_star), attn = lax.scan(body, (s0, q0), None, length=steps)
    return q_star, attn[-1]


def write_memory(kind: str, params: dict, x, mask=None, *, steps: int):
    """``(m [b, n, H], s0 [b, S, H])``: the memory the Write block points over and its starting state."""
    _check(params, x, mask, steps)
    m = read(params, x)
    q_star, _ = process(kind, params, m, mask, steps)
    s0 = mlp([(params["init"]["w"], params["init"]["b"])], q_star)
    return m, s0.reshape(m.shape[0], -1, m.shape[-1])


def rpw_logits(kind: str, params: dict, x: Float[Array, "b n d"], targets: Int[Array, "b t"], mask=None, *,
               steps: int, mode: str = "tour") -> Float[Array, "b t n"]:
    """Teacher-forced masked pointer logits ``[b, T, n]`` for ``targets`` ``[b, T]`` (``IGNORE`` after the end)."""
    m, s0 = write_memory(kind, params, x, mask, steps=steps)
    return _pointer.pointer_logits(kind, params, m, targets, mask, mode=mode, memory=(m, s0))


def rpw_decode(kind: str, params: dict, x: Float[Array, "b n d"], mask=None, *, steps: int, mode: str = "tour",
               beam: int = 1, max_len: int | None = None):
    """``(pointers [b, max_len] int32 with IGNORE after the end, log-probability [b])``: greedy (``beam = 1``)
    or beam search, under the pointer's validity masks."""
    m, s0 = write_memory(kind, params, x, mask, steps=steps)
    if beam == 1:
        return _pointer.greedy_decode(kind, params, m, mask, mode=mode, max_len=max_len, memory=(m, s0))
    return _pointer.beam_search(kind, params, m, mask, mode=mode, width=beam, max_len=max_len, memory=(m, s0))


def per_example_nll(logits: Float[Array, "b t n"], targets: Int[Array, "b t"]) -> Float[Array, " b"]:
    """Negative log-likelihood of each example's whole pointer sequence (summed over its scored steps)."""
    keep = targets != _pointer.IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * keep, axis=-1)


def order_search_loss(nll: Float[Array, "b k"], key, *, sample: int | None = None, uniform: bool = False):
    """``(loss, chosen [b])``: the mean over examples of the per-example NLL of one of ``K`` candidate orders.

    ``nll`` ``[b, K]``: each example's NLL under each candidate order. Each example draws ``sample`` of the
    ``K`` orders without replacement (all when ``None``) and keeps the one with the least NLL (the paper's max
    over orders, searched by sampling); with ``uniform=True`` it trains on one order drawn uniformly instead
    (exploration before the search). The choice carries no gradient; the NLL of the chosen order does."""
    _checks.check_ndim("nll", nll, 2, "[batch, candidate orders]")
    b, k = nll.shape
    sample = k if sample is None else sample
    if not 1 <= sample <= k:
        raise ValueError(f"sample must be in [1, {k}] (the number of candidate orders), got {sample}")
    if uniform:
        sample = 1
    scores = jax.random.uniform(key, (b, k))
    drawn = jnp.argsort(scores, axis=-1)[:, :sample]  # a uniform subset of `sample` orders per example
    picked = jnp.take_along_axis(lax.stop_gradient(nll), drawn, -1)
    chosen = jnp.take_along_axis(drawn, jnp.argmin(picked, -1)[:, None], -1)[:, 0]
    return jnp.mean(jnp.take_along_axis(nll, chosen[:, None], -1)[:, 0]), chosen


class ReadProcessWrite(nnx.Module):
    """``logits = net(x, targets, mask)`` (teacher forcing, ``[b, T, n]``); ``pointers, logp = net.decode(x, mask,
    beam=1)``; ``net.process_state(x, mask)`` is ``q*_P`` ``[b, 2H]``.

    ``x`` ``[b, n, d_in]`` float, ``mask`` ``[b, n]`` bool (``None``: all real), ``targets`` ``[b, T]`` int;
    ``steps`` is ``P``, the number of process steps. The pointer and start vector start uniform in
    ±``init_scale`` (the Pointer Network paper's ±0.08); the cells come from :mod:`seqjax.rnn`.
    """

    def __init__(self, d_in: int = 1, hidden: int = 64, steps: int = 5, *, kind: str = "lstm",
                 init_scale: float = 0.08, rngs: nnx.Rngs):
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps (process steps P) must be an int >= 0, got {steps!r}")
        self.kind, self.d_in, self.hidden, self.steps = kind, d_in, hidden, steps
        self.read1 = Linear(d_in, hidden, use_bias=True, rngs=rngs)
        self.read2 = Linear(hidden, hidden, use_bias=True, rngs=rngs)
        self.processor = RNN(kind, 2 * hidden, hidden, rngs=rngs)
        self.start_state = Linear(2 * hidden, self.processor.num_states * hidden, use_bias=True, rngs=rngs)
        self.decoder = RNN(kind, hidden, hidden, rngs=rngs)
        uni = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -init_scale, init_scale)
        self.start = nnx.Param(uni((hidden,)))
        self.w1 = nnx.Param(uni((hidden, hidden)))
        self.w2 = nnx.Param(uni((hidden, hidden)))
        self.v = nnx.Param(uni((hidden,)))
        self.end = nnx.Param(uni((hidden,)))  # the pointer's end slot (mode "triangles")

    def param_dict(self) -> dict:
        lin = lambda layer: (layer.kernel[...], layer.bias[...])
        (w1, b1), (w2, b2), (wi, bi) = lin(self.read1), lin(self.read2), lin(self.start_state)
        return {"read": {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, "process": self.processor.param_dict(),
                "init": {"w": wi, "b": bi}, "dec": self.decoder.param_dict(), "start": self.start[...],
                "w1": self.w1[...], "w2": self.w2[...], "v": self.v[...], "end": self.end[...]}

    def __call__(self, x, targets, mask=None, *, mode: str = "tour"):
        return rpw_logits(self.kind, self.param_dict(), x, targets, mask, steps=self.steps, mode=mode)

    def decode(self, x, mask=None, *, mode: str = "tour", beam: int = 1, max_len: int | None = None):
        return rpw_decode(self.kind, self.param_dict(), x, mask, steps=self.steps, mode=mode, beam=beam,
                          max_len=max_len)

    def process_state(self, x, mask=None):
        params = self.param_dict()
        _check(params, x, mask, self.steps)
        return process(self.kind, params, read(params, x), mask, self.steps)[0]
