r"""LSSL: the Linear State-Space Layer with HiPPO-LegS (Gu, Johnson, Goel, Saab, Dao, Rudra, Ré;
NeurIPS 2021, "Combining Recurrent, Convolutional, and Continuous-time Models with Linear State-Space
Layers").

Per channel ``c`` (``H`` channels, state size ``N``), the continuous system ``h' = A h + B u``,
``y = C_c h + D_c u`` is discretised with the bilinear rule and a learnable step ``Δ_c = exp(log_dt_c)``:

.. math::
   \bar A_c = (I - \tfrac{Δ_c}{2} A)^{-1}(I + \tfrac{Δ_c}{2} A), \quad
   \bar B_c = (I - \tfrac{Δ_c}{2} A)^{-1} Δ_c B,

   h_t = \bar A_c h_{t-1} + \bar B_c x_t, \qquad y_t = C_c h_t + D_c x_t,

with ``A`` dense (HiPPO-LegS at init, see :func:`seqjax.mixers._ssm.hippo_legs`). Two modes:

- recurrent (``impl="sequential"``): a ``lax.scan`` with the dense ``[H, N, N]`` state matrix;
- convolution (``impl="conv"``): the kernel ``K_c = (C \bar B, C \bar A \bar B, …, C \bar A^{T-1}
  \bar B)`` computed once (Krylov by repeated squaring, ``log T`` matmuls) and applied by FFT; ``h0``
  enters through ``C \bar A^{t+1} h_0`` and ``h_last`` through the same Krylov matrix. With
  ``resets`` the convolution becomes a document-masked Toeplitz product.

Shapes: ``x`` ``[b, t, H]``; ``log_dt`` ``[H]``; ``A`` ``[N, N]``; ``B`` ``[N]``; ``C`` ``[H, N]``;
``D`` ``[H]``; state ``[b, H, N]`` float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks, _linalg
from seqjax.layer import StateCache, plan, update
from seqjax.mixers import _ssm
from seqjax.mixers.registry import MixerSpec, register
from seqjax.nn import Linear
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, ResetsLike, SegmentIds

__all__ = ["lssl", "lssl_recurrent", "lssl_step", "lssl_kernel", "lssl_materialize", "lssl_make_inputs",
           "discretize_bilinear", "LSSL"]

IMPLS = ("auto", "sequential", "conv")


def _check_lssl_inputs(x, log_dt, A, B, C, D, h0, resets, negative_eigen, step=False):
    _checks.check_no_negative_eigen("lssl", negative_eigen)
    _checks.check_ndim("x", x, 2 if step else 3, "[batch, channels]" if step else "[batch, time, channels]")
    _checks.check_dtype("x", x, "float")
    h = x.shape[-1]
    _checks.check_ndim("A", A, 2, "[state, state]")
    n = A.shape[0]
    _checks.check_shape("A", A, (n, n), "[state, state]")
    _checks.check_shape("log_dt", log_dt, (h,), "[channels]")
    _checks.check_shape("B", B, (n,), "[state]")
    _checks.check_shape("C", C, (h, n), "[channels, state]")
    _checks.check_shape("D", D, (h,), "[channels]")
    if h0 is not None:
        _checks.check_shape("h0", h0, (x.shape[0], h, n), "[batch, channels, state]")
    if resets is not None:
        _checks.check_shape("resets", resets, x.shape[:2], "[batch, time]")


def discretize_bilinear(log_dt, A, B):
    r"""Bilinear (Tustin) discretisation per channel: ``(\bar A [H, N, N], \bar B [H, N])``."""
    dt = jnp.exp(log_dt.astype(jnp.float32))[:, None, None]
    eye = jnp.eye(A.shape[0], dtype=jnp.float32)[None]
    a = A.astype(jnp.float32)[None]
    left = eye - 0.5 * dt * a
    # one solve for both (seqjax._linalg.solve: not LAPACK on CPU, where batched LAPACK calls can deadlock)
    rhs = jnp.concatenate([eye + 0.5 * dt * a, (dt[:, :, 0] * B.astype(jnp.float32)[None])[..., None]], axis=-1)
    sol = _linalg.solve(left, rhs)
    a_bar, b_bar = sol[..., :-1], sol[..., -1]
    return a_bar, b_bar


def _krylov(a, v, length):
    """``[..., H, N, length]`` with column ``l`` equal to ``a^l v``, by doubling (``log length`` matmuls)."""
    k = v[..., None]
    p = a
    while k.shape[-1] < length:
        k = jnp.concatenate([k, jnp.einsum("hnm,...hml->...hnl", p, k)], axis=-1)
        p = jnp.einsum("hnm,hml->hnl", p, p)
    return k[..., :length]


def lssl_kernel(log_dt, A, B, C, length):
    r"""The convolution kernel ``K [H, length]``, ``K_{c, l} = C_c \bar A_c^l \bar B_c``."""
    a_bar, b_bar = discretize_bilinear(log_dt, A, B)
    return jnp.einsum("hn,hnl->hl", C.astype(jnp.float32), _krylov(a_bar, b_bar, length))


def lssl_recurrent(
    x: Float[AnyArray, "b t d"],
    log_dt: Float[AnyArray, " d"],
    A: Float[AnyArray, "n n"],
    B: Float[AnyArray, " n"],
    C: Float[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Float[AnyArray, "b d n"] | None = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d n"]]:
    """The reference: ``lax.scan`` of ``h_t = Ā h_{t-1} + B̄ x_t``, ``y_t = C h_t + D x_t`` (dense Ā)."""
    _check_lssl_inputs(x, log_dt, A, B, C, D, h0, resets, negative_eigen)
    return _recurrent(x, log_dt, A, B, C, D, h0, resets)


@jax.jit
def _recurrent(x, log_dt, A, B, C, D, h0, resets):
    bsz, t, h = x.shape
    a_bar, b_bar = discretize_bilinear(log_dt, A, B)
    c, d = C.astype(jnp.float32), D.astype(jnp.float32)
    state = jnp.zeros((bsz, h, A.shape[0]), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    keep = jnp.ones((bsz, t), bool) if resets is None else ~jnp.asarray(resets, bool)

    def step(state, inp):
        x_t, keep_t = inp
        state = jnp.where(keep_t[:, None, None], jnp.einsum("hnm,bhm->bhn", a_bar, state), 0.0)
        state = state + b_bar[None] * x_t[:, :, None]
        return state, jnp.einsum("hn,bhn->bh", c, state) + d[None] * x_t

    state, ys = lax.scan(step, state, (jnp.moveaxis(x.astype(jnp.float32), 1, 0), keep.T))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state


@jax.jit
def _lssl_conv(x, log_dt, A, B, C, D, h0, resets):
    bsz, t, h = x.shape
    a_bar, b_bar = discretize_bilinear(log_dt, A, B)
    c = C.astype(jnp.float32)
    kry = _krylov(a_bar, b_bar, t)  # [H, N, t]: Ā^l B̄
    kernel = jnp.einsum("hn,hnl->hl", c, kry)
    x32 = x.astype(jnp.float32)
    y = _ssm.causal_conv(x32, kernel, resets) + D.astype(jnp.float32)[None, None] * x32
    # h_last = Σ_s Ā^{t-1-s} B̄ x_s (over the last document) + Ā^t h0 (if no reset).
    xs = x32 if resets is None else jnp.where(_ssm.document_masks(resets, t)[1][..., None], x32, 0.0)
    h_last = jnp.einsum("hnl,blh->bhn", jnp.flip(kry, -1), xs)
    if h0 is not None:
        h0 = h0.astype(jnp.float32)
        powers = _krylov(a_bar, jnp.einsum("hnm,bhm->bhn", a_bar, h0), t)  # Ā^{t'+1} h0
        g = jnp.einsum("hn,bhnt->bth", c, powers)
        h0_last = powers[..., -1]
        if resets is not None:
            first = _ssm.document_masks(resets, t)[0]
            g = jnp.where(first[..., None], g, 0.0)
            h0_last = jnp.where(first[:, -1, None, None], h0_last, 0.0)
        y = y + g
        h_last = h_last + h0_last
    return y.astype(x.dtype), h_last


def lssl(
    x: Float[AnyArray, "b t d"],
    log_dt: Float[AnyArray, " d"],
    A: Float[AnyArray, "n n"],
    B: Float[AnyArray, " n"],
    C: Float[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    h0: Float[AnyArray, "b d n"] | None = None,
    impl="auto",
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d n"]]:
    """LSSL, functional: ``(y [b, t, H], h_last [b, H, N])``.

    ``impl``: ``"sequential"`` (the dense recurrence), ``"conv"`` (kernel + FFT) or ``"auto"`` (the
    convolution from ``t >= 64`` without resets, else the recurrence).
    """
    _checks.check_choice("impl", impl, IMPLS)
    _check_lssl_inputs(x, log_dt, A, B, C, D, h0, resets, negative_eigen)
    if impl == "auto":
        impl = "conv" if resets is None and x.shape[1] >= 64 else "sequential"
    if impl == "sequential":
        return _recurrent(x, log_dt, A, B, C, D, h0, resets)
    return _lssl_conv(x, log_dt, A, B, C, D, h0, _ssm.resets_or_none(resets))


def lssl_step(
    h: Float[AnyArray, "b d n"] | None,
    x: Float[AnyArray, "b d"],
    log_dt: Float[AnyArray, " d"],
    A: Float[AnyArray, "n n"],
    B: Float[AnyArray, " n"],
    C: Float[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b d"], Float[Array, "b d n"]]:
    """One token: ``x`` ``[b, H]``, ``h`` ``[b, H, N]`` (``None``: zeros) -> ``(y [b, H], h)``."""
    _check_lssl_inputs(x, log_dt, A, B, C, D, h, None, negative_eigen, step=True)
    y, h = lssl_recurrent(x[:, None], log_dt, A, B, C, D, h0=h)
    return y[:, 0], h


def lssl_materialize(
    x: Float[AnyArray, "b t d"],
    log_dt: Float[AnyArray, " d"],
    A: Float[AnyArray, "n n"],
    B: Float[AnyArray, " n"],
    C: Float[AnyArray, "d n"],
    D: Float[AnyArray, " d"],
    *,
    negative_eigen=False,
) -> Float[Array, "b d t t"]:
    """``[b, H, T, T]``: ``M_{c, t, s} = K_{c, t-s}`` for ``t >= s`` (Toeplitz), ``+ D_c`` on the diagonal."""
    _check_lssl_inputs(x, log_dt, A, B, C, D, None, None, negative_eigen)
    t = x.shape[1]
    return _toeplitz(lssl_kernel(log_dt, A, B, C, t), D, x.shape[0])


def _toeplitz(kernel, D, bsz):
    t = kernel.shape[1]
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    m = jnp.where(lag >= 0, kernel[:, jnp.clip(lag, 0, t - 1)], 0.0)
    m = m + D.astype(jnp.float32)[:, None, None] * jnp.eye(t, dtype=jnp.float32)[None]
    return jnp.broadcast_to(m[None], (bsz, *m.shape))


def lssl_make_inputs(key, batch, time, channels=3, state=5):
    kx, kd, kc, kdd = jax.random.split(key, 4)
    a, b = _ssm.hippo_legs(state)
    return dict(
        x=jax.random.normal(kx, (batch, time, channels)),
        log_dt=jax.random.uniform(kd, (channels,), minval=np.log(1e-2), maxval=np.log(0.5)),
        A=jnp.asarray(a, jnp.float32),
        B=jnp.asarray(b, jnp.float32),
        C=jax.random.normal(kc, (channels, state)) / np.sqrt(state),
        D=jax.random.normal(kdd, (channels,)),
    )


class LSSL(nnx.Module):
    """LSSL layer: ``d_model`` SISO channels sharing a trainable HiPPO-LegS ``A`` and ``B``, per-channel
    ``Δ``, ``C``, ``D``; then GELU and the position-wise output projection (the paper's mixing layer)."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_size: int = 16, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, impl: str = "auto", dtype=jnp.float32):
        _checks.check_choice("impl", impl, IMPLS)
        a, b = _ssm.hippo_legs(state_size)
        self.impl, self.dtype, self.state_size, self.d_model = impl, dtype, state_size, d_model
        self.A = nnx.Param(jnp.asarray(a, jnp.float32), out_sharding=("state", None))
        self.B = nnx.Param(jnp.asarray(b, jnp.float32), out_sharding=("state",))
        log_dt = jax.random.uniform(rngs.params(), (d_model,), minval=np.log(dt_min), maxval=np.log(dt_max))
        self.log_dt = nnx.Param(log_dt, out_sharding=("mlp",))
        c = jax.random.normal(rngs.params(), (d_model, state_size)) * np.sqrt(0.5 / state_size)
        self.C = nnx.Param(c, out_sharding=("mlp", "state"))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,)), out_sharding=("mlp",))
        self.out_proj = Linear(d_model, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        p = plan(x, segment_ids=segment_ids, cache=cache)
        y, h = lssl(x.astype(self.dtype), self.log_dt[...], self.A[...], self.B[...], self.C[...],
                    self.D[...], h0=p.h0, impl=self.impl, resets=p.resets)
        y = self.out_proj(jax.nn.gelu(y))
        return y.astype(x.dtype), update(cache, state=h)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> StateCache:
        del max_len
        return StateCache(jnp.zeros((batch_size, self.d_model, self.state_size), jnp.float32))


register(MixerSpec(
    name="lssl", fn=lssl, recurrent=lssl_recurrent, step=lssl_step, make_inputs=lssl_make_inputs, layer=LSSL,
    materialize=lssl_materialize, value_arg="x", params=("log_dt", "A", "B", "C", "D"), impls=("sequential", "conv"),
    paper="https://arxiv.org/abs/2110.13985",
    doc="LSSL (Gu et al. 2021): HiPPO-LegS, bilinear discretisation; recurrent and FFT-convolution modes",
))
