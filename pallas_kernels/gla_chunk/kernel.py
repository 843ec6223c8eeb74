r"""Pallas kernel: chunked gated linear attention with per-head scalar decay (SSD, RetNet, linear attn).

.. math::  S_t = \sigma_t e^{g_t} S_{t-1} + k_t v_t^\top, \qquad o_t = S_t^\top q_t

How it works
    Grid ``(batch, heads, value blocks)``: every program owns one head's ``[K, BV]`` slice of the
    state (value columns are independent), walks the chunks of its sequence with a ``fori_loop`` and
    keeps the state in registers/shared memory as the loop carry. Per chunk of ``C`` tokens:
    ``D = [s ≤ t, seg_s = seg_t] σ e^{b_t − b_s}`` (the masked exponent is replaced by 0 *before*
    ``exp``), ``O = (Q K^T ⊙ D) V + (Q ⊙ e^{b}) S``, then ``S ← e^{b_C} S + (K ⊙ e^{b_C − b})^T V``.
    ``b`` (inclusive cumulative log decay *within the chunk*), the segment counter ``seg`` (resets)
    and the cumulative sign ``p`` (negative eigenvalues) are computed outside by
    ``seqjax.ops.gla.prepare_chunks`` (cheap elementwise XLA), so every exponent the
    kernel evaluates is ``≤ 0``. Head dims are zero-padded to a power of two ``≥ 16`` (exact: padded
    key channels and value columns contribute 0) as GPU ``dot``s require; time is padded at the front to a
    whole number of chunks (decay 1, k = 0). Past key dims of 128 the Triton forward is two kernels, as fla's
    ``chunk_fwd_h`` / ``chunk_fwd_o``: the walk carries only the state and writes it before every chunk, then
    every chunk's outputs are formed at once (``_forward_split``).

Per-channel decay (GLA) — three kernels
    ``channel.py``. ``channel_intra``, all chunks in parallel (on Triton every 16-token secondary chunk's
    rows in its own program): the intra-chunk matrix ``A [C, C]`` by secondary chunks (GLA paper §4.3, as
    ``seqjax.ops.gla``):
    earlier secondary chunks through a reference token with both exponents ``≤ 0``, the diagonal
    ``16 × 16`` blocks in log space one key column at a time. Then the serial state pass
    (``channel_states``; only the per-channel decayed state update, with the state carried transposed,
    ``Sᵀ [BV, K]``: the per-channel decay is a broadcast), then the outputs ``O = A V + (Q ⊙ e^{b}) S`` for
    every chunk in parallel (``_channel_out_kernel``), as fla's ``chunk_gla`` forward.

Backward
    ``backward="pallas"`` (the default): ``backward.py`` (per head), ``backward_channel.py`` — the chunk states
    recomputed (per channel also the intra matrices ``A``), the state gradients walking the chunks
    backwards, then every chunk's ``dq, dk, dv`` and log-decay gradient in parallel (per channel by the
    same secondary chunks as the forward, on Triton one secondary chunk and 64 key channels per program,
    and ``dv`` in a kernel of its own). Only the inputs are kept from the forward, so training memory
    is linear in ``T``. ``backward="xla"`` differentiates through the XLA chunked form instead
    (``seqjax.ops.gla.chunk_gla``, whose intra-chunk block is rematerialised); ``impl="auto"`` picks one per
    kernel (``seqjax._platform.AUTO_BACKWARD``).

GPU lowering
    jax 0.11 makes Mosaic GPU the default Pallas lowering and deprecates Triton. Two GPU bodies, picked by
    ``backend``: ``"triton"`` (the ``pallas_call`` + ``BlockSpec`` + ``fori_loop`` body below, asking for the
    Triton lowering explicitly with ``pltriton.CompilerParams``) and ``"mosaic_gpu"`` (``mosaic_gpu.py``: the
    per-head forward as one warpgroup, TMA copies of each chunk into shared memory, ``wgmma`` for ``Q Kᵀ``,
    the readout and the state update). ``backend=None`` on a GPU takes Triton; once the Mosaic GPU body passes its
    tests compiled on a GPU (``MOSAIC_GPU_COMPILED_TESTS_PASS``), it takes **Mosaic GPU under jax >= 0.11** (for a
    chunk size that is a multiple of 64) and Triton below (``MOSAIC_GPU_DEFAULT``). Under ``"mosaic_gpu"``
    the per-head backward's two serial walks — the chunk states recomputed, the state gradients walking the
    chunks backwards — run on Mosaic GPU too (``backward_mosaic_gpu.py``: one body, one ``wgmma`` update of
    the ``[Kp, 64]`` carry per chunk), and so do its chunk-parallel gradients (``dQ, dK, db`` and ``dV``, two
    kernels), the per-head inputs padded to ``key_pad`` (head dims ≥ 64)
    from the start. Triton bodies only, so Triton under either choice while jax still ships it: everything per
    channel (forward and backward:
    the intra-chunk matrix is built on ``16 × 16`` secondary chunks, one key column at a time on the diagonal,
    below ``wgmma``'s ``M`` of 64). The Mosaic GPU bodies lower for CUDA through ``jax.export``; under Mosaic
    GPU's interpreter on the CPU the forward's values match the XLA chunked form and the gradients the Triton
    backend's (``tests/test_pallas_mosaic_gpu.py``).
    TPU: separate bodies for Mosaic (below).

Tests: values, final state, gradients, h0, resets, signs, odd head dims, bf16 and a split sequence in
interpret mode (``tests/test_pallas_gla.py``); every kernel lowers to Triton and to Mosaic TPU
(``tests/test_pallas_lowering.py``). What has run on which device, and how fast: ``benchmarks/results/``
(``NVIDIA_H200.md``, ``triton_sm90_resources.md``, ``tpu_compile.md``).

Mosaic TPU: ``backend="mosaic_tpu"`` (automatic on a TPU) uses bodies that run one chunk per grid step with
the state in a VMEM scratch (the chunk axis ``"arbitrary"``), heads-first blocks whose last two dims are
whole, and gates as columns and rows. They are tested in interpret mode, lower to Mosaic
(``tests/test_pallas_lowering.py``) and compile with libtpu without a TPU (``tests/test_tpu_compile.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic_gpu import JAX_0_11, check_operand_dtype, key_pad, resolve_mosaic_gpu
from pallas_kernels._util import (
    NT,
    TN,
    check_chunk_size,
    column_tile,
    key_tiles,
    mm,
    tile_sum,
    tpu_params,
    triton_params,
)
from pallas_kernels.gla_chunk.backward import _decay, _state_factors, gla_head_bwd, head_states
from pallas_kernels.gla_chunk.backward_channel import gla_channel_bwd
from pallas_kernels.gla_chunk.channel import forward_channel
from pallas_kernels.gla_chunk.mosaic_gpu import forward_padded as _forward_mosaic_gpu
from seqjax.ops.gla import chunk_gla, prepare_chunks

__all__ = ["gla_chunk_pallas"]

# The per-head forward takes its Mosaic GPU body by default on a GPU under jax >= 0.11 once that body has passed its
# tests compiled on a GPU (the `tests` stage of benchmarks/gpu_check.sh); until then it runs only when asked for
# (backend="mosaic_gpu") and the default stays on the measured Triton body
MOSAIC_GPU_COMPILED_TESTS_PASS = False
MOSAIC_GPU_DEFAULT = MOSAIC_GPU_COMPILED_TESTS_PASS and JAX_0_11
BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu")


def _resolve(interpret, backend, chunk):
    return resolve_mosaic_gpu(interpret, backend, chunk, default=MOSAIC_GPU_DEFAULT, backends=BACKENDS)


def _head_forward(backend):
    return {"mosaic_tpu": _forward_tpu, "mosaic_gpu": _forward_mosaic_gpu}.get(backend, _forward)


def _triton_for_mgpu(backend):
    """The per-channel kernels have no Mosaic GPU bodies (their 16 x 16 secondary chunks are below ``wgmma``'s 64
    rows): they run on Triton."""
    return "triton" if backend == "mosaic_gpu" else backend


def _pow2(n, lo=16):
    return max(lo, 1 << (int(n) - 1).bit_length())


def _kernel(q_ref, k_ref, v_ref, b_ref, s_ref, p_ref, h0_ref, o_ref, ht_ref, *, chunk, n_chunks, kt):
    """The state ``[K, BV]`` carried as row tiles of ``kt`` (``_util.column_tile``: 64 past key dims of 128),
    each contraction over the key axis a sum of one matmul per tile, its operands loaded where used."""
    c = chunk
    idx = jnp.arange(c)
    causal = idx[:, None] >= idx[None, :]
    tiles = key_tiles(h0_ref.shape[0], kt)
    f32 = jnp.float32

    def body(n, st):
        sl = pl.ds(pl.multiple_of(n * c, c), c)
        v = v_ref[sl, :]
        md = v.dtype
        if len(tiles) == 1:  # q and k loaded once
            qv, kv = q_ref[sl, :], k_ref[sl, :]
            qr, kr = (lambda r: qv), (lambda r: kv)
        else:  # a tile's columns where they are used
            qr, kr = (lambda r: q_ref[sl, r]), (lambda r: k_ref[sl, r])
        b, seg, p = b_ref[sl], s_ref[sl], p_ref[sl]
        ok = causal & (seg[:, None] == seg[None, :])
        d = jnp.where(ok, jnp.exp(jnp.where(ok, b[:, None] - b[None, :], 0.0)), 0.0) * (p[:, None] * p[None, :])
        att = sum(mm(qr(r), kr(r), NT) for r in tiles) * d
        o = mm(att.astype(md), v)
        fs = jnp.where(seg == 0, jnp.exp(b), 0.0) * p
        # state readout with operands in the input dtype (bf16 on the fast path), float32 accumulation
        for r, s in zip(tiles, st):
            o = o + mm((qr(r).astype(f32) * fs[:, None]).astype(md), s.astype(md))
        o_ref[sl, :] = o.astype(o_ref.dtype)
        last = pl.ds(n * c + c - 1, 1)  # [1]-shaped loads of the chunk's last token
        b_end, s_end, p_end = b_ref[last], s_ref[last], p_ref[last]
        fe = jnp.where(seg == s_end, jnp.exp(jnp.where(seg == s_end, b_end - b, 0.0)), 0.0) * (p * p_end)
        a = (jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end).reshape(1, 1)
        return tuple(a * s + mm((kr(r).astype(f32) * fe[:, None]).astype(md), v, TN) for r, s in zip(tiles, st))

    st = lax.fori_loop(0, n_chunks, body, tuple(h0_ref[r, :].astype(f32) for r in tiles))
    for r, s in zip(tiles, st):
        ht_ref[r, :] = s


def _out_kernel(q_ref, k_ref, v_ref, bc_ref, sc_ref, pc_ref, br_ref, sr_ref, pr_ref, h_ref, o_ref, *, kt):
    """One chunk and value block: ``O = (Q Kᵀ ⊙ D) V + f^s ⊙ (Q S)`` from the state before the chunk, both
    contractions over the key axis summed over tiles of ``kt`` columns (one tile of ``q``, ``k`` and of the
    state live at a time)."""
    md = v_ref.dtype
    bc, sc, pc = bc_ref[...], sc_ref[...], pc_ref[...]
    fs, _, _ = _state_factors(bc, sc, pc)

    def tile(sl):
        q = q_ref[:, sl]
        return mm(q, k_ref[:, sl], NT), mm(q, h_ref[sl, :].astype(md))

    att, qs = tile_sum(q_ref.shape[1], kt, tile)
    att = att * _decay(bc, sc, pc, br_ref[...], sr_ref[...], pr_ref[...])
    o_ref[...] = (mm(att.astype(md), v_ref[...]) + fs * qs).astype(o_ref.dtype)


def _forward_split(q, k, v, bc, seg, p, h0, *, chunk, interpret):
    """Past key dims of 128 on Triton, as fla's ``chunk_fwd_h`` + ``chunk_fwd_o``: the state before every chunk
    from the backward's walk (``backward.head_states``, which carries only the state), then every chunk's
    outputs at once (:func:`_out_kernel`, a program per chunk and value block of 128). One walk that also formed the
    outputs held the ``[256, BV]`` state beside the chunk's products and spilled registers on sm_90 (184 B per
    thread at 256); this costs the ``[b, h, N, Kp, Vp]`` float32 states in memory, as the backward's own walk."""
    bsz, tp, h, kp = q.shape
    vp, n = v.shape[-1], tp // chunk
    heads = lambda x: jnp.moveaxis(x, 2, 1)
    cols = [heads(x)[..., None] for x in (bc, seg, p)]
    rows = [heads(x).reshape(bsz, h, n, 1, chunk) for x in (bc, seg, p)]
    hs, ht = head_states(k, v, cols, h0, chunk=chunk, interpret=interpret, backend="triton", final=True)
    bv = min(vp, 128)
    big = lambda d, vb=False: pl.BlockSpec((None, chunk, None, d), lambda i, j, l, z: (i, l, j, z if vb else 0))
    col = pl.BlockSpec((None, None, chunk, 1), lambda i, j, l, z: (i, j, l, 0))
    row = pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, l, z: (i, j, l, 0, 0))
    state = pl.BlockSpec((None, None, None, kp, bv), lambda i, j, l, z: (i, j, l, 0, z))
    o = pl.pallas_call(
        functools.partial(_out_kernel, kt=column_tile(kp, "triton")), grid=(bsz, h, n, vp // bv),
        in_specs=[big(kp), big(kp), big(bv, True), col, col, col, row, row, row, state], out_specs=big(bv, True),
        out_shape=jax.ShapeDtypeStruct((bsz, tp, h, vp), jnp.float32), interpret=interpret,
        compiler_params=triton_params(interpret, "triton", num_warps=8), name="gla_chunk_fwd_out",
    )(q, k, v, *cols, *rows, hs)
    return o, ht


def _forward(q, k, v, bc, seg, p, h0, *, chunk, interpret):
    """Per-head decay (Triton / interpreter). Padded inputs: ``q, k [b, Tp, h, Kp]``, ``v [b, Tp, h, Vp]``,
    float32 gates ``[b, Tp, h]``. One walk that carries the state and writes the outputs; past key dims of 128,
    :func:`_forward_split`."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    if kp > 128:
        return _forward_split(q, k, v, bc, seg, p, h0, chunk=chunk, interpret=interpret)
    bv = min(vp, 32)
    seq = lambda d: pl.BlockSpec((None, tp, None, d), lambda i, j, l: (i, 0, j, 0))
    vseq = pl.BlockSpec((None, tp, None, bv), lambda i, j, l: (i, 0, j, l))
    gate = pl.BlockSpec((None, tp, None), lambda i, j, l: (i, 0, j))
    st = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
    # value blocks of 32 at 8 warps: the sm_90 compile spills no registers (blocks of 64 at 4 warps spilled 260 B
    # per thread); benchmarks/triton_resources.py measures it
    compiler_params = triton_params(interpret, "triton", num_warps=8)
    return pl.pallas_call(
        functools.partial(_kernel, chunk=chunk, n_chunks=tp // chunk, kt=column_tile(kp, "triton")),
        grid=(bsz, h, vp // bv),
        in_specs=[seq(kp), seq(kp), vseq, gate, gate, gate, st],
        out_specs=[vseq, st],
        out_shape=[jax.ShapeDtypeStruct((bsz, tp, h, vp), jnp.float32), jax.ShapeDtypeStruct(h0.shape, jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="gla_chunk_fwd",
    )(q, k, v, bc, seg, p, h0)


def _kernel_tpu(q_ref, k_ref, v_ref, bc_ref, sc_ref, pc_ref, br_ref, sr_ref, pr_ref, h0_ref, o_ref, ht_ref, s_scr):
    """Mosaic TPU body: one chunk per grid step ``(batch, head, chunk)``, the chunk axis sequential, the
    ``[K, V]`` float32 state in a VMEM scratch across steps. The gates come twice, as a column
    ``[C, 1]`` and as a row ``[1, C]``, so the ``C × C`` decay mask is a broadcast (no relayout)."""
    f32 = jnp.float32
    c = q_ref.shape[0]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(f32)

    state = s_scr[...]
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    bc, sc, pc = bc_ref[...], sc_ref[...], pc_ref[...]  # [C, 1]
    br, sr, pr = br_ref[...], sr_ref[...], pr_ref[...]  # [1, C]
    causal = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
    ok = causal & (sc == sr)
    d = jnp.where(ok, jnp.exp(jnp.where(ok, bc - br, 0.0)), 0.0) * (pc * pr)
    att = mm(q, k, (((1,), (1,)), ((), ()))) * d
    o = mm(att.astype(v.dtype), v)
    fs = jnp.where(sc == 0, jnp.exp(bc), 0.0) * pc
    o = o + mm((q.astype(f32) * fs).astype(v.dtype), state.astype(v.dtype))
    o_ref[...] = o.astype(o_ref.dtype)
    lane = lax.broadcasted_iota(jnp.int32, (1, c), 1)
    end = lambda x: jnp.sum(jnp.where(lane == c - 1, x, 0.0), axis=1, keepdims=True)
    b_end, s_end, p_end = end(br), end(sr), end(pr)
    fe = jnp.where(sc == s_end, jnp.exp(jnp.where(sc == s_end, b_end - bc, 0.0)), 0.0) * (pc * p_end)
    a = jnp.where(s_end == 0, jnp.exp(b_end), 0.0) * p_end
    kt = (k.astype(f32) * fe).astype(v.dtype)
    state = a * state + mm(kt, v, (((0,), (0,)), ((), ())))
    s_scr[...] = state

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = state


def _forward_tpu(q, k, v, bc, seg, p, h0, *, chunk, interpret):
    """Per-head decay on TPU (Mosaic): heads-first, whole head dims per block (the TPU tiling wants the
    last two block dims to be multiples of (8, 128) or whole), gates as columns and rows."""
    bsz, tp, h, kp = q.shape
    vp = v.shape[-1]
    n = tp // chunk
    heads = lambda x: jnp.moveaxis(x, 2, 1)
    col = lambda x: heads(x)[..., None]
    row = lambda x: heads(x).reshape(bsz, h, n, 1, chunk)
    blk = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, l: (i, j, l, 0))
    rblk = pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, l: (i, j, l, 0, 0))
    st = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
    params = tpu_params(interpret, "parallel", "parallel", "arbitrary")
    o, ht = pl.pallas_call(
        _kernel_tpu,
        grid=(bsz, h, n),
        in_specs=[blk(kp), blk(kp), blk(vp), blk(1), blk(1), blk(1), rblk, rblk, rblk, st],
        out_specs=[blk(vp), st],
        out_shape=[jax.ShapeDtypeStruct((bsz, h, tp, vp), jnp.float32), jax.ShapeDtypeStruct((bsz, h, kp, vp), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((kp, vp), jnp.float32)],
        interpret=interpret,
        compiler_params=params,
        name="gla_chunk_fwd_tpu",
    )(heads(q), heads(k), heads(v), col(bc), col(seg), col(p), row(bc), row(seg), row(p), h0)
    return jnp.moveaxis(o, 1, 2), ht


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _gla_pallas(q, k, v, bc, seg, p, h0, chunk, interpret, backend):
    """The kernels with the Pallas backward (``backward.py``, ``backward_channel.py``). Padded inputs: ``q, k [b, Tp, h, Kp]``,
    ``v [b, Tp, h, Vp]``, gates ``bc, seg, p`` float32 from ``prepare_chunks`` — ``[b, Tp, h]`` per head,
    ``[b, Tp, h, Kp]`` per channel — computed outside, so XLA differentiates the log decays through
    ``prepare_chunks``; ``seg`` and ``p`` get zero cotangents."""
    if bc.ndim == 4:
        return forward_channel(q, k, v, bc, seg, p, h0, chunk=chunk, interpret=interpret, backend=_triton_for_mgpu(backend))
    return _head_forward(backend)(q, k, v, bc, seg, p, h0, chunk=chunk, interpret=interpret)


def _gla_pallas_fwd(q, k, v, bc, seg, p, h0, chunk, interpret, backend):
    return _gla_pallas(q, k, v, bc, seg, p, h0, chunk, interpret, backend), (q, k, v, bc, seg, p, h0)


def _gla_pallas_bwd(chunk, interpret, backend, res, cts):
    q, k, v, bc, seg, p, h0 = res
    if bc.ndim == 4:
        grads, backend = gla_channel_bwd, _triton_for_mgpu(backend)
    else:  # under "mosaic_gpu": the walks and the chunk gradients on Mosaic GPU (backward_mosaic_gpu.py)
        grads = gla_head_bwd
    dq, dk, dv, dbc, dh0 = grads(q, k, v, bc, seg, p, h0, *cts, chunk=chunk, interpret=interpret, backend=backend)
    return dq, dk, dv, dbc, jnp.zeros_like(seg), jnp.zeros_like(p), dh0


_gla_pallas.defvjp(_gla_pallas_fwd, _gla_pallas_bwd)


def _channel_gates(g, sign, resets, chunk, kp):
    """Per-channel gates in the kernel's layout: ``bc, seg, p [b, t, h, Kp]`` float32 (padded channels: decay 1)."""
    bsz, t, h, dk = g.shape
    _, _, bc, seg, p = prepare_chunks(g, sign[..., None], resets, t, chunk)
    chan = lambda x: _pad_last(x.reshape(bsz, t, h, dk).astype(jnp.float32), kp)
    return chan(bc), chan(seg), chan(p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gla(q, k, v, gates, h0, chunk, interpret, backend):
    """The kernel forward with the XLA chunked form's backward (``backward="xla"``).
    ``gates = (cut, g, sign)`` float32: ``cut, sign [b, t, h]``, ``g [b, t, h]`` or ``[b, t, h, dk]``;
    time already a whole number of chunks."""
    cut, g, sign = gates
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    kp, vp = _pow2(dk), _pow2(dv)
    h0p = _pad_state(h0, kp, vp)
    if g.ndim == 4:  # per channel: bc, seg [b, t, h, Kp] (padded channels: k = q = 0, decay 1)
        bc, seg, p = _channel_gates(g, sign, cut[:, :, 0] > 0.5, chunk, kp)
        forward = functools.partial(forward_channel, backend=_triton_for_mgpu(backend))
    else:
        bc, seg, p = _head_gates(g, sign, cut[:, :, 0] > 0.5, chunk)
        forward = _head_forward(backend)
    o, s = forward(_pad_last(q, kp), _pad_last(k, kp), _pad_last(v, vp), bc, seg, p, h0p, chunk=chunk,
                   interpret=interpret)
    return o[..., :dv], s[:, :, :dk, :dv]


def _gla_fwd(q, k, v, gates, h0, chunk, interpret, backend):
    """Under differentiation the XLA chunked form runs the forward and keeps its own residuals
    (a kernel forward followed by the XLA form's VJP, which recomputes its forward, cost as much as XLA's
    forward+backward on the H200, so this path is exactly the XLA form under ``jax.grad``)."""
    del interpret, backend
    cut, g, sign = gates
    resets = cut[:, :, 0] > 0.5

    def f(q, k, v, g, sign, h0):
        return chunk_gla(q, k, v, g, sign=sign, h0=h0, resets=resets, chunk_size=chunk)

    out, vjp = jax.vjp(f, q, k, v, g, sign, h0)
    return out, (vjp, cut)


def _gla_bwd(chunk, interpret, backend, res, cts):
    vjp, cut = res
    dq, dk, dv, dg, dsign, dh0 = vjp(cts)
    return dq, dk, dv, (jnp.zeros_like(cut), dg, dsign), dh0


_gla.defvjp(_gla_fwd, _gla_bwd)


def _pad_last(x, d):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def _pad_state(h0, kp, vp):
    return jnp.pad(h0, [(0, 0), (0, 0), (0, kp - h0.shape[2]), (0, vp - h0.shape[3])])


def _head_gates(g, sign, resets, chunk):
    """Per-head gates in the kernel's layout: ``bc, seg, p [b, t, h]`` float32 (t a whole number of chunks)."""
    bsz, t, h = g.shape
    _, _, bc, seg, p = prepare_chunks(g[..., None], sign[..., None], resets, t, chunk)
    flat = lambda x: x.reshape(bsz, t, h).astype(jnp.float32)
    return flat(bc), flat(seg), flat(p)


def gla_chunk_pallas(q, k, v, g=None, *, sign=None, h0=None, resets=None, chunk_size=64, interpret=None, backend=None,
                     backward="pallas"):
    """``(o [b, t, h, dv] float32, S_T [b, h, dk, dv] float32)``.

    Same contract as ``seqjax.ops.gla.chunk_gla``: log decays ``g`` per head ``[b, t, h]``
    (SSD, RetNet, linear attention) or per channel ``[b, t, h, dk]`` (GLA); ``g=None``: no decay;
    ``-inf``: a reset of that entry; ``sign [b, t, h]``: ``±1`` transitions (piecewise constant: no
    gradient flows to it). ``interpret=None`` interprets on CPU. ``chunk_size`` must be a power of two
    ``≥ 16``. ``backend``: ``"triton"`` (GPU, and the CPU interpreter), ``"mosaic_gpu"`` (the per-head forward's
    Mosaic GPU body, ``mosaic_gpu.py``; chunk a multiple of 64) or ``"mosaic_tpu"``; ``None`` picks by platform
    and jax version (see the module docstring, "GPU lowering"). ``backward``: what ``jax.grad`` runs —
    ``"pallas"`` (``backward.py``, ``backward_channel.py``) or ``"xla"`` (the XLA chunked form's forward and
    backward).
    """
    bsz, t, h, dk = q.shape
    if g is not None and (g.ndim not in (3, 4) or g.shape[:3] != (bsz, t, h) or (g.ndim == 4 and g.shape[3] != dk)):
        raise ValueError(f"g must be [batch, time, heads] = {(bsz, t, h)} or [batch, time, heads, key_dim] = "
                         f"{(bsz, t, h, dk)}, got {tuple(g.shape)}")
    check_chunk_size(chunk_size)
    interpret, backend = _resolve(interpret, backend, chunk_size)
    dt = jnp.result_type(q, k, v)  # one matmul dtype (the gradients return to each input's own)
    check_operand_dtype(backend, dt)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    if backward not in ("pallas", "xla"):
        raise ValueError(f"backward must be 'pallas' or 'xla', got {backward!r}")
    g = jnp.zeros((bsz, t, h), jnp.float32) if g is None else jnp.asarray(g).astype(jnp.float32)
    sign = jnp.ones((bsz, t, h), jnp.float32) if sign is None else sign.astype(jnp.float32)
    cut = jnp.zeros((bsz, t), jnp.float32) if resets is None else jnp.asarray(resets).astype(jnp.float32)
    h0 = jnp.zeros((bsz, h, dk, v.shape[-1]), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    # pad time at the front to whole chunks (decay 1, sign +1, no reset, k = v = 0; h0 passes through):
    # the kernel always sees C = chunk_size, and every chunk ends on a real token (see chunk_gla)
    tp = -(-t // chunk_size) * chunk_size
    padt = lambda x, fill=0.0: jnp.pad(x, [(0, 0), (tp - t, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    if backward == "pallas":
        dv = v.shape[-1]
        # per head under Mosaic GPU: head dims at key_pad from the start, the layout of its forward and its backward walks
        pad = key_pad if backend == "mosaic_gpu" and g.ndim == 3 else _pow2
        kp, vp = pad(dk), pad(dv)
        args = (_pad_last(padt(q), kp), _pad_last(padt(k), kp), _pad_last(padt(v), vp))
        if g.ndim == 4:
            gates = _channel_gates(padt(g), padt(sign, 1.0), padt(cut) > 0.5, chunk_size, kp)
        else:
            gates = _head_gates(padt(g), padt(sign, 1.0), padt(cut) > 0.5, chunk_size)
        o, s = _gla_pallas(*args, *gates, _pad_state(h0, kp, vp), chunk_size, interpret, backend)
        return o[:, tp - t:, :, :dv], s[:, :, :dk, :dv]
    cut = jnp.broadcast_to(cut[:, :, None], (bsz, t, h))
    o, s = _gla(padt(q), padt(k), padt(v), (padt(cut), padt(g), padt(sign, 1.0)), h0, chunk_size, interpret, backend)
    return o[:, tp - t:], s
