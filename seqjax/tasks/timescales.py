"""N-parity and N-DMS on Bernoulli streams (Khajehabdollahi et al. 2024).

Input ``x_t ~ Bernoulli(1/2)``; targets, scored for ``t >= N − 1`` (N-parity) or ``t >= N`` (N-DMS):

- N-parity: ``y_t = (x_t + x_{t−1} + … + x_{t−N+1}) mod 2``;
- N-DMS (delayed match-to-sample): ``y_t = 1[x_t = x_{t−N}]``.

:func:`stream` returns a :class:`TaskBatch` with tokens 0/1 and, for the multi-head curriculum,
:func:`multi_targets` returns targets for every ``N' <= N`` at once ``[n, T, N]``.
"""

from __future__ import annotations

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch


def _targets(x, n, task):
    t = x.shape[1]
    y = np.full(x.shape, IGNORE, np.int32)
    if task == "parity":
        c = np.concatenate([np.zeros((x.shape[0], 1), np.int64), np.cumsum(x, axis=1)], axis=1)
        y[:, n - 1 :] = (c[:, n:] - c[:, : t - n + 1]) % 2
    elif task == "dms":
        y[:, n:] = (x[:, n:] == x[:, :-n]).astype(np.int32)
    else:
        raise ValueError(f"task must be 'parity' or 'dms', got {task!r}")
    return y


def stream(num: int, seq_len: int, n: int, *, task: str = "parity", seed: int = 0) -> TaskBatch:
    if not 1 <= n < seq_len:
        raise ValueError(f"n must be in [1, seq_len), got n={n}, seq_len={seq_len}")
    x = np.random.default_rng(seed).integers(0, 2, size=(num, seq_len)).astype(np.int32)
    return TaskBatch(x, _targets(x, n, task), num_classes=2, vocab_size=2)


def multi_targets(inputs, n_max: int, *, task: str = "parity"):
    """Targets for all heads ``N' = 1..n_max``: ``[num, T, n_max]``."""
    return np.stack([_targets(np.asarray(inputs), k, task) for k in range(1, n_max + 1)], axis=-1)
