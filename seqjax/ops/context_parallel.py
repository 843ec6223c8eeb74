"""Context (sequence) parallelism: the time axis split over the mesh axis ``context``.

**Diagonal-decay linear recurrences** (GLA, Mamba-2/SSD, RetNet, mLSTM-like; LASP-2, Sun et al. 2025,
arXiv 2502.07563). The recurrence ::

    S_t = diag(a_t) S_{t-1} + k_t v_t^T        (S: [dk, dv] per head, a_t = exp(log_a_t) in (0, 1])
    y_t = S_t^T q_t

is linear in the initial state. Device ``r`` holds times ``[r T/P, (r+1) T/P)`` and

1. runs its chunk from a zero state: ``y^loc, S^loc_r`` (any local form: the scan engine, chunked,
   a kernel), and its total log decay ``A_r = sum_t log a_t`` (a *diagonal* transition);
2. all-gathers the summaries ``(S^loc_j, A_j)`` over ``context`` (one collective, independent of T);
3. folds the earlier shards: ``S^in_r = sum_{j<r} exp(A_{j+1} + ... + A_{r-1}) S^loc_j`` (plus the
   decayed ``h0``), by a ``lax.scan`` over the gathered summaries;
4. corrects its outputs: ``y_t = y^loc_t + (q_t * exp(cumsum_t log a))^T S^in_r``.

The final state is the last shard's ``exp(A_r) S^in_r + S^loc_r``. Gradients come from autodiff
through ``all_gather`` (JAX transposes it to a reduce-scatter); no backward pass is hand-written.
Packed documents: a reset forces ``log a = -inf`` at the document's first token, which cuts both the
local carry and the cross-shard correction.

**The delta rule** (:func:`delta_context_parallel`): the shard transition is a dense ``dk x dk`` matrix
instead of ``exp(A_r)``; it comes out of the local chunked pass itself (an identity block appended to the
state), and the outputs take a second local pass from the folded incoming state.

**Softmax attention**: each device keeps its queries and all-gathers K, V and segment ids over
``context``; the causal mask uses global positions (no load-balancing reorder). The local attention is
flash attention where the platform has it: blocked attention in plain JAX with the shard's query offset
(CPU, GPU), or the splash kernel built for the whole mask with its query blocks split over ``context`` (TPU).

Both run inside ``jax.shard_map`` with batch on ``(data, fsdp)`` and heads on ``tensor``, so a kernel
used as the local form stays inside ``shard_map`` as Mosaic/Triton kernels require.

**In the LM**: under ``seqjax.sharding.use_rules(mesh)`` with ``context > 1`` dividing the length (the
train and eval steps trace there; ``seqjax.sharding.context_mesh``), ``seqjax.mixers.mamba2.Mamba2`` calls
``seqjax.mixers.mamba2.mamba2_context_parallel`` (:func:`gla_context_parallel` plus the ``D`` skip), the
GLA / RetNet / linear-attention layers :func:`gla_context_parallel` with :func:`chunked_local`, the DeltaNet /
Gated DeltaNet layers :func:`delta_context_parallel`, and ``seqjax.attention.Attention`` (full causal, no
persistent tokens) :func:`attention_context_parallel`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from seqjax import _checks
from seqjax.ops import attention as A
from seqjax.ops.attention import make_mask
from seqjax.ops.delta import chunk_delta_rule
from seqjax.ops.flash import flash_attention
from seqjax.ops.gla import chunk_gla, recurrent_gla
from seqjax.ops.splash import run_kernel, splash_kernel
from seqjax.types import AnyArray, Array, Float, Shaped

Decay = Float[AnyArray, "b t h"] | Float[AnyArray, "b t h k"]  # per-head or per-channel log decays
Out = tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]

__all__ = ["gla_local", "chunked_local", "gla_context_parallel", "delta_context_parallel",
           "attention_context_parallel", "context_size"]

NEG = -1e30  # log decay that cuts the carry (exp -> 0, finite so gradients stay finite)


def gla_local(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    log_a: Decay,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
) -> Out:
    """Reference local form, the float32 ``lax.scan`` of ``seqjax.ops.gla.recurrent_gla``:
    ``(y [b,t,h,dv] in v's dtype, S_last [b,h,dk,dv] float32)``.

    ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``log_a [b, t, h, dk]`` (per channel) or
    ``[b, t, h]`` (scalar per head, Mamba-2); ``resets [b, t]`` bool zeroes the carry into that token.
    """
    y, h_last = recurrent_gla(q, k, v, log_a, h0=h0, resets=resets)
    return y.astype(v.dtype), h_last


def chunked_local(chunk_size: int = 64):
    """The XLA chunked engine (``seqjax.ops.gla.chunk_gla``) as a ``local_fn``: per-head or
    per-channel decays, resets passed through (not folded into the decays, whose within-chunk differences
    a ``-1e30`` would swamp)."""

    def local(q, k, v, log_a, h0=None, resets=None):
        return chunk_gla(q, k, v, log_a, h0=h0, resets=resets, chunk_size=chunk_size)

    return local


def _specs(mesh, batch_axes, context, head_axis, batch=None, heads=None):
    """Mesh axes for the batch and head dims inside ``shard_map``; an axis whose size does not divide the
    dim (when the dim is given) is left out, so that dim is replicated instead of failing."""
    sizes = dict(mesh.shape)
    b = tuple(a for a in batch_axes if a in sizes) or None
    if b is not None and batch is not None and batch % int(np.prod([sizes[a] for a in b])):
        b = None
    h = head_axis if head_axis in sizes else None
    if h is not None and heads is not None and heads % sizes[h]:
        h = None
    return b, h


def _trail(a, ndim):
    """``a`` with trailing unit axes up to ``ndim`` (per-head decays against per-channel states)."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def gla_context_parallel(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    log_a: Decay,
    *,
    mesh,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
    local_fn=gla_local,
    context: str = "context",
    batch_axes=("data", "fsdp"),
    head_axis: str = "tensor",
) -> Out:
    """The diagonal-decay recurrence with time sharded over ``context`` (see the module docstring).

    Args: as :func:`gla_local` (``log_a`` per head ``[b, t, h]`` stays per head), plus ``resets [b, t]``
    bool (``True`` at each document's first token) and ``local_fn(q, k, v, log_a, h0, resets) -> (y, S_last)``
    (default: the scan engine; :func:`chunked_local` for the chunked engine). Returns ``(y, S_last)`` equal
    to the unsharded recurrence.
    """
    log_a = log_a.astype(jnp.float32)
    b, h = _specs(mesh, batch_axes, context, head_axis, batch=q.shape[0], heads=q.shape[2])
    act = P(b, context, h, None)
    gate = act if log_a.ndim == 4 else P(b, context, h)
    st = P(b, h, None, None)
    if h0 is None:
        h0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    rs = jnp.zeros(q.shape[:2], bool) if resets is None else jnp.asarray(resets, bool)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(act, act, act, gate, st, P(b, context)), out_specs=(act, st),
        check_vma=False,
    )
    def run(q, k, v, log_a, h0, rs):
        y_loc, s_loc = local_fn(q, k, v, log_a, None, rs if resets is not None else None)
        # the summaries see a reset as log a = -1e30: the carry into a document's first token is cut
        cut = jnp.where(_trail(rs, log_a.ndim), NEG, log_a)
        cum = jnp.cumsum(cut, axis=1)  # [b, tl, h(, dk)]
        s_all = jax.lax.all_gather(s_loc.astype(jnp.float32), context)  # [P, b, h, dk, dv]
        a_all = jax.lax.all_gather(cum[:, -1], context)  # [P, b, h(, dk)]

        def fold(s, xs):
            a_j, s_j = xs
            return _trail(jnp.exp(a_j), s.ndim) * s + s_j, s  # emit the state entering shard j

        s_last, s_in_all = jax.lax.scan(fold, h0.astype(jnp.float32), (a_all, s_all))
        s_in = s_in_all[jax.lax.axis_index(context)]
        qd = q.astype(jnp.float32) * _trail(jnp.exp(cum), q.ndim)
        y = y_loc.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", qd, s_in)
        return y.astype(v.dtype), s_last

    return run(q, k, v, log_a, h0, rs)


