r"""Mamba's selective state-space model, S6 (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces"), with the negative-eigenvalue switch of Grazzi et al. (ICLR 2025, "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues").

Per channel ``d`` and state index ``n``, with input-dependent ``Δ_t > 0``, ``B_t``, ``C_t``:

.. math::
   \bar a_{t,dn} = \exp(Δ_{t,d} A_{dn}), \qquad
   h_{t,dn} = \bar a_{t,dn} h_{t-1,dn} + Δ_{t,d} B_{t,n} x_{t,d}, \qquad
   y_{t,d} = \textstyle\sum_n C_{t,n} h_{t,dn} + D_d x_{t,d},

``A = -exp(A_log)`` real ``[d, n]`` so ``\bar a ∈ (0, 1)``. With ``negative_eigen=True`` the transition
becomes ``2 \bar a - 1 ∈ (-1, 1)`` (the input term ``Δ B x`` is unchanged, as in the authors'
``selective_scan`` with ``positive_and_negative``): a sign flip per step, which lets one channel
track parity. The decay is kept in log space (``Δ A``) in the plain case; the signed transition is
formed as ``1 + 2 expm1(Δ A)`` (exact near 1).

Shapes: ``x``, ``dt`` ``[b, t, d]``; ``A`` ``[d, n]``; ``B``, ``C`` ``[b, t, n]``; ``D`` ``[d]``; state
``[b, d, n]`` float32. The layer (:class:`Mamba`) owns ``in_proj`` (to ``x`` and the gate ``z``), the
causal depthwise conv1d, ``x_proj`` (to ``Δ``, ``B``, ``C``), ``dt_proj`` with softplus and the
``dt`` bias init, ``A_log``, ``D``, the ``z`` gate and ``out_proj``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pallas_kernels._util import platform as kernel_platform
from seqjax import _checks
from seqjax.layer import plan, update
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import Linear, ShortConv
from seqjax.scan import linear_scan
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, ResetsLike, SegmentIds

__all__ = ["mamba", "mamba_recurrent", "mamba_step", "mamba_materialize", "mamba_make_inputs", "MambaCache",
           "Mamba", "MambaNegEig"]

IMPLS = ("auto", "sequential", "associative", "chunked", "fused")
FUSED_BLOCK = 16  # steps between the states the fused form saves for its backward


def _check_mamba_inputs(x, dt, A, B, C, D, h0, resets, negative_eigen, step=False):
    if not isinstance(negative_eigen, (bool, np.bool_)):
        raise TypeError(f"negative_eigen must be a bool, got {negative_eigen!r}")
    lead = "[batch, " if step else "[batch, time, "
    _checks.check_ndim("x", x, 2 if step else 3, lead + "channels]")
    _checks.check_dtype("x", x, "float")
    d = x.shape[-1]
    _checks.check_same_shape("x", x, "dt", dt)
    _checks.check_ndim("A", A, 2, "[channels, state]")
    n = A.shape[1]
    _checks.check_shape("A", A, (d, n), "[channels, state]")
    _checks.check_shape("B", B, (*x.shape[:-1], n), lead + "state]")
    _checks.check_shape("C", C, (*x.shape[:-1], n), lead + "state]")
    _checks.check_shape("D", D, (d,), "[channels]")
    if h0 is not None:
        _checks.check_shape("h0", h0, (x.shape[0], d, n), "[batch, channels, state]")
    if resets is not None:
        _checks.check_shape("resets", resets, x.shape[:2], "[batch, time]")


def _transition(dt, A, negative_eigen):
    """``(a, log_decay)``: ``Δ A`` (log space) or the signed ``2 exp(Δ A) - 1``."""
    dt_a = dt.astype(jnp.float32)[..., None] * A.astype(jnp.float32)[None, None]
    if negative_eigen:
        return 1.0 + 2.0 * jnp.expm1(dt_a), False
    return dt_a, True


def mamba_recurrent(
    x: Float[AnyArray, "b t d"],
    dt: Float[AnyArray, "b t d"],
    A: Float[AnyArray, "d n"],
    B: Float[AnyArray, "b t n"],
    C: Float[AnyArray, "b t n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Float[AnyArray, "b d n"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d n"]]:
    """The reference: ``lax.scan`` of ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``,
    ``y_t = C_t h_t + D x_t`` (``2 exp(Δ_t A) - 1`` with ``negative_eigen``)."""
    _check_mamba_inputs(x, dt, A, B, C, D, h0, resets, negative_eigen)
    return _recurrent(x, dt, A, B, C, D, h0, resets, bool(negative_eigen))


@functools.partial(jax.jit, static_argnames=("negative_eigen",))
def _recurrent(x, dt, A, B, C, D, h0, resets, negative_eigen):
    bsz, t, d = x.shape
    f32 = lambda v: jnp.moveaxis(v.astype(jnp.float32), 1, 0)
    state = jnp.zeros((bsz, *A.shape), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    keep = jnp.ones((bsz, t), bool) if resets is None else ~jnp.asarray(resets, bool)
    a, d_skip = A.astype(jnp.float32)[None], D.astype(jnp.float32)[None]

    def step(h, inp):
        x_t, dt_t, b_t, c_t, keep_t = inp
        a_bar = jnp.exp(dt_t[..., None] * a)
        if negative_eigen:
            a_bar = 2.0 * a_bar - 1.0
        h = jnp.where(keep_t[:, None, None], a_bar * h, 0.0) + (dt_t * x_t)[..., None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t) + d_skip * x_t

    state, ys = lax.scan(step, state, (f32(x), f32(dt), f32(B), f32(C), keep.T))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state


@functools.partial(jax.jit, static_argnames=("impl", "negative_eigen"))
def _scan(x, dt, A, B, C, D, h0, resets, impl, negative_eigen):
    a, log_decay = _transition(dt, A, negative_eigen)
    x32, dt32 = x.astype(jnp.float32), dt.astype(jnp.float32)
    bx = (dt32 * x32)[..., None] * B.astype(jnp.float32)[:, :, None, :]  # [b, t, d, n]
    hs, h_last = linear_scan(a, bx, h0=h0, resets=resets, log_decay=log_decay, impl=impl)
    y = jnp.einsum("btdn,btn->btd", hs.astype(jnp.float32), C.astype(jnp.float32))
    return (y + D.astype(jnp.float32)[None, None] * x32).astype(x.dtype), h_last


def _decay(dt_t, A, negative_eigen):
    """``(a, exp(Δ A))`` of one step: ``a = exp(Δ A)``, or ``2 exp(Δ A) - 1`` with ``negative_eigen`` (its
    derivative in ``Δ A`` is ``exp(Δ A)`` times 1 or 2)."""
    z = dt_t[..., None] * A[None]
    e = jnp.exp(z)
    return (1.0 + 2.0 * jnp.expm1(z), e) if negative_eigen else (e, e)


def _blocks(v, k):
    """``[T, ...]`` → ``[T / k, k, ...]`` (``T`` already a multiple of ``k``)."""
    return v.reshape(v.shape[0] // k, k, *v.shape[1:])


def _advance(h, x_t, dt_t, b_t, keep_t, A, negative_eigen):
    """One step ``h_t = a_t h_{t-1} + Δ_t x_t B_t`` (``a_t = 0`` where ``keep_t`` is 0); also ``exp(Δ_t A)``."""
    a, e = _decay(dt_t, A, negative_eigen)
    return a * keep_t[:, None, None] * h + (dt_t * x_t)[..., None] * b_t[:, None, :], e


def _readout_scan(h0, xs, A, negative_eigen):
    """``lax.scan`` of :func:`_advance` over ``xs = (x, dt, B, C, keep)``: ``(h_last, y = Σ_n C h)``."""

    def step(h, s):
        x_t, dt_t, b_t, c_t, keep_t = s
        h = _advance(h, x_t, dt_t, b_t, keep_t, A, negative_eigen)[0]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    return lax.scan(step, h0, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_core(x, dt, A, B, C, h0, keep, negative_eigen):
    """Time-major float32 ``x``, ``dt`` ``[T, b, d]``, ``B``, ``C`` ``[T, b, n]``, ``keep`` ``[T, b]`` (0. where
    the carry is cut), ``T`` a multiple of the block: ``(Σ_n C h [T, b, d], h_last)``. Without a gradient, one
    scan over the steps; under one, :func:`_fused_fwd` also keeps the state at each block's start."""
    h_last, y = _readout_scan(h0, (x, dt, B, C, keep), A, negative_eigen)
    return y, h_last


