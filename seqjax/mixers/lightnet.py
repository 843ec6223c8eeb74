r"""LightNet: the additive linear recurrence (Qin et al. 2024, "You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet", arXiv 2405.21022).

Linear attention with a multiplicative decay, ``s_t = lambda_t s_{t-1} + k_t v_t^T``, depends on the
scan order, so 2-D data needs one scan per direction. LightNet's **additive** recurrence keeps an
order-free sum and derives the decay from a cumulative (log-sum-exp) gate:

.. math::

    z_t = \log\Big(\sum_{j \le t} e^{f_j}\Big), \qquad
    s_t = \sum_{j \le t} e^{f_j - z_t} \odot k_j \, v_j^\top
        = e^{z_{t-1} - z_t} \odot s_{t-1} + e^{f_t - z_t} \odot k_t v_t^\top, \qquad
    o_t = q_t^\top s_t,

per key channel (``f, k, q`` ``[b, t, h, K]``). The unnormalised sum ``e^{z_t} s_t`` is additive, so
the final state of one scan is the same in any order (raster, column-major, reversed): one scan
covers a 2-D grid, and the non-causal form reads the final state everywhere. In the paper (and in
fla / xmixers) the gate is the key itself, ``f = k``, and the key fed to the state is ``1`` — or the
MD-LRPE features ``[cos phi_j, sin phi_j]`` (see :func:`md_lrpe`), which is why ``k`` and ``f`` are
separate inputs here. The decay ``e^{z_{t-1} - z_t}`` lies in ``(0, 1]``; every exponent computed is
``<= 0`` (so a log-decay of -20 per step or more stays finite).

Impls: ``"sequential"`` (reference ``lax.scan``) and ``"chunked"``: ``z`` by a segmented
log-cum-sum-exp ``associative_scan``, then per chunk the intra-chunk weights ``e^{f_j - z_t}`` (``j <= t``,
never positive exponents) and the chunk-to-chunk carry through :func:`seqjax.scan.linear_scan`.

Positional encodings for ``D``-dimensional grids (scanned once, in raster order):

- **MD-TPE** (:func:`md_tpe`, :class:`MdTpe`): a Toeplitz (relative-position) mixing along each axis,
  ``y = sum_a T_a x`` with ``(T_a x)[.., i, ..] = sum_{j <= i} c_a lambda_a^{i-j} x[.., j, ..]``
  (the exponentially-decaying Toeplitz kernel of xmixers' ``Tpe``, computed by the scan engine); it
  commutes with shifts along each axis.
- **MD-LRPE** (:func:`md_lrpe`): the key/query channels are split into one group per axis and each
  group is rotated by ``theta_i * pos_a``; as ``[x cos phi, x sin phi]`` (LRPE's cos/sin form, which keeps
  ``k >= 0`` compatible with the additive gate), ``q'_t . k'_j = sum_i q_i k_i cos(theta_i (pos_t - pos_j)_a)``
  depends on relative positions only.

Shapes: ``q, k, f`` ``[b, t, h, K]``; ``v`` ``[b, t, h, V]``; state ``(s [b, h, K, V], z [b, h, K])``
float32 (``z = -1e30`` is the empty state); ``y`` in ``v``'s dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.layer import plan, update
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import GatedRMSNorm, Linear, merge_heads, split_heads
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, PyTree, ResetsLike, SegmentIds

__all__ = [
    "lightnet", "lightnet_recurrent", "lightnet_chunked", "lightnet_step", "lightnet_materialize",
    "lightnet_make_inputs", "md_lrpe", "lrpe_angles", "md_tpe", "MdTpe", "LightNetCache", "LightNet",
]

NEG = -1e30
IMPLS = ("auto", "sequential", "chunked")


#: the state ``(s [b, h, k, v], z [b, h, k])`` float32 (``z``: the running log-sum-exp of ``f``)
State = tuple[Float[Array, "b h k v"], Float[Array, "b h k"]]


def _check_lightnet_inputs(q, k, v, f, h0, resets):
    _checks.check_ndim("q", q, 4, "[batch, time, heads, key_dim]")
    b, t, h, dk = q.shape
    _checks.check_same_shape("q", q, "k", k)
    _checks.check_same_shape("q", q, "f", f)
    _checks.check_ndim("v", v, 4, "[batch, time, heads, value_dim]")
    _checks.check_shape("v", v, (b, t, h, None), "[batch, time, heads, value_dim]")
    for name, x in (("q", q), ("k", k), ("v", v), ("f", f)):
        _checks.check_dtype(name, x, "float")
    if h0 is not None:
        if not (isinstance(h0, (tuple, list)) and len(h0) == 2):
            raise ValueError("h0 must be the state tuple (s [b, h, K, V], z [b, h, K])")
        _checks.check_shape("h0[0] (s)", h0[0], (b, h, dk, v.shape[-1]), "[batch, heads, key_dim, value_dim]")
        _checks.check_shape("h0[1] (z)", h0[1], (b, h, dk), "[batch, heads, key_dim]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")


def _init(h0, b, h, dk, dv):
    if h0 is None:
        return jnp.zeros((b, h, dk, dv), jnp.float32), jnp.full((b, h, dk), NEG, jnp.float32)
    return jnp.asarray(h0[0], jnp.float32), jnp.asarray(h0[1], jnp.float32)


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


# ----------------------------------------------------------------------------- reference and step


def _cell(state, q_t, k_t, v_t, f_t):
    s, z = state
    z_new = jnp.logaddexp(z, f_t)
    s = jnp.exp(z - z_new)[..., None] * s + (jnp.exp(f_t - z_new) * k_t)[..., None] * v_t[..., None, :]
    return (s, z_new), jnp.einsum("bhk,bhkv->bhv", q_t, s)


def lightnet_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    f: Float[AnyArray, "b t h k"],
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
) -> tuple[Float[Array, "b t h v"], State]:
    """The reference ``lax.scan``: ``z_t = logaddexp(z_{t-1}, f_t)``,
    ``s_t = e^{z_{t-1}-z_t} s_{t-1} + e^{f_t-z_t} k_t v_t^T``, ``o_t = q_t s_t``."""
    _check_lightnet_inputs(q, k, v, f, h0, resets)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    r = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    empty = _init(None, b, h, dk, dv)

    def step(state, xs):
        *x, r_t = xs
        state = tuple(jnp.where(r_t.reshape(b, *(1,) * (a.ndim - 1)), e, a) for a, e in zip(state, empty))
        return _cell(state, *x)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (*_f32(q, k, v, f), r))
    h_last, ys = lax.scan(step, _init(h0, b, h, dk, dv), xs)
    return jnp.moveaxis(ys, 0, 1).astype(v.dtype), h_last


def lightnet_step(
    h: PyTree,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    f: Float[AnyArray, "b h k"],
) -> tuple[Float[Array, "b h v"], State]:
    """One token (``q, k, f [b, h, K]``, ``v [b, h, V]``); ``h=None`` is the empty state."""
    b, nh, dk = q.shape
    state, y = _cell(_init(h, b, nh, dk, v.shape[-1]), *_f32(q, k, v, f))
    return y.astype(v.dtype), state


# ----------------------------------------------------------------------------- chunked


def _log_cumsum_exp(f, z0, r):
    """Segmented ``z_t = log(e^{z_{t-1}} + e^{f_t})`` over axis 1 (``r`` cuts the carry); ``f [b, t, ...]``."""
    rr = r.reshape(r.shape + (1,) * (f.ndim - 2))
    flag = jnp.broadcast_to(rr, f.shape)

    def comb(a, b):
        fa, za = a
        fb, zb = b
        return fa | fb, jnp.where(fb, zb, jnp.logaddexp(za, zb))

    seen, z = lax.associative_scan(comb, (flag, f), axis=1)
    return jnp.where(seen, z, jnp.logaddexp(z0[:, None], z))


def lightnet_chunked(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    f: Float[AnyArray, "b t h k"],
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    chunk_size=16,
) -> tuple[Float[Array, "b t h v"], State]:
    """Chunkwise-parallel form (see module docstring). Returns ``(y, (s, z))``."""
    _check_lightnet_inputs(q, k, v, f, h0, resets)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, f = _f32(q, k, v, f)
    r = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets).astype(bool)
    s0, z0 = _init(h0, b, h, dk, dv)
    z = _log_cumsum_exp(f, z0, r)
    z_prev = jnp.concatenate([z0[:, None], z[:, :-1]], axis=1)
    z_prev = jnp.where(r[..., None, None], NEG, z_prev)
    z_last = z[:, -1]
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        w = [(0, 0), (0, pad), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, w) for x in (q, k, v))
        f = jnp.pad(f, w, constant_values=NEG)
        z, z_prev = jnp.pad(z, w, mode="edge"), jnp.pad(z_prev, w, mode="edge")
        r = jnp.pad(r, [(0, 0), (0, pad)])
    q, k, v, f, z, z_prev = (x.reshape(b, n, c, h, x.shape[-1]) for x in (q, k, v, f, z, z_prev))
    seg = jnp.cumsum(r.reshape(b, n, c).astype(jnp.int32), axis=2)
    ii = jnp.arange(c)
    mask = (ii[:, None] >= ii[None, :])[None, None] & (seg[..., :, None] == seg[..., None, :])  # [b, n, t, j]
    # intra-chunk: e^{f_j - z_t} for j <= t in the same document (exponent <= 0); masked before exp
    lw = f[:, :, None, :] - z[:, :, :, None]  # [b, n, t, j, h, K]
    w_tj = jnp.exp(jnp.where(mask[..., None, None], lw, NEG))
    a = jnp.einsum("bnthk,bnjhk,bntjhk->bnhtj", q, k, w_tj)
    y = jnp.einsum("bnhtj,bnjhv->bnthv", a, v)
    # carry: the state after the previous chunk, decayed by e^{z_start - z_t} for the chunk's head tokens
    z_start = z_prev[:, :, 0]  # [b, n, h, K]
    head = (seg == 0)[..., None, None]
    dq = q * jnp.exp(jnp.where(head, z_start[:, :, None] - z, NEG))
    z_end = z[:, :, -1]
    tail = (seg == seg[..., -1:])[..., None, None]
    kb = k * jnp.exp(jnp.where(tail, f - z_end[:, :, None], NEG))
    b_c = jnp.einsum("bnjhk,bnjhv->bnhkv", kb, v)
    a_c = jnp.where((seg[..., -1] == 0)[..., None, None], jnp.exp(z_start - z_end), 0.0)[..., None]
    s_end, s_last = linear_scan(a_c, b_c, h0=s0)
    s_start = jnp.concatenate([s0[:, None], s_end[:, :-1]], axis=1)
    y = y + jnp.einsum("bnthk,bnhkv->bnthv", dq, s_start)
    return y.reshape(b, n * c, h, dv)[:, :t].astype(out_dtype), (s_last, z_last)


def lightnet(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    f: Float[AnyArray, "b t h k"],
    *,
    h0: PyTree = None,
    impl="auto",
    resets: ResetsLike | None = None,
    chunk_size=16,
    negative_eigen: bool = False,
) -> tuple[Float[Array, "b t h v"], State]:
    """LightNet's additive recurrence; ``impl`` in ``IMPLS`` (``"auto"`` is chunked)."""
    _checks.check_no_negative_eigen("lightnet", negative_eigen)
    _checks.check_choice("impl", impl, IMPLS)
    if impl == "sequential":
        return lightnet_recurrent(q, k, v, f, h0=h0, resets=resets)
    return lightnet_chunked(q, k, v, f, h0=h0, resets=resets, chunk_size=chunk_size)


