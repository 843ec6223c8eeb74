r"""Aaren: attention as an RNN (Feng, Tung, Hajimirsadeghi, Ahmed, Bengio, Mori 2024, arXiv 2405.13956).

Softmax attention of one **learned query** ``q`` (a constant per head, not computed from the input)
over the prefixes of a sequence, ``o_t = sum_{j<=t} softmax_j(s_{1..t}) v_j`` with
``s_j = scale * q . k_j``, is a many-to-many RNN over the state ``h = (m, u, w)``:

.. math::

    m_t = \max(m_{t-1}, s_t), \qquad
    u_t = u_{t-1} e^{m_{t-1} - m_t} + e^{s_t - m_t}, \qquad
    w_t = w_{t-1} e^{m_{t-1} - m_t} + e^{s_t - m_t} v_t, \qquad
    o_t = w_t / u_t,

(``m`` the running max, ``u = sum_j exp(s_j - m)``, ``w = sum_j exp(s_j - m) v_j``), and because
the combine of two partial states

.. math::

    (m_A, u_A, w_A) \oplus (m_B, u_B, w_B) = (m, u_A e^{m_A - m} + u_B e^{m_B - m},
    w_A e^{m_A - m} + w_B e^{m_B - m}), \quad m = \max(m_A, m_B)

is associative, all prefixes come out of one ``lax.associative_scan`` (the paper's parallel prefix
scan; impl ``"associative"``). The token ``j`` contributes the leaf ``(s_j, 1, v_j)``; the empty state
(identity) is ``(-1e30, 0, 0)`` (a finite "minus infinity" keeps every ``exp`` and gradient finite).
Decoding (:func:`aaren_step`) keeps O(1) memory per head: ``m, u`` scalars and ``w`` a vector.

Packed documents: ``resets[b, t]`` replaces the carry into ``t`` by the identity (a segmented scan:
a leaf flagged as a document start absorbs everything to its left).

Shapes: ``q`` ``[h, k]`` (a parameter, no batch/time axes); ``k`` ``[b, t, h, k]``; ``v``
``[b, t, h, v]``; state ``(m [b, h], u [b, h], w [b, h, v])`` float32; ``y`` ``[b, t, h, v]`` in
``v``'s dtype.

``materialize`` gives the ``[b, h, T, T]`` causal softmax attention matrix of the query ``q``: the
output is linear in ``v`` given the scores (Sieber et al. 2024's view of softmax attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.layer import StateCache, plan, update
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import Linear, merge_heads, split_heads
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, PyTree, ResetsLike, SegmentIds

__all__ = ["aaren", "aaren_recurrent", "aaren_associative", "aaren_step", "aaren_materialize", "aaren_make_inputs",
           "Aaren"]

NEG = -1e30  # the max of an empty set; finite so that exp(NEG - m) == 0 with finite gradients
IMPLS = ("auto", "sequential", "associative")


# ----------------------------------------------------------------------------- helpers


#: the state ``(m [b, h], u [b, h], w [b, h, v])`` float32
State = tuple[Float[Array, "b h"], Float[Array, "b h"], Float[Array, "b h v"]]


def _check_aaren_inputs(q, k, v, h0, resets):
    _checks.check_ndim("k", k, 4, "[batch, time, heads, key_dim]")
    b, t, h, dk = k.shape
    _checks.check_shape("q", q, (h, dk), "[heads, key_dim] (one learned query per head)")
    _checks.check_ndim("v", v, 4, "[batch, time, heads, value_dim]")
    _checks.check_shape("v", v, (b, t, h, None), "[batch, time, heads, value_dim] (as k)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_dtype(name, x, "float")
    if h0 is not None:
        if not (isinstance(h0, (tuple, list)) and len(h0) == 3):
            raise ValueError("h0 must be the state tuple (m [b, h], u [b, h], w [b, h, v])")
        _checks.check_shape("h0[0] (m)", h0[0], (b, h), "[batch, heads]")
        _checks.check_shape("h0[1] (u)", h0[1], (b, h), "[batch, heads]")
        _checks.check_shape("h0[2] (w)", h0[2], (b, h, v.shape[-1]), "[batch, heads, value_dim]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")


def _scale(scale, dk):
    return dk**-0.5 if scale is None else scale


def _scores(q, k, scale):
    return jnp.einsum("bthk,hk->bth", k.astype(jnp.float32), q.astype(jnp.float32)) * _scale(scale, k.shape[-1])


def zero_state(batch: int, heads: int, value_dim: int):
    """The empty (identity) state ``(m, u, w) = (-1e30, 0, 0)``."""
    return (
        jnp.full((batch, heads), NEG, jnp.float32),
        jnp.zeros((batch, heads), jnp.float32),
        jnp.zeros((batch, heads, value_dim), jnp.float32),
    )


def _init(h0, b, h, dv):
    if h0 is None:
        return zero_state(b, h, dv)
    return tuple(jnp.asarray(x, jnp.float32) for x in h0)


def combine(a, b):
    """The associative operator ``(m_A, u_A, w_A) (+) (m_B, u_B, w_B)`` on states of any batch shape."""
    ma, ua, wa = a
    mb, ub, wb = b
    m = jnp.maximum(ma, mb)
    ea, eb = jnp.exp(ma - m), jnp.exp(mb - m)
    return m, ua * ea + ub * eb, wa * ea[..., None] + wb * eb[..., None]


# ----------------------------------------------------------------------------- the three forms


def _update(state, s, v):
    """One token: the RNN cell of the paper's Fig. 2 (fold leaf (s, 1, v) into the state)."""
    m, u, w = state
    m_new = jnp.maximum(m, s)
    decay, weight = jnp.exp(m - m_new), jnp.exp(s - m_new)
    u = u * decay + weight
    w = w * decay[..., None] + weight[..., None] * v
    return m_new, u, w


