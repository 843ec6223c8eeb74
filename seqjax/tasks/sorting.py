"""Sorting sets of numbers (Vinyals, Bengio & Kudlur 2016, "Order Matters"), generated locally.

Each set holds ``n`` distinct floats drawn uniformly from ``[0, 1)`` (``n`` an int or ``(lo, hi)`` drawn per
set); the task is to point at them in sorted order. Two orders are choices of the task, not of the data:

- ``input_order``: ``"random"`` presents the elements in the order drawn, ``"sorted"`` presents them ascending
  (the natural pointer sequence is then ``0, 1, …, n − 1``).
- ``output_order``: the order in which the ranks are emitted. ``"natural"`` emits the smallest first
  (ascending), ``"reverse"`` the largest first, ``"fixed"`` in a random but fixed permutation ``π_n`` of the
  ranks, one per set size, drawn from ``order_seed`` (the same for every set of that size, so a model can learn
  it; neither ascending nor descending for ``n >= 3``): step ``t`` points at the element of rank ``π_n[t]``.

A :class:`SortBatch` has ``values`` ``[b, n_max]`` float32 right-padded with zeros, ``mask`` ``[b, n_max]`` bool
(``True`` = a real element), ``ranks`` ``[b, n_max]`` int32 (the natural pointer sequence, the stable argsort
of the real elements; ``IGNORE`` after them) and ``targets`` ``[b, n_max]`` int32 (the pointer sequence in
``output_order``; ``IGNORE`` after ``n``). :meth:`SortBatch.targets_in` gives the targets in another output
order; :func:`exact_order` tells which candidate order each decoded sequence equals.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax import _checks
from seqjax.tasks import IGNORE

__all__ = ["SortBatch", "INPUT_ORDERS", "OUTPUT_ORDERS", "MIN_N", "MAX_N", "rank_order", "sort_sets",
           "exact_order", "chance_accuracy"]

INPUT_ORDERS = ("random", "sorted")
OUTPUT_ORDERS = ("natural", "reverse", "fixed")
MIN_N = 2  # a set of one has nothing to sort
MAX_N = 1000


def _check_n(n) -> tuple[int, int]:
    pair = (n, n) if isinstance(n, (int, np.integer)) else tuple(n) if isinstance(n, (tuple, list)) else ()
    if (len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair)
            or not MIN_N <= pair[0] <= pair[1] <= MAX_N):
        raise ValueError(f"n must be an int or a (lo, hi) pair with {MIN_N} <= lo <= hi <= {MAX_N}, got {n!r}")
    return int(pair[0]), int(pair[1])


def rank_order(order: str, n: int, order_seed: int = 0) -> np.ndarray:
    """The ranks emitted at steps ``0 … n − 1`` in output order ``order`` (``[n]`` int, a permutation of
    ``range(n)``): ascending, descending, or the fixed permutation ``π_n`` of ``(order_seed, n)``."""
    _checks.check_choice("output_order", order, OUTPUT_ORDERS)
    _check_n(n)
    if order == "natural":
        return np.arange(n)
    if order == "reverse":
        return np.arange(n)[::-1].copy()
    rng = np.random.default_rng([order_seed, n])
    while True:  # never ascending or descending (possible from n = 3 on)
        perm = rng.permutation(n)
        if n < 3 or not (np.all(np.diff(perm) == 1) or np.all(np.diff(perm) == -1)):
            return perm


@dataclasses.dataclass
class SortBatch:
    values: np.ndarray  # [b, n_max] float32, zeros after the real elements
    mask: np.ndarray  # [b, n_max] bool
    ranks: np.ndarray  # [b, n_max] int32: the positions in ascending order of value, IGNORE after n
    targets: np.ndarray  # [b, n_max] int32: the pointer sequence in output_order, IGNORE after n
    input_order: str = "random"
    output_order: str = "natural"
    order_seed: int = 0

    def __len__(self):
        return len(self.values)

    def __getitem__(self, idx):
        return SortBatch(self.values[idx], self.mask[idx], self.ranks[idx], self.targets[idx], self.input_order,
                         self.output_order, self.order_seed)

    def targets_in(self, order: str, order_seed: int | None = None) -> np.ndarray:
        """The pointer targets ``[b, n_max]`` in output order ``order`` (``order_seed``: this batch's if None)."""
        seed = self.order_seed if order_seed is None else order_seed
        out = np.full_like(self.ranks, IGNORE)
        for i, n in enumerate(self.mask.sum(1)):
            out[i, :n] = self.ranks[i, rank_order(order, int(n), seed)]
        return out


def sort_sets(num: int, n=(5, 15), *, input_order: str = "random", output_order: str = "natural",
              seed: int = 0, order_seed: int = 0) -> SortBatch:
    """``num`` sets of ``n`` distinct uniform floats and their sorting pointers (see the module docstring)."""
    lo, hi = _check_n(n)
    _checks.check_choice("input_order", input_order, INPUT_ORDERS)
    _checks.check_choice("output_order", output_order, OUTPUT_ORDERS)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi + 1, size=num) if hi > lo else np.full(num, lo)
    mask = np.arange(hi)[None] < sizes[:, None]
    values = rng.random((num, hi)).astype(np.float32)
    while True:  # distinct in float32, so the sorted order is unique (redraw the rare rows with a tie)
        s = np.sort(np.where(mask, values, np.inf), 1)
        tie = ((s[:, 1:] == s[:, :-1]) & np.isfinite(s[:, 1:])).any(1)
        if not tie.any():
            break
        values[tie] = rng.random((int(tie.sum()), hi)).astype(np.float32)
    if input_order == "sorted":
        values = np.sort(np.where(mask, values, np.inf), 1)
    values = np.where(mask, values, 0.0).astype(np.float32)
    ranks = np.argsort(np.where(mask, values, np.inf), axis=1, kind="stable").astype(np.int32)
    ranks = np.where(mask, ranks, IGNORE).astype(np.int32)  # the real elements sort before the padding
    batch = SortBatch(values, mask, ranks, ranks, input_order, output_order, order_seed)
    if output_order != "natural":
        batch.targets = batch.targets_in(output_order)
    return batch


def exact_order(batch: SortBatch, preds, orders=OUTPUT_ORDERS) -> np.ndarray:
    """``[b]`` int: the index in ``orders`` of the output order each decoded row ``preds`` ``[b, T']`` equals
    exactly (its first ``n`` pointers, then ``IGNORE`` or the end of the row), or −1 for none."""
    preds = np.asarray(preds)
    sizes = batch.mask.sum(1)
    out = np.full(len(batch), -1)
    for k in range(len(orders) - 1, -1, -1):  # the first matching order wins
        t = batch.targets_in(orders[k])
        for i, n in enumerate(sizes):
            tail = preds[i, n:]
            if np.array_equal(preds[i, :n], t[i, :n]) and np.all(tail == IGNORE):
                out[i] = k
    return out


def chance_accuracy(n: int) -> float:
    """Exact-sequence accuracy of a uniformly random permutation of ``n`` elements: ``1 / n!``."""
    return 1.0 / float(np.prod(np.arange(1, n + 1, dtype=np.float64)))
