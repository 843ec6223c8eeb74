"""Set disjointness / intersect token (Arora et al. 2024, JRT; after ``disjoint_sets`` in
HazyResearch/prefix-linear-attention).

Special tokens: 0 mask, 1 prefix, 2 list separator, 3 answer separator; content from ``[4, V)``. The
content vocabulary is shuffled and halved; the short set comes from one half, the long set from the
other (without replacement), then one element of the short set is copied into a random position of the
long set, so the sets share exactly one token. Sequence ``[1] short… [2] long… [3]``; the label — the
shared token — is scored at the final ``[3]``. ``short_first=False`` swaps the order (long set first),
the harder case for a streaming model.
"""

from __future__ import annotations

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch


def disjoint_sets(num: int, short_len: int, long_len: int, vocab_size: int = 256, *, short_first: bool = True, seed: int = 0) -> TaskBatch:
    content = vocab_size - 4
    if short_len > content // 2 or long_len > content // 2:
        raise ValueError(f"vocab_size={vocab_size} too small for sets of {short_len} and {long_len}")
    rng = np.random.default_rng(seed)
    t = short_len + long_len + 3
    inputs = np.zeros((num, t), np.int32)
    targets = np.full((num, t), IGNORE, np.int32)
    for i in range(num):
        perm = rng.permutation(np.arange(4, vocab_size))
        short = rng.choice(perm[: content // 2], short_len, replace=False)
        long = rng.choice(perm[content // 2 :], long_len, replace=False)
        shared = short[rng.integers(short_len)]
        long[rng.integers(long_len)] = shared
        first, second = (short, long) if short_first else (long, short)
        inputs[i] = np.concatenate([[1], first, [2], second, [3]])
        targets[i, -1] = shared
    return TaskBatch(inputs, targets, vocab_size=vocab_size)