def aaren_recurrent(
    q: Float[AnyArray, "h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    scale=None,
) -> tuple[Float[Array, "b t h v"], State]:
    """The reference: a float32 ``lax.scan`` of the (m, u, w) cell over time. Returns ``(y, h_last)``."""
    _check_aaren_inputs(q, k, v, h0, resets)
    b, t, h, _ = k.shape
    dv = v.shape[-1]
    s = _scores(q, k, scale)
    r = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)

    def cell(state, xs):
        s_t, v_t, r_t = xs
        state = tuple(jnp.where(r_t.reshape(b, *(1,) * (x.ndim - 1)), z, x) for x, z in zip(state, zero_state(b, h, dv)))
        state = _update(state, s_t, v_t)
        m, u, w = state
        return state, w / u[..., None]

    xs = (jnp.moveaxis(s, 1, 0), jnp.moveaxis(v.astype(jnp.float32), 1, 0), jnp.moveaxis(r, 1, 0))
    h_last, ys = lax.scan(cell, _init(h0, b, h, dv), xs)
    return jnp.moveaxis(ys, 0, 1).astype(v.dtype), h_last


def aaren_associative(
    q: Float[AnyArray, "h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    scale=None,
) -> tuple[Float[Array, "b t h v"], State]:
    """The parallel form: every prefix state by one segmented ``lax.associative_scan``."""
    _check_aaren_inputs(q, k, v, h0, resets)
    b, t, h, _ = k.shape
    dv = v.shape[-1]
    s = _scores(q, k, scale)
    r = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    leaves = (r, s, jnp.ones_like(s), v.astype(jnp.float32))

    def seg_combine(left, right):  # a leaf that starts a document absorbs its left
        fa, *a = left
        fb, *bb = right
        merged = combine(a, bb)
        out = tuple(jnp.where(fb.reshape(fb.shape + (1,) * (x.ndim - fb.ndim)), y, x) for x, y in zip(merged, bb))
        return (fa | fb, *out)

    f, m, u, w = lax.associative_scan(seg_combine, leaves, axis=1)
    # fold h0 in front of every prefix that has not seen a document start
    h0 = tuple(x[:, None] for x in _init(h0, b, h, dv))
    m0, u0, w0 = combine(h0, (m, u, w))
    m = jnp.where(f[..., None], m, m0)
    u = jnp.where(f[..., None], u, u0)
    w = jnp.where(f[..., None, None], w, w0)
    y = w / u[..., None]
    return y.astype(v.dtype), (m[:, -1], u[:, -1], w[:, -1])


def aaren(
    q: Float[AnyArray, "h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    h0: PyTree = None,
    impl: str = "auto",
    resets: ResetsLike | None = None,
    scale=None,
    negative_eigen: bool = False,
) -> tuple[Float[Array, "b t h v"], State]:
    """Aaren's many-to-many attention with the learned query ``q``; ``impl`` in ``IMPLS``.

    Returns ``(y [b, t, h, v], (m, u, w))``; ``"auto"`` is the associative scan.
    """
    _checks.check_no_negative_eigen("aaren", negative_eigen)
    _checks.check_choice("impl", impl, IMPLS)
    if impl == "sequential":
        return aaren_recurrent(q, k, v, h0=h0, resets=resets, scale=scale)
    return aaren_associative(q, k, v, h0=h0, resets=resets, scale=scale)


def aaren_step(
    h: PyTree,
    q: Float[AnyArray, "h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    *,
    scale=None,
) -> tuple[Float[Array, "b h v"], State]:
    """One token: ``k [b, h, k]``, ``v [b, h, v]``; ``h=None`` is the empty state. O(1) memory."""
    b, nh, dk = k.shape
    state = _init(h, b, nh, v.shape[-1])
    s = jnp.einsum("bhk,hk->bh", k.astype(jnp.float32), q.astype(jnp.float32)) * _scale(scale, dk)
    state = _update(state, s, v.astype(jnp.float32))
    m, u, w = state
    return (w / u[..., None]).astype(v.dtype), state


def aaren_materialize(
    q: Float[AnyArray, "h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    *,
    scale=None,
) -> Operator:
    """``[b, h, T, T]``: the causal softmax attention matrix of the query ``q`` (``y = M v``)."""
    del v
    s = _scores(q, k, scale)  # [b, t, h]
    t = s.shape[1]
    logits = jnp.broadcast_to(jnp.moveaxis(s, 1, 2)[:, :, None, :], (s.shape[0], s.shape[2], t, t))
    mask = jnp.tril(jnp.ones((t, t), bool))
    return jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)


# ----------------------------------------------------------------------------- NNX layer


class Aaren(nnx.Module):
    """An Aaren layer: learned per-head query, key/value projections, the (m, u, w) scan, output projection.

    ``y, cache = layer(x, segment_ids=None, cache=None)`` with ``x`` ``[b, t, d_model]``; the cache is
    ``StateCache((m, u, w))`` (constant size, whatever the length).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, rngs: nnx.Rngs, dtype=jnp.float32):
        head_dim = head_dim or d_model // num_heads
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        inner = num_heads * head_dim
        self.query = nnx.Param(
            jax.random.normal(rngs.params(), (num_heads, head_dim), jnp.float32), out_sharding=("heads", "head_dim")
        )
        self.k_proj = Linear(d_model, inner, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d_model, inner, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.o_proj = Linear(inner, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, state = aaren(self.query[...], k, v, h0=p.h0, resets=p.resets)
        return self.o_proj(merge_heads(y)).astype(x.dtype), update(cache, state=state)

    def init_cache(self, batch_size: int, max_len: int) -> StateCache:
        del max_len  # constant-size state
        return StateCache(zero_state(batch_size, self.num_heads, self.head_dim))


# ----------------------------------------------------------------------------- registry


def aaren_make_inputs(key, batch, time, *, heads=2, key_dim=5, value_dim=7, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return {
        "q": jax.random.normal(kq, (heads, key_dim), dtype),
        "k": jax.random.normal(kk, (batch, time, heads, key_dim), dtype),
        "v": jax.random.normal(kv, (batch, time, heads, value_dim), dtype),
    }


register(MixerSpec(
    name="aaren", fn=aaren, recurrent=aaren_recurrent, step=aaren_step, make_inputs=aaren_make_inputs, layer=Aaren,
    materialize=aaren_materialize, value_arg="v", params=("q",), impls=("sequential", "associative"),
    paper="https://arxiv.org/abs/2405.13956",
    doc="Attention as an RNN (Feng et al. 2024): learned-query softmax attention by an (m, u, w) prefix scan.",
    tol=1e-5,
))