def _fused_fwd(x, dt, A, B, C, h0, keep, negative_eigen):
    k = min(FUSED_BLOCK, x.shape[0])

    def block(h, blk):
        h_end, y = _readout_scan(h, blk, A, negative_eigen)
        return h_end, (y, h)

    h_last, (y, starts) = lax.scan(block, h0, tuple(_blocks(v, k) for v in (x, dt, B, C, keep)))
    return (y.reshape(x.shape), h_last), (x, dt, A, B, C, keep, starts)


def _fused_bwd(negative_eigen, res, cts):
    x, dt, A, B, C, keep, starts = res
    dy, dh_last = cts
    k = min(FUSED_BLOCK, x.shape[0])

    def block(carry, blk):
        x_b, dt_b, b_b, c_b, keep_b, dy_b, h_start = blk

        def forward(h, s):  # the block's states again, from the one saved at its start
            h_next, e = _advance(h, *s, A, negative_eigen)
            return h_next, (h, e)

        _, (h_prev, e_b) = lax.scan(forward, h_start, (x_b, dt_b, b_b, keep_b))
        slope = 2.0 if negative_eigen else 1.0  # ∂a/∂(Δ A) = slope · exp(Δ A)

        def back(carry, s):
            g, dA = carry  # g: ∂L/∂h_t from the steps after t
            x_t, dt_t, b_t, c_t, keep_t, dy_t, hp, e = s
            a = (2.0 * e - 1.0 if negative_eigen else e) * keep_t[:, None, None]
            u = dt_t * x_t
            h = a * hp + u[..., None] * b_t[:, None, :]
            dh = g + dy_t[..., None] * c_t[:, None, :]
            dc = jnp.sum(h * dy_t[..., None], axis=1)
            du = jnp.sum(dh * b_t[:, None, :], axis=2)
            db = jnp.sum(dh * u[..., None], axis=1)
            dz = dh * hp * (slope * e) * keep_t[:, None, None]  # ∂L/∂(Δ A)
            ddt = du * x_t + jnp.sum(dz * A[None], axis=2)
            dA = dA + jnp.sum(dz * dt_t[..., None], axis=0)
            return (a * dh, dA), (du * dt_t, ddt, db, dc)

        return lax.scan(back, carry, (x_b, dt_b, b_b, c_b, keep_b, dy_b, h_prev, e_b), reverse=True)

    blocks = tuple(_blocks(v, k) for v in (x, dt, B, C, keep, dy)) + (starts,)
    (dh0, dA), (dx, ddt, dB, dC) = lax.scan(block, (dh_last, jnp.zeros_like(A)), blocks, reverse=True)
    unblock = lambda v: v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])
    return unblock(dx), unblock(ddt), dA, unblock(dB), unblock(dC), dh0, jnp.zeros_like(keep)


