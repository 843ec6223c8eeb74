r"""The TPU's flash attention: JAX's splash attention kernel (``jax.experimental.pallas.ops.tpu.splash_attention``)
behind seqjax's layout, masks and grouped-query heads.

Splash ("sparse flash") attention is a Mosaic TPU kernel with a block-sparse mask: blocks the mask hides are
skipped in the forward and in its fused backward. seqjax's masks map onto it as

- causal:            ``CausalMask`` (``offset = s - t`` when the queries are the last ``t`` of ``s`` keys),
- sliding window:    ``LocalMask(window_size=(window - 1, 0))`` (``(window - 1, None)`` without causality),
- packed sequences:  ``SegmentIds(q, kv)``,
- GQA:               the kernel's MQA form (one kv head, ``heads / kv_heads`` query heads) mapped over
                     batch and kv heads.

Lengths are padded to a multiple of 128 (the kernel's block); padded queries and keys get a segment id of
their own, so they never mix with real tokens. Under a multi-device ``seqjax.sharding.use_rules`` mesh the
kernel runs per device inside ``shard_map`` (batch and heads split, time whole). ``interpret=None`` runs the
kernel's Pallas body in interpret mode anywhere but on a TPU (the CPU tests), and compiles it for a TPU on
one or under a TPU mesh (a TPU topology compiled from a CPU host, ``tests/test_flash_attention.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from seqjax import _checks, sharding
from seqjax.types import AnyArray, Array, Float, Shaped

__all__ = ["splash_attention", "splash_kernel", "splash_block", "PAD_SEGMENT"]

LANE = 128
PAD_SEGMENT = np.iinfo(np.int32).min  # the segment id of padding (no real token has it)


def _round(n: int, m: int = LANE) -> int:
    return -(-n // m) * m


def splash_block(n: int, cap: int = 512) -> int:
    """The largest of ``cap, cap/2, …, 128`` dividing ``n`` (a multiple of 128)."""
    b = cap
    while n % b:
        b //= 2
    return b


def splash_kernel(t: int, s: int, groups: int, *, causal=True, window=None, offset=0, interpret=False,
                  q_seq_shards: int = 1, block: int = 512):
    """The MQA splash kernel for ``groups`` query heads per kv head over ``t`` (padded) queries and ``s``
    (padded) keys, query ``i`` at key position ``i + offset``. ``q_seq_shards > 1`` builds it for queries
    split over that many devices (``SplashAttentionKernel.manual_sharding_spec``)."""
    if window is not None:
        one = sa.LocalMask((t, s), window_size=(window - 1, 0 if causal else None), offset=offset)
    elif causal:
        one = sa.CausalMask((t, s), offset=offset)
    else:
        one = sa.FullMask((t, s))
    bq, bk = splash_block(t // q_seq_shards, block), splash_block(s, block)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, use_fused_bwd_kernel=True)
    return sa.make_splash_mqa(sa.MultiHeadMask([one] * groups), block_sizes=sizes, head_shards=1,
                              q_seq_shards=q_seq_shards, interpret=interpret)


def _default_precision(f):
    """``f`` with its forward and backward traced under ``jax.default_matmul_precision("default")``: bf16
    operands take the MXU's bf16 pass whatever the global setting says (Mosaic rejects a bf16 matmul asked
    for float32 precision, "Bad lhs type"). The kernel's backward is traced when the cotangent arrives, so
    the context must be entered there too."""

    @jax.custom_vjp
    def g(*args):
        with jax.default_matmul_precision("default"):
            return f(*args)

    def fwd(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(f, *args)

    def bwd(vjp, ct):
        with jax.default_matmul_precision("default"):
            return vjp(ct)

    g.defvjp(fwd, bwd)
    return g


def run_kernel(kernel, q, k, v, q_seg, k_seg, scale):
    """``kernel`` (from :func:`splash_kernel`) on ``q [b, t, h, d]``, ``k, v [b, s, kvh, d]`` with
    ``q_seg [b, t]`` / ``k_seg [b, s]`` (or None), lengths already what the kernel was built for."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)  # [b, n, g, t, d]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, n, s, d]

    def one(qg, kt, vt, qs, ks):
        seg = None if qs is None else sa.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=seg))(qg, kt, vt)

    run = jax.vmap(one)
    if q.dtype in (jnp.bfloat16, jnp.float16):
        run = _default_precision(run)
    o = run(qg, kt, vt, q_seg, k_seg)  # [b, n, g, t, d]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _on_each_device(fn, q, k, v, q_seg, k_seg):
    """``fn(q, k, v, q_seg, k_seg)`` inside ``jax.shard_map`` over the mesh of the innermost
    ``seqjax.sharding.use_rules`` (batch on ``data``/``fsdp``, heads on ``tensor``, each only where it divides
    the dim; time whole): a ``pallas_call`` has no sharding rule, and under a plain multi-device ``jit`` XLA
    would gather its operands onto every device. Without a mesh, on one device, or already inside a
    ``shard_map`` (context parallelism) it is just ``fn(...)``."""
    mesh = sharding.current()[0]
    if mesh is None or mesh.size == 1 or jax.sharding.get_abstract_mesh().manual_axes:
        return fn(q, k, v, q_seg, k_seg)
    sizes = dict(mesh.shape)
    bat = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1) or None
    if bat is not None and q.shape[0] % int(np.prod([sizes[a] for a in bat])):
        bat = None
    hd = "tensor" if sizes.get("tensor", 1) > 1 and k.shape[2] % sizes["tensor"] == 0 else None
    act, seg = P(bat, None, hd, None), P(bat, None)
    segs = () if q_seg is None else (q_seg, k_seg)
    run = jax.shard_map(lambda q, k, v, *sg: fn(q, k, v, *(sg or (None, None))), mesh=mesh,
                        in_specs=(act, act, act) + (seg,) * len(segs), out_specs=act, check_vma=False)
    return run(q, k, v, *segs)


