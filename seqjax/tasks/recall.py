"""Selective copying and single-query associative recall (the H3 / Hyena / TCNCA setting).

- :func:`associative_recall`: ``L/2 − 1`` key–value pairs (keys from ``[0, V/2)``, values from
  ``[V/2, V)``, keys distinct) then one query key at the last position; the label there is its value.
- :func:`h3_associative_recall`: the form H3 and Hyena train (HazyResearch/safari's ``generate_assoc_recall``):
  ``L/2`` pairs whose keys repeat (drawn with replacement; one value per key in a sequence), then the query
  marker, a key of the context and its value. Training labels are every next token, so each repeated key is a
  recall example; the evaluation scores only the value after the query.
- :func:`selective_copying`: ``num_tokens`` content tokens scattered among noise (token 0) over the first
  ``seq_len`` positions, then ``num_tokens`` copy markers (token 1); at each marker the model must emit
  the content tokens in order. Content tokens come from ``[2, V)``.
"""

from __future__ import annotations

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch


def associative_recall(num: int, seq_len: int = 64, vocab_size: int = 32, *, seed: int = 0) -> TaskBatch:
    if seq_len % 2 or seq_len < 4:
        raise ValueError(f"seq_len must be even and >= 4, got {seq_len}")
    pairs = seq_len // 2 - 1
    if pairs > vocab_size // 2:
        raise ValueError(f"vocab_size={vocab_size} too small for {pairs} distinct keys")
    rng = np.random.default_rng(seed)
    inputs = np.zeros((num, seq_len), np.int32)
    targets = np.full((num, seq_len), IGNORE, np.int32)
    for i in range(num):
        keys = rng.choice(vocab_size // 2, pairs, replace=False)
        vals = rng.integers(vocab_size // 2, vocab_size, size=pairs)
        inputs[i, : 2 * pairs : 2] = keys
        inputs[i, 1 : 2 * pairs : 2] = vals
        q = rng.integers(pairs)
        inputs[i, -2] = keys[q]
        targets[i, -2] = vals[q]
        inputs[i, -1] = vals[q]
    return TaskBatch(inputs, targets, vocab_size=vocab_size)


def h3_associative_recall(num: int, seq_len: int = 64, vocab_size: int = 20, *, seed: int = 0,
                          train: bool = True) -> TaskBatch:
    """Associative recall as H3 / Hyena train it. Token 0 is the query marker, keys are ``[1, 1 + n)`` and values
    ``[1 + n, 1 + 2n)`` with ``n = (vocab_size − 1) // 2``. A sequence holds ``seq_len // 2`` key–value pairs
    (keys with replacement, each key's value fixed per sequence), then ``0, k, v(k)`` for a key ``k`` of the
    context; inputs are its first ``seq_len + 2`` tokens (``seq_len`` rounded down to even) and targets the next
    tokens: all of them (``train=True``) or only the last, the query's value (``train=False``)."""
    n = (vocab_size - 1) // 2
    if n < 1 or seq_len < 2:
        raise ValueError(f"h3_associative_recall needs vocab_size >= 3 and seq_len >= 2, got {vocab_size}, {seq_len}")
    rng = np.random.default_rng(seed)
    pairs = seq_len // 2
    tokens = np.zeros((num, 2 * pairs + 3), np.int32)
    for i in range(num):
        value_of = rng.integers(1 + n, 1 + 2 * n, size=n)
        keys = rng.integers(0, n, size=pairs)
        tokens[i, 0 : 2 * pairs : 2] = 1 + keys
        tokens[i, 1 : 2 * pairs : 2] = value_of[keys]
        q = rng.choice(keys)
        tokens[i, 2 * pairs :] = (0, 1 + q, value_of[q])
    targets = tokens[:, 1:].copy()
    if not train:
        targets[:, :-1] = IGNORE
    return TaskBatch(tokens[:, :-1], targets, vocab_size=vocab_size)


def selective_copying(num: int, seq_len: int = 64, num_tokens: int = 8, vocab_size: int = 16, *, seed: int = 0) -> TaskBatch:
    if num_tokens > seq_len:
        raise ValueError(f"num_tokens={num_tokens} must be <= seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    total = seq_len + num_tokens
    inputs = np.zeros((num, total), np.int32)
    targets = np.full((num, total), IGNORE, np.int32)
    for i in range(num):
        pos = np.sort(rng.choice(seq_len, num_tokens, replace=False))
        toks = rng.integers(2, vocab_size, size=num_tokens)
        inputs[i, pos] = toks
        inputs[i, seq_len:] = 1
        # the model emits token j while reading marker j (the prediction made at position seq_len-1+j
        # would be the shifted form; here the label sits at the marker itself)
        targets[i, seq_len:] = toks
    return TaskBatch(inputs, targets, vocab_size=vocab_size)
