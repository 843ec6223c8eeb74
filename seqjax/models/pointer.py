r"""Pointer Networks (Vinyals, Fortunato & Jaitly 2015): an LSTM encoder–decoder whose output is a pointer
to one of its input positions.

The encoder reads the points ``x`` ``[b, n, d_in]`` (right-padded; ``mask`` ``[b, n]`` marks the real ones)
into ``e_j``; the decoder starts from the encoder's state after the last real point and reads, at step
``i``, the input point chosen at step ``i − 1`` (a learned start vector at ``i = 0``). Its output is
attention over the input positions:

.. math::  u^i_j = v^\top \tanh(W_1 e_j + W_2 d_i),\qquad p(C_i = j \mid C_{<i}, x) = \mathrm{softmax}_j(u^i_j)
           \ \text{over the valid } j.

Validity masks (``mode``): a pointer never points at padding, and

- ``"tour"`` (TSP): never at a point already chosen; the sequence ends when every real point is chosen;
- ``"cycle"`` (convex hull): never at a point already chosen, except the first, which may be chosen again
  once three points are chosen: that pointer closes the polygon and ends the sequence;
- ``"triangles"`` (Delaunay): triples of points, ascending within a triple; a learned end slot (pointer
  ``n``, encoded by the parameter ``end``) may be chosen between triples and ends the sequence;
- ``"free"``: any real point, repeats allowed; the sequence ends after as many pointers as real points (the
  unconstrained decoder, which must learn not to repeat itself).

After the end the decoder emits ``IGNORE`` (−1). Teacher forcing (:func:`pointer_logits`) runs the decoder over
the whole target at once (its masks from the target prefix); :func:`greedy_decode` and :func:`beam_search`
decode with the same masks (``beam_search`` with width 1 is greedy decoding). Each takes ``memory=(e, state)``
to point over another encoder's memory ``e`` ``[b, n, H]`` from the decoder state ``state`` ``[b, S, H]``
instead of the LSTM encoder's (``x`` is then what the decoder reads of the chosen element; Read-Process-Write
in :mod:`seqjax.models.order_matters`). :class:`PointerNet` owns the
parameters; the functions take them as a dict ``{"enc", "dec", "start", "w1", "w2", "v", "end"}``
(``enc``/``dec`` are :mod:`seqjax.rnn.cells` parameter dicts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.rnn import cells as _cells
from seqjax.rnn.functional import rnn
from seqjax.rnn.layers import RNN

__all__ = ["MODES", "IGNORE", "PointerNet", "encode", "pointer_logits", "greedy_decode", "beam_search",
           "valid_next", "sequence_nll", "default_max_len"]

MODES = ("tour", "cycle", "triangles", "free")
IGNORE = -1
_NEG = -1e9  # masked logit: finite, so a fully masked row (after the end) stays NaN-free


def _check_inputs(params, x, mask, mode):
    _checks.check_choice("mode", mode, MODES)
    d_in = np.shape(params["start"])[-1]
    _checks.check_ndim("x", x, 3, f"[batch, points, {d_in}]")
    _checks.check_shape("x", x, (None, None, d_in), f"[batch, points, {d_in}] (points of dimension {d_in})")
    _checks.check_dtype("x", x, "float")
    if mask is not None:
        _checks.check_shape("mask", mask, np.shape(x)[:2], "[batch, points]")
        _checks.check_dtype("mask", mask, "bool")
    if mode in ("cycle", "triangles") and np.shape(x)[1] < 3:
        raise ValueError(f"mode={mode!r} needs at least 3 points, got x with {np.shape(x)[1]}")


def encode(kind: str, enc_params: dict, x, mask):
    """``(e [b, n, H], state [b, S, H])``: the encoder's outputs and its state after the last real point
    (padding steps leave the state unchanged)."""
    xp = _cells.project(enc_params, x)  # [b, n, G, K, D]
    b = x.shape[0]
    g, _, d = np.shape(enc_params["b"])
    s0 = jnp.zeros((b, _cells.CELLS[kind].num_states, g, d), jnp.float32)

    def body(s, inp):
        xp_t, m_t = inp
        s_new = _cells.step(kind, enc_params, s, xp_t)
        return jnp.where(m_t[:, None, None, None], s_new, s), s_new[:, 0]

    s, ys = lax.scan(body, s0, (jnp.moveaxis(xp, 1, 0), jnp.moveaxis(mask, 1, 0)))
    return jnp.moveaxis(ys, 0, 1).reshape(b, x.shape[1], g * d), s.reshape(b, s.shape[1], g * d)


def _keys(params, enc, mode):
    """``W₁ e_j`` ``[b, n, A]``, and for ``"triangles"`` the learned end slot ``W₁ e_end`` at position ``n``."""
    keys = enc @ params["w1"]
    if mode == "triangles":
        end = jnp.broadcast_to(params["end"] @ params["w1"], (enc.shape[0], 1, keys.shape[-1]))
        keys = jnp.concatenate([keys, end], 1)
    return keys


def _slots(mask, mode):
    """The real positions among the pointer's slots (points, then the end slot for ``"triangles"``)."""
    return jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], 1) if mode == "triangles" else mask