def splash_attention(
    q: Float[AnyArray, "b t h d"],
    k: Float[AnyArray, "b s kvh d"],
    v: Float[AnyArray, "b s kvh d"],
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: Shaped[AnyArray, "b t"] | None = None,
    kv_segment_ids: Shaped[AnyArray, "b s"] | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
) -> Float[Array, "b t h d"]:
    """Causal (windowed, packed) attention by the splash kernel; the queries are the last ``t`` of the ``s``
    keys' positions. Same arguments and result as ``seqjax.ops.flash.flash_attention`` (``q_offset = s - t``)."""
    _checks.check_qkv(q, k, v)
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got window={window}")
    _checks.check_segment_ids(segment_ids, kv_segment_ids, b, t, s)
    if interpret is None:  # the platform of the use_rules mesh (a TPU topology compiled from a CPU host), else the backend's
        mesh = sharding.current()[0]
        interpret = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()) != "tpu"
    scale = float(1.0 / np.sqrt(d) if scale is None else scale)
    tp, sp = _round(t), _round(s)
    q_seg = k_seg = None
    if segment_ids is not None or (tp != t or sp != s) and (not causal or s != t):
        q_seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        k_seg = q_seg if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=PAD_SEGMENT)
        k_seg = jnp.pad(k_seg, ((0, 0), (0, sp - s)), constant_values=PAD_SEGMENT)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    # the queries sit at key positions s - t + i: the offset keeps that when t and s pad by different amounts
    kernel = splash_kernel(tp, sp, h // kvh, causal=causal, window=window, offset=s - t, interpret=interpret)
    local = lambda q, k, v, qs, ks: run_kernel(kernel, q, k, v, qs, ks, scale)
    o = _on_each_device(local, pad(q, tp), pad(k.astype(q.dtype), sp), pad(v.astype(q.dtype), sp), q_seg, k_seg)
    return o[:, :t]
