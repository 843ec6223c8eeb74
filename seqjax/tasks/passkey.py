"""Tokenizer-free passkey retrieval (after InfiniteBench / Stuffed Mamba's ``passkey.py``).

Vocabulary (32 tokens): digits 0..9 are tokens 0..9, filler tokens 10..25, ``PASS`` 26, ``QUERY`` 27,
``SEP`` 28, pad 29. A sequence is a repeated filler pattern (the "grass is green" block, as a fixed
16-token cycle) with the needle ``PASS d1 … d5 SEP`` inserted at block ``int(depth · (blocks − 1))``,
then ``QUERY`` and the five digits. The labels are the digits, scored at the positions that precede
them (``QUERY`` and the first four digits): the model must emit the passkey after ``QUERY``.

Train at ``T``; evaluate at ``{1, 2, 4, 8, 16} × T`` over 10 depths ``(i + 0.5)/10``.
"""

from __future__ import annotations

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch

FILLER = np.arange(10, 26)
PASS, QUERY, SEP, PAD, VOCAB = 26, 27, 28, 29, 32
DIGITS = 5


def passkey(num: int, seq_len: int, *, depth: float | None = None, seed: int = 0, random_filler: bool = False) -> TaskBatch:
    """``depth`` in [0, 1]; ``None`` draws a depth per example (training)."""
    needle = DIGITS + 2
    tail = 1 + DIGITS
    block = len(FILLER)
    blocks = (seq_len - needle - tail) // block
    if blocks < 1:
        raise ValueError(f"seq_len={seq_len} too short for a passkey (need >= {needle + tail + block})")
    rng = np.random.default_rng(seed)
    inputs = np.full((num, seq_len), PAD, np.int32)
    targets = np.full((num, seq_len), IGNORE, np.int32)
    for i in range(num):
        key = rng.integers(0, 10, size=DIGITS)
        d = rng.random() if depth is None else depth
        at = int(d * (blocks - 1))
        filler = rng.choice(FILLER, size=blocks * block) if random_filler else np.tile(FILLER, blocks)
        toks = np.concatenate(
            [filler[: at * block], [PASS], key, [SEP], filler[at * block :], [QUERY], key]
        ).astype(np.int32)
        inputs[i, : len(toks)] = toks
        q = len(toks) - DIGITS - 1
        targets[i, q : q + DIGITS] = key
    return TaskBatch(inputs, targets, num_classes=10, vocab_size=VOCAB)
