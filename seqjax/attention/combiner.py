"""Combiner-Axial (Ren et al., NeurIPS 2021): causal full-support attention at O(T sqrt(T)) cost.

The sequence is laid out row-major on a grid of rows of length ``c`` (position ``i = r c + col``).
Query ``i`` attends *directly* to the earlier keys of its own row, and to one *summary* per column
``col'``: the region ``Omega_{r, col'} = {(r', col') : r' < r}`` of that column in earlier rows. A region
is summarised by a local conditional expectation with a query-independent score ``s_j = k_j . w``::

    kbar = sum_{j in Omega} a_j k_j,  vbar = sum_{j in Omega} a_j v_j,  a_j = softmax_{j in Omega}(s_j)

and enters the softmax with its size ``n = |Omega| = r``::

    y_i = [sum_{j direct} e^{q_i.k_j/sqrt(d)} v_j + sum_{Omega} n e^{q_i.kbar/sqrt(d)} vbar]
          / [sum_{j direct} e^{q_i.k_j/sqrt(d)}     + sum_{Omega} n e^{q_i.kbar/sqrt(d)}]

so every earlier position has support (Combiner's "full attention"), ``q = 0`` gives the causal mean,
and with at most one earlier row every region is one key and the result is exact softmax attention.

Shapes: ``q, k, v [b, t, h, d]``, ``w [h, d]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax.nn import Linear, merge_heads, split_heads

__all__ = ["combiner_axial", "combiner_axial_reference", "CombinerAxial"]


def _grid(a, rows, c):
    b, t = a.shape[:2]
    a = jnp.pad(a, ((0, 0), (0, rows * c - t)) + ((0, 0),) * (a.ndim - 2))
    return a.reshape(b, rows, c, *a.shape[2:])


def combiner_axial(q, k, v, w, *, row: int | None = None):
    """Causal Combiner-Axial attention (module docstring); ``row`` defaults to ``ceil(sqrt(t))``."""
    _checks.check_ndim("q", q, 4, "[batch, time, heads, head_dim]")
    _checks.check_same_shape("q", q, "k", k)
    _checks.check_same_shape("q", q, "v", v)
    b, t, h, d = q.shape
    _checks.check_shape("w", w, (h, d), "[heads, head_dim]")
    c = row or max(1, math.isqrt(t - 1) + 1)
    rows = -(-t // c)
    scale = 1.0 / math.sqrt(d)
    f32 = jnp.float32
    qg, kg, vg = (_grid(a.astype(f32), rows, c) for a in (q, k, v))  # [b, R, c, h, d]
    # direct: causal attention inside each row
    s_dir = jnp.einsum("brihd,brjhd->brhij", qg, kg) * scale
    tri = jnp.tril(jnp.ones((c, c), bool))[None, None, None]
    s_dir = jnp.where(tri, s_dir, -jnp.inf)
    # summaries: exclusive prefix over rows of each column, softmax-weighted by s_j = k_j . w
    sj = jnp.einsum("brchd,hd->brch", kg, w.astype(f32))  # [b, R, c, h]
    m = jax.lax.stop_gradient(jnp.max(sj, axis=1, keepdims=True))
    e = jnp.exp(sj - m)
    excl = lambda a: jnp.cumsum(jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1), axis=1)
    den = excl(e)  # [b, R, c, h]
    kbar = excl(e[..., None] * kg) / jnp.maximum(den, 1e-30)[..., None]
    vbar = excl(e[..., None] * vg) / jnp.maximum(den, 1e-30)[..., None]
    n = jnp.arange(rows, dtype=f32)[None, :, None, None]  # rows before = region size
    s_sum = jnp.einsum("brihd,brjhd->brhij", qg, kbar) * scale
    log_n = jnp.where(n > 0, jnp.log(jnp.maximum(n, 1.0)), -jnp.inf)  # [1, R, 1, 1]
    s_sum = s_sum + log_n[:, :, :, :, None]
    p = jax.nn.softmax(jnp.concatenate([s_dir, s_sum], axis=-1), axis=-1)
    y = jnp.einsum("brhij,brjhd->brihd", p[..., :c], vg) + jnp.einsum("brhij,brjhd->brihd", p[..., c:], vbar)
    return y.reshape(b, rows * c, h, d)[:, :t].astype(q.dtype)


def combiner_axial_reference(q, k, v, w, *, row: int | None = None):
    """The same distribution built per query from explicit regions (O(T^2), for tests)."""
    b, t, h, d = q.shape
    c = row or max(1, math.isqrt(t - 1) + 1)
    f32 = jnp.float32
    q, k, v, w = (a.astype(f32) for a in (q, k, v, w))
    out = []
    for i in range(t):
        r, col = divmod(i, c)
        logits, vals = [], []
        for j in range(r * c, i + 1):
            logits.append(jnp.einsum("bhd,bhd->bh", q[:, i], k[:, j]) / math.sqrt(d))
            vals.append(v[:, j])
        for cc in range(c):
            region = [rr * c + cc for rr in range(r) if rr * c + cc < t]
            if not region:
                continue
            a = jax.nn.softmax(jnp.stack([jnp.einsum("bhd,hd->bh", k[:, j], w) for j in region]), axis=0)
            kb = sum(a[n][..., None] * k[:, j] for n, j in enumerate(region))
            vb = sum(a[n][..., None] * v[:, j] for n, j in enumerate(region))
            logits.append(jnp.einsum("bhd,bhd->bh", q[:, i], kb) / math.sqrt(d) + math.log(len(region)))
            vals.append(vb)
        p = jax.nn.softmax(jnp.stack(logits), axis=0)
        out.append(sum(p[n][..., None] * vals[n] for n in range(len(vals))))
    return jnp.stack(out, axis=1)


class CombinerAxial(nnx.Module):
    """Multi-head causal Combiner-Axial attention layer: ``y, None = layer(x)``."""

    def __init__(self, d_model: int, *, num_heads: int = 4, row: int | None = None, rngs: nnx.Rngs):
        _checks.check_divisible("d_model", d_model, "num_heads", num_heads)
        self.num_heads, self.row = num_heads, row
        self.wq = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wk = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wv = Linear(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
        self.wo = Linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
        self.w_sum = nnx.Param(jnp.zeros((num_heads, d_model // num_heads)), out_sharding=("heads", "head_dim"))

    def __call__(self, x, *, segment_ids=None, cache=None):
        if segment_ids is not None or cache is not None:
            raise ValueError("CombinerAxial supports neither segment_ids nor a decode cache")
        h = self.num_heads
        q, k, v = (split_heads(f(x), h) for f in (self.wq, self.wk, self.wv))
        return self.wo(merge_heads(combiner_axial(q, k, v, self.w_sum[...], row=self.row))), None
