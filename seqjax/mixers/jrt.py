r"""JRT-RNN prefix linear attention (Arora, Timalsina, Singhal, Spector, Eyuboglu, Zhao, Rao, Rudra, Ré
2024, "Just read twice: closing the recall gap for recurrent language models", arXiv 2407.05483).

The first ``prefix_len`` tokens of a document (the prompt) are read **non-causally** by an encoder
with its own key/value projections, and the decoder runs causal linear attention whose state starts
from the encoder's state of the *whole* prefix:

.. math::

    E = \sum_{j < P} \tilde k_j \tilde v_j^\top, \qquad e = \sum_{j < P} \tilde k_j,
    \qquad
    S_t = E + \sum_{j \le t} k_j v_j^\top, \qquad z_t = e + \sum_{j \le t} k_j,
    \qquad
    y_t = \frac{q_t^\top S_t}{q_t^\top z_t + \epsilon}

for every position ``t`` of the document (prefix positions too, so they see the whole prefix through
``E``; as in the authors' ``PrefixLinearAttention``). ``q, k, k_enc`` are feature-mapped already (the
layer uses Based's 2nd-order Taylor map); ``normalize=False`` drops the denominator. Recurrently:
the carry into a document's first token is ``(E, e)`` instead of zero, then ``S_t = S_{t-1} + k_t v_t^T``.

**Where the prefix is (the convention that makes split / step / packing exact).** A *document start*
is ``t = 0`` when ``h0 is None`` and every ``t`` with ``resets[t]``. The prefix of a document is its
first ``prefix_len`` tokens **inside this call**. A call with ``h0`` given and no reset at ``t = 0``
continues a document whose prefix was already consumed, so it is plain causal linear attention from
``h0``. Hence:

- split-and-carry is exact when the split point is ``>= prefix_len`` (the prefix is handled in one
  parallel call, as in the authors' prefill);
- :func:`jrt_step` is the decoder after the prefix (causal linear attention; ``k_enc`` / ``v_enc`` are
  accepted and ignored);
- packed documents each get their own prefix; the NNX layer marks a fresh cache as a document start.

Impls: ``"sequential"`` (the reference, two ``lax.scan`` s: a reverse one sums each document's prefix,
a forward one runs the decoder) and ``"chunked"`` (chunkwise-parallel linear attention; the non-causal
prefix term is a causal plus a strictly anti-causal pass over the masked encoder keys).

Shapes: ``q, k, k_enc`` ``[b, t, h, k]``; ``v`` (and ``v_enc``, default ``v``) ``[b, t, h, v]``;
state ``(S [b, h, k, v], z [b, h, k])`` float32; ``y`` in ``v``'s dtype. ``materialize`` (with
``v_enc = v``) is the ``[b, h, T, T]`` operator — lower triangular plus a full prefix block.
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
from seqjax.nn import Linear, merge_heads, split_heads
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, PyTree, ResetsLike, SegmentIds

__all__ = ["jrt", "jrt_recurrent", "jrt_chunked", "jrt_step", "jrt_materialize", "jrt_make_inputs",
           "taylor_feature_map", "JRTCache", "JRT"]

IMPLS = ("auto", "sequential", "chunked")


# ----------------------------------------------------------------------------- helpers


#: the state ``(S [b, h, k, v], z [b, h, k])`` float32
State = tuple[Float[Array, "b h k v"], Float[Array, "b h k"]]


def _check_jrt_inputs(q, k, v, k_enc, v_enc, h0, resets, prefix_len):
    _checks.check_ndim("q", q, 4, "[batch, time, heads, key_dim]")
    b, t, h, dk = q.shape
    _checks.check_same_shape("q", q, "k", k)
    _checks.check_ndim("v", v, 4, "[batch, time, heads, value_dim]")
    _checks.check_shape("v", v, (b, t, h, None), "[batch, time, heads, value_dim]")
    if k_enc is not None:
        _checks.check_same_shape("q", q, "k_enc", k_enc)
    if v_enc is not None:
        _checks.check_same_shape("v", v, "v_enc", v_enc)
    for name, x in (("q", q), ("k", k), ("v", v), ("k_enc", k_enc), ("v_enc", v_enc)):
        if x is not None:
            _checks.check_dtype(name, x, "float")
    if h0 is not None:
        if not (isinstance(h0, (tuple, list)) and len(h0) == 2):
            raise ValueError("h0 must be the state tuple (S [b, h, k, v], z [b, h, k])")
        _checks.check_shape("h0[0] (S)", h0[0], (b, h, dk, v.shape[-1]), "[batch, heads, key_dim, value_dim]")
        _checks.check_shape("h0[1] (z)", h0[1], (b, h, dk), "[batch, heads, key_dim]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")
    if not (isinstance(prefix_len, int) and prefix_len >= 0):
        raise ValueError(f"prefix_len must be a non-negative int, got {prefix_len!r}")


def _starts(b, t, h0, resets):
    """``[b, t]`` bool: document starts (``t = 0`` when ``h0 is None``, and every reset)."""
    s = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    if h0 is None:
        s = s.at[:, 0].set(True)
    return s


def _prefix_mask(starts, prefix_len):
    """``[b, t]`` bool: the first ``prefix_len`` tokens after each document start."""
    idx = jnp.arange(starts.shape[1])[None]
    last = lax.cummax(jnp.where(starts, idx, -1), axis=1)
    return (last >= 0) & (idx - last < prefix_len)


def _prep(q, k, v, k_enc, v_enc, h0, resets, prefix_len):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    k_enc = k if k_enc is None else k_enc
    v_enc = v if v_enc is None else v_enc
    starts = _starts(b, t, h0, resets)
    pm = _prefix_mask(starts, prefix_len)[..., None, None].astype(jnp.float32)
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if h0 is None else f32(h0[0])
    z0 = jnp.zeros((b, h, dk), jnp.float32) if h0 is None else f32(h0[1])
    return f32(q), f32(k), f32(v), f32(k_enc) * pm, f32(v_enc), starts, s0, z0


def _readout(num, den, normalize, eps):
    return num / (den[..., None] + eps) if normalize else num


# ----------------------------------------------------------------------------- reference


def jrt_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    k_enc: Float[AnyArray, "b t h k"] | None = None,
    v_enc: Float[AnyArray, "b t h v"] | None = None,
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    prefix_len=0,
    normalize=True,
    eps=1e-6,
) -> tuple[Float[Array, "b t h v"], State]:
    """The reference: a reverse ``lax.scan`` sums each document's prefix ``(E, e)``; a forward one runs
    ``S_t = [t starts a document ? E : S_{t-1}] + k_t v_t^T``, ``y_t = q_t S_t / (q_t z_t + eps)``."""
    _check_jrt_inputs(q, k, v, k_enc, v_enc, h0, resets, prefix_len)
    out_dtype = v.dtype
    q, k, v, ke, ve, starts, s0, z0 = _prep(q, k, v, k_enc, v_enc, h0, resets, prefix_len)
    tm = lambda x: jnp.moveaxis(x, 1, 0)
    nxt_start = jnp.concatenate([starts[:, 1:], jnp.zeros_like(starts[:, :1])], axis=1)

    def enc(carry, xs):  # R_t = prefix term at t + R_{t+1} (cut where t+1 starts the next document)
        ke_t, ve_t, cut = xs
        e_s, e_z = carry
        e_s = jnp.where(cut[:, None, None, None], 0.0, e_s) + jnp.einsum("bhk,bhv->bhkv", ke_t, ve_t)
        e_z = jnp.where(cut[:, None, None], 0.0, e_z) + ke_t
        return (e_s, e_z), (e_s, e_z)

    _, (es, ez) = lax.scan(enc, (jnp.zeros_like(s0), jnp.zeros_like(z0)), (tm(ke), tm(ve), tm(nxt_start)), reverse=True)

    def dec(carry, xs):
        q_t, k_t, v_t, st, es_t, ez_t = xs
        s, z = carry
        s = jnp.where(st[:, None, None, None], es_t, s) + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        z = jnp.where(st[:, None, None], ez_t, z) + k_t
        y = _readout(jnp.einsum("bhk,bhkv->bhv", q_t, s), jnp.einsum("bhk,bhk->bh", q_t, z), normalize, eps)
        return (s, z), y

    h_last, ys = lax.scan(dec, (s0, z0), (tm(q), tm(k), tm(v), tm(starts), es, ez))
    return jnp.moveaxis(ys, 0, 1).astype(out_dtype), h_last


# ----------------------------------------------------------------------------- chunked


def _la_chunked(q, k, v, h0, cut, chunk_size):
    """Causal linear attention ``S_t = [cut_t ? 0 : S_{t-1}] + k_t v_t^T``, ``y_t = q_t S_t``, chunkwise.

    ``q, k [b, t, h, k]``, ``v [b, t, h, v]``, ``h0 [b, h, k, v]``, ``cut [b, t]``; float32.
    Returns ``(y, S_last)``.
    """
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, cut = padt(q), padt(k), padt(v), padt(cut)
    q, k, v = (x.reshape(b, n, c, h, x.shape[-1]) for x in (q, k, v))
    seg = jnp.cumsum(cut.reshape(b, n, c).astype(jnp.int32), axis=2)  # document index inside the chunk
    ii = jnp.arange(c)
    mask = (ii[:, None] >= ii[None, :])[None, None] & (seg[..., :, None] == seg[..., None, :])  # [b, n, c, c]
    a = jnp.einsum("bnthk,bnshk->bnhts", q, k) * mask[:, :, None].astype(jnp.float32)
    y = jnp.einsum("bnhts,bnshv->bnthv", a, v)
    tail = (seg == seg[..., -1:]).astype(jnp.float32)  # tokens of the chunk's last document
    b_c = jnp.einsum("bnshk,bnshv->bnhkv", k * tail[..., None, None], v)
    a_c = (seg[..., -1] == 0).astype(jnp.float32)[:, :, None, None, None]  # carry survives the chunk
    s_end, s_last = linear_scan(a_c, b_c, h0=h0)
    s_start = jnp.concatenate([h0[:, None], s_end[:, :-1]], axis=1)
    head = (seg == 0).astype(jnp.float32)[..., None, None]  # tokens that still see the chunk-start state
    y = y + jnp.einsum("bnthk,bnhkv->bnthv", q * head, s_start)
    return y.reshape(b, n * c, h, dv)[:, :t], s_last


def jrt_chunked(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    k_enc: Float[AnyArray, "b t h k"] | None = None,
    v_enc: Float[AnyArray, "b t h v"] | None = None,
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    prefix_len=0,
    normalize=True,
    eps=1e-6,
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], State]:
    """The parallel form: causal chunked linear attention on ``(k, v)`` from ``h0``, plus the prefix
    term ``sum_{j in prefix(doc(t))} (q_t . k~_j) v~_j`` as a causal + strictly anti-causal pass."""
    _check_jrt_inputs(q, k, v, k_enc, v_enc, h0, resets, prefix_len)
    out_dtype = v.dtype
    q, k, v, ke, ve, starts, s0, z0 = _prep(q, k, v, k_enc, v_enc, h0, resets, prefix_len)
    ones = jnp.ones(v.shape[:-1] + (1,), jnp.float32)
    va, vea = jnp.concatenate([v, ones], -1), jnp.concatenate([ve, ones], -1)  # last column: denominator
    h0a = jnp.concatenate([s0, z0[..., None]], -1)
    y_dec, h_dec = _la_chunked(q, k, va, h0a, starts, chunk_size)
    y_enc, h_enc = _la_chunked(q, ke, vea, jnp.zeros_like(h0a), starts, chunk_size)
    if prefix_len > 0:  # the part of the prefix that lies in the future of t (same document)
        nxt = jnp.concatenate([starts[:, 1:], jnp.zeros_like(starts[:, :1])], axis=1)
        fl = lambda x: jnp.flip(x, 1)
        y_rev, _ = _la_chunked(fl(q), fl(ke), fl(vea), jnp.zeros_like(h0a), fl(nxt), chunk_size)
        diag = jnp.einsum("bthk,bthk->bth", q, ke)[..., None] * vea
        y_enc = y_enc + fl(y_rev) - diag
    y = y_dec + y_enc
    h = h_dec + h_enc
    y = _readout(y[..., :-1], y[..., -1], normalize, eps)
    return y.astype(out_dtype), (h[..., :-1], h[..., -1])


def jrt(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    k_enc: Float[AnyArray, "b t h k"] | None = None,
    v_enc: Float[AnyArray, "b t h v"] | None = None,
    *,
    h0: PyTree = None,
    impl="auto",
    resets: ResetsLike | None = None,
    prefix_len=0,
    normalize=True,
    eps=1e-6,
    chunk_size=64,
    negative_eigen: bool = False,
) -> tuple[Float[Array, "b t h v"], State]:
    """JRT prefix linear attention; ``impl`` in ``IMPLS`` (``"auto"`` is chunked). Returns ``(y, (S, z))``."""
    _checks.check_no_negative_eigen("jrt", negative_eigen)
    _checks.check_choice("impl", impl, IMPLS)
    kw = dict(h0=h0, resets=resets, prefix_len=prefix_len, normalize=normalize, eps=eps)
    if impl == "sequential":
        return jrt_recurrent(q, k, v, k_enc, v_enc, **kw)
    return jrt_chunked(q, k, v, k_enc, v_enc, chunk_size=chunk_size, **kw)


def jrt_step(
    h: PyTree,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    k_enc: Float[AnyArray, "b h k"] | None = None,
    v_enc: Float[AnyArray, "b h v"] | None = None,
    *,
    prefix_len=0,
    normalize=True,
    eps=1e-6,
) -> tuple[Float[Array, "b h v"], State]:
    """One decoder token after the prefix (``q, k [b, h, k]``, ``v [b, h, v]``): causal linear attention.
    ``k_enc``, ``v_enc`` and ``prefix_len`` are accepted for a uniform signature and unused."""
    del k_enc, v_enc, prefix_len
    b, nh, dk = k.shape
    s, z = (jnp.zeros((b, nh, dk, v.shape[-1]), jnp.float32), jnp.zeros((b, nh, dk), jnp.float32)) if h is None else h
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    s = s + jnp.einsum("bhk,bhv->bhkv", k32, v.astype(jnp.float32))
    z = z + k32
    y = _readout(jnp.einsum("bhk,bhkv->bhv", q32, s), jnp.einsum("bhk,bhk->bh", q32, z), normalize, eps)
    return y.astype(v.dtype), (s, z)


def jrt_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    k_enc: Float[AnyArray, "b t h k"] | None = None,
    *,
    prefix_len=0,
    normalize=True,
    eps=1e-6,
    resets: ResetsLike | None = None,
) -> Operator:
    """``[b, h, T, T]`` operator on ``v`` (with ``v_enc = v``, ``h0 = 0``): ``M[t, j] = (q_t.k_j [j <= t,
    same document] + q_t.k~_j [j in the prefix of t's document]) / (q_t z_t + eps)``."""
    b, t = q.shape[:2]
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    starts = _starts(b, t, None, resets)
    seg = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    same = seg[:, :, None] == seg[:, None, :]  # [b, t, j]
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & same
    ke = (k32 if k_enc is None else k_enc.astype(jnp.float32)) * _prefix_mask(starts, prefix_len)[..., None, None]
    m = jnp.einsum("bthk,bjhk->bhtj", q32, k32) * causal[:, None] + jnp.einsum("bthk,bjhk->bhtj", q32, ke) * same[:, None]
    if normalize:
        m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    return m


# ----------------------------------------------------------------------------- NNX layer


def taylor_feature_map(x):
    """Based's 2nd-order Taylor map: ``phi(x) . phi(y) = 1 + x.y/sqrt(d) + (x.y)^2/(2d)`` ~ ``exp(x.y/sqrt d)``."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d) / (2**0.5 * d**0.5)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / d**0.25, x2], axis=-1)


class JRTCache(NamedTuple):
    state: Any  # (S [b, h, f, v], z [b, h, f]) float32
    pos: Any  # [] int32: tokens consumed (0: a fresh cache, whose first token starts a document)


class JRT(nnx.Module):
    """Prefix linear attention layer (JRT-RNN): feature-mapped q/k, separate encoder k/v projections,
    output projection. The first ``prefix_len`` tokens of each document (of a fresh cache) are the
    non-causal prefix; pass ``prefix_len=`` at call time to override. Cache: :class:`JRTCache`."""

    def __init__(self, d_model: int, *, num_heads: int = 2, feature_dim: int = 4, head_dim: int | None = None,
                 prefix_len: int = 4, rngs: nnx.Rngs, dtype=jnp.float32):
        head_dim = head_dim or d_model // num_heads
        self.num_heads, self.feature_dim, self.head_dim, self.prefix_len = num_heads, feature_dim, head_dim, prefix_len
        fk = num_heads * feature_dim
        self.q_proj = Linear(d_model, fk, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k_proj = Linear(d_model, fk, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d_model, num_heads * head_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k_enc_proj = Linear(d_model, fk, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v_enc_proj = Linear(d_model, num_heads * head_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.o_proj = Linear(num_heads * head_dim, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None, prefix_len: int | None = None
    ) -> tuple[Hidden, Cache]:
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        prefix_len = self.prefix_len if prefix_len is None else prefix_len
        nh = self.num_heads
        phi = lambda y: taylor_feature_map(split_heads(y, nh))
        q, k, ke = phi(self.q_proj(x)), phi(self.k_proj(x)), phi(self.k_enc_proj(x))
        v, ve = split_heads(self.v_proj(x), nh), split_heads(self.v_enc_proj(x), nh)
        # a fresh cache starts a document (its first prefix_len tokens are the prefix)
        p = plan(x, segment_ids=segment_ids, cache=cache, fresh=None if cache is None else cache.pos == 0)
        y, state = jrt(q, k, v, ke, ve, h0=p.h0, resets=p.resets, prefix_len=prefix_len)
        y = self.o_proj(merge_heads(y)).astype(x.dtype)
        return y, update(cache, state=state, pos=None if cache is None else cache.pos + x.shape[1])

    def init_cache(self, batch_size: int, max_len: int) -> JRTCache:
        del max_len
        f = 1 + self.feature_dim + self.feature_dim**2
        state = (jnp.zeros((batch_size, self.num_heads, f, self.head_dim), jnp.float32),
                 jnp.zeros((batch_size, self.num_heads, f), jnp.float32))
        return JRTCache(state, jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- registry


def jrt_make_inputs(key, batch, time, *, heads=2, key_dim=5, value_dim=7, dtype=jnp.float32):
    kq, kk, kv, ke = jax.random.split(key, 4)
    pos = lambda kk_: jax.nn.softplus(jax.random.normal(kk_, (batch, time, heads, key_dim))).astype(dtype)
    return {
        "q": pos(kq),
        "k": pos(kk),
        "v": jax.random.normal(kv, (batch, time, heads, value_dim), dtype),
        "k_enc": pos(ke),
    }


register(MixerSpec(
    name="jrt", fn=jrt, recurrent=jrt_recurrent, step=jrt_step, make_inputs=jrt_make_inputs, layer=JRT,
    materialize=jrt_materialize, value_arg="v", impls=("sequential", "chunked"),
    paper="https://arxiv.org/abs/2407.05483", options={"prefix_len": 8}, causal=False,
    doc="JRT-RNN prefix linear attention (Arora et al. 2024): non-causal prefix encoder, causal decoder.", tol=1e-5,
))
