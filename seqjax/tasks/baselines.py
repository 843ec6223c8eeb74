"""Trivial, training-free predictors: the rows a trained model must beat before its number means anything.

Each predictor maps a batch's ``inputs [n, T]`` to greedy predictions ``[n, T]`` (the label the model
would emit at each position, next-token style as :class:`~seqjax.tasks.TaskBatch`), so it is scored by the
task's own metric, exactly as a model is:

- :func:`constant` — one token everywhere: the **majority class** (:func:`majority`, the most frequent
  training label) or the **always-separator** predictor of ICLL;
- :func:`copy_last` — the next token is the current one;
- :func:`ngram_lookup` — the **in-context n-gram** (bigram for ``n = 2``): the token that most often followed
  the current ``n − 1`` tokens earlier in the same sequence (ties: the latest), the algorithm an induction
  head or an n-gram head (Akyürek et al. 2024) implements; it solves associative recall without training;
- :func:`value_majority` — associative recall's most frequent value so far (knows the values, not their keys).

**Chance** (:func:`chance`) is the exact expected score of a prediction drawn uniformly from the answer
tokens (:func:`answer_tokens`): for a metric that averages per-position hits over positions fixed by the
inputs (accuracy, scaled accuracy, DFA accuracy), the expectation is the mean of the metric over the constant
predictors. :func:`trivial_baselines` scores them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch


def _check_inputs(inputs) -> np.ndarray:
    inputs = np.asarray(inputs)
    if inputs.ndim != 2 or not np.issubdtype(inputs.dtype, np.integer):
        raise ValueError(f"inputs must be integer token ids [n, T], got {inputs.dtype} {inputs.shape}")
    return inputs


def constant(inputs, token: int) -> np.ndarray:
    """Predict ``token`` at every position."""
    return np.full(np.shape(inputs)[:2], token, np.int32)


def copy_last(inputs) -> np.ndarray:
    """Predict the current token as the next one."""
    return _check_inputs(inputs).astype(np.int32)


def ngram_lookup(inputs, n: int = 2, *, ignore: Iterable[int] = ()) -> np.ndarray:
    """In-context n-gram prediction: at position ``t``, among the earlier positions ``j < t`` whose last
    ``n − 1`` tokens equal those ending at ``t``, the most frequent follower ``inputs[j + 1]`` (ties: the
    latest). Followers in ``ignore`` are not counted; with no follower the prediction is ``IGNORE`` (−1,
    an abstention that no metric counts as right)."""
    inputs = _check_inputs(inputs)
    if n < 2:
        raise ValueError(f"n must be >= 2 (a context of n - 1 tokens), got {n}")
    ignore = set(int(i) for i in ignore)
    out = np.full(inputs.shape, IGNORE, np.int32)
    k = n - 1
    for b, seq in enumerate(inputs.tolist()):
        counts: dict[tuple, Counter] = {}
        last: dict[tuple, dict] = {}
        for t in range(len(seq)):
            if t >= k:  # record the follower of the context ending at t - 1
                ctx, nxt = tuple(seq[t - k : t]), seq[t]
                if nxt not in ignore:
                    counts.setdefault(ctx, Counter())[nxt] += 1
                    last.setdefault(ctx, {})[nxt] = t
            if t + 1 >= k:
                c = counts.get(tuple(seq[t + 1 - k : t + 1]))
                if c:
                    recent = last[tuple(seq[t + 1 - k : t + 1])]
                    out[b, t] = max(c, key=lambda v: (c[v], recent[v]))
    return out


def value_majority(inputs) -> np.ndarray:
    """Associative recall's "knows the values, not which key each belongs to" predictor: at position ``t``,
    the most frequent token among the values so far (the odd positions ``1, 3, ...`` up to ``t``, where
    :func:`seqjax.tasks.recall.associative_recall` puts them; ties: the latest). ``inputs [n, T]`` ->
    predictions ``[n, T]`` (``IGNORE`` at position 0, before any value)."""
    inputs = _check_inputs(inputs)
    out = np.full(inputs.shape, IGNORE, np.int32)
    for b, seq in enumerate(inputs.tolist()):
        counts: dict[int, int] = {}
        best = IGNORE
        for t, tok in enumerate(seq):
            if t % 2 == 1:
                counts[tok] = counts.get(tok, 0) + 1
                if best == IGNORE or counts[tok] >= counts[best]:  # the value just seen is the latest: it wins ties
                    best = tok
            out[b, t] = best
    return out


def answer_tokens(targets) -> np.ndarray:
    """The distinct labels (``targets != IGNORE``), sorted: the answer set chance draws from."""
    targets = np.asarray(targets)
    vals = np.unique(targets[targets != IGNORE])
    if not len(vals):
        raise ValueError("targets has no scored positions")
    return vals


def majority(targets) -> int:
    """The most frequent label (ties: the smallest)."""
    targets = np.asarray(targets)
    vals, counts = np.unique(targets[targets != IGNORE], return_counts=True)
    if not len(vals):
        raise ValueError("targets has no scored positions")
    return int(vals[np.argmax(counts)])


def chance(metric: Callable[[np.ndarray, TaskBatch], dict], batch: TaskBatch, tokens) -> dict:
    """Expected ``metric`` of a uniform random choice among ``tokens`` at every position: the mean of the
    metric over the constant predictors (exact for metrics averaging per-position hits)."""
    scores = [metric(constant(batch.inputs, int(v)), batch) for v in tokens]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def trivial_baselines(metric: Callable[[np.ndarray, TaskBatch], dict], batch: TaskBatch, train_targets, *,
                      sequence: bool = False, extra: dict | None = None) -> dict[str, dict]:
    """Score the trivial predictors on ``batch`` with the task's ``metric``: ``{name: metric dict}``.

    ``chance`` and ``majority`` (both from ``train_targets``, labels of training batches) always;
    ``copy_last`` and ``bigram`` (:func:`ngram_lookup`, ``n = 2``) when ``sequence`` (tasks whose answers are
    tokens of the sequence); ``extra``: more predictors, ``{name: inputs -> predictions}``.
    """
    out = {"chance": chance(metric, batch, answer_tokens(train_targets)),
           "majority": metric(constant(batch.inputs, majority(train_targets)), batch)}
    fns = {"copy_last": copy_last, "bigram": ngram_lookup} if sequence else {}
    for name, fn in {**fns, **(extra or {})}.items():
        out[name] = metric(fn(batch.inputs), batch)
    return out
