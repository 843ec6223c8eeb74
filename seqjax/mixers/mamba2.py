r"""Mamba-2 / SSD (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality"), with the negative-eigenvalue switch of Grazzi et al. 2025.

Per head ``h`` (state ``S [n, p]``, grouped ``B, C`` shared by ``heads / groups`` heads):

.. math::

    a_t = \exp(\Delta_t A_h), \qquad S_t = a_t S_{t-1} + \Delta_t B_t x_t^\top, \qquad
    y_t = S_t^\top C_t + D_h x_t .

``negative_eigen=True`` uses the transition ``2 a_t − 1 ∈ (−1, 1)`` ("Unlocking State-Tracking in Linear
RNNs Through Negative Eigenvalues"), which lets a linear RNN track parity. Negative transitions have no
real log: we pass ``log|2a − 1|`` (computed without cancellation near ``±1``) and its sign to the engine,
which keeps the cumulative sign product within each chunk. ``A=None`` switches the decay off (``a = 1``).

Inference-time state-collapse mitigations (Chen et al. 2024, "Stuffed Mamba"), off by default:
``state_norm`` (``mamba2_recurrent``) rescales a head's state to norm ``τ_h`` after any update that takes its
Frobenius norm above ``τ_h``; :func:`mamba2_window` keeps only the last ``w`` tokens through the state
difference ``S_t − (Π_{r=t−w+1}^{t} a_r) S_{t−w}``.

The chunked form is SSD's four steps — intra-chunk ``(C B^T ⊙ L) (Δ x)``, chunk states, inter-chunk
pass, state to output — evaluated by the shared engine (``seqjax.ops.gla``) with
``q = C, k = B, v = Δ x`` and per-head log decay ``Δ A``; the ``D`` skip is added outside.

Shapes: ``x [b, t, h, p]``, ``dt [b, t, h]`` (positive, after softplus), ``A [h]`` (negative), ``B, C
[b, t, g, n]``, ``D [h]``, state ``[b, h, n, p]`` float32 (the ``[b, h, k, v]`` layout).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pallas_kernels._util import platform as kernel_platform
from pallas_kernels.gla_chunk import gla_chunk_pallas
from seqjax import _checks, nn
from seqjax._platform import AUTO_BACKWARD, auto_pallas, kernel_call
from seqjax.layer import plan, update
from seqjax.mixers._autodiff import primal_by
from seqjax.mixers.registry import MixerSpec, register
from seqjax.ops import context_parallel as cp
from seqjax.ops import gla as eng
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, ResetsLike, SegmentIds

__all__ = ["mamba2", "mamba2_recurrent", "mamba2_step", "mamba2_materialize", "mamba2_make_inputs",
           "mamba2_context_parallel", "mamba2_window", "transition", "Mamba2Cache", "Mamba2", "Mamba2NegEig"]

IMPLS = ("auto", "sequential", "chunked", "pallas")


def transition(dt, A, negative_eigen=False):
    """``(log|a_t|, sign a_t)`` float32 ``[b, t, h]`` (sign ``None`` unless ``negative_eigen``).

    ``a = exp(Δ A)``, or ``2 exp(Δ A) − 1`` with ``negative_eigen``: ``log1p(2 expm1(ΔA))`` where ``a > 0``
    and ``log1p(−2 exp(ΔA))`` where ``a ≤ 0`` (accurate near ``+1`` and near ``−1``).
    """
    dt = dt.astype(jnp.float32)
    if A is None:
        return jnp.zeros_like(dt), None
    la = dt * A.astype(jnp.float32)[None, None, :]
    if not negative_eigen:
        return la, None
    e = jnp.exp(la)
    pos = e > 0.5
    lp = jnp.log1p(2.0 * jnp.expm1(jnp.where(pos, la, 0.0)))
    ln = jnp.log1p(-2.0 * jnp.where(pos, 0.25, jnp.minimum(e, 0.4999999)))  # clamp: no log(0) gradient
    return jnp.where(pos, lp, ln), jnp.where(pos, 1.0, -1.0)


def _check_mamba2_inputs(x, dt, A, B, C, D, h0, resets, negative_eigen):
    _checks.check_ndim("x", x, 4, "[batch, time, heads, head_dim]")
    b, t, h, p = x.shape
    _checks.check_shape("dt", dt, (b, t, h), "[batch, time, heads]")
    _checks.check_ndim("B", B, 4, "[batch, time, groups, state]")
    g, n = B.shape[2:]
    _checks.check_shape("B", B, (b, t, g, n), "[batch, time, groups, state]")
    _checks.check_shape("C", C, (b, t, g, n), "[batch, time, groups, state] (like B)")
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of B/C groups ({g})")
    if A is not None:
        _checks.check_shape("A", A, (h,), "[heads]")
    if D is not None:
        _checks.check_shape("D", D, (h,), "[heads]")
    if h0 is not None:
        _checks.check_shape("h0", h0, (b, h, n, p), "[batch, heads, state, head_dim]")
    if resets is not None:
        _checks.check_shape("resets", resets, (b, t), "[batch, time]")
    if not isinstance(negative_eigen, bool):
        raise ValueError(f"negative_eigen must be a bool, got {negative_eigen!r}")


def _heads(B, h):
    """``[b, t, g, n] -> [b, t, h, n]``: head ``i`` reads group ``i // (h / g)``."""
    return jnp.repeat(B, h // B.shape[2], axis=2)


def _ssd_operands(x, dt, A, B, C, negative_eigen):
    """The engine's operands ``(q, k, v, log|a|, sign)``: ``q = C``, ``k = B`` per head, ``v = Δ x`` (in
    ``x``'s dtype) and the transitions of :func:`transition`."""
    h = x.shape[2]
    g, sign = transition(dt, A, negative_eigen)
    v = (x.astype(jnp.float32) * dt.astype(jnp.float32)[..., None]).astype(x.dtype)
    q, k = _heads(C, h).astype(x.dtype), _heads(B, h).astype(x.dtype)
    return q, k, v, g, sign


def _skip(y, D, x):
    """``y + D x`` in float32 (``y`` alone when ``D`` is None), returned in ``x``'s dtype."""
    y = y.astype(jnp.float32)
    if D is not None:
        y = y + D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32)
    return y.astype(x.dtype)


