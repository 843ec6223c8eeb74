"""Continual-learning task sequences that need no download, deterministic by seed.

- ``kind="split"``: the 10 classes in a seeded order, cut into ``num_tasks`` groups of ``10 // num_tasks``
  classes (Split MNIST's construction: 5 tasks of 2 classes); labels renumbered ``0..C-1`` within each task.
- ``kind="permuted"``: every task has all 10 classes and its own fixed pixel permutation (Permuted MNIST's
  construction); task 0 keeps the original order.

Sources: scikit-learn's bundled 8×8 digits (``source="digits"``, 64 features in [0, 1], 1,797 images, one
seeded 80/20 split) or MNIST-1D (``source="mnist1d"``, 40 features, 4,000/1,000 images; needs the ``mnist1d``
package, which generates it procedurally). The evaluation is task-incremental: the task id is known at test
time, so a model can give each task its own output head.

:func:`sequence` ``(kind, num_tasks, source, seed) -> list[ContinualTask]``; each task holds flat float32
inputs ``[n, features]`` and int32 labels ``[n]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax import _checks
from seqjax.tasks import classification

__all__ = ["KINDS", "SOURCES", "ContinualTask", "sequence", "chance"]

KINDS = ("split", "permuted")
SOURCES = ("digits", "mnist1d")


@dataclasses.dataclass
class ContinualTask:
    x_train: np.ndarray  # [n, features] float32
    y_train: np.ndarray  # [n] int32 in [0, num_classes)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    classes: tuple[int, ...]  # the source classes, in label order
    permutation: np.ndarray | None = None  # [features] the pixel order (permuted tasks)

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


def _load(source: str, seed: int):
    if source == "digits":
        x_tr, y_tr, x_te, y_te = classification.digits(seed=seed)
    else:
        try:
            x_tr, y_tr, x_te, y_te = classification.mnist1d(seed=seed)
        except ImportError as e:
            raise ImportError("source='mnist1d' needs the mnist1d package (pip install mnist1d)") from e
    return x_tr[..., 0], y_tr, x_te[..., 0], y_te


def sequence(kind: str = "split", num_tasks: int = 5, *, source: str = "digits", seed: int = 0) -> list[ContinualTask]:
    """``num_tasks`` tasks of ``kind`` built from ``source``; the same ``seed`` gives the same sequence."""
    _checks.check_choice("kind", kind, KINDS)
    _checks.check_choice("source", source, SOURCES)
    if kind == "split" and num_tasks not in (2, 5):
        raise ValueError(f"num_tasks={num_tasks}: a split of the 10 classes needs 2 or 5 tasks")
    if kind == "permuted" and not 1 <= num_tasks <= 100:
        raise ValueError(f"num_tasks={num_tasks} must be in [1, 100] for permuted tasks")
    x_tr, y_tr, x_te, y_te = _load(source, seed)
    rng = np.random.default_rng(seed)
    tasks = []
    if kind == "split":
        per = 10 // num_tasks
        order = rng.permutation(10)
        for t in range(num_tasks):
            cls = tuple(int(c) for c in order[t * per : (t + 1) * per])
            relabel = np.full(10, -1, np.int32)
            relabel[list(cls)] = np.arange(per, dtype=np.int32)
            tr, te = np.isin(y_tr, cls), np.isin(y_te, cls)
            tasks.append(ContinualTask(x_tr[tr], relabel[y_tr[tr]], x_te[te], relabel[y_te[te]], per, cls))
        return tasks
    d = x_tr.shape[1]
    for t in range(num_tasks):
        perm = np.arange(d) if t == 0 else rng.permutation(d)
        tasks.append(ContinualTask(x_tr[:, perm], y_tr.copy(), x_te[:, perm], y_te.copy(), 10, tuple(range(10)), perm))
    return tasks


def chance(tasks: list[ContinualTask]) -> float:
    """The average accuracy of guessing uniformly within each task (the trivial baseline)."""
    return float(np.mean([1.0 / t.num_classes for t in tasks]))
