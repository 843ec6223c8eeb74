r"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni 2024, "Titans: Learning to Memorize at
Test Time", arXiv 2501.00663).

The recurrent state is the *weights* of a small MLP memory ``M`` (per head), written at test time by
gradient descent with momentum and weight decay on the associative loss
``l(M; k_t, v_t) = ||M(k_t) - v_t||^2``:

.. math::

    S_t = \eta_t S_{t-1} - \theta_t \nabla_M l(M_{t-1}; k_t, v_t), \qquad
    M_t = (1 - \alpha_t) M_{t-1} + S_t, \qquad
    y_t = M_t(q_t),

with data-dependent gates ``theta_t >= 0`` (inner learning rate), ``eta_t in [0, 1]`` (momentum,
"past surprise") and ``alpha_t in [0, 1]`` (forgetting). Memories: ``depth=1`` is linear,
``M(x) = x W_1`` (``W_1 [k, v]``); ``depth=2`` is ``M(x) = silu(x W_1) W_2`` (``W_1 [k, hidden]``,
``W_2 [hidden, v]``). The initial weights ``w1`` (``w2``) ``[h, ...]`` are learned parameters (no batch /
time axes): ``h0=None`` and every document start (``resets``) restart from them with zero momentum.
(A 2-layer memory started at zero would never move: its gradient vanishes there.)

**Two forms and how they relate.**

- :func:`titans_recurrent` (the reference): a ``lax.scan`` over tokens with ``jax.grad`` inside the
  step. With ``chunk_size=c`` it evaluates the paper's chunked *approximation* token by token: the
  gradient of token ``t`` is taken at the weights at the start of ``t``'s chunk (the later of the chunk
  start and the document start). ``chunk_size=1`` is the exact token-by-token rule above.
