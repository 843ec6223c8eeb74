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
local carry and the cross-shard correction. For the delta rule the transition is a dense
``dk x dk`` matrix instead of ``exp(A_r)``; only the diagonal case is implemented here.

**Softmax attention**: each device keeps its queries and all-gathers K, V and segment ids over
``context``; the causal mask uses global positions (no load-balancing reorder).

Both run inside ``jax.shard_map`` with batch on ``(data, fsdp)`` and heads on ``tensor``, so a kernel
used as the local form stays inside ``shard_map`` as Mosaic/Triton kernels require.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from seqjax.scan import linear_scan

__all__ = ["gla_local", "gla_context_parallel", "attention_context_parallel"]

NEG = -1e30  # log decay that cuts the carry (exp -> 0, finite so gradients stay finite)


def gla_local(q, k, v, log_a, h0=None):
    """Reference local form via the scan engine: ``(y [b,t,h,dv], S_last [b,h,dk,dv] float32)``.

    ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``log_a [b, t, h, dk]`` (per channel) or
    ``[b, t, h]`` (scalar per head, Mamba-2).
    """
    if log_a.ndim == 3:
        log_a = jnp.broadcast_to(log_a[..., None], k.shape)
    kv = jnp.einsum("bthk,bthv->bthkv", k.astype(jnp.float32), v.astype(jnp.float32))
    a = jnp.broadcast_to(log_a.astype(jnp.float32)[..., None], kv.shape)
    h, h_last = linear_scan(a, kv, h0=h0, log_decay=True, impl="sequential")
    y = jnp.einsum("bthk,bthkv->bthv", q.astype(jnp.float32), h)
    return y.astype(v.dtype), h_last


def _specs(mesh, batch_axes, context, head_axis):
    b = tuple(a for a in batch_axes if a in mesh.shape) or None
    h = head_axis if head_axis in mesh.shape else None
    return b, h


def gla_context_parallel(
    q,
    k,
    v,
    log_a,
    *,
    mesh,
    h0=None,
    resets=None,
    local_fn=gla_local,
    context: str = "context",
    batch_axes=("data", "fsdp"),
    head_axis: str = "tensor",
):
    """The diagonal-decay recurrence with time sharded over ``context`` (see the module docstring).

    Args: as :func:`gla_local`, plus ``resets [b, t]`` bool (``True`` at each document's first token)
    and ``local_fn(q, k, v, log_a, h0) -> (y, S_last)`` (default: the scan engine). Returns
    ``(y, S_last)`` equal to the unsharded recurrence.
    """
    if log_a.ndim == 3:
        log_a = jnp.broadcast_to(log_a[..., None], k.shape)
    log_a = log_a.astype(jnp.float32)
    if resets is not None:
        log_a = jnp.where(resets[:, :, None, None], NEG, log_a)
    b, h = _specs(mesh, batch_axes, context, head_axis)
    act = P(b, context, h, None)
    st = P(b, h, None, None)
    if h0 is None:
        h0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(act, act, act, act, st), out_specs=(act, st), check_vma=False
    )
    def run(q, k, v, log_a, h0):
        y_loc, s_loc = local_fn(q, k, v, log_a, None)
        cum = jnp.cumsum(log_a, axis=1)  # [b, tl, h, dk]
        s_all = jax.lax.all_gather(s_loc.astype(jnp.float32), context)  # [P, b, h, dk, dv]
        a_all = jax.lax.all_gather(cum[:, -1], context)  # [P, b, h, dk]

        def fold(s, xs):
            a_j, s_j = xs
            return jnp.exp(a_j)[..., None] * s + s_j, s  # emit the state entering shard j

        s_last, s_in_all = jax.lax.scan(fold, h0.astype(jnp.float32), (a_all, s_all))
        s_in = s_in_all[jax.lax.axis_index(context)]
        qd = q.astype(jnp.float32) * jnp.exp(cum)
        y = y_loc.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", qd, s_in)
        return y.astype(v.dtype), s_last

    return run(q, k, v, log_a, h0)


def attention_context_parallel(
    q, k, v, *, mesh, segment_ids=None, context: str = "context", batch_axes=("data", "fsdp"), head_axis="tensor"
):
    """Causal softmax attention with time sharded over ``context``: K/V (and segment ids) are
    all-gathered, queries stay local. ``q [b, t, h, d]``, ``k, v [b, t, kv_h, d]``."""
    from seqjax.attention.attention import attention, make_mask

    b, h = _specs(mesh, batch_axes, context, head_axis)
    kv_h = h if h is not None and k.shape[2] % mesh.shape[h] == 0 else None
    if kv_h is None:
        h = None
    act, kv = P(b, context, h, None), P(b, context, kv_h, None)
    seg = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(act, kv, kv, P(b, context)), out_specs=act, check_vma=False)
    def run(q, k, v, seg):
        tl = q.shape[1]
        k_all = jax.lax.all_gather(k, context, axis=1, tiled=True)
        v_all = jax.lax.all_gather(v, context, axis=1, tiled=True)
        seg_all = jax.lax.all_gather(seg, context, axis=1, tiled=True)
        q_idx = (jax.lax.axis_index(context) * tl + jnp.arange(tl, dtype=jnp.int32))[None]
        k_idx = jnp.arange(k_all.shape[1], dtype=jnp.int32)[None]
        mask = make_mask(q_idx, k_idx, q_seg=seg, k_seg=seg_all)
        return attention(q, k_all, v_all, mask=mask)

    return run(q, k, v, seg)
