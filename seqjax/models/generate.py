"""Stateful generation: prefill the prompt into the mixed cache, then decode one token at a time.

The cache (``LM.init_cache``, a ``seqjax.models.lm.LMCache``) holds a KV cache per global-attention layer, a
ring buffer per sliding-window layer, and each recurrent mixer's state (recurrent state + short-conv state),
each a NamedTuple, so a decode step costs O(max_len) for attention layers and O(1) for recurrent ones.

Sampling (:func:`sample`): greedy (``temperature=0``), temperature, top-k and top-p (nucleus,
Holtzman et al. 2020), batched. :func:`generate` compiles prefill and the whole decode loop
(``lax.scan`` over steps) into one ``jax.jit`` per (model graph, prompt shape, settings), reused across
calls; :func:`decode_fns` gives the separately jitted prefill / step for benchmarks and servers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax import _checks

__all__ = ["sample", "generate", "decode_fns"]


def sample(logits, key=None, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Draw one token per row from ``logits [b, vocab]`` -> ``[b]`` int32.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by ``temperature``, all but
    the ``top_k`` largest are dropped, then all outside the smallest set whose probability reaches
    ``top_p`` (the most likely token is always kept), and a token is drawn from the rest.
    """
    _checks.check_ndim("logits", logits, 2, "[batch, vocab]")
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        if not 1 <= top_k:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, neg)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, max_new_tokens: int, max_len: int, temperature: float, top_k, top_p):
    def run(state, prompt, key, segment_ids):
        model = nnx.merge(graphdef, state)
        b = prompt.shape[0]
        cache = model.init_cache(b, max_len)
        logits, cache = model(prompt, segment_ids=segment_ids, cache=cache)
        k0, key = jax.random.split(key)
        tok = sample(logits[:, -1], k0, temperature=temperature, top_k=top_k, top_p=top_p)

        def step(carry, k):
            tok, cache = carry
            logits, cache = model(tok[:, None], cache=cache)
            nxt = sample(logits[:, -1], k, temperature=temperature, top_k=top_k, top_p=top_p)
            return (nxt, cache), tok

        if max_new_tokens > 1:
            (last, _), toks = jax.lax.scan(step, (tok, cache), jax.random.split(key, max_new_tokens - 1))
            toks = jnp.concatenate([toks.T, last[:, None]], axis=1)
        else:
            toks = tok[:, None]
        return toks

    return jax.jit(run)


def generate(
    model,
    prompt,
    max_new_tokens: int,
    *,
    key=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_len: int | None = None,
    segment_ids=None,
):
    """Continue ``prompt [b, t0]`` by ``max_new_tokens`` tokens -> ``[b, max_new_tokens]`` int32.

    The cache is sized ``max_len`` (default ``t0 + max_new_tokens``). Jitted once per model graph,
    prompt shape and settings.
    """
    _checks.check_ndim("prompt", prompt, 2, "[batch, time]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_len = max_len or prompt.shape[1] + max_new_tokens
    if max_len < prompt.shape[1] + max_new_tokens:
        raise ValueError(f"max_len={max_len} < prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens}")
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, state = nnx.split(model)
    fn = _compiled(graphdef, int(max_new_tokens), int(max_len), float(temperature), top_k, top_p)
    return fn(state, jnp.asarray(prompt, jnp.int32), key, segment_ids)


def decode_fns(model):
    """``(state, prefill, step)``: the model state and two ``jax.jit``-ed functions of it::

        logits, cache = prefill(state, tokens [b, t], cache)
        logits, cache = step(state, token [b], cache)        # logits [b, vocab]

    with ``graphdef, state = nnx.split(model)`` and ``cache = model.init_cache(b, max_len)``. The
    cache is donated to ``step``.
    """
    graphdef, state = nnx.split(model)

    def prefill(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache=cache)

    def step(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return logits[:, -1], cache

    return state, jax.jit(prefill), jax.jit(step, donate_argnums=(2,))