- :func:`titans_chunked` (the paper's parallel training form, Sec. 3.2): per chunk, all gradients
  at the chunk-start weights at once (``vmap`` of ``grad``), then momentum and decay as two linear
  recurrences inside the chunk solved with :func:`seqjax.scan.linear_scan`, and every token's
  memory read in parallel; a ``lax.scan`` carries ``(M, S)`` across chunks.

``titans_chunked(chunk_size=c) == titans_recurrent(chunk_size=c)`` exactly for every ``c`` (same
maths, other order). Against the exact rule (``c = 1``) the chunked form is an approximation for
``c > 1`` — for the linear memory too (it freezes ``M`` inside the gradient; the paper documents it) —
whose error shrinks as ``c`` shrinks and is zero at ``c = 1``. The registered specs therefore pin
``chunk_size=1`` (exact), and ``tests/test_mixers_titans.py`` checks the ``c > 1`` relations. The
step form is token by token (``chunk_size=1``).

Shapes: ``q, k`` ``[b, t, h, k]``; ``v`` ``[b, t, h, v]``; ``theta, eta, alpha`` ``[b, t, h]``;
state ``MemoryState(w=(W_1, [W_2]), s=(S_1, [S_2]))`` with leaves ``[b, h, ...]`` float32; ``y`` in ``v``'s
dtype. ``materialize`` (linear memory, zero initial weights) is the ``[b, h, T, T]`` operator on ``v``
(``y`` is linear in ``v`` then; each value channel evolves with the same coefficients).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.layer import plan, update
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import Linear, RMSNorm, ShortConv, l2_normalize, merge_heads, split_heads
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, ResetsLike, SegmentIds

__all__ = ["titans", "titans_recurrent", "titans_chunked", "titans_step", "titans_materialize", "titans_make_inputs",
           "titans_linear_make_inputs", "memory_apply", "MemoryState", "NeuralMemoryCache", "NeuralMemory",
           "LinearNeuralMemory"]

IMPLS = ("auto", "sequential", "chunked")


# ----------------------------------------------------------------------------- the memory


class MemoryState(NamedTuple):
    """The recurrent state: the memory's weights and their momentum, each ``(W_1[, W_2])`` ``[b, h, ...]``."""

    w: Any
    s: Any


def memory_apply(w, x):
    """``M(x)`` for batched weights ``w = (W_1[, W_2])`` ``[b, h, ...]`` and ``x [b, h, k]`` -> ``[b, h, v]``."""
    a = jnp.einsum("bhk,bhkd->bhd", x, w[0])
    if len(w) == 1:
        return a
    return jnp.einsum("bhd,bhdv->bhv", jax.nn.silu(a), w[1])


def _loss(w, k, v):
    """``sum_{b, h} ||M(k) - v||^2``: separable over (b, h), so its gradient is the per-head gradient."""
    return jnp.sum((memory_apply(w, k) - v) ** 2)


_grad = jax.grad(_loss)


def _check_titans_inputs(q, k, v, theta, eta, alpha, w, h0, resets, chunk_size):
    _checks.check_ndim("q", q, 4, "[batch, time, heads, key_dim]")
    b, t, h, dk = q.shape
    _checks.check_same_shape("q", q, "k", k)
    _checks.check_ndim("v", v, 4, "[batch, time, heads, value_dim]")
    _checks.check_shape("v", v, (b, t, h, None), "[batch, time, heads, value_dim]")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        _checks.check_shape(name, g, (b, t, h), "[batch, time, heads]")
    dv = v.shape[-1]
    if len(w) == 1:
        _checks.check_shape("w1", w[0], (h, dk, dv), "[heads, key_dim, value_dim] (linear memory)")
    else:
        _checks.check_shape("w1", w[0], (h, dk, None), "[heads, key_dim, hidden]")
        _checks.check_shape("w2", w[1], (h, w[0].shape[-1], dv), "[heads, hidden, value_dim]")
    for name, x in (("q", q), ("k", k), ("v", v), ("theta", theta), ("eta", eta), ("alpha", alpha), ("w1", w[0])):
        _checks.check_dtype(name, x, "float")
    if h0 is not None:
        if not isinstance(h0, MemoryState):
            raise ValueError("h0 must be the state MemoryState(w=weights, s=momentum)")
        for name in ("w", "s"):
            for i, (x, p) in enumerate(zip(getattr(h0, name), w)):
                _checks.check_shape(f"h0.{name}[{i}]", x, (b, *p.shape), "[batch, *weight shape]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _weights(w1, w2):
    return (w1,) if w2 is None else (w1, w2)


def _initial(w, b):
    return tuple(jnp.broadcast_to(x.astype(jnp.float32), (b, *x.shape)) for x in w)


def _init_state(h0, w, b):
    if h0 is None:
        w0 = _initial(w, b)
        return MemoryState(w0, tuple(jnp.zeros_like(x) for x in w0))
    return MemoryState(tuple(jnp.asarray(x, jnp.float32) for x in h0.w), tuple(jnp.asarray(x, jnp.float32) for x in h0.s))


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def _bc(g, x):
    """Gate ``[b, h]`` (or ``[b, c, h]``) broadcast against a weight leaf ``x``."""
    return g.reshape(g.shape + (1,) * (x.ndim - g.ndim))


# ----------------------------------------------------------------------------- reference and step


def titans_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    theta: Float[AnyArray, "b t h"],
    eta: Float[AnyArray, "b t h"],
    alpha: Float[AnyArray, "b t h"],
    w1: Float[AnyArray, "h k _"],
    w2: Float[AnyArray, "h _ v"] | None = None,
    *,
    h0: MemoryState | None = None,
    resets: ResetsLike | None = None,
    chunk_size=1,
) -> tuple[Float[Array, "b t h v"], MemoryState]:
    """The reference: ``lax.scan`` over tokens, ``jax.grad`` of the associative loss inside the step.

    ``chunk_size=c > 1`` takes token ``t``'s gradient at the weights of the start of its chunk (the
    paper's chunked approximation, evaluated sequentially)."""
    w = _weights(w1, w2)
    _check_titans_inputs(q, k, v, theta, eta, alpha, w, h0, resets, chunk_size)
    b, t = q.shape[:2]
    w_init = _initial(w, b)
    r = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    state = _init_state(h0, w, b)
    anchor = state.w

    def step(carry, xs):
        m, s, anchor = carry
        i, q_t, k_t, v_t, th, et, al, r_t = xs
        m = tuple(jnp.where(_bc(r_t, x), x0, x) for x, x0 in zip(m, w_init))  # a document restarts memory
        s = tuple(jnp.where(_bc(r_t, x), 0.0, x) for x in s)
        refresh = (i % chunk_size == 0) | r_t
        anchor = tuple(jnp.where(_bc(refresh, a), x, a) for a, x in zip(anchor, m))
        g = _grad(anchor, k_t, v_t)
        s = tuple(_bc(et, x) * x - _bc(th, x) * gx for x, gx in zip(s, g))
        m = tuple(_bc(1.0 - al, x) * x + sx for x, sx in zip(m, s))
        return (m, s, anchor), memory_apply(m, q_t)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    xs = (jnp.arange(t), *(tm(x) for x in _f32(q, k, v, theta, eta, alpha)), tm(r))
    (m, s, _), ys = lax.scan(step, (state.w, state.s, anchor), xs)
    return jnp.moveaxis(ys, 0, 1).astype(v.dtype), MemoryState(m, s)


def titans_step(
    h: MemoryState | None,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    theta: Float[AnyArray, "b h"],
    eta: Float[AnyArray, "b h"],
    alpha: Float[AnyArray, "b h"],
    w1: Float[AnyArray, "h k _"],
    w2: Float[AnyArray, "h _ v"] | None = None,
    *,
    chunk_size=1,
) -> tuple[Float[Array, "b h v"], MemoryState]:
    """One token (``q, k [b, h, k]``, ``v [b, h, v]``, gates ``[b, h]``); ``h=None`` starts from ``w1, w2``."""
    if chunk_size != 1:
        raise ValueError(f"titans_step is token by token (chunk_size=1), got chunk_size={chunk_size}")
    w = _weights(w1, w2)
    state = _init_state(h, w, q.shape[0])
    q, k, v32, theta, eta, alpha = _f32(q, k, v, theta, eta, alpha)
    g = _grad(state.w, k, v32)
    s = tuple(_bc(eta, x) * x - _bc(theta, x) * gx for x, gx in zip(state.s, g))
    m = tuple(_bc(1.0 - alpha, x) * x + sx for x, sx in zip(state.w, s))
    return memory_apply(m, q).astype(v.dtype), MemoryState(m, s)


# ----------------------------------------------------------------------------- chunked (parallel)


def _chunk(carry, xs, w_init):
    """One chunk ``[b, c, ...]``: gradients at the chunk-start weights, two linear recurrences, reads."""
    m0, s0 = carry
    q, k, v, theta, eta, alpha, r = xs
    seg = jnp.cumsum(r.astype(jnp.int32), axis=1)  # > 0 after a document start inside the chunk
    per_token = jax.vmap(_grad, in_axes=(None, 1, 1), out_axes=1)
    g = per_token(m0, k, v)
    if w_init is not None:  # tokens after a reset differentiate at the initial weights
        g0 = per_token(w_init, k, v)
        g = tuple(jnp.where(_bc(seg > 0, x), x0, x) for x, x0 in zip(g, g0))
    rf = r.astype(jnp.float32)[..., None]  # [b, c, 1] against [b, c, h]
    a_s = eta * (1.0 - rf)
    a_m = (1.0 - alpha) * (1.0 - rf)
    s_all, m_all, s_last, m_last = [], [], [], []
    for i in range(len(m0)):
        s_i, s_l = linear_scan(_bc(a_s, g[i]), -_bc(theta, g[i]) * g[i], h0=s0[i])
        b_m = s_i
        if w_init is not None:  # M_t = (1 - alpha_t) W_init + S_t at a document start
            b_m = b_m + _bc(rf * (1.0 - alpha), g[i]) * w_init[i][:, None]
        m_i, m_l = linear_scan(_bc(a_m, g[i]), b_m, h0=m0[i])
        s_all.append(s_i), m_all.append(m_i), s_last.append(s_l), m_last.append(m_l)
    read = jax.vmap(memory_apply, in_axes=(1, 1), out_axes=1)
    y = read(tuple(m_all), q)
    return (tuple(m_last), tuple(s_last)), y


def titans_chunked(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    theta: Float[AnyArray, "b t h"],
    eta: Float[AnyArray, "b t h"],
    alpha: Float[AnyArray, "b t h"],
    w1: Float[AnyArray, "h k _"],
    w2: Float[AnyArray, "h _ v"] | None = None,
    *,
    h0: MemoryState | None = None,
    resets: ResetsLike | None = None,
    chunk_size=16,
) -> tuple[Float[Array, "b t h v"], MemoryState]:
    """The paper's chunkwise-parallel training form (see module docstring). Returns ``(y, state)``."""
    w = _weights(w1, w2)
    _check_titans_inputs(q, k, v, theta, eta, alpha, w, h0, resets, chunk_size)
    b, t = q.shape[:2]
    out_dtype = v.dtype
    xs = (*_f32(q, k, v, theta, eta, alpha), jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool))
    w_init = _initial(w, b) if resets is not None else None
    state = _init_state(h0, w, b)
    carry = (state.w, state.s)
    c = min(chunk_size, t)
    n, rem = divmod(t, c)
    ys = []
    if n:
        body = lambda cr, x: _chunk(cr, x, w_init)
        full = tuple(jnp.moveaxis(x[:, : n * c].reshape(b, n, c, *x.shape[2:]), 1, 0) for x in xs)
        carry, y = lax.scan(body, carry, full)
        ys.append(jnp.moveaxis(y, 0, 1).reshape(b, n * c, *y.shape[3:]))
    if rem:  # the last, shorter chunk: same maths, its own static shape
        carry, y = _chunk(carry, tuple(x[:, n * c :] for x in xs), w_init)
        ys.append(y)
    y = jnp.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
    return y.astype(out_dtype), MemoryState(*carry)