def _scores(params, keys, dec):
    """``u = vᵀ tanh(keys + W₂ d)``: ``keys`` ``[b, n, A]`` (``W₁ e``), ``dec`` ``[b, ..., H]`` -> ``[b, ..., n]``."""
    q = dec @ params["w2"]
    q = q.reshape(q.shape[0], -1, 1, q.shape[-1])
    u = jnp.tanh(keys[:, None] + q) @ params["v"]
    return u.reshape(dec.shape[:-1] + (keys.shape[1],))


def valid_next(mode: str, real, used, first, last, count):
    """Which slots the next pointer may take. ``real``/``used`` ``[..., slots]`` bool; ``first``/``last`` ``[...]``
    the first and the previous pointer; ``count`` ``[...]`` how many pointers so far.

    ``tour``: a real point not used. ``cycle``: the same, or the first point once three are chosen. ``free``: any
    real point. ``triangles`` (the last slot ends): a real point above the previous one within a triple; the end only
    between triples, after at least one."""
    slots = real.shape[-1]
    if mode == "triangles":
        idx = jnp.arange(slots).reshape((1,) * (real.ndim - 1) + (slots,))
        between = (count % 3 == 0)[..., None]
        is_end = idx == slots - 1
        points = real & ~is_end & (between | (idx > last[..., None]))
        return points | (is_end & between & (count[..., None] >= 3))
    valid = real if mode == "free" else real & ~used
    if mode == "cycle":
        valid = valid | (jax.nn.one_hot(first, slots, dtype=bool) & (count[..., None] >= 3))
    return valid


def _gather_points(x, idx):
    """``x[b, idx]`` for ``idx`` ``[b, ...]`` (the end slot and ``IGNORE`` read a valid point; never used)."""
    safe = jnp.clip(idx, 0, x.shape[1] - 1)
    flat = safe.reshape(safe.shape[0], -1)
    return jnp.take_along_axis(x, flat[..., None], axis=1).reshape(idx.shape + (x.shape[-1],))


def pointer_logits(kind: str, params: dict, x, targets, mask=None, *, mode: str = "tour", memory=None):
    """Teacher-forced masked pointer logits ``[b, T, slots]`` for ``targets`` ``[b, T]`` (``IGNORE`` after the
    end); ``slots`` is ``n``, or ``n + 1`` for ``"triangles"`` (the end is pointer ``n``)."""
    _check_inputs(params, x, mask, mode)
    _checks.check_ndim("targets", targets, 2, "[batch, steps]")
    _checks.check_dtype("targets", targets, "int")
    b, n = x.shape[:2]
    mask = jnp.ones((b, n), bool) if mask is None else mask
    x = x.astype(jnp.float32)
    enc, s = encode(kind, params["enc"], x, mask) if memory is None else memory
    start = jnp.broadcast_to(params["start"], (b, 1, x.shape[-1]))
    dec, _ = rnn(kind, params["dec"], jnp.concatenate([start, _gather_points(x, targets[:, :-1])], 1), h0=s)
    real = _slots(mask, mode)
    u = _scores(params, _keys(params, enc, mode), dec)
    onehot = jax.nn.one_hot(targets, real.shape[1], dtype=jnp.int32)  # IGNORE -> all zeros
    used = (jnp.cumsum(onehot, axis=1) - onehot) > 0
    count = jnp.broadcast_to(jnp.arange(targets.shape[1]), targets.shape)
    last = jnp.concatenate([jnp.full_like(targets[:, :1], -1), targets[:, :-1]], 1)
    valid = valid_next(mode, real[:, None], used, jnp.broadcast_to(targets[:, :1], targets.shape), last, count)
    return jnp.where(valid, u, _NEG)