def delta_context_parallel(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    mesh,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: Shaped[AnyArray, "b t"] | None = None,
    scale=1.0,
    chunk_size=64,
    context: str = "context",
    batch_axes=("data", "fsdp"),
    head_axis: str = "tensor",
) -> Out:
    """The (gated) delta rule ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``
    (``seqjax.ops.delta.chunk_delta_rule``'s arguments; ``beta`` already doubled for negative
    eigenvalues) with time sharded over ``context``. The shard transition is a dense ``dk x dk`` matrix:

    1. one chunked pass per shard from ``h0 = [0 | I]`` with the values extended by ``dk`` zero columns gives
       the local final state ``S^loc_r`` and the shard's transition ``M_r = Π_t α_t (I − β_t k_t k_tᵀ)`` (the
       identity block sees only the transitions);
    2. one all-gather of ``(S^loc_r, M_r)`` over ``context``; ``S^in_r = M_{r−1} S^in_{r−1} + S^loc_{r−1}``
       by a ``lax.scan`` from ``h0``;
    3. a second chunked pass from ``S^in_r`` gives the outputs.

    About 2x the local work of the unsharded form (the diagonal case needs one pass); gradients by autodiff.
    """
    bsz, _, nh, dk = q.shape
    dv = v.shape[-1]
    la = jnp.zeros(q.shape[:3], jnp.float32) if log_alpha is None else jnp.asarray(log_alpha, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    rs = jnp.zeros(q.shape[:2], bool) if resets is None else jnp.asarray(resets, bool)
    h0 = jnp.zeros((bsz, nh, dk, dv), jnp.float32) if h0 is None else jnp.asarray(h0, jnp.float32)
    b, h = _specs(mesh, batch_axes, context, head_axis, batch=bsz, heads=nh)
    act, gate, st = P(b, context, h, None), P(b, context, h), P(b, h, None, None)
    run_local = functools.partial(chunk_delta_rule, scale=scale, chunk_size=chunk_size)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(act, act, act, gate, gate, st, P(b, context)), out_specs=(act, st),
        check_vma=False,
    )
    def run(q, k, v, beta, la, h0, rs):
        eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (*h0.shape[:2], dk, dk))
        v_ext = jnp.concatenate([v, jnp.zeros((*v.shape[:3], dk), v.dtype)], axis=-1)
        h_ext = jnp.concatenate([jnp.zeros_like(h0), eye], axis=-1)
        _, s_ext = run_local(q, k, v_ext, beta, la, h0=h_ext, resets=rs)
        s_all = jax.lax.all_gather(s_ext[..., :dv], context)  # [P, b, h, dk, dv]
        m_all = jax.lax.all_gather(s_ext[..., dv:], context)  # [P, b, h, dk, dk]

        def fold(s, xs):
            m_j, s_j = xs
            return jnp.einsum("bhij,bhjv->bhiv", m_j, s) + s_j, s  # emit the state entering shard j

        s_last, s_in_all = jax.lax.scan(fold, h0, (m_all, s_all))
        y, _ = run_local(q, k, v, beta, la, h0=s_in_all[jax.lax.axis_index(context)], resets=rs)
        return y, s_last

    return run(q, k, v, beta, la, h0, rs)