def mamba2(
    x: Float[AnyArray, "b t h p"],
    dt: Float[AnyArray, "b t h"],
    A: Float[AnyArray, " h"] | None,
    B: Float[AnyArray, "b t g n"],
    C: Float[AnyArray, "b t g n"],
    D: Float[AnyArray, " h"] | None = None,
    *,
    h0: Float[AnyArray, "b h n p"] | None = None,
    resets: ResetsLike | None = None,
    impl="auto",
    chunk_size=64,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h p"], Float[Array, "b h n p"]]:
    """SSD: ``S_t = a_t S_{t-1} + Δ_t B_t x_t^T; y_t = S_t^T C_t + D x_t``. Returns ``(y, S_T)``.

    ``impl``: ``"sequential"`` (the float32 ``lax.scan`` reference), ``"chunked"`` (the SSD chunked form on
    ``seqjax.ops.gla``), ``"pallas"``, or ``"auto"``: the Pallas kernel where ``seqjax._platform.auto_pallas``
    says so, else the chunked form, except on the CPU, where the scan evaluates it and the chunked form
    differentiates it (as in :func:`seqjax.mixers.gla.gla`)."""
    _checks.check_choice("impl", impl, IMPLS)
    _check_mamba2_inputs(x, dt, A, B, C, D, h0, resets, negative_eigen)
    if impl == "sequential":
        return mamba2_recurrent(x, dt, A, B, C, D, h0=h0, resets=resets, negative_eigen=negative_eigen)
    if impl == "auto" and not auto_pallas(chunk_size) and kernel_platform() == "cpu":
        # evaluate by the scan, differentiate through the chunked form (as GLA's "auto" on the CPU)
        return primal_by(
            lambda x, dt, A, B, C, D, h0, resets: mamba2_recurrent(
                x, dt, A, B, C, D, h0=h0, resets=resets, negative_eigen=negative_eigen),
            lambda x, dt, A, B, C, D, h0, resets: mamba2(
                x, dt, A, B, C, D, h0=h0, resets=resets, impl="chunked", chunk_size=chunk_size, negative_eigen=negative_eigen),
        )(x, dt, A, B, C, D, h0, resets)
    q, k, v, g, sign = _ssd_operands(x, dt, A, B, C, negative_eigen)
    if impl == "pallas" or (impl == "auto" and auto_pallas(chunk_size)):
        backward = "pallas" if impl == "pallas" else AUTO_BACKWARD["gla"]
        y, s = kernel_call(
            lambda q, k, v, g, sign, h0, resets: gla_chunk_pallas(
                q, k, v, g, sign=sign, h0=h0, resets=resets, chunk_size=chunk_size, backward=backward),
            q, k, v, g, sign, h0, resets, layouts="tttttst", out_layouts="ts")
    else:
        y, s = eng.chunk_gla(q, k, v, g, sign=sign, h0=h0, resets=resets, chunk_size=chunk_size)
    return _skip(y, D, x), s


def mamba2_context_parallel(
    x: Float[AnyArray, "b t h p"],
    dt: Float[AnyArray, "b t h"],
    A: Float[AnyArray, " h"] | None,
    B: Float[AnyArray, "b t g n"],
    C: Float[AnyArray, "b t g n"],
    D: Float[AnyArray, " h"] | None = None,
    *,
    mesh,
    resets: ResetsLike | None = None,
    chunk_size=64,
    **axes,
) -> tuple[Float[Array, "b t h p"], Float[Array, "b h n p"]]:
    """:func:`mamba2` (``h0=None``, no negative eigenvalues) with time sharded over the mesh axis ``context``:
    the chunked engine per shard, per-head decays (``seqjax.ops.context_parallel.gla_context_parallel``),
    plus the ``D`` skip. ``axes``: ``context``, ``batch_axes``, ``head_axis`` as there."""
    q, k, v, g, _ = _ssd_operands(x, dt, A, B, C, False)
    y, s = cp.gla_context_parallel(q, k, v, g, mesh=mesh, resets=resets, local_fn=cp.chunked_local(chunk_size), **axes)
    return _skip(y, D, x), s


def mamba2_recurrent(
    x: Float[AnyArray, "b t h p"],
    dt: Float[AnyArray, "b t h"],
    A: Float[AnyArray, " h"] | None,
    B: Float[AnyArray, "b t g n"],
    C: Float[AnyArray, "b t g n"],
    D: Float[AnyArray, " h"] | None = None,
    *,
    h0: Float[AnyArray, "b h n p"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
    state_norm: Float[AnyArray, " h"] | float | None = None,
) -> tuple[Float[Array, "b t h p"], Float[Array, "b h n p"]]:
    """Reference: float32 ``lax.scan`` of ``S_t = a_t S_{t-1} + Δ_t B_t x_t^T; y_t = S_t^T C_t + D x_t``.

    ``state_norm``: thresholds ``τ`` (``[h]`` or a scalar, positive; ``inf`` leaves a head alone); after each
    update ``S_t ← S_t · min(1, τ_h / ‖S_t‖_F)`` per head, before the output reads it (inference-time state
    normalisation, Chen et al. 2024).
    """
    _check_mamba2_inputs(x, dt, A, B, C, D, h0, resets, negative_eigen)
    b, t, h, p = x.shape
    tau = None if state_norm is None else _state_norm_thresholds(state_norm, h)
    f32 = lambda z: z.astype(jnp.float32)
    a = jnp.ones((b, t, h), jnp.float32) if A is None else jnp.exp(f32(dt) * f32(A)[None, None, :])
    if negative_eigen:
        a = 2.0 * a - 1.0
    if resets is not None:
        a = jnp.where(jnp.asarray(resets).astype(bool)[:, :, None], 0.0, a)
    s0 = jnp.zeros((b, h, B.shape[-1], p), jnp.float32) if h0 is None else f32(h0)

    def step(s, xs):
        x_t, dt_t, a_t, B_t, C_t = xs
        s = a_t[:, :, None, None] * s + jnp.einsum("bhn,bhp->bhnp", B_t, dt_t[:, :, None] * x_t)
        if tau is not None:
            norm = jnp.sqrt(jnp.sum(jnp.square(s), axis=(2, 3)))
            s = s * jnp.minimum(1.0, tau / jnp.maximum(norm, 1e-30))[:, :, None, None]
        return s, jnp.einsum("bhnp,bhn->bhp", s, C_t)

    xs = (f32(x), f32(dt), a, f32(_heads(B, h)), f32(_heads(C, h)))
    s_last, y = lax.scan(step, s0, tuple(jnp.moveaxis(z, 1, 0) for z in xs))
    return _skip(jnp.moveaxis(y, 0, 1), D, x), s_last


def mamba2_step(
    h: Float[AnyArray, "b h n p"] | None,
    x: Float[AnyArray, "b h p"],
    dt: Float[AnyArray, "b h"],
    A: Float[AnyArray, " h"] | None,
    B: Float[AnyArray, "b g n"],
    C: Float[AnyArray, "b g n"],
    D: Float[AnyArray, " h"] | None = None,
    *,
    negative_eigen=False,
    state_norm: Float[AnyArray, " h"] | float | None = None,
) -> tuple[Float[Array, "b h p"], Float[Array, "b h n p"]]:
    """One token: ``x [b, h, p]``, ``dt [b, h]``, ``B, C [b, g, n]`` -> ``(y [b, h, p], S [b, h, n, p])``."""
    y, s = mamba2_recurrent(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D, h0=h, negative_eigen=negative_eigen,
        state_norm=state_norm,
    )
    return y[:, 0], s


def _state_norm_thresholds(state_norm, h):
    """``state_norm`` as float32 ``[h]``; checked when concrete (positive, ``inf`` allowed)."""
    known = _checks.concrete_or_none(state_norm)
    if known is not None and not (np.all(known > 0) and not np.any(np.isnan(known))):
        raise ValueError(f"state_norm thresholds must be positive (inf = off), got {known}")
    tau = jnp.asarray(state_norm, jnp.float32)
    if tau.ndim == 0:
        tau = jnp.full((h,), tau)
    _checks.check_shape("state_norm", tau, (h,), "[heads] thresholds (or a scalar)")
    return tau[None, :]


def mamba2_window(
    x: Float[AnyArray, "b t h p"],
    dt: Float[AnyArray, "b t h"],
    A: Float[AnyArray, " h"] | None,
    B: Float[AnyArray, "b t g n"],
    C: Float[AnyArray, "b t g n"],
    D: Float[AnyArray, " h"] | None = None,
    *,
    window: int,
    impl="auto",
    chunk_size=64,
) -> tuple[Float[Array, "b t h p"], Float[Array, "b h n p"]]:
    """Sliding window as a state difference (Chen et al. 2024): ``S^w_t = S_t − (Π_{r=t−w+1}^{t} a_r) S_{t−w}``
    is the state built from the last ``w = window`` tokens alone; ``y_t = S^w_t{}^T C_t + D x_t``.

    ``C_t^T S_{t−w}`` is the output of the same scan over the inputs delayed by ``w`` tokens (zero input and
    unit decay before the start), so two passes of :func:`mamba2` give the difference on outputs, exactly,
    with no per-position states. Returns ``(y, S^w_T)``. No ``h0``, resets or negative eigenvalues.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    _check_mamba2_inputs(x, dt, A, B, C, D, None, None, False)
    y, s = mamba2(x, dt, A, B, C, None, impl=impl, chunk_size=chunk_size)
    t = x.shape[1]
    if window < t:
        def delay(z):
            return jnp.pad(z, [(0, 0), (window, 0)] + [(0, 0)] * (z.ndim - 2))[:, :t]

        y_old, s_old = mamba2(delay(x), delay(dt), A, delay(B), C, None, impl=impl, chunk_size=chunk_size)
        cum = jnp.cumsum(transition(dt, A)[0], axis=1)  # [b, t, h] float32
        decay = jnp.exp(cum - delay(cum))  # Π_{r=t−w+1}^{t} a_r (y_old is zero where t < w)
        y = y.astype(jnp.float32) - decay[..., None] * y_old.astype(jnp.float32)
        s = s - decay[:, -1, :, None, None] * s_old
    return _skip(y, D, x), s


def mamba2_materialize(
    x: Float[AnyArray, "b t h p"],
    dt: Float[AnyArray, "b t h"],
    A: Float[AnyArray, " h"] | None,
    B: Float[AnyArray, "b t g n"],
    C: Float[AnyArray, "b t g n"],
    D: Float[AnyArray, " h"] | None = None,
    *,
    negative_eigen=False,
) -> Operator:
    """``M[b, h, t, s] = (C_t · B_s) (Π_{r=s+1}^{t} a_r) Δ_s + D δ_ts`` (``y = M x`` per head, ``h0 = 0``)."""
    b, t, h, _ = x.shape
    g, sign = transition(dt, A, negative_eigen)
    cg = jnp.cumsum(g, axis=1)  # [b, t, h]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, :, :, None]
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, cg[:, :, None] - cg[:, None, :], 0.0)), 0.0)
    if sign is not None:
        ps = jnp.cumprod(sign, axis=1)
        decay = decay * ps[:, :, None] * ps[:, None, :]
    cb = jnp.einsum("bthn,bshn->btsh", _heads(C, h).astype(jnp.float32), _heads(B, h).astype(jnp.float32))
    m = cb * decay * dt.astype(jnp.float32)[:, None, :, :]
    if D is not None:
        m = m + jnp.eye(t, dtype=jnp.float32)[None, :, :, None] * D.astype(jnp.float32)[None, None, None, :]
    return jnp.moveaxis(m, 3, 1)


def mamba2_make_inputs(key, batch, time, heads=4, head_dim=5, groups=2, state=7):
    ks = jax.random.split(key, 6)
    return dict(
        x=jax.random.normal(ks[0], (batch, time, heads, head_dim)),
        dt=jax.nn.softplus(jax.random.normal(ks[1], (batch, time, heads)) - 0.5),
        A=-jnp.linspace(0.3, 3.0, heads),
        B=jax.random.normal(ks[2], (batch, time, groups, state)) / math.sqrt(state),
        C=jax.random.normal(ks[3], (batch, time, groups, state)),
        D=jax.random.normal(ks[4], (heads,)),
    )


class Mamba2Cache(NamedTuple):
    state: Any  # [b, heads, d_state, head_dim] float32
    conv_x: Any  # [b, d_conv - 1, d_inner]
    conv_B: Any  # [b, d_conv - 1, groups * d_state]
    conv_C: Any


class Mamba2(nnx.Module):
    """The Mamba-2 block: separate projections (``x_proj, z_proj, B_proj, C_proj, dt_proj``), causal
    depthwise convs over ``x, B, C`` (``x_conv, B_conv, C_conv``; one conv over their concatenation in
    the paper, identical since it is depthwise), SiLU, SSD, ``D`` skip, ``z``-gated RMSNorm per group,
    ``out_proj``. ``use_decay=False`` fixes ``a = 1`` (for initialising from attention: ``C ← Q``,
    ``B ← K``, ``x ← V``).

    Inference-time state-collapse mitigations (off by default; set them on a trained model):
    ``state_norm`` (an ``nnx.Variable`` of ``[nheads]`` thresholds, or a float) runs the recurrent form with
    the state rescaled to norm ``τ_h`` whenever it exceeds it; ``window`` (an int) keeps the last ``window``
    tokens through the state difference (:func:`mamba2_window`; full sequences only, no cache).
    """

    def __init__(self, d_model, *, expand=2, head_dim=16, d_state=16, ngroups=1, d_conv=4, chunk_size=64,
                 impl="auto", negative_eigen=False, use_decay=True, dt_min=1e-3, dt_max=0.1,
                 state_norm=None, window=None, rngs: nnx.Rngs, dtype=jnp.float32):
        d_inner = expand * d_model
        _checks.check_divisible("d_inner", d_inner, "head_dim", head_dim)
        self.nheads, self.head_dim, self.d_state, self.ngroups = d_inner // head_dim, head_dim, d_state, ngroups
        _checks.check_divisible("nheads", self.nheads, "ngroups", ngroups)
        self.chunk_size, self.impl, self.negative_eigen, self.use_decay = chunk_size, impl, negative_eigen, use_decay

        def lin(i, o, axes):
            return nn.Linear(i, o, axes=axes, rngs=rngs, dtype=dtype)

        self.x_proj = lin(d_model, d_inner, ("embed", "heads"))
        self.z_proj = lin(d_model, d_inner, ("embed", "heads"))
        self.B_proj = lin(d_model, ngroups * d_state, ("embed", "state"))
        self.C_proj = lin(d_model, ngroups * d_state, ("embed", "state"))
        self.dt_proj = lin(d_model, self.nheads, ("embed", "heads"))
        self.x_conv = nn.ShortConv(d_inner, d_conv, rngs=rngs)
        self.B_conv = nn.ShortConv(ngroups * d_state, d_conv, rngs=rngs)
        self.C_conv = nn.ShortConv(ngroups * d_state, d_conv, rngs=rngs)
        dt = jnp.exp(jax.random.uniform(rngs.params(), (self.nheads,)) * (math.log(dt_max) - math.log(dt_min))
                     + math.log(dt_min))
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), out_sharding=("heads",))  # softplus^{-1}(dt)
        a = jax.random.uniform(rngs.params(), (self.nheads,), minval=1.0, maxval=16.0)
        self.A_log = nnx.Param(jnp.log(a), out_sharding=("heads",))
        self.D = nnx.Param(jnp.ones((self.nheads,)), out_sharding=("heads",))
        self.norm = nn.GatedRMSNorm(d_inner, group_size=d_inner // ngroups)
        self.out_proj = lin(d_inner, d_model, ("heads", "embed"))
        self.state_norm = nnx.data(state_norm)
        self.window = window

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        bsz, t, _ = x.shape
        c = Mamba2Cache(None, None, None, None) if cache is None else cache
        xs, cx = self.x_conv(self.x_proj(x), state=c.conv_x, segment_ids=segment_ids)
        B, cB = self.B_conv(self.B_proj(x), state=c.conv_B, segment_ids=segment_ids)
        C, cC = self.C_conv(self.C_proj(x), state=c.conv_C, segment_ids=segment_ids)
        xs, B, C = jax.nn.silu(xs), jax.nn.silu(B), jax.nn.silu(C)
        xh = nn.split_heads(xs, self.nheads)
        B, C = B.reshape(bsz, t, self.ngroups, self.d_state), C.reshape(bsz, t, self.ngroups, self.d_state)
        dt = jax.nn.softplus(self.dt_proj(x).astype(jnp.float32) + self.dt_bias[...][None, None, :])
        A = -jnp.exp(self.A_log[...]) if self.use_decay else None
        tau = self.state_norm[...] if isinstance(self.state_norm, nnx.Variable) else self.state_norm
        if self.window is not None and (cache is not None or segment_ids is not None or tau is not None):
            raise ValueError("window (sliding window by state difference) runs on whole sequences: "
                             "no cache, no segment_ids, no state_norm")
        # signed transitions and the mitigations have no context-parallel form (they keep the GSPMD path)
        mitigated = tau is not None or self.window is not None
        p = plan(x, segment_ids=segment_ids, cache=cache, context_parallel=not (self.negative_eigen or mitigated))
        if p.decode:
            y, s = mamba2_step(p.h0, xh[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D[...],
                               negative_eigen=self.negative_eigen, state_norm=tau)
            y = y[:, None]
        elif self.window is not None:
            y, s = mamba2_window(xh, dt, A, B, C, self.D[...], window=self.window, impl=self.impl,
                                 chunk_size=self.chunk_size)
        elif tau is not None:
            y, s = mamba2_recurrent(xh, dt, A, B, C, self.D[...], h0=p.h0, resets=p.resets,
                                    negative_eigen=self.negative_eigen, state_norm=tau)
        elif p.mesh is not None:
            y, s = mamba2_context_parallel(xh, dt, A, B, C, self.D[...], mesh=p.mesh,
                                           resets=p.resets, chunk_size=self.chunk_size)
        else:
            y, s = mamba2(xh, dt, A, B, C, self.D[...], h0=p.h0, resets=p.resets, impl=self.impl,
                          chunk_size=self.chunk_size, negative_eigen=self.negative_eigen)
        y = self.norm(nn.merge_heads(y), self.z_proj(x))
        return self.out_proj(y), update(cache, state=s, conv_x=cx, conv_B=cB, conv_C=cC)

    def init_cache(self, batch_size, max_len=None) -> Mamba2Cache:
        del max_len
        return Mamba2Cache(
            jnp.zeros((batch_size, self.nheads, self.d_state, self.head_dim), jnp.float32),
            self.x_conv.init_state(batch_size),
            self.B_conv.init_state(batch_size),
            self.C_conv.init_state(batch_size),
        )


class Mamba2NegEig(Mamba2):
    """Mamba-2 with transitions ``2a − 1 ∈ (−1, 1)`` (Grazzi et al. 2025)."""

    def __init__(self, d_model, *, negative_eigen: bool = True, **kw):
        super().__init__(d_model, negative_eigen=negative_eigen, **kw)


register(MixerSpec(
    name="mamba2", fn=mamba2, recurrent=mamba2_recurrent, step=mamba2_step, make_inputs=mamba2_make_inputs,
    layer=Mamba2, materialize=mamba2_materialize, value_arg="x", params=("A", "D"), impls=("sequential", "chunked"),
    pallas=("gpu", "tpu"), context_parallel=True, negative_eigen=True, paper="https://arxiv.org/abs/2405.21060",
    doc="Mamba-2 / SSD (Dao & Gu 2024)",
))
register(MixerSpec(
    name="mamba2_negeig", fn=mamba2, recurrent=mamba2_recurrent, step=mamba2_step, make_inputs=mamba2_make_inputs,
    layer=Mamba2NegEig, materialize=mamba2_materialize, value_arg="x", params=("A", "D"),
    impls=("sequential", "chunked"), pallas=("gpu", "tpu"), options={"negative_eigen": True}, negative_eigen=True,
    paper="https://arxiv.org/abs/2411.12537", doc="Mamba-2 with negative eigenvalues 2a-1 (Grazzi et al. 2025)",
))