def sequence_nll(logits, targets):
    """Mean negative log-likelihood per scored pointer (``targets != IGNORE``)."""
    keep = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * keep) / jnp.maximum(jnp.sum(keep), 1)


def _dec_step(kind, params, s, inp):
    xp = _cells.project(params["dec"], inp[:, None])[:, 0]
    shape = s.shape
    g, _, d = np.shape(params["dec"]["b"])
    s = _cells.step(kind, params["dec"], s.reshape(shape[0], shape[1], g, d), xp)
    return s.reshape(shape)


def default_max_len(mode: str, n: int) -> int:
    """The longest valid sequence: ``n`` (tour, free), ``n + 1`` (cycle), ``3(2n − 5) + 1`` (triangles: a planar
    triangulation of ``n`` points has at most ``2n − 5`` triangles, then the end)."""
    return {"tour": n, "free": n, "cycle": n + 1, "triangles": 3 * max(2 * n - 5, 1) + 1}[mode]


def _init(kind, params, x, mask, mode, max_len, memory):
    _check_inputs(params, x, mask, mode)
    b, n = x.shape[:2]
    mask = jnp.ones((b, n), bool) if mask is None else mask
    x = x.astype(jnp.float32)
    enc, s = encode(kind, params["enc"], x, mask) if memory is None else memory
    return x, _slots(mask, mode), _keys(params, enc, mode), s, max_len or default_max_len(mode, n)


def _start(real, lead):
    """The mask state before the first pointer: ``(used, first, last, count, done)``."""
    zi = jnp.zeros(lead, jnp.int32)
    return jnp.zeros(lead + (real.shape[-1],), bool), zi, zi - 1, zi, jnp.zeros(lead, bool)


def _advance(mode, real, state, tok):
    """The mask state after pointing at ``tok`` ``[...]``; finished rows keep theirs."""
    used, first, last, count, done = state
    if mode == "cycle":
        closed = (tok == first) & (count >= 1)
    elif mode in ("tour", "free"):
        closed = count + 1 >= jnp.sum(real, -1)
    else:
        closed = tok == real.shape[-1] - 1
    new = (used | jax.nn.one_hot(tok, real.shape[-1], dtype=bool), jnp.where(count == 0, tok, first), tok, count + 1)
    kept = tuple(jnp.where(done[..., None] if a.ndim > done.ndim else done, a, b)
                 for a, b in zip((used, first, last, count), new))
    return kept + (done | closed,)


def greedy_decode(kind: str, params: dict, x, mask=None, *, mode: str = "tour", max_len: int | None = None,
                  memory=None):
    """``(pointers [b, max_len] int32 with IGNORE after the end, log-probability [b])``, the argmax each step;
    ``max_len`` defaults to :func:`default_max_len`."""
    x, real, keys, s, max_len = _init(kind, params, x, mask, mode, max_len, memory)
    b = real.shape[0]

    def body(carry, _):
        s, inp, state, lp = carry
        s = _dec_step(kind, params, s, inp)
        used, first, last, count, done = state
        valid = valid_next(mode, real, used, first, last, count)
        logp = jax.nn.log_softmax(jnp.where(valid, _scores(params, keys, s[:, 0]), _NEG), -1)
        tok = jnp.argmax(logp, -1).astype(jnp.int32)
        lp = lp + jnp.where(done, 0.0, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0])
        inp = jnp.where(done[:, None], inp, _gather_points(x, tok))
        return (s, inp, _advance(mode, real, state, tok), lp), jnp.where(done, IGNORE, tok)

    start = jnp.broadcast_to(params["start"], (b, x.shape[-1]))
    carry, toks = lax.scan(body, (s, start, _start(real, (b,)), jnp.zeros((b,), jnp.float32)), None, length=max_len)
    return jnp.moveaxis(toks, 0, 1), carry[-1]