_fused_core.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.jit, static_argnames=("negative_eigen",))
def _fused(x, dt, A, B, C, D, h0, resets, negative_eigen):
    """The selective scan as the Mamba kernel computes it: the state ``[b, d, n]`` is carried step by step
    and never written for every token; the backward recomputes it from one saved state per
    ``FUSED_BLOCK`` steps. Gradients by hand (``_fused_bwd``)."""
    bsz, t, d = x.shape
    k = min(FUSED_BLOCK, t)
    pad = -t % k  # padded steps: x = 0, Δ = 0 (transition 1, no input), C = 0
    f32 = lambda v: jnp.pad(jnp.moveaxis(v.astype(jnp.float32), 1, 0), [(0, pad)] + [(0, 0)] * (v.ndim - 1))
    keep = jnp.ones((bsz, t), jnp.float32) if resets is None else 1.0 - resets.astype(jnp.float32)
    h0 = jnp.zeros((bsz, *A.shape), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    ys, h_last = _fused_core(f32(x), f32(dt), A.astype(jnp.float32), f32(B), f32(C), h0,
                             jnp.pad(keep.T, [(0, pad), (0, 0)], constant_values=1.0), negative_eigen)
    y = jnp.moveaxis(ys[:t], 0, 1) + D.astype(jnp.float32)[None, None] * x.astype(jnp.float32)
    return y.astype(x.dtype), h_last


def mamba(
    x: Float[AnyArray, "b t d"],
    dt: Float[AnyArray, "b t d"],
    A: Float[AnyArray, "d n"],
    B: Float[AnyArray, "b t n"],
    C: Float[AnyArray, "b t n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Float[AnyArray, "b d n"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d n"]]:
    """The selective scan, functional: ``(y [b, t, d], h_last [b, d, n])``.

    ``dt`` is the positive step (the layer applies ``softplus(dt_proj(·) + dt_bias)``). ``impl``:
    ``"fused"`` carries the state step by step and never writes it for every token (Mamba's own kernel
    design; its backward recomputes the states from one saved every ``FUSED_BLOCK`` steps);
    ``"sequential"`` / ``"associative"`` / ``"chunked"`` form ``exp(Δ A)`` and ``Δ B x`` for every token,
    ``[b, t, d, n]``, and run the scan engine (``seqjax.scan.linear_scan``) over them; ``"auto"`` takes
    ``"fused"`` on the CPU (1.7-2.3x the sequential scan engine's speed forward+backward at the experiments'
    sizes, with a fraction of the memory: ``benchmarks/results/cpu_mixers.md``) and the scan engine's own
    choice elsewhere (the associative scan on a GPU, the Pallas kernel on a TPU).
    """
    _checks.check_choice("impl", impl, IMPLS)
    _check_mamba_inputs(x, dt, A, B, C, D, h0, resets, negative_eigen)
    resets = None if resets is None else jnp.asarray(resets).astype(bool)
    if impl == "fused" or (impl == "auto" and kernel_platform() == "cpu"):
        return _fused(x, dt, A, B, C, D, h0, resets, bool(negative_eigen))
    return _scan(x, dt, A, B, C, D, h0, resets, impl, bool(negative_eigen))


def mamba_step(
    h: Float[AnyArray, "b d n"] | None,
    x: Float[AnyArray, "b d"],
    dt: Float[AnyArray, "b d"],
    A: Float[AnyArray, "d n"],
    B: Float[AnyArray, "b n"],
    C: Float[AnyArray, "b n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b d"], Float[Array, "b d n"]]:
    """One token: ``x``, ``dt`` ``[b, d]``, ``B``, ``C`` ``[b, n]``; ``h`` ``[b, d, n]`` (``None``: zeros)."""
    _check_mamba_inputs(x, dt, A, B, C, D, h, None, negative_eigen, step=True)
    y, h = _recurrent(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, h, None, bool(negative_eigen))
    return y[:, 0], h


def mamba_materialize(
    x: Float[AnyArray, "b t d"],
    dt: Float[AnyArray, "b t d"],
    A: Float[AnyArray, "d n"],
    B: Float[AnyArray, "b t n"],
    C: Float[AnyArray, "b t n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> Float[Array, "b d t t"]:
    r"""``[b, d, T, T]``: ``M_{ts} = Σ_n C_{t,n} (Π_{s<r<=t} \bar a_{r,dn}) Δ_{s,d} B_{s,n} + D_d δ_{ts}``.

    Products of transitions are taken in log space, ``|Π a| = exp(Σ log|a|)``, with the sign from the
    parity of negative factors (``negative_eigen``), masked before ``exp`` so nothing overflows.
    """
    _check_mamba_inputs(x, dt, A, B, C, D, None, None, negative_eigen)
    a, log_decay = _transition(dt, A, bool(negative_eigen))
    log_abs = a if log_decay else jnp.log(jnp.maximum(jnp.abs(a), 1e-30))
    cum = jnp.cumsum(jnp.moveaxis(log_abs, 1, -1), axis=-1)  # [b, d, n, T]
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    if not log_decay:
        neg = jnp.cumsum(jnp.moveaxis(a < 0, 1, -1).astype(jnp.int32), axis=-1)
        decay = decay * (1 - 2 * ((neg[..., :, None] - neg[..., None, :]) % 2)).astype(jnp.float32)
    m = jnp.einsum("btn,bdnts,bsn->bdts", C.astype(jnp.float32), decay, B.astype(jnp.float32))
    m = m * jnp.moveaxis(dt.astype(jnp.float32), 1, 2)[:, :, None, :]
    return m + D.astype(jnp.float32)[None, :, None, None] * jnp.eye(t, dtype=jnp.float32)[None, None]


def mamba_make_inputs(key, batch, time, channels=3, state=4):
    kx, kd, ka, kb, kc, kdd = jax.random.split(key, 6)
    return dict(
        x=jax.random.normal(kx, (batch, time, channels)),
        dt=jax.nn.softplus(jax.random.normal(kd, (batch, time, channels)) - 1.0),
        A=-jnp.exp(jax.random.uniform(ka, (channels, state), minval=-1.0, maxval=1.5)),
        B=jax.random.normal(kb, (batch, time, state)),
        C=jax.random.normal(kc, (batch, time, state)) / np.sqrt(state),
        D=jax.random.normal(kdd, (channels,)),
    )


def _dt_bias_init(key, d, dt_min, dt_max, floor):
    """``softplus^{-1}(Δ)`` with ``Δ`` log-uniform in ``[dt_min, dt_max]`` (Mamba's ``dt_proj.bias``)."""
    dt = jnp.exp(jax.random.uniform(key, (d,)) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class MambaCache(NamedTuple):
    state: Any  # [b, d_inner, d_state] float32
    conv: Any  # [b, d_conv - 1, d_inner]


class Mamba(nnx.Module):
    """The Mamba block: ``out_proj(S6(silu(conv1d(x_in))) ⊙ silu(z))`` with ``[x_in, z] = in_proj(x)``.

    Cache: :class:`MambaCache`.
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, negative_eigen: bool = False, impl: str = "auto",
                 dtype=jnp.float32):
        _checks.check_choice("impl", impl, IMPLS)
        d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.negative_eigen, self.impl, self.dtype = bool(negative_eigen), impl, dtype
        self.in_proj = Linear(d_model, 2 * d_inner, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.conv = ShortConv(d_inner, d_conv, rngs=rngs)
        self.x_proj = Linear(d_inner, dt_rank + 2 * d_state, axes=("mlp", None), rngs=rngs, dtype=dtype)
        s = dt_rank**-0.5
        self.dt_proj = Linear(dt_rank, d_inner, axes=(None, "mlp"), rngs=rngs, dtype=dtype,
                              kernel_init=lambda k, shape, dt=jnp.float32: jax.random.uniform(k, shape, dt, -s, s))
        self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), d_inner, dt_min, dt_max, dt_init_floor),
                                 out_sharding=("mlp",))
        a = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32)[None], (d_inner, d_state))
        self.A_log = nnx.Param(jnp.log(a), out_sharding=("mlp", "state"))
        self.D = nnx.Param(jnp.ones((d_inner,)), out_sharding=("mlp",))
        self.out_proj = Linear(d_inner, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        x = x.astype(self.dtype)
        xi, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xi, conv_state = self.conv(xi, state=None if cache is None else cache.conv, segment_ids=segment_ids)
        xi = jax.nn.silu(xi)
        dt_low, b, c = jnp.split(self.x_proj(xi), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        dt = jax.nn.softplus(self.dt_proj(dt_low).astype(jnp.float32) + self.dt_bias[...][None, None])
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, h = mamba(xi, dt, -jnp.exp(self.A_log[...]), b, c, self.D[...], h0=p.h0, impl=self.impl,
                     resets=p.resets, negative_eigen=self.negative_eigen)
        out = self.out_proj(y * jax.nn.silu(z))
        return out, update(cache, state=h, conv=conv_state)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> MambaCache:
        del max_len
        return MambaCache(jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32),
                          self.conv.init_state(batch_size, self.dtype))


class MambaNegEig(Mamba):
    """Mamba with transitions ``2 exp(ΔA) - 1 ∈ (-1, 1)`` (Grazzi et al. 2025)."""

    def __init__(self, d_model: int, *, negative_eigen: bool = True, **kw):
        super().__init__(d_model, negative_eigen=negative_eigen, **kw)


register(MixerSpec(
    name="mamba", fn=mamba, recurrent=mamba_recurrent, step=mamba_step, make_inputs=mamba_make_inputs, layer=Mamba,
    materialize=mamba_materialize, value_arg="x", params=("A", "D"), impls=("sequential", "associative", "chunked", "fused"),
    pallas=("tpu",), negative_eigen=True, paper="https://arxiv.org/abs/2312.00752",
    doc="Mamba / S6 (Gu & Dao 2023): selective scan",
))
register(MixerSpec(
    name="mamba_negeig", fn=mamba, recurrent=mamba_recurrent, step=mamba_step, make_inputs=mamba_make_inputs,
    layer=MambaNegEig, materialize=mamba_materialize, value_arg="x", params=("A", "D"),
    impls=("sequential", "associative", "chunked", "fused"), pallas=("tpu",), options={"negative_eigen": True},
    negative_eigen=True, paper="https://arxiv.org/abs/2411.12537",
    doc="Mamba / S6 (Gu & Dao 2023): selective scan with transition 2 exp(ΔA) - 1 ∈ (-1, 1) (Grazzi et al. 2025)",
))
