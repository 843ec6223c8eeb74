r"""Pallas backward of the chunked (gated) delta rule: recompute the WY factors and the chunk states, walk
the state gradients backwards, then every chunk's gradients in parallel (as fla's
``chunk_gated_delta_rule_bwd``: ``prepare_wy_repr`` / ``chunk_fwd_h`` / ``bwd_dhu`` / ``bwd_dqkwg`` /
``prepare_wy_repr_bwd``, here five ``pallas_call``\ s).

Per chunk (``kernel.py``'s notation; gates as columns ``[C, 1]``): ``A = tril(diag(β) K Kᵀ ⊙ Γ, −1)``,
``X = (I + A)^{-1}``, ``W = X (βγ ⊙ K)``, ``U = X (β ⊙ V)``, ``U' = U − W S``,
``O = s [(γ ⊙ Q) S + (Q Kᵀ ⊙ Γ) U']``, ``S⁺ = γ_C S + (K ⊙ e^{rev})ᵀ U'``. Given ``dO`` (``dÕ = s dO``)
and ``dS⁺``:

.. math::
    dU' &= (Q K^\top ⊙ Γ)^\top dÕ + e^{rev} ⊙ (K dS^{+\top})^{\!\top}\!, \qquad
    dS = γ_C dS^+ + (γ ⊙ Q)^\top dÕ − W^\top dU' \\
    dQ &= γ ⊙ (dÕ S^\top) + (dÕ U'^\top ⊙ Γ) K, \qquad
    dK \mathrel{+}= (dÕ U'^\top ⊙ Γ)^\top Q + e^{rev} ⊙ (U' dS^{+\top}) \\
    dW &= −dU' S^\top, \quad dX = dW (βγ ⊙ K)^\top + dU' (β ⊙ V)^\top, \quad
    dA = −X^\top dX X^\top \ (\text{strictly lower}) \\
    dK &\mathrel{+}= βγ ⊙ X^\top dW + (β ⊙ (dA ⊙ Γ)) K + (β ⊙ (dA ⊙ Γ))^\top K, \qquad
    dV = β ⊙ X^\top dU'

``dβ`` collects the three places β enters (``A``, ``W``, ``U``). The log decays enter as the chunk-local
inclusive cumulative sum ``g`` (in ``Γ``, ``γ``, ``γ_C``) and the exclusive reverse one ``rev`` (in
``e^{rev}``, kept separate as in the forward: ``g_C − g_s`` would lose digits at ``g ≈ −10³``); the kernel
returns the gradients of both and XLA maps them back through ``_chunk_gates``' own VJP. For ``g``:
rows minus columns of ``dA ⊙ A`` and of ``dÕ U'ᵀ ⊙ Q Kᵀ ⊙ Γ`` *without their diagonals* (under strong
decay the true gradient is ~1e-9 and adding then subtracting O(1) diagonal terms would leave only their
rounding), plus the ``γ`` terms and ``γ_C ⟨S, dS⁺⟩`` at the last token.

Kernels: (1) ``wy_factors(with_x=True)``: ``W, U`` and ``X``, chunk-parallel; (2) the state before every chunk,
``H [b, h, N, K, V]``, and ``U' = U − W S`` (fla's ``v_new``); (3) ``dH`` (the gradient of the state after every chunk)
walking the chunks backwards, and ``dh0`` (on every backend the state-free part of ``dU'``,
``(Q Kᵀ ⊙ Γ)ᵀ dÕ``, is formed chunk-parallel in XLA first, as fla's ``chunk_bwd_dv_local``: :func:`_dv_local`);
(4) everything above, per chunk,
in two kernels — (4a) grid
``(batch, heads, chunks, key blocks of 64)`` (as fla's ``bwd_dqkwg``; Mosaic TPU: one block, the whole key axis),
through the outputs, the attention and the states from ``U'``, ``H`` and ``dH`` (``dq``, ``dU'``, ``dW``, part of
``dk``; part of ``dg`` and ``drev`` per key block, added in XLA), (4b) grid ``(batch, heads, chunks)``, through
``W, U`` and ``X`` (the rest of ``dk`` and ``dg``, ``dv``, ``dβ``; fla's ``prepare_wy_repr_bwd``). Nothing but
the inputs is kept from the forward. Triton walks (2) and (3) with a ``fori_loop`` per (batch, head, value block
of 64; of 32 in (3) past key dims of 128), the state in row tiles of 64 past key dims of 128; Mosaic TPU runs one
chunk per grid step with the state in VMEM scratch. ``backend="mosaic_gpu"`` walks
both on Mosaic GPU (``mosaic_gpu.py``: ``chunk_states_mosaic_gpu``, ``chunk_dstates_mosaic_gpu``; ``H``, ``dH`` and
``U'`` come out in bf16, and the state-gradient walk writes the ``−dU'`` it forms, as fla's ``bwd_dhu`` writes
``dv2``), runs (4a) and (4b) on Mosaic GPU too (``backward_mosaic_gpu.py``: (4a) on the same grid, its programs
also split the value axis in blocks of up to 128 whose shares XLA adds, reading that ``dU'``; (4b) per chunk, and on
Triton at chunks of 128, where its shared memory would pass the budget), and (1) as well (``wy_mosaic_gpu.py``: the
inverse by float32 forward substitution in registers, ``X`` written in the input dtype); its matmul operands are
bf16 with float32 accumulation. The math is one function per step for
Triton and Mosaic TPU, on gates given as columns ``[C, 1]`` and rows ``[1, C]``; the Mosaic GPU bodies follow it
term for term. Float32 products with ``X`` run at ``HIGHEST``; the others take the input dtype with float32
accumulation, as the forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._util import (
    chunk_block,
    column_tile,
    key_tiles,
    once_on_tpu,
    tile_sum,
    tpu_params,
    triton_params,
    walk_params,
)
from pallas_kernels.delta_chunk.backward_mosaic_gpu import (
    chunk_grads_mosaic_gpu,
    chunk_grads_wy_mosaic_gpu,
    wy_grads_fit,
)
from pallas_kernels.delta_chunk.forward import _NT, _TN, _col_factors, _decay_incl, _mm, chunk_states, f32
from pallas_kernels.delta_chunk.mosaic_gpu import chunk_dstates_mosaic_gpu, chunk_states_mosaic_gpu
from pallas_kernels.delta_chunk.wy import chunk_gamma, wy_factors


def _dstate_step(q, k, w, dos, gc, rc, sc, local, st, md):
    """``dS = γ_C dS⁺ + (γ ⊙ Q)ᵀ dÕ − Wᵀ dU'`` with ``dU' = local + e^{rev} ⊙ K dS⁺`` (``local``:
    ``(Q Kᵀ ⊙ Γ)ᵀ dÕ`` from :func:`_dv_local`), the state gradient as row tiles ``st`` (float32); ``q(j)``,
    ``k(j)``, ``w(j)`` load the matching column tiles ``[C, kt]`` where they are used (one tile: the whole key
    axis), ``dÕ = s dO`` and the operands in ``md``. Each contraction over the key axis is a sum of one matmul per tile, and each row tile's
    update is one tile's products (as the forward's ``_state_step``)."""
    gamma, total, to_end = _col_factors(gc, rc, sc)
    kds = _mm(k(0), st[0].astype(md))  # K dS⁺
    for j in range(1, len(st)):
        kds = kds + _mm(k(j), st[j].astype(md))
    du = (local + to_end * kds).astype(md)
    return tuple(total * s + _mm((q(j).astype(f32) * gamma).astype(md), dos, _TN) - _mm(w(j), du, _TN)
                 for j, s in enumerate(st))


def _dv_local(q, k, do, g, seg, *, c, scale):
    """``(Q Kᵀ ⊙ Γ)ᵀ dÕ`` of every chunk, ``[b, h, Tp, Vp]`` float32: the state-free term of ``dU'``, chunk-parallel
    in XLA before the state-gradient walk (fla's ``chunk_bwd_dv_local``), with the Triton walk's roundings
    (``Q Kᵀ ⊙ Γ`` and ``dÕ`` in the input dtype). The walk then contracts ``K`` only with its state: a third
    fewer matmul FLOPs on the serial path at ``C = 64, K = 128``, and none of the ``[C, C]`` decay exponentials.
    With ``Q Kᵀ`` in the loop as well, the Triton walk spilled registers at head dim 256 on sm_90 and every value
    block's program formed the same ``Q Kᵀ`` again."""
    b, h, tp, _ = q.shape
    n, md = tp // c, q.dtype
    split = lambda x: x.reshape(b, h, n, c, *x.shape[3:])
    hi = lax.Precision.HIGHEST if md == f32 else None
    qk = jnp.einsum("bhnik,bhnjk->bhnij", split(q), split(k), preferred_element_type=f32, precision=hi)
    gt, st = split(g)[..., :, None], split(seg)[..., :, None]
    ok = jnp.tril(jnp.ones((1, 1, 1, c, c), bool)) & (st == jnp.swapaxes(st, -1, -2))
    decay = jnp.where(ok, jnp.exp(jnp.where(ok, gt - jnp.swapaxes(gt, -1, -2), 0.0)), 0.0)
    dos = (scale * do.astype(f32)).astype(md)
    dvl = jnp.einsum("bhnij,bhniv->bhnjv", (qk * decay).astype(md), split(dos), preferred_element_type=f32,
                     precision=hi)
    return dvl.reshape(b, h, tp, -1)


def _chunk_grads_states(q_ref, k_ref, qb_ref, kb_ref, un_ref, do_ref, gc, rc, sc, gr, sr, s_ref, ds_ref, dsf_ref, scale,
                        dq_ref, dk_ref, du_ref, dw_ref, dg_ref, dr_ref, *, wk, wv):
    """Pass 4a, one chunk and one block of ``bk`` key columns: the gradients through the outputs, the attention
    and the states (module docstring). Refs of ``q, k [C, K]`` and of their block's columns ``[C, bk]``,
    ``U' = U − W S`` and ``do`` ``[C, V]`` (input dtype), of ``s`` the state before the chunk and ``ds`` the
    gradient of the state after it, their block's ``[bk, V]`` rows (float32; bf16 from the Mosaic GPU walks,
    whose products with them are then taken in float32 all the same), and of all of that gradient
    (``dsf_ref``, ``[K, V]``); gate columns ``g, rev, seg [C, 1]`` and rows ``g, seg [1, C]``. ``U'`` comes
    from the state pass, as fla's ``v_new``. Every term but ``dU'`` has the key axis free or contracts over the
    value axis: each program holds ``[C, bk]`` float32 blocks and the ``[bk, wv]`` state rows of a value tile (the
    whole key axis in one program spilled registers on sm_90). ``dU'`` contracts over the whole key axis: every block's program
    computes all of it (``dW = −dU' Sᵀ`` needs it all), from ``dsf_ref``, and the first program writes it.

    The value axis goes by in tiles of ``wv`` columns, and the key axis of ``Q Kᵀ`` and ``K dS⁺`` in tiles of
    ``wk`` (``_util.column_tile``: whole axes up to 128 and on Mosaic TPU): per value tile, ``dU'`` and every
    product that contracts over the value axis (``dW``, ``dÕ U'ᵀ``, ``dÕ Sᵀ``, ``U' dS⁺ᵀ``, the diagonal
    ``Σ dÕ ⊙ U'`` and ``⟨S, dS⁺⟩``), summed over the tiles; then ``dq``, ``dk``, ``dg`` and ``drev`` from those
    sums. Writes ``dU' [C, V]``, ``dW [C, bk]``, ``dq`` (complete), ``dk`` (these terms) to their refs and the
    block's share of ``dg`` (these terms) and ``drev`` ``[C, 1]`` (sums over the key axis, added over the
    blocks in XLA)."""
    md = q_ref.dtype
    c = kb_ref.shape[0]
    kp, vp = q_ref.shape[1], do_ref.shape[1]
    rsum = lambda a: jnp.sum(a, axis=1, keepdims=True)
    strict = lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(jnp.int32, (c, c), 1)
    gamma, total, to_end = _col_factors(gc, rc, sc)
    decay = _decay_incl(gc, sc, gr, sr)
    qk = (tile_sum(kp, wk, lambda sl: _mm(q_ref[:, sl], k_ref[:, sl], _NT)) * decay).astype(md)  # Q Kᵀ ⊙ Γ
    first = pl.program_id(3) == 0

    def value_tile(sl):
        # dU' (the outputs and the state written), then the products with it and with dÕ over these columns
        # (in the input dtype, as fla: a float32 S operand costs shared memory)
        dof = scale * do_ref[:, sl].astype(f32)
        dos = dof.astype(md)
        kds = tile_sum(kp, wk, lambda kl: _mm(k_ref[:, kl], dsf_ref[kl, sl].astype(md)))
        dum = (_mm(qk, dos, _TN) + to_end * kds).astype(md)

        @pl.when(first)
        def _():
            du_ref[:, sl] = dum.astype(du_ref.dtype)

        sm = s_ref[:, sl].astype(md)  # [bk, wv] float32 values live through the chunk would spill on a GPU
        un = un_ref[:, sl]
        um = un.astype(md)
        carry = jnp.sum(rsum(s_ref[:, sl].astype(f32) * ds_ref[:, sl].astype(f32)), axis=0, keepdims=True)
        return (-_mm(dum, sm, _NT), rsum(dof * un.astype(f32)), _mm(dos, um, _NT), _mm(dos, sm, _NT), carry,
                _mm(um, ds_ref[:, sl].astype(md), _NT))

    # dW = −dU' Sᵀ; the diagonal Σ_v dÕ ⊙ U'; dÕ U'ᵀ; dÕ Sᵀ; ⟨S, dS⁺⟩; U' dS⁺ᵀ
    dw, diag, dou, rd, carry, ke = tile_sum(vp, wv, value_tile)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    # dq: the readout and the intra-chunk attention, their diagonal (Γ_tt = 1) apart
    qb, kb = qb_ref[...], kb_ref[...]
    dqk = jnp.where(strict, dou * decay, 0.0).astype(md)
    dq_in = _mm(dqk, kb)
    dg_q, dg_rd = rsum(qb.astype(f32) * dq_in), gamma * rsum(qb.astype(f32) * rd)
    dq_ref[...] = (gamma * rd + dq_in + diag * kb.astype(f32)).astype(dq_ref.dtype)
    kf = kb.astype(f32)
    dk_in = _mm(dqk, qb, _TN)
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    dg_ref[...] = (dg_q - rsum(kf * dk_in) + dg_rd + jnp.where(is_last, total * carry, 0.0)).astype(dg_ref.dtype)
    dk = dk_in + diag * qb.astype(f32)
    dr_ref[...] = (to_end * rsum(kf * ke)).astype(dr_ref.dtype)
    dk_ref[...] = (dk + to_end * ke).astype(dk_ref.dtype)


def _chunk_grads_wy(k_ref, v_ref, x, du_ref, dw_ref, bc, gc, sc, gr, sr, dka_ref, dga_ref, dk_ref, dv_ref, db_ref,
                    dg_ref, *, wk, wv):
    """Pass 4b, one chunk: the gradients through ``W = X (βγ ⊙ K)``, ``U = X (β ⊙ V)`` and ``X = (I + A)^{-1}`` from
    refs of ``k [C, K]``, ``v [C, V]`` and of pass 4a's ``dU' [C, V]``, ``dW [C, K]``, and the inverse
    ``x [C, C]`` (input dtype). Writes ``dk`` (pass 4a's terms added, read from ``dka_ref`` where they are
    added), ``dv``, ``dβ`` and ``dg`` (pass 4a's terms from ``dga_ref`` added) ``[C, 1]`` to their refs.
    The matmul operands take the input dtype, as fla's ``prepare_wy_repr_bwd`` (float32 inputs: float32 at
    ``HIGHEST``; on a GPU that is an FMA loop per product, not a tensor-core one).

    Only the ``[C, C]`` products (``dX``, ``dA``) need a whole head dim; every other term has a key or a value
    axis free. So, as fla's kernel, the value axis goes by in tiles of ``wv`` columns (``dv`` written per
    tile; its ``dβ`` share and ``dU' (β ⊙ V)ᵀ`` summed), then the key axis in tiles of ``wk`` for
    ``dW (βγ ⊙ K)ᵀ``, and after ``dA`` again for ``dk`` (written per tile) and the row sums of ``dβ`` and
    ``dg``: one tile of ``[C, wk]`` float32 blocks live at a time (``_util.column_tile``: the whole axis up to
    128 and on Mosaic TPU; at 256 the whole-axis blocks spilled 1,116 B of registers per thread on sm_90)."""
    md = k_ref.dtype
    c = x.shape[0]
    rsum = lambda a: jnp.sum(a, axis=1, keepdims=True)
    strict = lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(jnp.int32, (c, c), 1)
    gamma = chunk_gamma(gc, sc)
    bg = bc * gamma
    xm = x.astype(md)

    def value_tile(sl):
        vf, dum = v_ref[:, sl].astype(f32), du_ref[:, sl].astype(md)
        dvb = _mm(xm, dum, _TN)
        dv_ref[:, sl] = (bc * dvb).astype(dv_ref.dtype)
        return rsum(vf * dvb), _mm(dum, (vf * bc).astype(md), _NT)

    db_v, dx_u = tile_sum(v_ref.shape[1], wv, value_tile)
    dx = tile_sum(k_ref.shape[1], wk, lambda sl: _mm(
        dw_ref[:, sl].astype(md), (k_ref[:, sl].astype(f32) * bg).astype(md), _NT)) + dx_u
    gam_st = jnp.where(strict, _decay_incl(gc, sc, gr, sr), 0.0)
    da_g = -_mm(_mm(xm, dx.astype(md), _TN).astype(md), xm, _NT) * gam_st  # dA ⊙ Γ, strictly lower
    dam, dag = da_g.astype(md), (bc * da_g).astype(md)

    def key_tile(sl):
        k = k_ref[:, sl]
        kf = k.astype(f32)
        dkb = _mm(xm, dw_ref[:, sl].astype(md), _TN)
        dk = dka_ref[:, sl] + bg * dkb  # dk summed term by term, each matmul's block dead once added
        kda = _mm(dag, k)
        dk = dk + kda
        kdat = _mm(dag, k, _TN)
        dk_ref[:, sl] = (dk + kdat).astype(dk_ref.dtype)
        return rsum(kf * _mm(dam, k)), rsum(kf * dkb), rsum(kf * kda) - rsum(kf * kdat)

    db_a, kdkb, dg_a = tile_sum(k_ref.shape[1], wk, key_tile)
    db_ref[...] = db_a + gamma * kdkb + db_v
    dg_ref[...] = dga_ref[...] + (dg_a + bg * kdkb)


# ----------------------------------------------------------------------------- kernels


def _dstates_kernel(q_ref, k_ref, w_ref, do_ref, gc_ref, rc_ref, sc_ref, dvl_ref, dht_ref, dhs_ref, dh0_ref, *, c, n,
                    scale, kt):
    """Triton: the state gradient ``[K, BV]`` carried as row tiles of ``kt`` (``_util.column_tile``: 64 past key
    dims of 128), ``(Q Kᵀ ⊙ Γ)ᵀ dÕ`` read from ``dvl_ref`` (:func:`_dv_local`)."""
    tiles = key_tiles(dht_ref.shape[0], kt)
    md = q_ref.dtype

    def body(j, st):
        i = n - 1 - j
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        for r, s in zip(tiles, st):
            dhs_ref[i, r, :] = s
        dos = (scale * do_ref[sl, :].astype(f32)).astype(md)
        load = lambda ref: lambda t: ref[sl, tiles[t]]
        return _dstate_step(load(q_ref), load(k_ref), load(w_ref), dos, gc_ref[sl, :], rc_ref[sl, :], sc_ref[sl, :],
                            dvl_ref[sl, :], st, md)

    st = lax.fori_loop(0, n, body, tuple(dht_ref[r, :] for r in tiles))
    for r, s in zip(tiles, st):
        dh0_ref[r, :] = s


def _dstates_kernel_tpu(q_ref, k_ref, w_ref, do_ref, gc_ref, rc_ref, sc_ref, dvl_ref, dht_ref, dhs_ref, dh0_ref, ds_scr,
                        *, scale):
    @pl.when(pl.program_id(2) == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    ds = ds_scr[...]
    dhs_ref[...] = ds
    q, k, md = q_ref[...], k_ref[...], q_ref.dtype
    gc, sc = gc_ref[...], sc_ref[...]
    dos = (scale * do_ref[...].astype(f32)).astype(md)
    (ds,) = _dstate_step(lambda t: q, lambda t: k, lambda t: w_ref[...], dos, gc, rc_ref[...], sc, dvl_ref[...], (ds,),
                         md)
    ds_scr[...] = ds

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds


def _grads_states_kernel(q_ref, k_ref, qb_ref, kb_ref, un_ref, do_ref, gc_ref, rc_ref, sc_ref, gr_ref, sr_ref, h_ref,
                         dh_ref, dhf_ref, dq_ref, dk_ref, du_ref, dw_ref, dg_ref, dr_ref, *, scale, wk, wv):
    _chunk_grads_states(q_ref, k_ref, qb_ref, kb_ref, un_ref, do_ref,
                        *(r[...] for r in (gc_ref, rc_ref, sc_ref, gr_ref, sr_ref)), h_ref, dh_ref, dhf_ref, scale,
                        dq_ref, dk_ref, du_ref, dw_ref, dg_ref, dr_ref, wk=wk, wv=wv)


def _grads_wy_kernel(k_ref, v_ref, x_ref, du_ref, dw_ref, bc_ref, gc_ref, sc_ref, gr_ref, sr_ref, dka_ref, dga_ref,
                     dk_ref, dv_ref, db_ref, dg_ref, *, wk, wv):
    _chunk_grads_wy(k_ref, v_ref, x_ref[...], du_ref, dw_ref, *(r[...] for r in (bc_ref, gc_ref, sc_ref, gr_ref, sr_ref)),
                    dka_ref, dga_ref, dk_ref, dv_ref, db_ref, dg_ref, wk=wk, wv=wv)


# ----------------------------------------------------------------------------- driver


def delta_bwd(qh, kh, vh, bh, g, rev, seg, h0p, do, dht, *, c, scale, interpret, backend):
    """Gradients of ``kernel._kernels`` on its prepared heads-first inputs (``q, k [b, h, Tp, Kp]``,
    ``v [b, h, Tp, Vp]``, ``β, g, rev, seg [b, h, Tp]`` float32, ``h0 [b, h, Kp, Vp]``) for the cotangents
    ``do [b, h, Tp, Vp]``, ``dht [b, h, Kp, Vp]``. Returns ``dq, dk, dv`` (input dtypes), ``dβ, dg, drev``
    and ``dh0`` (float32)."""
    b, h, tp, kp = qh.shape
    vp, n = vh.shape[-1], tp // c
    tpu, mgpu = backend == "mosaic_tpu", backend == "mosaic_gpu"
    w, u, x = wy_factors(kh, vh, bh, g, seg, c=c, interpret=interpret, backend=backend, with_x=True)
    backend = "triton" if mgpu else backend  # 4b at chunks of 128, the one kernel with no Mosaic GPU body there
    do = do.astype(vh.dtype)
    dht = dht.astype(f32)
    cols = [x_[..., None] for x_ in (bh, g, rev, seg)]  # [b, h, Tp, 1]
    rows = [x_.reshape(b, h, n, 1, c) for x_ in (g, seg)]
    hs_shape = jax.ShapeDtypeStruct((b, h, n, kp, vp), f32)
    st_shape = jax.ShapeDtypeStruct((b, h, kp, vp), f32)
    blk = lambda d, rev_=False: chunk_block(c, d, n if rev_ else None)
    rblk = lambda: pl.BlockSpec((None, None, None, 1, c), lambda i, j, l: (i, j, l, 0, 0))
    local = _dv_local(qh, kh, do, g, seg, c=c, scale=scale)  # the state-free part of dU', read by every walk
    if mgpu:  # the two serial walks on Mosaic GPU; H and dH in bf16, the wgmma operands they are there
        hs, _, un = chunk_states_mosaic_gpu(kh, w, u, g, rev, seg, h0p, c=c, interpret=interpret)
        dhs, dh0, ndu = chunk_dstates_mosaic_gpu(qh, kh, w, do, local, g, rev, seg, dht, c=c, scale=scale,
                                                 interpret=interpret)
    elif tpu:
        hs, _, un = chunk_states(kh, w, u, g, rev, seg, h0p, c=c, interpret=interpret, backend=backend, with_u_new=True)
        whole = pl.BlockSpec((None, None, kp, vp), lambda i, j, l: (i, j, 0, 0))
        seq = tpu_params(interpret, "parallel", "parallel", "arbitrary")
        r = blk(1, True)
        dhs, dh0 = pl.pallas_call(
            functools.partial(_dstates_kernel_tpu, scale=scale), grid=(b, h, n),
            in_specs=[blk(kp, True), blk(kp, True), blk(kp, True), blk(vp, True), r, r, r, blk(vp, True), whole],
            out_specs=[pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l: (i, j, n - 1 - l, 0, 0)), whole],
            out_shape=[hs_shape, st_shape], scratch_shapes=[pltpu.VMEM((kp, vp), f32)], interpret=interpret,
            compiler_params=seq, name="delta_chunk_bwd_dstates_tpu",
        )(qh, kh, w, do, *cols[1:], local, dht)
    else:
        hs, _, un = chunk_states(kh, w, u, g, rev, seg, h0p, c=c, interpret=interpret, backend=backend, with_u_new=True)
        bv = min(vp, 32 if kp > 128 else 64)  # sm_90 at K = 256: 76 B of spills at 64, none at 32
        full = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j, l: (i, j, 0, 0))
        vseq = pl.BlockSpec((None, None, tp, bv), lambda i, j, l: (i, j, 0, l))
        vstate = pl.BlockSpec((None, None, kp, bv), lambda i, j, l: (i, j, 0, l))
        vstates = pl.BlockSpec((None, None, n, kp, bv), lambda i, j, l: (i, j, 0, 0, l))
        walk = walk_params(interpret, backend, kp, num_warps=8, num_stages=2)
        dhs, dh0 = pl.pallas_call(
            functools.partial(_dstates_kernel, c=c, n=n, scale=scale, kt=column_tile(kp, backend)), grid=(b, h, vp // bv),
            in_specs=[full(kp), full(kp), full(kp), vseq, full(1), full(1), full(1), vseq, vstate],
            out_specs=[vstates, vstate], out_shape=[hs_shape, st_shape], interpret=interpret,
            compiler_params=walk, name="delta_chunk_bwd_dstates",
        )(qh, kh, w, do, *cols[1:], local, dht)
    if tpu:
        params = tpu_params(interpret, "parallel", "parallel", "parallel")
    else:  # Triton, under backend="mosaic_gpu" too
        params = triton_params(interpret, backend, num_warps=8, num_stages=1)
    gshape = jax.ShapeDtypeStruct((b, h, tp, 1), f32)
    fshape = lambda d: jax.ShapeDtypeStruct((b, h, tp, d), f32)
    mshape = lambda d: jax.ShapeDtypeStruct((b, h, tp, d), kh.dtype)
    name = "_tpu" if tpu else ""
    # (4a) through the outputs, the attention and the states, a program per key block of 64 (Mosaic TPU: the whole
    # key axis, as its blocks' last dim must be a multiple of 128 or all of it); (4b) through W, U and X (two kernels:
    # one holding both [K, V] states and the WY algebra needs more shared memory than an H100 has: 272 KiB by
    # Triton 3.9)
    bk = kp if tpu else min(kp, 64)
    nk = kp // bk
    kblk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, l, z: (i, j, l, 0))
    kcol = pl.BlockSpec((None, None, c, bk), lambda i, j, l, z: (i, j, l, z))
    krow = pl.BlockSpec((None, None, None, 1, c), lambda i, j, l, z: (i, j, l, 0, 0))
    kstate = pl.BlockSpec((None, None, None, bk, vp), lambda i, j, l, z: (i, j, l, z, 0))
    fstate = pl.BlockSpec((None, None, None, kp, vp), lambda i, j, l, z: (i, j, l, 0, 0))
    kpart = pl.BlockSpec((None, None, None, c, 1), lambda i, j, l, z: (z, i, j, l, 0))
    pshape = jax.ShapeDtypeStruct((nk, b, h, tp, 1), f32)
    if mgpu:  # (4a) on Mosaic GPU (backward_mosaic_gpu.py), dU' from the state-gradient walk
        dq, dk_a, dw, dg_a, drev = chunk_grads_mosaic_gpu(qh, kh, un, do, ndu, g, rev, seg, hs, dhs, c=c, scale=scale,
                                                          interpret=interpret)
        du = None  # (4b) on Mosaic GPU takes −dU' itself; on Triton, dU'
    else:
        kernel, in_specs, args = once_on_tpu(
            tpu, functools.partial(_grads_states_kernel, scale=scale, wk=column_tile(kp, backend),
                                   wv=column_tile(vp, backend, 32)),  # sm_90 at K = V = 256: 64 B of spills at wv = 64, 0 at 32
            [kblk(kp), kblk(kp), kcol, kcol, kblk(vp), kblk(vp), kblk(1), kblk(1), kblk(1), krow, krow, kstate, kstate,
             fstate], [qh, kh, qh, kh, un, do, *cols[1:], *rows, hs, dhs, dhs], {2: 0, 3: 1, 13: 12})
        dq, dk_a, du, dw, dg_a, drev = pl.pallas_call(
            kernel, grid=(b, h, n, nk), in_specs=in_specs,
            out_specs=[kcol, kcol, kblk(vp), kcol, kpart, kpart],
            # dU' and dW in the input dtype: (4b) takes them as matmul operands only; dg and drev per key block
            out_shape=[jax.ShapeDtypeStruct(qh.shape, qh.dtype), fshape(kp), mshape(vp), mshape(kp), pshape, pshape],
            interpret=interpret, compiler_params=tpu_params(interpret, *["parallel"] * 4) if tpu else params,
            name="delta_chunk_bwd_grads" + name,
        )(*args)
        dg_a, drev = jnp.sum(dg_a, axis=0), jnp.sum(drev, axis=0)
    if mgpu and wy_grads_fit(c, kp, vp, vh.dtype):  # (4b) on Mosaic GPU; 4a's dk and dg terms added here
        dk_b, dv, dbeta, dg_b = chunk_grads_wy_mosaic_gpu(kh, vh, x, ndu, dw, bh, g, seg, c=c, interpret=interpret)
        return dq, (dk_a + dk_b).astype(kh.dtype), dv, dbeta, dg_a[..., 0] + dg_b, drev[..., 0], dh0
    du = (-ndu).astype(vh.dtype) if du is None else du
    dk, dv, dbeta, dg = pl.pallas_call(
        # sm_90 at K = V = 256: 24 B of spills at wk = 64, 0 at 32
        functools.partial(_grads_wy_kernel, wk=column_tile(kp, backend, 32), wv=column_tile(vp, backend)), grid=(b, h, n),
        in_specs=[blk(kp), blk(vp), blk(c), blk(vp), blk(kp), blk(1), blk(1), blk(1), rblk(), rblk(), blk(kp), blk(1)],
        out_specs=[blk(kp), blk(vp), blk(1), blk(1)],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, kh.dtype), jax.ShapeDtypeStruct(vh.shape, vh.dtype), gshape, gshape],
        interpret=interpret, compiler_params=params, name="delta_chunk_bwd_grads_wy" + name,
    )(kh, vh, x, du, dw, cols[0], cols[1], cols[3], *rows, dk_a, dg_a)
    return dq, dk, dv, dbeta[..., 0], dg[..., 0], drev[..., 0], dh0
