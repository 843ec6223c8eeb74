"""Synthetic tasks from the papers behind seqjax, deterministic from a seed, no downloads.

Every generator returns a :class:`TaskBatch` of int32 numpy arrays:

- ``inputs`` ``[n, T]`` token ids (right-padded with the task's pad id),
- ``targets`` ``[n, T]`` the label the model must emit *at that position* (next-token style), and
  ``IGNORE`` (−1) where nothing is scored.

So a model reads ``inputs`` causally and is scored on ``argmax(logits)[targets != IGNORE]``. Each module
documents its format against the paper's public generator.

Tasks: ``state_tracking`` (parity, modular arithmetic with/without brackets, S3/S5 word problems),
``mqar`` (multi-query associative recall), ``recall`` (selective copying, single-query associative
recall), ``icll`` (random-DFA in-context language learning), ``timescales`` (N-parity, N-DMS),
``passkey`` (tokenizer-free passkey retrieval), ``sets`` (set disjointness), ``classification``
(sequential/permuted digits, MNIST-1D), ``cipher`` (substitution ciphers for lexinvariant LMs). Other
families have their own batch types: ``geometry`` (convex hull, Delaunay, TSP for pointer networks: points and
pointer targets), ``sorting`` (sets to sort, for Read-Process-Write), ``multisets`` (set functions for the
learnable commutative monoids: values, mask, one label per set), ``sudoku`` (puzzles with one solution and the
Sudoku graph), ``scan`` (the SCAN command → action suite and its splits), ``dynamics`` (chaotic flows for
attractor reconstruction) and ``continual`` (split and permuted task sequences).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -1

__all__ = ["IGNORE", "TaskBatch", "masked_accuracy", "scaled_accuracy", "sequence_accuracy"]


@dataclasses.dataclass
class TaskBatch:
    inputs: np.ndarray
    targets: np.ndarray
    #: number of answer classes (for scaled accuracy), if the task has a fixed answer set
    num_classes: int | None = None
    vocab_size: int | None = None
    #: per-example task objects (e.g. the DFA of each ICLL sequence), or None
    meta: list | None = None

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, idx):
        meta = None if self.meta is None else list(np.asarray(self.meta, dtype=object)[idx])
        return TaskBatch(self.inputs[idx], self.targets[idx], self.num_classes, self.vocab_size, meta)


def masked_accuracy(predictions, targets) -> float:
    """Fraction of scored positions (``targets != IGNORE``) where ``predictions == targets``."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("targets has no scored positions")
    return float((predictions[mask] == targets[mask]).mean())


def sequence_accuracy(predictions, targets) -> float:
    """Fraction of sequences whose every scored position is right."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    mask = targets != IGNORE
    ok = np.where(mask, predictions == targets, True).all(axis=1)
    return float(ok[mask.any(axis=1)].mean())


def scaled_accuracy(acc: float, num_classes: int) -> float:
    """Grazzi et al.'s scaled accuracy ``(acc − 1/C) / (1 − 1/C)``: 1 perfect, 0 chance."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return (acc - 1.0 / num_classes) / (1.0 - 1.0 / num_classes)
