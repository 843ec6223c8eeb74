"""Token-sequence transforms.

**JRT-Prompt** (Arora et al. 2024, "Just read twice"): a recurrent LM reads the context once and must
decide what to keep before it sees the question; repeating the context (``repeats`` times) before the
question lets the later copies be read with the whole context already seen::

    [c_1 .. c_n] [q_1 .. q_m]  ->  [c_1 .. c_n] x repeats  [q_1 .. q_m]  (padding at the end)
"""

from __future__ import annotations

import jax.numpy as jnp

from seqjax import _checks

__all__ = ["jrt_prompt"]


def jrt_prompt(context, question, *, repeats: int = 2, context_lengths=None, question_lengths=None, pad_id: int = 0):
    """Repeat each row's context ``repeats`` times, then append its question.

    Args:
      context: ``[b, C]`` int tokens, each row's first ``context_lengths[i]`` valid (default all ``C``).
      question: ``[b, Q]`` int tokens, first ``question_lengths[i]`` valid (default all ``Q``).

    Returns:
      ``(tokens [b, repeats*C + Q], valid [b, repeats*C + Q] int32)``: rows left-aligned, ``pad_id``
      after the question and ``valid = 0`` there.
    """
    _checks.check_ndim("context", context, 2, "[batch, context_len]")
    _checks.check_ndim("question", question, 2, "[batch, question_len]")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    context, question = jnp.asarray(context), jnp.asarray(question)
    b, c = context.shape
    q = question.shape[1]
    if question.shape[0] != b:
        raise ValueError(f"question must have batch {b} like context, got {question.shape[0]}")
    n = jnp.full((b,), c, jnp.int32) if context_lengths is None else jnp.asarray(context_lengths, jnp.int32)
    m = jnp.full((b,), q, jnp.int32) if question_lengths is None else jnp.asarray(question_lengths, jnp.int32)
    total = repeats * c + q
    p = jnp.arange(total, dtype=jnp.int32)[None, :]
    ctx_end = (repeats * n)[:, None]
    in_ctx = p < ctx_end
    in_q = (p >= ctx_end) & (p < ctx_end + m[:, None])
    ci = jnp.where(in_ctx, p % jnp.maximum(n, 1)[:, None], 0)
    qi = jnp.clip(p - ctx_end, 0, q - 1)
    tok = jnp.where(
        in_ctx,
        jnp.take_along_axis(context, ci, axis=1),
        jnp.where(in_q, jnp.take_along_axis(question, qi, axis=1), pad_id),
    )
    return tok.astype(context.dtype), (in_ctx | in_q).astype(jnp.int32)