def lightnet_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    f: Float[AnyArray, "b t h k"],
) -> Operator:
    """``[b, h, T, T]``: ``M[t, j] = sum_i q_t[i] k_j[i] e^{f_j[i] - z_t[i]}`` for ``j <= t`` (``h0 = 0``)."""
    del v
    q, k, f = _f32(q, k, f)
    t = q.shape[1]
    z = lax.cumlogsumexp(f, axis=1)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, :, :, None, None]
    w = jnp.exp(jnp.where(mask, f[:, None] - z[:, :, None], NEG))  # [b, t, j, h, K]
    return jnp.einsum("bthk,bjhk,btjhk->bhtj", q, k, w)


# ----------------------------------------------------------------------------- positional encodings


def lrpe_angles(positions, key_dim: int, *, base: float = 10000.0):
    """MD-LRPE angles ``[..., key_dim]`` for integer ``positions [..., D]`` (one column per axis).

    Channels are split into ``D`` contiguous groups; group ``a`` turns with axis ``a``'s position at
    frequencies ``base^{-i / group}``.
    """
    positions = jnp.asarray(positions, jnp.float32)
    d = positions.shape[-1]
    sizes = [key_dim // d + (1 if a < key_dim % d else 0) for a in range(d)]
    parts = []
    for a, g in enumerate(sizes):
        freq = base ** (-jnp.arange(g, dtype=jnp.float32) / max(g, 1))
        parts.append(positions[..., a : a + 1] * freq.reshape((1,) * (positions.ndim - 1) + (g,)))
    return jnp.concatenate(parts, axis=-1)


def md_lrpe(x, angles):
    """``[x cos phi, x sin phi]``: ``x [b, t, h, K]``, ``angles [t, K]`` (or ``[b, t, K]``) -> ``[b, t, h, 2K]``."""
    phi = angles[:, :, None, :] if angles.ndim == 3 else angles[None, :, None, :]
    x32 = x.astype(jnp.float32)
    return jnp.concatenate([x32 * jnp.cos(phi), x32 * jnp.sin(phi)], axis=-1).astype(x.dtype)


def raster_positions(grid):
    """``[prod(grid), D]`` integer coordinates of a grid in raster (row-major) order."""
    mesh = jnp.meshgrid(*[jnp.arange(g) for g in grid], indexing="ij")
    return jnp.stack([m.reshape(-1) for m in mesh], axis=-1)


def md_tpe(x, coef, log_decay):
    """MD-TPE on a grid ``x [b, *grid, d]``: ``sum_a T_a x``, ``T_a`` the causal Toeplitz kernel
    ``c_a lambda_a^{i-j}`` (``i >= j``) along grid axis ``a``; ``coef, log_decay [D, d]`` (``log lambda <= 0``)."""
    nd = x.ndim - 2
    _checks.check_shape("coef", coef, (nd, x.shape[-1]), "[grid axes, channels]")
    _checks.check_shape("log_decay", log_decay, (nd, x.shape[-1]), "[grid axes, channels]")
    out = jnp.zeros(x.shape, jnp.float32)
    for a in range(nd):
        xa = jnp.moveaxis(x.astype(jnp.float32), a + 1, 1)  # the axis to scan on axis 1
        lam = jnp.broadcast_to(log_decay[a].astype(jnp.float32), xa.shape)
        ca = coef[a].astype(jnp.float32).reshape((1,) * (xa.ndim - 1) + (-1,))
        ya, _ = linear_scan(lam, xa * ca, log_decay=True)
        out = out + jnp.moveaxis(ya, 1, a + 1)
    return out.astype(x.dtype)


class MdTpe(nnx.Module):
    """MD-TPE as a residual positional encoding on a grid: ``x + sum_a T_a x``."""

    def __init__(self, dim: int, ndim: int = 2, *, rngs: nnx.Rngs):
        self.coef = nnx.Param(0.1 * jax.random.normal(rngs.params(), (ndim, dim)), out_sharding=(None, "embed"))
        self.decay_logit = nnx.Param(jnp.full((ndim, dim), 2.0), out_sharding=(None, "embed"))

    def __call__(self, x):
        return x + md_tpe(x, self.coef[...], jax.nn.log_sigmoid(self.decay_logit[...]))


# ----------------------------------------------------------------------------- NNX layer


class LightNetCache(NamedTuple):
    state: Any  # (s [b, h, K, V], z [b, h, K]) float32
    pos: Any  # [] int32: tokens consumed (the LRPE position of the next one)


class LightNet(nnx.Module):
    """LightNet attention: ``q = silu(W_q x)``, the gate ``f = W_k x`` (the key is its own gate), LRPE
    on q / key, the additive recurrence, a low-rank output gate with RMSNorm, output projection.

    1-D (``grid=None``): causal over time, LRPE on the absolute position; cache :class:`LightNetCache`.
    ``grid=(H, W, ...)``: ``x [b, prod(grid), d]`` is a raster-flattened grid; MD-TPE is added to the
    input, MD-LRPE uses grid coordinates, and one scan runs in raster order (``causal=False``: every
    position reads the final state, i.e. global attention in O(T)). No cache in grid mode.
    """

    def __init__(self, d_model: int, *, num_heads: int = 2, key_dim: int = 8, use_lrpe: bool = True,
                 grid: tuple[int, ...] | None = None, causal: bool = True, gate_rank: int = 8,
                 base: float = 10000.0, rngs: nnx.Rngs, dtype=jnp.float32):
        self.num_heads, self.key_dim, self.use_lrpe, self.base = num_heads, key_dim, use_lrpe, base
        self.grid, self.causal = (tuple(grid) if grid is not None else None), causal
        if not causal and grid is None:
            raise ValueError("causal=False needs grid= (the non-causal form is for grids)")
        self.head_dim = d_model // num_heads
        self.q_proj = Linear(d_model, num_heads * key_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.f_proj = Linear(d_model, num_heads * key_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d_model, num_heads * self.head_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.g_down = Linear(d_model, gate_rank, axes=("embed", None), rngs=rngs, dtype=dtype)
        self.g_up = Linear(gate_rank, num_heads * self.head_dim, axes=(None, "heads"), rngs=rngs, dtype=dtype)
        self.norm = GatedRMSNorm(num_heads * self.head_dim, group_size=self.head_dim)
        self.o_proj = Linear(num_heads * self.head_dim, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype)
        self.tpe = MdTpe(d_model, len(self.grid), rngs=rngs) if self.grid is not None else None

    def _features(self, q, f, positions):
        k = jnp.ones_like(q)
        if self.use_lrpe:
            ang = lrpe_angles(positions, self.key_dim, base=self.base)
            q, k, f = md_lrpe(q, ang), md_lrpe(k, ang), jnp.concatenate([f, f], axis=-1)
        return q, k, f

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        _checks.check_ndim("x", x, 3, "[batch, time, d_model]")
        b, t, _ = x.shape
        if self.grid is not None:
            if cache is not None:
                raise ValueError("LightNet(grid=...) has no decode cache")
            if t != math.prod(self.grid):
                raise ValueError(f"x must have time = prod(grid) = {math.prod(self.grid)}, got {t}")
            x = self.tpe(x.reshape(b, *self.grid, -1)).reshape(b, t, -1)
            positions = raster_positions(self.grid)
        else:
            pos0 = 0 if cache is None else cache.pos
            positions = (pos0 + jnp.arange(t))[:, None]
        nh = self.num_heads
        q = jax.nn.silu(split_heads(self.q_proj(x), nh))
        f = split_heads(self.f_proj(x), nh)
        v = split_heads(self.v_proj(x), nh)
        q, k, f = self._features(q, f, positions)
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, (s, z) = lightnet(q, k, v, f, h0=p.h0, resets=p.resets)
        if not self.causal:  # every position reads the final state
            y = jnp.einsum("bthk,bhkv->bthv", q.astype(jnp.float32), s).astype(v.dtype)
        y = self.norm(merge_heads(y), self.g_up(self.g_down(x)))
        y = self.o_proj(y).astype(x.dtype)
        return y, update(cache, state=(s, z), pos=None if cache is None else cache.pos + t)

    def init_cache(self, batch_size: int, max_len: int) -> LightNetCache:
        del max_len
        kd = self.key_dim * (2 if self.use_lrpe else 1)
        return LightNetCache(_init(None, batch_size, self.num_heads, kd, self.head_dim), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- registry


def lightnet_make_inputs(key, batch, time, *, heads=2, key_dim=5, value_dim=7, dtype=jnp.float32):
    kq, kk, kv, kf = jax.random.split(key, 4)
    shp = (batch, time, heads, key_dim)
    return {
        "q": jax.random.normal(kq, shp, dtype),
        "k": jax.random.normal(kk, shp, dtype),
        "v": jax.random.normal(kv, (batch, time, heads, value_dim), dtype),
        "f": (2.0 * jax.random.normal(kf, shp)).astype(dtype),
    }


register(MixerSpec(
    name="lightnet", fn=lightnet, recurrent=lightnet_recurrent, step=lightnet_step,
    make_inputs=lightnet_make_inputs, layer=LightNet, materialize=lightnet_materialize, value_arg="v",
    impls=("sequential", "chunked"), paper="https://arxiv.org/abs/2405.21022",
    doc="LightNet (Qin et al. 2024): additive linear recurrence with a log-cum-sum-exp gate; MD-TPE, MD-LRPE.",
    tol=1e-5,
))
