"""Multi-query associative recall, MQAR (Arora et al. 2023, zoology's ``multiquery_ar``).

Keys are drawn without replacement from ``[1, V/2)`` and values from ``[V/2, V)``; the context is
``k1 v1 k2 v2 …`` (tiled ``num_passes`` times, the JRT-style repetition); then each key is queried once at
position ``context + 2·gap`` with gaps drawn without replacement from ``p(g) ∝ a·g^(a−1)`` over
``g = 1..(T − context)/2`` (``power_a = 0.01`` favours near gaps), and the label — the key's value — sits
at the query token (next-token style: the model must emit the value after reading the key; the
value itself follows in ``inputs``, as in zoology's unshifted sequence). Other
non-query slots are 0 (``random_non_queries=False``, the zoology paper's setting) or random tokens.
Paper grid: ``(T, pairs) ∈ {(64, 4), (128, 8), (256, 16)}``. Metric: accuracy on value positions.
"""

from __future__ import annotations

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch


def mqar(
    num: int,
    seq_len: int = 64,
    num_pairs: int = 4,
    vocab_size: int = 8192,
    *,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = False,
    seed: int = 0,
) -> TaskBatch:
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed seq_len ({seq_len})")
    context = 2 * num_pairs * num_passes
    if context + 2 * num_pairs > seq_len:
        raise ValueError(f"num_pairs={num_pairs} (x{num_passes} passes) does not fit seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    space = (seq_len - context) // 2
    g = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1)
    p /= p.sum()

    keys = np.stack([rng.choice(np.arange(1, vocab_size // 2), num_pairs, replace=False) for _ in range(num)])
    vals = np.stack([rng.choice(np.arange(vocab_size // 2, vocab_size), num_pairs, replace=False) for _ in range(num)])
    kv = np.stack([keys, vals], axis=-1).reshape(num, 2 * num_pairs)
    inputs = np.zeros((num, seq_len), np.int64)
    inputs[:, :context] = np.tile(kv, (1, num_passes))
    targets = np.full((num, seq_len), IGNORE, np.int64)
    rows = np.arange(num)[:, None]
    gaps = np.stack([rng.choice(space, num_pairs, replace=False, p=p) for _ in range(num)])  # 0-based gap
    pos = context + 2 * gaps
    if random_non_queries:
        inputs[:, context:] = rng.integers(0, vocab_size, size=(num, seq_len - context))
    inputs[rows, pos] = keys
    inputs[rows, pos + 1] = vals  # the full sequence, as zoology builds it before shifting
    targets[rows, pos] = vals
    return TaskBatch(inputs.astype(np.int32), targets.astype(np.int32), vocab_size=vocab_size)
