"""Training recipes on top of the pattern LM.

**MaTVLM** (Li et al. 2025, language part; also "The Mamba in the Llama", Wang et al. 2024): a
Mamba-2 layer is initialised from a trained attention layer through the SSD / linear-attention
duality ``y_t = sum_{s<=t} (C_t . B_s) prod(a) Delta_s x_s``:

    C <- Q,   B <- K,   x <- V,   out_proj <- O,   (Delta = 1, D = 0, short convs = identity)

(``B``/``x`` repeat the key/value heads over their query-head group: GQA). With the decay off
(``use_decay=False``, ``a = 1``) the SSD core then computes exactly causal linear attention (no softmax)
of the layer's ``silu(q), silu(k), silu(v)``; training (distillation) recovers the rest. A hybrid
student then learns from the Transformer teacher with :func:`distill_loss`, the token-averaged
``T^2 KL(softmax(teacher/T) || softmax(student/T))`` (Hinton et al. 2015).

**Depth up-scaling** (Yi, 01.AI 2024; SOLAR): a deeper model made by duplicating a trained model's
middle layers, ``[0 .. a) + [s .. e) + [a .. L)``-style index lists (:func:`upscale_depth`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax.models.lm import LM, layer_names

__all__ = [
    "mamba2_from_attention",
    "distill_loss",
    "layer_state",
    "set_layer_state",
    "hybrid_from_transformer",
    "upscale_depth",
]


# -- per-layer access (scanned or not) ---------------------------------------------------------
def _where(lm: LM, i: int):
    period = len(lm.cfg.pattern)
    if i < lm.num_repeats * period:
        r, j = divmod(i, period)
        return lm.blocks.layers[j], r
    return lm.tail[i - lm.num_repeats * period], None


def layer_state(lm: LM, i: int) -> nnx.State:
    """The ``nnx.State`` of layer ``i`` (a slice of the stacked state for scanned layers)."""
    mod, r = _where(lm, i)
    st = nnx.state(mod)
    return st if r is None else jax.tree.map(lambda a: a[r], st)


def set_layer_state(lm: LM, i: int, state: nnx.State) -> None:
    mod, r = _where(lm, i)
    if r is None:
        nnx.update(mod, state)
    else:
        nnx.update(mod, jax.tree.map(lambda a, s: a.at[r].set(s), nnx.state(mod), state))


def _copy_shared(dst: LM, src: LM):
    """Embeddings, head and final norm."""
    for name in ("embed", "head"):
        a, b = getattr(src, name), getattr(dst, name)
        if a is not None and b is not None:
            b[...] = a[...]
    nnx.update(dst.final_norm, nnx.state(src.final_norm))


# -- MaTVLM ------------------------------------------------------------------------------------
def mamba2_from_attention(mamba, attn) -> None:
    """Initialise a ``seqjax.mixers.mamba2.Mamba2`` layer in place from an ``Attention`` layer.

    The Mamba-2 layer must have ``nheads = num_heads``, ``head_dim = d_state = attention head_dim``
    and ``ngroups = num_heads`` (build it with ``expand = heads * head_dim / d_model``).
    """
    h, kvh, hd, d = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.d_model
    if (mamba.nheads, mamba.head_dim, mamba.d_state, mamba.ngroups) != (h, hd, hd, h):
        raise ValueError(
            f"Mamba2 needs nheads={h}, head_dim={hd}, d_state={hd}, ngroups={h} to take this attention layer; "
            f"got nheads={mamba.nheads}, head_dim={mamba.head_dim}, d_state={mamba.d_state}, ngroups={mamba.ngroups}"
        )
    rep = lambda w: jnp.repeat(w, h // kvh, axis=1)  # [d, kvh, hd] -> [d, h, hd]
    mamba.C_proj.kernel[...] = attn.wq[...].reshape(d, h * hd)
    mamba.B_proj.kernel[...] = rep(attn.wk[...]).reshape(d, h * hd)
    mamba.x_proj.kernel[...] = rep(attn.wv[...]).reshape(d, h * hd)
    mamba.out_proj.kernel[...] = attn.wo[...].reshape(h * hd, d)
    for conv in (mamba.x_conv, mamba.B_conv, mamba.C_conv):  # identity taps: w[-1] = 1
        conv.w[...] = jnp.zeros_like(conv.w[...]).at[-1].set(1.0)
        if conv.bias is not None:
            conv.bias[...] = jnp.zeros_like(conv.bias[...])
    mamba.dt_proj.kernel[...] = jnp.zeros_like(mamba.dt_proj.kernel[...])
    mamba.dt_bias[...] = jnp.full_like(mamba.dt_bias[...], np.log(np.expm1(1.0)))  # softplus -> 1
    mamba.D[...] = jnp.zeros_like(mamba.D[...])


def distill_loss(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """``T^2 * mean_tokens KL(softmax(teacher / T) || softmax(student / T))``; ``mask [b, t]`` weights tokens."""
    t = temperature
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)  # [b, t]
    if mask is None:
        return t * t * jnp.mean(kl)
    m = mask.astype(jnp.float32)
    return t * t * jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def hybrid_from_transformer(teacher: LM, pattern, *, rngs: nnx.Rngs, mamba_kwargs=None) -> LM:
    """A hybrid student with ``pattern`` (``"attention"`` or ``"mamba2"`` per slot), every layer copied
    from the teacher: attention layers as they are, Mamba-2 layers via :func:`mamba2_from_attention`
    (the MLPs and norms copied either way). The teacher must be attention-only."""
    tcfg = teacher.cfg
    if set(layer_names(tcfg)) != {"attention"}:
        raise ValueError(f"the teacher must be attention-only, got pattern {tcfg.pattern}")
    h = tcfg.num_heads
    hd = tcfg.d_model // h
    mk = dict(expand=h * hd // tcfg.d_model, head_dim=hd, d_state=hd, ngroups=h, use_decay=False)
    mk.update(mamba_kwargs or {})
    cfg = dataclasses.replace(tcfg, pattern=tuple(pattern), mixer_kwargs={**tcfg.mixer_kwargs, "mamba2": mk})
    student = LM(cfg, rngs=rngs)
    _copy_shared(student, teacher)
    for i, name in enumerate(layer_names(cfg)):
        src = layer_state(teacher, i)
        if name == "attention":
            set_layer_state(student, i, src)
            continue
        if name != "mamba2":
            raise ValueError(f"hybrid_from_transformer maps attention to 'mamba2' only, got {name!r}")
        layer, t_layer = _standalone(student, i), _standalone(teacher, i)
        for key in ("norm1", "norm2", "mlp"):
            if getattr(layer, key) is not None:
                nnx.update(getattr(layer, key), nnx.state(getattr(t_layer, key)))
        mamba2_from_attention(layer.mixer, t_layer.mixer)
        set_layer_state(student, i, nnx.state(layer))
    return student


def _standalone(lm: LM, i: int):
    """A standalone copy of layer ``i`` (unstacked), as a module."""
    mod, r = _where(lm, i)
    if r is None:
        return nnx.merge(*nnx.split(mod))
    graphdef, st = nnx.split(mod)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[r], st))


# -- depth up-scaling ---------------------------------------------------------------------------
def upscale_depth(lm: LM, order, *, rngs: nnx.Rngs | None = None) -> LM:
    """A deeper LM whose layer ``k`` is a copy of ``lm``'s layer ``order[k]`` (Yi / SOLAR depth
    up-scaling), e.g. ``order = [0, 1, 2, 3, 1, 2, 3, 4, 5]`` duplicates the middle layers 1..3 of a
    6-layer model. The pattern of the new model is the old names in that order."""
    names = layer_names(lm.cfg)
    order = [int(i) for i in order]
    if not order or min(order) < 0 or max(order) >= len(names):
        raise ValueError(f"order must index the {len(names)} layers, got {order}")
    new_names = tuple(names[i] for i in order)
    cfg = dataclasses.replace(lm.cfg, num_layers=len(order), pattern=new_names)
    out = LM(cfg, rngs=rngs or nnx.Rngs(0))
    _copy_shared(out, lm)
    for k, i in enumerate(order):
        set_layer_state(out, k, layer_state(lm, i))
    return out