def beam_search(kind: str, params: dict, x, mask=None, *, mode: str = "tour", width: int = 4,
                max_len: int | None = None, memory=None):
    """Beam search over valid pointer sequences by total log-probability: ``(best pointers [b, max_len],
    its log-probability [b])``; a finished beam keeps its score and emits ``IGNORE``."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    x, real, keys, s, max_len = _init(kind, params, x, mask, mode, max_len, memory)
    b, slots = real.shape
    k = width
    rep = lambda a: jnp.repeat(a[:, None], k, axis=1)  # [b, ...] -> [b, k, ...]
    flat = lambda a: a.reshape((b * k,) + a.shape[2:])
    real_k, keys_k = rep(real), jnp.repeat(keys, k, axis=0)
    stay = jnp.where(jnp.arange(slots) == 0, 0.0, -jnp.inf).reshape(1, 1, slots)

    def body(carry, i):
        s, inp, state, score, toks = carry
        s = _dec_step(kind, params, flat(s), flat(inp)).reshape(s.shape)
        used, first, last, count, done = state
        valid = valid_next(mode, real_k, used, first, last, count)
        u = _scores(params, keys_k, flat(s)[:, 0]).reshape(b, k, slots)
        logp = jax.nn.log_softmax(jnp.where(valid, u, _NEG), -1)
        logp = jnp.where(done[..., None], stay, logp)  # a finished beam has one continuation, at no cost
        score, idx = lax.top_k((score[..., None] + logp).reshape(b, k * slots), k)
        parent, tok = idx // slots, (idx % slots).astype(jnp.int32)
        pick = lambda a: jnp.take_along_axis(a, parent.reshape((b, k) + (1,) * (a.ndim - 2)), axis=1)
        s, inp, toks = pick(s), pick(inp), pick(toks)
        state = tuple(map(pick, state))
        done = state[-1]
        toks = toks.at[:, :, i].set(jnp.where(done, IGNORE, tok))
        inp = jnp.where(done[..., None], inp, _gather_points(x, tok))
        return (s, inp, _advance(mode, real_k, state, tok), score, toks), None

    score0 = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, k))  # one live beam at the start
    init = (rep(s), jnp.broadcast_to(params["start"], (b, k, x.shape[-1])), _start(real, (b, k)), score0,
            jnp.full((b, k, max_len), IGNORE, jnp.int32))
    carry, _ = lax.scan(body, init, jnp.arange(max_len))
    return carry[-1][:, 0], carry[-2][:, 0]


class PointerNet(nnx.Module):
    """``logits = net(x, targets, mask, mode=...)`` (teacher forcing, ``[b, T, n]``);
    ``pointers, logp = net.decode(x, mask, mode=..., beam=1)``.

    ``x`` ``[b, n, d_in]`` float, ``mask`` ``[b, n]`` bool (``None``: all real), ``targets`` ``[b, T]`` int.
    Uniform ±``init_scale`` initialisation of the pointer (the paper's ±0.08); cells from :mod:`seqjax.rnn`.
    """

    def __init__(self, d_in: int = 2, hidden: int = 128, attn: int | None = None, *, kind: str = "lstm",
                 init_scale: float = 0.08, rngs: nnx.Rngs):
        attn = attn or hidden
        self.kind, self.d_in = kind, d_in
        self.encoder = RNN(kind, d_in, hidden, rngs=rngs)
        self.decoder = RNN(kind, d_in, hidden, rngs=rngs)
        uni = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -init_scale, init_scale)
        self.start = nnx.Param(uni((d_in,)))
        self.w1 = nnx.Param(uni((hidden, attn)))
        self.w2 = nnx.Param(uni((hidden, attn)))
        self.v = nnx.Param(uni((attn,)))
        self.end = nnx.Param(uni((hidden,)))  # the end slot's encoding (mode "triangles")

    def param_dict(self) -> dict:
        return {"enc": self.encoder.param_dict(), "dec": self.decoder.param_dict(), "start": self.start[...],
                "w1": self.w1[...], "w2": self.w2[...], "v": self.v[...], "end": self.end[...]}

    def __call__(self, x, targets, mask=None, *, mode: str = "tour"):
        return pointer_logits(self.kind, self.param_dict(), x, targets, mask, mode=mode)

    def decode(self, x, mask=None, *, mode: str = "tour", beam: int = 1, max_len: int | None = None):
        if beam == 1:
            return greedy_decode(self.kind, self.param_dict(), x, mask, mode=mode, max_len=max_len)
        return beam_search(self.kind, self.param_dict(), x, mask, mode=mode, width=beam, max_len=max_len)