def context_size(mesh, context: str = "context") -> int:
    """How many devices the ``context`` axis of ``mesh`` has (1 without a mesh or that axis)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(context, 1))


def attention_context_parallel(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b t kvh d"],
    v: Float[AnyArray, "b t kvh d"],
    *,
    mesh,
    segment_ids: Shaped[AnyArray, "b t"] | None = None,
    impl: str | None = None,
    scale: float | None = None,
    context: str = "context",
    batch_axes=("data", "fsdp"),
    head_axis="tensor",
) -> Float[Array, "b t h d"]:
    """Causal softmax attention with time sharded over ``context``: K/V (and segment ids) are
    all-gathered, queries stay local at their global positions. ``q [b, t, h, d]``, ``k, v [b, t, kv_h, d]``.

    ``impl``: as ``seqjax.ops.attention.attention``; ``None`` takes ``choose_impl``'s pick for the whole
    sequence on the mesh's platform, with two changes: cuDNN's causal mask has no query offset, so a GPU runs
    ``"blocked"`` (``q_offset = shard * t_local``); the TPU's ``"splash"`` kernel is built for the whole
    ``[T, T]`` mask with its query blocks split over ``context`` (``q_seq_shards``, as MaxText does), which
    needs ``t_local`` a multiple of 128 (else ``"blocked"``). ``"xla"`` / ``"reference"`` build the
    ``[t_local, T]`` mask.
    """
    _checks.check_choice("impl", impl, A.IMPLS)
    b, h = _specs(mesh, batch_axes, context, head_axis, batch=q.shape[0], heads=q.shape[2])
    kv_h = h if h is not None and k.shape[2] % mesh.shape[h] == 0 else None
    if kv_h is None:
        h = None
    act, kv = P(b, context, h, None), P(b, context, kv_h, None)
    packed = segment_ids is not None
    seg = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    n_ctx = context_size(mesh, context)
    t_all, tl = q.shape[1], q.shape[1] // n_ctx
    scale = float(1.0 / np.sqrt(q.shape[3]) if scale is None else scale)
    if impl is None:
        impl = A.choose_impl(mesh.devices.flat[0].platform, q.dtype, q.shape, k.shape, segments=packed)
        impl = "blocked" if impl == "cudnn" or (impl == "splash" and tl % 128) else impl
    args, specs = [q, k, v, seg], [act, kv, kv, P(b, context)]
    if impl == "splash":
        kern = splash_kernel(t_all, t_all, q.shape[2] // k.shape[2], interpret=mesh.devices.flat[0].platform != "tpu",
                             q_seq_shards=n_ctx)
        args.append(kern)
        specs.append(kern.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, context))))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=tuple(specs), out_specs=act, check_vma=False)
    def run(q, k, v, seg, *kern):
        k_all = jax.lax.all_gather(k, context, axis=1, tiled=True)
        v_all = jax.lax.all_gather(v, context, axis=1, tiled=True)
        seg_all = jax.lax.all_gather(seg, context, axis=1, tiled=True)
        offset = jax.lax.axis_index(context) * tl
        if impl == "blocked":
            return flash_attention(q, k_all, v_all, segment_ids=seg if packed else None,
                                   kv_segment_ids=seg_all if packed else None, q_offset=offset, scale=scale)
        if impl == "splash":
            return run_kernel(kern[0], q, k_all, v_all, seg if packed else None, seg_all if packed else None, scale)
        q_idx = (offset + jnp.arange(tl, dtype=jnp.int32))[None]
        k_idx = jnp.arange(k_all.shape[1], dtype=jnp.int32)[None]
        mask = make_mask(q_idx, k_idx, q_seg=seg, k_seg=seg_all)
        return A.attention(q, k_all, v_all, mask=mask, scale=scale, impl=impl)

    return run(*args)
