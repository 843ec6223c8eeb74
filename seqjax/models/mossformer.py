r"""MossFormer2 (Zhao et al., ICASSP 2024): time-domain speech separation with a recurrent-free memory module
(a gated, dilated FSMN) beside the MossFormer block's joint local/global attention.

**Separator.** ``mixture [b, L] -> estimates [b, S, L]``: a 1-D conv encoder (kernel ``K``, stride ``K/2``, ReLU)
gives frames ``e [b, T, N]``; a mask net gives one mask per source ``m_s [b, T, N]``; a transposed-conv decoder
(overlap-add of ``(e ⊙ m_s) W_dec``) returns each source, cropped to ``L``.

**Mask net.** LayerNorm → linear ``N → D`` + scaled sinusoidal positions → ``layers`` × [MossFormer block →
recurrent block] → LayerNorm (+ the stack's input) → PReLU → linear ``D → S·N`` → per source
``relu(W_o (tanh(W_t h) ⊙ σ(W_g h)))``.

**MossFormer block** (gated single-head attention, convolution-augmented). Every projection is an FFConvM:
LayerNorm → linear → SiLU → a residual depthwise conv over time (kernel 17). With ``x'`` = ``x`` with half its
channels shifted one step later (token shift)::

    v, u = FFConvM(x') ;  z = FFConvM(x') ;  (q, q_lin, k, k_lin) = z ⊙ γ_i + β_i  (rotary positions on each)
    a(w) = relu(q kᵀ / g)² w           inside chunks of g frames   (quadratic, local)
         + q_lin (Σ k_linᵀ w) / n       over the whole sequence      (linear, global)
    out  = (a(u) ⊙ v) ⊙ σ(a(v) ⊙ u) ;   x ← x + FFConvM(out)

Causal: the chunk-local term is masked to ``j ≤ i`` and the global term sums only earlier chunks (an exclusive
cumulative sum over chunks, each chunk's ``k_linᵀ w`` divided by ``g``) — :func:`joint_attention`.

**Recurrent block** (``Gated_FSMN_Block_Dilated``)::

    h = LN(PReLU(W_in x)) ;  u = FFConvM(h) ;  v = FFConvM(h)
    u ← u + DenseFSMN(W_p relu(W_l u))      (the dilated FSMN memory)
    y = x + W_out LN(v ⊙ u + h)             (the gated convolutional unit, bottleneck and output layer)

:func:`dilated_dense_fsmn` is the memory: ``depth`` depthwise convs over time with dilation ``2^i``; layer ``i``
reads the memory input and every earlier layer's output (dense connections), each through its own depthwise
taps, summed per channel, then a norm and PReLU; the last layer's output is returned. Non-causal taps are
centred (kernel ``2·lorder − 1``, instance norm over time, as the paper's code); causal taps look back only
(kernel ``lorder``, a per-frame channel norm so no statistic reaches the future). The causal form takes
``state`` — the window of past inputs of every layer — and returns the new one, so running a sequence in chunks
(down to one frame at a time) equals the full causal run (:meth:`RecurrentBlock.__call__` carries the windows
of its two FFConvM convs too; :meth:`RecurrentBlock.init_state`).

Differences from the paper's code, on purpose: the dense connections are channel-aligned (output channel ``c``
reads channel ``c`` of every earlier output; the paper's grouped conv over the concatenation mixes neighbouring
channels); no dropout; per-frame LayerNorms instead of global GroupNorms in the mask net (so the causal variant
is causal end to end); rotary positions on the first ``min(32, qk_dim)`` dims of each of the four query/key
views. Shapes: activations ``[batch, frames, channels]``, time on axis 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from seqjax import _checks
from seqjax.attention.attention import rope

__all__ = ["BLOCKS", "token_shift", "depthwise_conv", "dilated_dense_fsmn", "fsmn_receptive_field", "joint_attention",
           "encode", "decode", "ConvModule", "FFConvM", "MossFormerBlock", "DilatedFSMN", "RecurrentBlock",
           "RecurrentState", "MaskNet", "MossFormer2"]

#: mask-net layer kinds: attention + recurrent (MossFormer2), attention only (MossFormer), recurrent only, conv only
BLOCKS = ("mossformer2", "mossformer", "fsmn", "conv")


# ----------------------------------------------------------------------------- functional core


def token_shift(x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    """The first half of the channels delayed one frame (``x[t-1]``, zeros at ``t = 0``); the rest unchanged."""
    h = x.shape[-1] // 2
    shifted = jnp.pad(x[:, :-1, :h], ((0, 0), (1, 0), (0, 0)))
    return jnp.concatenate([shifted, x[:, :, h:]], axis=-1)


def depthwise_conv(x: Float[Array, "b t c"], w: Float[Array, "k c"], *, dilation: int = 1, causal: bool = False,
                   state=None):
    """Depthwise conv over time: ``y_t = Σ_j w[j] x_{t + (j - c) δ}`` with ``c = K − 1`` (causal) or ``(K − 1)/2``
    (centred, ``K`` odd; zeros beyond both ends). Causal ``state`` ``[b, (K−1)δ, c]`` holds the previous inputs
    (zeros if ``None``). Returns ``(y, new_state)``; ``new_state`` is ``None`` when not causal."""
    _checks.check_ndim("x", x, 3, "[batch, time, channels]")
    _checks.check_shape("w", w, (None, x.shape[-1]), f"[taps, {x.shape[-1]}]")
    k, c = w.shape
    span = (k - 1) * dilation
    if causal:
        b = x.shape[0]
        if state is None:
            state = jnp.zeros((b, span, c), x.dtype)
        _checks.check_shape("state", state, (b, span, c), "[batch, (taps-1)*dilation, channels]")
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
        new_state = xp[:, xp.shape[1] - span:] if span else state
    else:
        if k % 2 == 0:
            raise ValueError(f"a centred (non-causal) depthwise conv needs an odd number of taps, got {k}")
        if state is not None:
            raise ValueError("state is only for causal=True")
        xp = jnp.pad(x, ((0, 0), (span // 2, span // 2), (0, 0)))
        new_state = None
    # a sum of shifted slices: XLA's grouped convolutions are slow on CPU, and K is small
    t = x.shape[1]
    w32 = w.astype(jnp.float32)
    y = sum(xp[:, j * dilation: j * dilation + t].astype(jnp.float32) * w32[j][None, None] for j in range(k))
    return y.astype(x.dtype), new_state


def _prelu(x, alpha):
    return jnp.where(x >= 0, x, jnp.asarray(alpha).reshape((1,) * (x.ndim - 1) + (-1,)) * x)


def _norm(x, scale, bias, *, causal: bool, eps: float = 1e-5):
    """Causal: over channels per frame. Non-causal: instance norm (over time per channel)."""
    axis = -1 if causal else 1
    x32 = x.astype(jnp.float32)
    mu = x32.mean(axis, keepdims=True)
    var = ((x32 - mu) ** 2).mean(axis, keepdims=True)
    scale, bias = (jnp.asarray(a).reshape((1,) * (x.ndim - 1) + (-1,)) for a in (scale, bias))
    return ((x32 - mu) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def fsmn_receptive_field(lorder: int, depth: int, *, causal: bool) -> tuple[int, int]:
    """``(past, future)`` frames the dense dilated FSMN reads around each output frame."""
    k = lorder if causal else 2 * lorder - 1
    reach = sum((k - 1) * 2**i for i in range(depth))
    return (reach, 0) if causal else (reach // 2, reach // 2)


def dilated_dense_fsmn(params: dict, z: Float[Array, "b t c"], *, causal: bool, state=None):
    """The dense dilated FSMN memory of ``z``: ``params = {"taps": (w_0, …), "scale", "bias", "alpha": (…)}`` with
    ``w_i`` ``[i+1, K, c]`` (layer ``i`` has dilation ``2^i`` and taps for each of its ``i + 1`` inputs
    ``[z, o_0, …, o_{i−1}]``), norm scales/biases ``[c]`` and PReLU slopes ``[c]`` per layer. Causal ``state`` is a
    tuple of windows ``[b, (K−1)·2^i, (i+1)·c]`` (zeros if ``None``). Returns ``(o_last, new_state)``."""
    _checks.check_ndim("z", z, 3, "[batch, time, channels]")
    taps = params["taps"]
    b, t, c = z.shape
    if state is None and causal:
        state = tuple(None for _ in taps)
    srcs, new_state = [z], []
    out = z
    for i, w in enumerate(taps):
        n, k, _ = w.shape
        inp = jnp.concatenate(srcs, axis=-1)  # [z, o_0, …, o_{i-1}]
        wi = jnp.moveaxis(w, 0, 1).reshape(k, n * c)  # taps laid out like the concatenation
        y, st = depthwise_conv(inp, wi, dilation=2**i, causal=causal, state=state[i] if causal else None)
        y = y.reshape(b, t, n, c).sum(2)
        out = _prelu(_norm(y, params["scale"][i], params["bias"][i], causal=causal), params["alpha"][i])
        srcs.append(out)
        new_state.append(st)
    return out, (tuple(new_state) if causal else None)


def _grouped(a, g):
    b, t = a.shape[:2]
    n = -(-t // g)
    a = jnp.pad(a, ((0, 0), (0, n * g - t), (0, 0)))
    return a.reshape(b, n, g, a.shape[-1])


def joint_attention(quad_q, quad_k, lin_q, lin_k, w: Float[Array, "b t e"], *, group: int, causal: bool):
    """MossFormer's joint attention of values ``w`` (``[b, t, e]``; ``v`` and ``u`` concatenated):
    ``relu(q kᵀ / g)² w`` within chunks of ``group`` frames plus linear attention ``q_lin (k_linᵀ w)`` across the
    sequence (``/ t`` over all of it; causal: over earlier chunks only, each chunk ``/ g``). Queries and keys
    ``[b, t, dk]``. The sequence is zero-padded to a multiple of ``group``; padding never reaches a real frame."""
    _checks.check_ndim("w", w, 3, "[batch, time, values]")
    for name, a in (("quad_q", quad_q), ("quad_k", quad_k), ("lin_q", lin_q), ("lin_k", lin_k)):
        _checks.check_shape(name, a, (w.shape[0], w.shape[1], None), "[batch, time, qk_dim]")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    t, g = w.shape[1], group
    qq, qk, lq, lk, ww = (_grouped(a.astype(jnp.float32), g) for a in (quad_q, quad_k, lin_q, lin_k, w))
    attn = jax.nn.relu(jnp.einsum("bnid,bnjd->bnij", qq, qk) / g) ** 2
    if causal:
        attn = jnp.where(jnp.tril(jnp.ones((1, 1, g, g), bool)), attn, 0.0)
    quad = jnp.einsum("bnij,bnje->bnie", attn, ww)
    if causal:
        kv = jnp.einsum("bnjd,bnje->bnde", lk, ww) / g
        # exclusive prefix sum (chunks strictly before), built so a chunk's own kv never enters its prefix: a
        # subtraction (cumsum − kv) would leak the chunk's future frames into its past by rounding
        kv = jnp.pad(jnp.cumsum(kv, axis=1)[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
        lin = jnp.einsum("bnid,bnde->bnie", lq, kv)
    else:
        kv = jnp.einsum("bnjd,bnje->bde", lk, ww) / t
        lin = jnp.einsum("bnid,bde->bnie", lq, kv)
    out = (quad + lin).reshape(w.shape[0], -1, w.shape[-1])[:, :t]
    return out.astype(w.dtype)


def _frames(length: int, kernel: int, stride: int) -> int:
    return -(-max(length - kernel, 0) // stride) + 1


def encode(w: Float[Array, "k n"], x: Float[Array, "b l"], *, stride: int) -> Float[Array, "b t n"]:
    """``relu(Conv1d(x))`` with kernel ``K = w.shape[0]`` and ``stride``; ``x`` is zero-padded at the end so the
    frames cover every sample: ``T = ⌈(L − K) / stride⌉ + 1`` frames."""
    k = w.shape[0]
    length = x.shape[1]
    t = _frames(length, k, stride)
    x = jnp.pad(x, ((0, 0), (0, (t - 1) * stride + k - length)))
    idx = np.arange(t)[:, None] * stride + np.arange(k)[None, :]
    return jax.nn.relu(jnp.einsum("btk,kn->btn", x[:, idx], w))


def decode(w: Float[Array, "n k"], h: Float[Array, "... t n"], *, stride: int, length: int) -> Float[Array, "... l"]:
    """The transposed conv of :func:`encode`: frames ``h W`` overlap-added at ``stride``, cropped to ``length``."""
    k = w.shape[1]
    t = h.shape[-2]
    frames = jnp.einsum("...tn,nk->...tk", h, w)
    idx = (np.arange(t)[:, None] * stride + np.arange(k)[None, :]).reshape(-1)
    out = jnp.zeros(h.shape[:-2] + ((t - 1) * stride + k,), frames.dtype)
    out = out.at[..., idx].add(frames.reshape(*h.shape[:-2], -1))
    return out[..., :length]


# ----------------------------------------------------------------------------- modules


def _linear(d_in, d_out, rngs, *, bias=True):
    return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs)


class PReLU(nnx.Module):
    def __init__(self, d: int):
        self.alpha = nnx.Param(jnp.full((d,), 0.25, jnp.float32))

    def __call__(self, x):
        return _prelu(x, self.alpha[...])


class ConvModule(nnx.Module):
    """``x + depthwise_conv(x)`` over time (kernel ``kernel``; causal or centred)."""

    def __init__(self, d: int, kernel: int = 17, *, causal: bool = False, rngs: nnx.Rngs):
        self.causal, self.kernel = causal, kernel if causal else kernel | 1
        self.w = nnx.Param(jax.random.normal(rngs.params(), (self.kernel, d)) / np.sqrt(self.kernel))

    def __call__(self, x, state=None):
        y, state = depthwise_conv(x, self.w[...], causal=self.causal, state=state)
        return x + y, state

    def init_state(self, batch: int, dtype=jnp.float32):
        return jnp.zeros((batch, self.kernel - 1, self.w.shape[1]), dtype)


class FFConvM(nnx.Module):
    """LayerNorm → linear → SiLU → :class:`ConvModule`. Returns ``(y, conv_state)``."""

    def __init__(self, d_in: int, d_out: int, kernel: int = 17, *, causal: bool = False, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_in, rngs=rngs)
        self.proj = _linear(d_in, d_out, rngs)
        self.conv = ConvModule(d_out, kernel, causal=causal, rngs=rngs)

    def __call__(self, x, state=None):
        return self.conv(jax.nn.silu(self.proj(self.norm(x))), state)


class MossFormerBlock(nnx.Module):
    """Gated single-head attention with convolution-augmented joint local/global attention: ``x -> x + Δ``."""

    def __init__(self, dim: int, *, expansion: int = 2, qk_dim: int = 32, group: int = 64, kernel: int = 17,
                 causal: bool = False, rngs: nnx.Rngs):
        self.group, self.causal = group, causal
        self.hidden = expansion * dim
        self.to_vu = FFConvM(dim, 2 * self.hidden, kernel, causal=causal, rngs=rngs)
        self.to_qk = FFConvM(dim, qk_dim, kernel, causal=causal, rngs=rngs)
        self.gamma = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (4, qk_dim)))
        self.beta = nnx.Param(jnp.zeros((4, qk_dim)))
        self.to_out = FFConvM(self.hidden, dim, kernel, causal=causal, rngs=rngs)
        self.rotary = min(32, qk_dim) // 2 * 2

    def _rope(self, a):
        r = self.rotary
        if r == 0:
            return a
        pos = jnp.arange(a.shape[1])[None]
        return jnp.concatenate([rope(a[:, :, None, :r], pos)[:, :, 0], a[:, :, r:]], axis=-1)

    def __call__(self, x):
        xs = token_shift(x)
        vu, _ = self.to_vu(xs)
        v, u = vu[..., : self.hidden], vu[..., self.hidden:]
        z, _ = self.to_qk(xs)
        qq, lq, qk, lk = (self._rope(z * self.gamma[i][None, None] + self.beta[i][None, None]) for i in range(4))
        att = joint_attention(qq, qk, lq, lk, jnp.concatenate([v, u], -1), group=self.group, causal=self.causal)
        att_v, att_u = att[..., : self.hidden], att[..., self.hidden:]
        out = (att_u * v) * jax.nn.sigmoid(att_v * u)
        return x + self.to_out(out)[0]


class DilatedFSMN(nnx.Module):
    """``u + DenseFSMN(W_p relu(W_l u))``: the FSMN memory with dilated dense depthwise convs
    (:func:`dilated_dense_fsmn`). Returns ``(y, state)``."""

    def __init__(self, d: int, *, lorder: int = 10, depth: int = 2, causal: bool = False, rngs: nnx.Rngs):
        self.causal, self.lorder, self.depth = causal, lorder, depth
        k = lorder if causal else 2 * lorder - 1
        self.linear = _linear(d, d, rngs)
        self.project = _linear(d, d, rngs, bias=False)
        self.taps = nnx.List([nnx.Param(jax.random.normal(rngs.params(), (i + 1, k, d)) / np.sqrt((i + 1) * k))
                              for i in range(depth)])
        self.scale = nnx.Param(jnp.ones((depth, d)))
        self.bias = nnx.Param(jnp.zeros((depth, d)))
        self.alpha = nnx.Param(jnp.full((depth, d), 0.25))

    def params(self) -> dict:
        return {"taps": tuple(w[...] for w in self.taps), "scale": self.scale[...], "bias": self.bias[...],
                "alpha": self.alpha[...]}

    def __call__(self, u, state=None):
        p = self.project(jax.nn.relu(self.linear(u)))
        out, state = dilated_dense_fsmn(self.params(), p, causal=self.causal, state=state)
        return u + out, state

    def init_state(self, batch: int, dtype=jnp.float32):
        k, d = self.taps[0].shape[1], self.taps[0].shape[2]
        return tuple(jnp.zeros((batch, (k - 1) * 2**i, (i + 1) * d), dtype) for i in range(self.depth))


class RecurrentState(NamedTuple):
    """Windows of past inputs carried by a causal :class:`RecurrentBlock`."""

    conv_u: jax.Array
    conv_v: jax.Array
    fsmn: tuple


class RecurrentBlock(nnx.Module):
    """MossFormer2's recurrent module (gated dilated FSMN with bottleneck and output layer): ``(x, state) -> (y,
    state)`` with ``x, y`` ``[b, t, dim]``; the state is ``None`` unless causal."""

    def __init__(self, dim: int, inner: int = 32, *, lorder: int = 10, depth: int = 2, kernel: int = 17,
                 causal: bool = False, rngs: nnx.Rngs):
        self.causal = causal
        self.conv_in = _linear(dim, inner, rngs)
        self.act = PReLU(inner)
        self.norm1 = nnx.LayerNorm(inner, rngs=rngs)
        self.to_u = FFConvM(inner, inner, kernel, causal=causal, rngs=rngs)
        self.to_v = FFConvM(inner, inner, kernel, causal=causal, rngs=rngs)
        self.fsmn = DilatedFSMN(inner, lorder=lorder, depth=depth, causal=causal, rngs=rngs)
        self.norm2 = nnx.LayerNorm(inner, rngs=rngs)
        self.conv_out = _linear(inner, dim, rngs)

    def init_state(self, batch: int, dtype=jnp.float32) -> RecurrentState:
        if not self.causal:
            raise ValueError("a non-causal RecurrentBlock has no streaming state (causal=False)")
        return RecurrentState(self.to_u.conv.init_state(batch, dtype), self.to_v.conv.init_state(batch, dtype),
                              self.fsmn.init_state(batch, dtype))

    def __call__(self, x, state: RecurrentState | None = None):
        _checks.check_ndim("x", x, 3, "[batch, time, dim]")
        if state is not None and not self.causal:
            raise ValueError("state is only for a causal RecurrentBlock (causal=True)")
        if self.causal and state is None:
            state = self.init_state(x.shape[0], x.dtype)
        h = self.norm1(self.act(self.conv_in(x)))
        u, su = self.to_u(h, state.conv_u if self.causal else None)
        v, sv = self.to_v(h, state.conv_v if self.causal else None)
        u, sf = self.fsmn(u, state.fsmn if self.causal else None)
        y = x + self.conv_out(self.norm2(v * u + h))
        return y, (RecurrentState(su, sv, sf) if self.causal else None)


def _sinusoids(t: int, d: int):
    inv = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    ang = np.arange(t)[:, None] * inv[None]
    return jnp.asarray(np.concatenate([np.sin(ang), np.cos(ang)], -1)[:, :d], jnp.float32)


class MaskNet(nnx.Module):
    """Encoder frames ``[b, T, N]`` -> masks ``[b, S, T, N]`` (``blocks`` picks the layer kind, :data:`BLOCKS`)."""

    def __init__(self, enc_dim: int, dim: int, *, sources: int = 2, layers: int = 2, blocks: str = "mossformer2",
                 expansion: int = 2, qk_dim: int = 32, group: int = 64, kernel: int = 17, inner: int = 32,
                 lorder: int = 10, depth: int = 2, causal: bool = False, rngs: nnx.Rngs):
        _checks.check_choice("blocks", blocks, BLOCKS)
        self.sources, self.blocks = sources, blocks
        self.norm_in = nnx.LayerNorm(enc_dim, rngs=rngs)
        self.proj_in = _linear(enc_dim, dim, rngs)
        self.pos_scale = nnx.Param(jnp.ones(()))
        attn = blocks in ("mossformer2", "mossformer")
        rec = blocks in ("mossformer2", "fsmn")
        mk_attn = lambda: MossFormerBlock(dim, expansion=expansion, qk_dim=qk_dim, group=group, kernel=kernel,
                                          causal=causal, rngs=rngs)
        mk_rec = lambda: RecurrentBlock(dim, inner, lorder=lorder, depth=depth, kernel=kernel, causal=causal, rngs=rngs)
        self.attn = nnx.List([mk_attn() for _ in range(layers)]) if attn else None
        self.rec = nnx.List([mk_rec() for _ in range(layers)]) if rec else None
        self.conv = (nnx.List([FFConvM(dim, dim, kernel, causal=causal, rngs=rngs) for _ in range(2 * layers)])
                     if blocks == "conv" else None)
        self.layers = layers
        self.norm_out = nnx.LayerNorm(dim, rngs=rngs)
        self.act = PReLU(dim)
        self.proj_out = _linear(dim, sources * enc_dim, rngs)
        self.out_t = _linear(enc_dim, enc_dim, rngs)
        self.out_g = _linear(enc_dim, enc_dim, rngs)
        self.out = _linear(enc_dim, enc_dim, rngs, bias=False)

    def __call__(self, e):
        b, t, n = e.shape
        h = self.proj_in(self.norm_in(e))
        h = h + self.pos_scale[...] * _sinusoids(t, h.shape[-1])[None]
        skip = h
        for i in range(self.layers):
            if self.attn is not None:
                h = self.attn[i](h)
            if self.rec is not None:
                h = self.rec[i](h)[0]
            if self.conv is not None:
                h = h + self.conv[2 * i](h)[0]
                h = h + self.conv[2 * i + 1](h)[0]
        h = self.proj_out(self.act(self.norm_out(h) + skip)).reshape(b, t, self.sources, n)
        m = jax.nn.relu(self.out(jnp.tanh(self.out_t(h)) * jax.nn.sigmoid(self.out_g(h))))
        return jnp.moveaxis(m, 2, 1)


class MossFormer2(nnx.Module):
    """The separator: ``mixture [b, L] -> estimates [b, S, L]`` (encoder → :class:`MaskNet` → decoder).

    ``blocks="mossformer2"`` is the paper's system; ``"mossformer"`` drops the recurrent module (the ablation);
    ``"fsmn"`` keeps only the recurrent module; ``"conv"`` is a conv-only mask net (FFConvM blocks)."""

    def __init__(self, *, enc_dim: int = 64, dim: int = 64, kernel_size: int = 16, sources: int = 2, layers: int = 2,
                 blocks: str = "mossformer2", expansion: int = 2, qk_dim: int = 32, group: int = 64, conv_kernel: int = 17,
                 inner: int = 32, lorder: int = 10, depth: int = 2, causal: bool = False, rngs: nnx.Rngs):
        if kernel_size < 2 or kernel_size % 2:
            raise ValueError(f"kernel_size must be an even int >= 2 (stride is kernel_size // 2), got {kernel_size}")
        self.kernel_size, self.stride, self.sources = kernel_size, kernel_size // 2, sources
        self.w_enc = nnx.Param(jax.random.normal(rngs.params(), (kernel_size, enc_dim)) / np.sqrt(kernel_size))
        self.w_dec = nnx.Param(jax.random.normal(rngs.params(), (enc_dim, kernel_size)) / np.sqrt(enc_dim))
        self.mask = MaskNet(enc_dim, dim, sources=sources, layers=layers, blocks=blocks, expansion=expansion,
                            qk_dim=qk_dim, group=group, kernel=conv_kernel, inner=inner, lorder=lorder, depth=depth,
                            causal=causal, rngs=rngs)

    def check_mixture(self, mixture) -> None:
        """The checks :meth:`__call__` runs before tracing: ``[batch, samples]`` float, at least one encoder window."""
        _checks.check_ndim("mixture", mixture, 2, "[batch, samples]")
        _checks.check_dtype("mixture", mixture, "float")
        if mixture.shape[1] < self.kernel_size:
            raise ValueError(f"mixture has {mixture.shape[1]} samples, shorter than the encoder's window of "
                             f"{self.kernel_size} samples (the model's smallest input)")

    def __call__(self, mixture):
        self.check_mixture(mixture)
        e = encode(self.w_enc[...], mixture, stride=self.stride)
        m = self.mask(e)
        return decode(self.w_dec[...], e[:, None] * m, stride=self.stride, length=mixture.shape[1])
