"""mLSTM, the matrix-memory cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

``C_t = f'_t C_{t-1} + i'_t k_t v_t^T``, ``n_t = f'_t n_{t-1} + i'_t k_t``,
``h_t = C_t^T q_t / max(|n_t^T q_t|, e^{-m_t})`` with exponential input gate, sigmoid forget gate and a
stabiliser ``m``; the equations, shapes and algorithms are in the engine, ``seqjax.ops.mlstm``. Shapes:
``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``i, f [b, t, h]``; state ``(C [b, h, dk, dv], n [b, h, dk],
m [b, h])`` float32. This module holds the ``impl=`` dispatch (reference, chunked, Pallas), the layer and
the registration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.mlstm_chunk import mlstm_chunk
from seqjax import _checks, nn
from seqjax._platform import AUTO_BACKWARD, auto_pallas, kernel_call
from seqjax.layer import StateCache, plan, update
from seqjax.mixers.registry import MixerSpec, register
from seqjax.ops import mlstm as eng
from seqjax.types import AnyArray, Array, Cache, Float, Hidden, Operator, PyTree, ResetsLike, SegmentIds

__all__ = ["mlstm", "mlstm_recurrent", "mlstm_step", "mlstm_materialize", "mlstm_make_inputs", "MLSTM"]


def _check_mlstm_inputs(q, k, v, i, f, h0, resets, negative_eigen):
    _checks.check_no_negative_eigen("mlstm", negative_eigen)
    eng.check_mlstm_inputs(q, k, v, i, f, h0, resets)


def mlstm_recurrent(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    i: Float[AnyArray, "b t h"],
    f: Float[AnyArray, "b t h"],
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], eng.State]:
    """Reference: the stabilised mLSTM recurrence above as a float32 ``lax.scan``."""
    _check_mlstm_inputs(q, k, v, i, f, h0, resets, negative_eigen)
    return eng.recurrent_mlstm(q, k, v, i, f, h0=h0, resets=resets)


def mlstm_step(
    h: PyTree,
    q: Float[AnyArray, "b h k"],
    k: Float[AnyArray, "b h k"],
    v: Float[AnyArray, "b h v"],
    i: Float[AnyArray, "b h"],
    f: Float[AnyArray, "b h"],
    *,
    negative_eigen=False,
) -> tuple[Float[Array, "b h v"], eng.State]:
    """One token: ``q, k [b, h, dk]``, ``v [b, h, dv]``, ``i, f [b, h]`` -> ``(y [b, h, dv], (C, n, m))``."""
    y, s = mlstm_recurrent(q[:, None], k[:, None], v[:, None], i[:, None], f[:, None], h0=h, negative_eigen=negative_eigen)
    return y[:, 0], s


def mlstm(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    i: Float[AnyArray, "b t h"],
    f: Float[AnyArray, "b t h"],
    *,
    h0: PyTree = None,
    resets: ResetsLike | None = None,
    impl="auto",
    chunk_size=64,
    negative_eigen=False,
) -> tuple[Float[Array, "b t h v"], eng.State]:
    """mLSTM: ``impl="chunked"`` (chunkwise-parallel XLA), ``"sequential"`` (the reference), ``"pallas"``
    (``pallas_kernels/mlstm_chunk`` and its Pallas backward) or ``"auto"`` (the kernel on a GPU once its current
    forward has passed the GPU tests, ``seqjax._platform.GPU_TESTED`` — one device, or inside ``shard_map``
    under a ``use_rules`` mesh — differentiated through the chunked form until its
    backward is timed, see ``seqjax._platform``; else chunked).

    Returns ``(y [b, t, h, dv] in v's dtype, (C, n, m))``.
    """
    _checks.check_choice("impl", impl, ("auto", "sequential", "chunked", "pallas"))
    _check_mlstm_inputs(q, k, v, i, f, h0, resets, negative_eigen)
    eng.check_mlstm_inputs(q, k, v, i, f, None, resets, chunk_size)
    if impl == "sequential":
        return mlstm_recurrent(q, k, v, i, f, h0=h0, resets=resets)
    if impl == "pallas" or (impl == "auto" and auto_pallas(chunk_size, kernel="mlstm")):
        backward = "pallas" if impl == "pallas" else AUTO_BACKWARD["mlstm"]
        y, s = kernel_call(
            lambda q, k, v, i, f, h0, resets: mlstm_chunk(
                q, k, v, i, f, h0=h0, resets=resets, chunk_size=chunk_size, backward=backward),
            q, k, v, i, f, h0, resets, layouts="tttttst", out_layouts="ts")
        return y.astype(v.dtype), s
    y, s = eng.chunk_mlstm(q, k, v, i, f, h0, resets, chunk_size)
    return y.astype(v.dtype), s


def mlstm_materialize(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    i: Float[AnyArray, "b t h"],
    f: Float[AnyArray, "b t h"],
    *,
    negative_eigen=False,
) -> Operator:
    """``M[b, h, t, s] = (q_t·k_s/√d) e^{b_t − b_s + i_s − m_t} / max(|Σ_s …|, e^{−m_t})`` (``h0 = 0``)."""
    del v, negative_eigen
    return eng.materialize_mlstm(q, k, i, f)


def mlstm_make_inputs(key, batch, time, heads=2, dk=7, dv=5):
    ks = jax.random.split(key, 5)
    return dict(
        q=jax.random.normal(ks[0], (batch, time, heads, dk)),
        k=jax.random.normal(ks[1], (batch, time, heads, dk)),
        v=jax.random.normal(ks[2], (batch, time, heads, dv)),
        i=2.0 * jax.random.normal(ks[3], (batch, time, heads)),
        f=1.5 + 2.0 * jax.random.normal(ks[4], (batch, time, heads)),
    )


class MLSTM(nnx.Module):
    """mLSTM layer: q/k/v projections, scalar input/forget gates per head (forget bias init in [3, 6]),
    per-head RMSNorm, sigmoid output gate, output projection. Cache ``StateCache((C, n, m))``."""

    def __init__(self, d_model, *, num_heads=2, expand=1, chunk_size=64, impl="auto", rngs: nnx.Rngs, dtype=jnp.float32):
        inner = expand * d_model
        _checks.check_divisible("inner", inner, "num_heads", num_heads)
        self.num_heads, self.head_dim, self.chunk_size, self.impl = num_heads, inner // num_heads, chunk_size, impl

        def lin(i, o, axes, bias=False):
            return nn.Linear(i, o, axes=axes, use_bias=bias, rngs=rngs, dtype=dtype)

        self.q_proj, self.k_proj, self.v_proj = (lin(d_model, inner, ("embed", "heads")) for _ in range(3))
        self.i_proj = lin(d_model, num_heads, ("embed", "heads"), True)
        self.f_proj = lin(d_model, num_heads, ("embed", "heads"), True)
        self.f_proj.bias[...] = jnp.linspace(3.0, 6.0, num_heads)
        self.o_proj_gate = lin(d_model, inner, ("embed", "heads"))
        self.norm = nn.RMSNorm(self.head_dim, axis_name="head_dim")
        self.out_proj = lin(inner, d_model, ("heads", "embed"))

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: Cache = None
    ) -> tuple[Hidden, Cache]:
        h = self.num_heads
        q, k, v = (nn.split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        ig, fg = self.i_proj(x).astype(jnp.float32), self.f_proj(x).astype(jnp.float32)
        p = plan(x, segment_ids=segment_ids, cache=cache)
        if p.decode:
            y, s = mlstm_step(p.h0, q[:, 0], k[:, 0], v[:, 0], ig[:, 0], fg[:, 0])
            y = y[:, None]
        else:
            y, s = mlstm(q, k, v, ig, fg, h0=p.h0, resets=p.resets, impl=self.impl, chunk_size=self.chunk_size)
        y = nn.merge_heads(self.norm(y)) * jax.nn.sigmoid(self.o_proj_gate(x))
        return self.out_proj(y), update(cache, state=s)

    def init_cache(self, batch_size, max_len=None):
        del max_len
        return StateCache(eng.zero_state_mlstm(batch_size, self.num_heads, self.head_dim, self.head_dim))


register(MixerSpec(
    name="mlstm", fn=mlstm, recurrent=mlstm_recurrent, step=mlstm_step, make_inputs=mlstm_make_inputs,
    layer=MLSTM, materialize=mlstm_materialize, value_arg="v", impls=("sequential", "chunked"),
    pallas=("gpu", "tpu"), paper="https://arxiv.org/abs/2405.04517", doc="mLSTM (Beck et al. 2024, xLSTM)",
))