def titans(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    theta: Float[AnyArray, "b t h"],
    eta: Float[AnyArray, "b t h"],
    alpha: Float[AnyArray, "b t h"],
    w1: Float[AnyArray, "h k _"],
    w2: Float[AnyArray, "h _ v"] | None = None,
    *,
    h0: MemoryState | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    chunk_size=16,
    negative_eigen: bool = False,
) -> tuple[Float[Array, "b t h v"], MemoryState]:
    """Titans neural memory; ``impl`` in ``IMPLS`` (``"auto"`` is chunked). ``chunk_size=1`` is exact;
    larger chunks are the paper's faster approximation (both impls compute the same one)."""
    _checks.check_no_negative_eigen("titans", negative_eigen)
    _checks.check_choice("impl", impl, IMPLS)
    if impl == "sequential":
        return titans_recurrent(q, k, v, theta, eta, alpha, w1, w2, h0=h0, resets=resets, chunk_size=chunk_size)
    return titans_chunked(q, k, v, theta, eta, alpha, w1, w2, h0=h0, resets=resets, chunk_size=chunk_size)


def titans_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    theta: Float[AnyArray, "b t h"],
    eta: Float[AnyArray, "b t h"],
    alpha: Float[AnyArray, "b t h"],
    w1: Float[AnyArray, "h k _"],
    w2: Float[AnyArray, "h _ v"] | None = None,
    *,
    chunk_size=1,
) -> Operator:
    """``[b, h, T, T]`` operator on ``v`` of the linear memory from zero initial weights: the response to
    one-hot value sequences (``v_s = e_s``), i.e. ``M[t, s] = d y_t / d v_s`` (any value channel)."""
    if w2 is not None:
        raise ValueError("materialize needs the linear memory (depth=1): a 2-layer memory is not linear in v")
    b, t, h, _ = q.shape
    basis = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32)[None, :, None, :], (b, t, h, t))
    zero = jnp.zeros((h, q.shape[-1], t), jnp.float32)
    y, _ = titans_chunked(q, k, basis, theta, eta, alpha, zero, chunk_size=chunk_size)
    return jnp.moveaxis(y, 1, 2)  # [b, h, t, s]


