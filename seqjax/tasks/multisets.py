"""Functions of a multiset that need more than a sum (Cohen-Karlik et al. 2020; Ong & Veličković 2022, LCM).

Each set holds ``n`` integers drawn uniformly from ``[0, values)`` (``n`` an int or ``(lo, hi)`` drawn per set).
A :class:`SetBatch` has ``values`` ``[b, n_max]`` int32 right-padded with ``values`` (the pad id: vocabulary
``values + 1``), ``mask`` ``[b, n_max]`` bool and ``labels`` ``[b]`` int32 in ``[0, num_classes)``.

- ``second_minimum``: the second element of the sorted multiset (the minimum again when it occurs twice);
  ``n >= 2``. A commutative monoid keeps the two smallest; max-pooling over one-hot codes cannot tell a repeated
  minimum, and a sum's counts leave the training range as sets grow.
- ``count_parity``: the parity of the number of odd elements (2 classes, balanced at every size): counting
  modulo 2. A sum can count, but a readout trained on small counts does not extend to larger ones; max-pooling
  sees only which values occur.
- ``product``: the product modulo ``values`` (prime) of elements drawn from ``[1, values)``: the cyclic
  group ``(Z/p)^×``, a monoid no pooling of bounded codes extrapolates.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax._checks import check_choice

__all__ = ["SetBatch", "TASKS", "multiset", "label"]

TASKS = ("second_minimum", "count_parity", "product")


@dataclasses.dataclass
class SetBatch:
    values: np.ndarray  # [b, n_max] int32, padded with the pad id
    mask: np.ndarray  # [b, n_max] bool
    labels: np.ndarray  # [b] int32
    num_classes: int
    vocab_size: int

    def __len__(self):
        return len(self.labels)


def label(task: str, elements, values: int) -> int:
    """The label of one multiset ``elements`` (a 1-D int sequence) for ``task``."""
    check_choice("task", task, TASKS)
    x = sorted(int(v) for v in elements)
    if task == "second_minimum":
        return x[1]
    if task == "count_parity":
        return sum(v % 2 for v in x) % 2
    return int(np.prod(np.array(x, dtype=object)) % values)  # product


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % q for q in range(2, int(p**0.5) + 1))


def multiset(task: str, num: int, n=(2, 16), *, values: int = 10, seed: int = 0) -> SetBatch:
    """``num`` random multisets and their ``task`` labels (see the module docstring)."""
    check_choice("task", task, TASKS)
    lo, hi = (n, n) if np.isscalar(n) else tuple(n)
    least = 2 if task == "second_minimum" else 1
    if not least <= lo <= hi:
        raise ValueError(f"n must be an int or a (lo, hi) pair with {least} <= lo <= hi for {task}, got {n!r}")
    if task == "product" and not _is_prime(values):
        raise ValueError(f"values must be a prime for task='product', got {values}")
    if values < 2:
        raise ValueError(f"values must be >= 2, got {values}")
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi + 1, size=num)
    low = 1 if task == "product" else 0
    x = rng.integers(low, values, size=(num, hi)).astype(np.int32)
    mask = np.arange(hi)[None] < sizes[:, None]
    x = np.where(mask, x, values).astype(np.int32)
    labels = np.array([label(task, row[:k], values) for row, k in zip(x, sizes)], np.int32)
    classes = 2 if task == "count_parity" else values
    return SetBatch(x, mask, labels, classes, values + 1)