# ----------------------------------------------------------------------------- NNX layer


class NeuralMemoryCache(NamedTuple):
    state: Any  # MemoryState
    conv: Any  # [b, conv_size - 1, 3 * heads * head_dim]


class NeuralMemory(nnx.Module):
    """The Titans long-term memory module (LMM) as a sequence mixer, for the MAC / MAG / MAL models.

    ``q, k, v = silu(conv(W x))`` (depthwise short convs), ``q, k`` L2-normalised per head; gates
    ``theta = max_lr * sigmoid(.)``, ``eta = sigmoid(.)``, ``alpha = sigmoid(.)`` per head; learned
    initial memory weights; ``y = W_o RMSNorm(M_t(q_t))``. ``chunk_size=1`` (default) is exact and
    agrees with decoding; larger chunks train faster (the paper's approximation). Cache:
    :class:`NeuralMemoryCache`. ``retrieve(cache, x)`` reads the memory without writing (MAC).
    """

    def __init__(self, d_model: int, *, num_heads: int = 2, head_dim: int | None = None, depth: int = 2,
                 hidden: int | None = None, max_lr: float = 0.1, chunk_size: int = 1, conv_size: int = 4,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        _checks.check_choice("depth", depth, (1, 2))
        head_dim = head_dim or d_model // num_heads
        hidden = hidden or 2 * head_dim
        self.num_heads, self.head_dim, self.depth, self.max_lr, self.chunk_size = num_heads, head_dim, depth, max_lr, chunk_size
        inner = num_heads * head_dim
        self.qkv_proj = Linear(d_model, 3 * inner, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.conv = ShortConv(3 * inner, conv_size, rngs=rngs)
        self.gate_proj = Linear(d_model, 3 * num_heads, axes=("embed", "heads"), use_bias=True, rngs=rngs, dtype=dtype)
        k1, k2 = jax.random.split(rngs.params())
        out1 = head_dim if depth == 1 else hidden
        self.w1 = nnx.Param(jax.random.normal(k1, (num_heads, head_dim, out1)) * head_dim**-0.5 * (depth - 1),
                            out_sharding=("heads", "head_dim", None))
        self.w2 = (nnx.Param(jax.random.normal(k2, (num_heads, hidden, head_dim)) * hidden**-0.5,
                             out_sharding=("heads", None, "head_dim")) if depth == 2 else None)
        self.norm = RMSNorm(inner, axis_name="heads")
        self.o_proj = Linear(inner, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype)

    def _inputs(self, x, segment_ids, conv_state):
        nh = self.num_heads
        qkv, conv_state = self.conv(self.qkv_proj(x), state=conv_state, segment_ids=segment_ids)
        q, k, v = jnp.split(jax.nn.silu(qkv), 3, axis=-1)
        q, k, v = l2_normalize(split_heads(q, nh)), l2_normalize(split_heads(k, nh)), split_heads(v, nh)
        th, et, al = jnp.split(self.gate_proj(x).astype(jnp.float32), 3, axis=-1)
        # forgetting starts small (sigmoid(-4) ~ 0.018): a 2-layer memory decayed to 0 cannot relearn
        return q, k, v, self.max_lr * jax.nn.sigmoid(th), jax.nn.sigmoid(et), jax.nn.sigmoid(al - 4.0), conv_state

    def _w(self):
        return self.w1[...], (None if self.w2 is None else self.w2[...])

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        q, k, v, th, et, al, conv_state = self._inputs(x, segment_ids, None if cache is None else cache.conv)
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, mem = titans(q, k, v, th, et, al, *self._w(), h0=p.h0, resets=p.resets, chunk_size=self.chunk_size)
        y = self.o_proj(self.norm(merge_heads(y))).astype(x.dtype)
        return y, update(cache, state=mem, conv=conv_state)

    def retrieve(self, cache, q):
        """``M(q)`` for queries ``q [b, t, h, head_dim]`` from the cache's memory (no write)."""
        mem = cache.state if cache is not None else _init_state(None, _weights(*self._w()), q.shape[0])
        read = jax.vmap(memory_apply, in_axes=(None, 1), out_axes=1)
        return read(mem.w, q.astype(jnp.float32)).astype(q.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> NeuralMemoryCache:
        del max_len
        return NeuralMemoryCache(_init_state(None, _weights(*self._w()), batch_size), self.conv.init_state(batch_size))


class LinearNeuralMemory(NeuralMemory):
    """The neural memory with a linear memory ``M(x) = x W`` (``depth=1``)."""

    def __init__(self, d_model: int, *, depth: int = 1, **kw):
        super().__init__(d_model, depth=depth, **kw)


# ----------------------------------------------------------------------------- registry


def titans_make_inputs(key, batch, time, *, heads=2, key_dim=5, value_dim=7, hidden=6, depth=2, dtype=jnp.float32):
    ks = jax.random.split(key, 8)
    shp = (batch, time, heads)
    out = {
        "q": l2_normalize(jax.random.normal(ks[0], (*shp, key_dim))).astype(dtype),
        "k": l2_normalize(jax.random.normal(ks[1], (*shp, key_dim))).astype(dtype),
        "v": jax.random.normal(ks[2], (*shp, value_dim), dtype),
        # inner step sizes well inside the stable range (|k| = 1, momentum gain 1 / (1 - eta) ~ 2)
        "theta": (0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], shp))).astype(dtype),
        "eta": jax.nn.sigmoid(jax.random.normal(ks[4], shp)).astype(dtype),
        "alpha": (0.1 * jax.nn.sigmoid(jax.random.normal(ks[5], shp))).astype(dtype),
    }
    if depth == 1:
        out["w1"] = jnp.zeros((heads, key_dim, value_dim), jnp.float32)
    else:
        out["w1"] = jax.random.normal(ks[6], (heads, key_dim, hidden)) * key_dim**-0.5
        out["w2"] = jax.random.normal(ks[7], (heads, hidden, value_dim)) * hidden**-0.5
    return out


def titans_linear_make_inputs(key, batch, time, **kw):
    return titans_make_inputs(key, batch, time, **{"depth": 1, **kw})


register(MixerSpec(
    name="titans", fn=titans, recurrent=titans_recurrent, step=titans_step, make_inputs=titans_make_inputs,
    layer=NeuralMemory, params=("w1", "w2"), impls=("sequential", "chunked"), options={"chunk_size": 1},
    paper="https://arxiv.org/abs/2501.00663",
    doc="Titans neural memory (Behrouz et al. 2024): 2-layer MLP written by momentum SGD with decay.", tol=1e-5,
))
register(MixerSpec(
    name="titans_linear", fn=titans, recurrent=titans_recurrent, step=titans_step,
    make_inputs=titans_linear_make_inputs, layer=LinearNeuralMemory, materialize=titans_materialize, value_arg="v",
    params=("w1",), impls=("sequential", "chunked"), options={"chunk_size": 1},
    paper="https://arxiv.org/abs/2501.00663", doc="Titans neural memory with a linear memory M(x) = x W.", tol=1e-5,
))
