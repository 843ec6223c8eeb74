r"""Sequential recommendation data and its evaluation protocol (BERT4Rec, Sun et al. 2019), generated locally.

Items are ids ``1..num_items``; ``0`` is padding (:data:`PAD`) and ``num_items + 1`` the Cloze ``[mask]``
(:func:`mask_id`), so a model's vocabulary is ``num_items + 2``. A user's history is a list of item ids in time
order; arrays of histories are right-padded with ``PAD``.

:func:`sessions` draws users with latent structure, deterministic by seed:

- item popularity is Zipfian, :math:`\pi_i \propto r_i^{-s}` over a random ranking ``r`` of the items;
- each of ``clusters`` taste clusters prefers its own random subset of the items (``taste`` :math:`\tau_c`:
  popularity restricted to the subset) and has its own sparse Markov chain :math:`T_c` (each item has
  ``successors`` next items drawn from the cluster's taste, with Dirichlet weights);
- a user belongs to one cluster and has a length drawn uniformly from ``lengths``; the first item comes from
  :math:`\tau_c`, each next one from :math:`p = \alpha T_c[\text{prev}] + \beta \tau_c + (1-\alpha-\beta)\pi`
  over the items the user has not taken yet (no repeats, as in rating data);
- ``swap``: the probability that each adjacent pair is then swapped, so the order is only loosely the chain's
  (the paper's motivation: real histories are not rigidly ordered).

:func:`leave_one_out` splits each history as the paper does: the last item is the test target, the one before
it the validation target, the rest the training sequence. :func:`pack` right-pads (keeping the most recent
items) and can append ``[mask]``; :func:`cloze` masks a training batch (never padding);
:func:`sample_negatives` draws 100 items per user by popularity among those the user never took;
:func:`ranks` and :func:`rank_metrics` give HR@{1,5,10}, NDCG@{5,10} and MRR. :func:`movielens` builds the same
histories from TFDS's ``movielens/1m-ratings`` (downloads; not used in tests).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.tasks import IGNORE

__all__ = ["PAD", "Sessions", "mask_id", "sessions", "leave_one_out", "pack", "cloze", "sample_negatives",
           "popularity", "ranks", "rank_metrics", "check_items", "movielens"]

PAD = 0
KS = (1, 5, 10)


def mask_id(num_items: int) -> int:
    """The Cloze ``[mask]`` token: ``num_items + 1`` (the vocabulary is ``num_items + 2``)."""
    return num_items + 1


@dataclasses.dataclass
class Sessions:
    histories: list  # one int32 array of item ids per user, time order
    num_items: int
    clusters: np.ndarray | None = None  # [users] the latent cluster of each user (synthetic data)

    def __len__(self):
        return len(self.histories)


def check_items(name: str, items, num_items: int, *, allow_mask: bool = False) -> None:
    """ValueError unless every id of ``items`` is padding, an item ``1..num_items`` or (``allow_mask``) the mask."""
    a = np.asarray(items)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer item ids, got dtype {a.dtype}")
    hi = num_items + 1 if allow_mask else num_items
    if a.size and (a.min() < 0 or a.max() > hi):
        what = f"0 (padding), 1..{num_items} (items)" + (f" or {hi} (the mask)" if allow_mask else "")
        raise ValueError(f"{name} holds ids outside the vocabulary: expected {what}, got min {a.min()}, max {a.max()}")


def sessions(num_users: int = 1000, num_items: int = 500, *, clusters: int = 4, lengths=(20, 60),
             zipf: float = 1.0, taste_size: float = 0.3, successors: int = 4, alpha: float = 0.6,
             beta: float = 0.25, swap: float = 0.0, seed: int = 0) -> Sessions:
    """Synthetic user histories with taste clusters, Zipf popularity and cluster Markov chains (module docstring)."""
    lo, hi = (lengths, lengths) if np.isscalar(lengths) else tuple(lengths)
    if not 3 <= lo <= hi:
        raise ValueError(f"lengths must be an int or (lo, hi) with 3 <= lo <= hi (leave-one-out needs 3), got {lengths!r}")
    if hi > num_items:
        raise ValueError(f"lengths must not exceed num_items={num_items} (no repeated items), got {lengths!r}")
    if num_users < 1 or clusters < 1 or successors < 1:
        raise ValueError(f"num_users, clusters and successors must be >= 1, got {num_users}, {clusters}, {successors}")
    if not (0 <= alpha and 0 <= beta and alpha + beta <= 1 and 0 <= swap <= 1 and 0 < taste_size <= 1):
        raise ValueError(f"need alpha, beta >= 0, alpha + beta <= 1, 0 <= swap <= 1, 0 < taste_size <= 1; got "
                         f"alpha={alpha}, beta={beta}, swap={swap}, taste_size={taste_size}")
    rng = np.random.default_rng(seed)
    n = num_items
    pop = np.empty(n)
    pop[rng.permutation(n)] = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    pop /= pop.sum()
    size = max(successors, int(round(taste_size * n)))
    tastes, chains = [], []
    for _ in range(clusters):
        subset = rng.choice(n, size, replace=False)
        taste = np.zeros(n)
        taste[subset] = pop[subset]
        taste /= taste.sum()
        nxt = np.stack([rng.choice(n, successors, replace=False, p=taste) for _ in range(n)])
        tastes.append(taste)
        chains.append((nxt, rng.dirichlet(np.ones(successors), size=n)))  # sparse rows of T_c
    user_cluster = rng.integers(0, clusters, size=num_users)
    histories = []
    for c in user_cluster:
        length = int(rng.integers(lo, hi + 1))
        seen = np.zeros(n, bool)
        seq = []
        p = tastes[c]
        for _ in range(length):
            q = np.where(seen, 0.0, p)
            if q.sum() <= 0:  # every likely item taken: fall back to popularity over the rest
                q = np.where(seen, 0.0, pop)
            item = int(rng.choice(n, p=q / q.sum()))
            seen[item] = True
            seq.append(item)
            p = beta * tastes[c] + (1 - alpha - beta) * pop
            p[chains[c][0][item]] += alpha * chains[c][1][item]
        seq = np.asarray(seq)
        if swap > 0:
            for t in range(length - 1):
                if rng.random() < swap:
                    seq[t], seq[t + 1] = seq[t + 1], seq[t]
        histories.append((seq + 1).astype(np.int32))
    return Sessions(histories, num_items, user_cluster.astype(np.int32))


def leave_one_out(histories):
    """``(train, valid, test)``: per user the history less its last two items, the second-to-last item, the last."""
    short = [i for i, h in enumerate(histories) if len(h) < 3]
    if short:
        raise ValueError(f"leave-one-out needs histories of at least 3 items; user {short[0]} has {len(histories[short[0]])}")
    train = [np.asarray(h[:-2], np.int32) for h in histories]
    valid = np.asarray([h[-2] for h in histories], np.int32)
    test = np.asarray([h[-1] for h in histories], np.int32)
    return train, valid, test


def pack(seqs, length: int, *, num_items: int, append_mask: bool = False):
    """``(items [n, length] int32 right-padded with PAD, lengths [n])``: each sequence's most recent items, then
    ``[mask]`` when ``append_mask`` (the BERT4Rec query); ``lengths`` counts the real tokens (mask included)."""
    if length < 1 + append_mask:
        raise ValueError(f"length must be >= {1 + append_mask}, got {length}")
    keep = length - append_mask
    out = np.full((len(seqs), length), PAD, np.int32)
    lens = np.zeros(len(seqs), np.int32)
    for i, s in enumerate(seqs):
        s = np.asarray(s)[-keep:]
        check_items(f"seqs[{i}]", s, num_items)
        if np.any(s == PAD):
            raise ValueError(f"seqs[{i}] holds the padding id {PAD}; items are 1..{num_items}")
        if append_mask:
            s = np.append(s, mask_id(num_items))
        out[i, : len(s)] = s
        lens[i] = len(s)
    return out, lens


def cloze(items, prob: float, *, num_items: int, rng: np.random.Generator, last_only=None):
    """Cloze masking of a right-padded batch ``items [b, t]`` (BERT-style count): in each row exactly
    ``max(1, round(prob * n_real))`` real positions, chosen uniformly, become ``[mask]``; padding is never masked.
    ``last_only`` ``[b]`` bool: those rows mask their last real item only (the paper's extra samples that match
    the inference query). Returns ``(inputs, targets)`` with ``targets = IGNORE`` where nothing is predicted."""
    items = np.asarray(items)
    if not 0 < prob <= 1:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    check_items("items", items, num_items)
    real = items != PAD
    n_real = real.sum(1)
    k = np.maximum(1, np.round(prob * n_real)).astype(int)
    noise = np.where(real, rng.random(items.shape), np.inf)
    order = np.argsort(np.argsort(noise, axis=1), axis=1)  # rank of each position among the row's real ones
    masked = (order < k[:, None]) & real
    if last_only is not None:
        last = np.zeros_like(real)
        last[np.arange(len(items)), np.maximum(n_real - 1, 0)] = True
        masked = np.where(np.asarray(last_only)[:, None], last & real, masked)
    inputs = np.where(masked, mask_id(num_items), items).astype(np.int32)
    targets = np.where(masked, items, IGNORE).astype(np.int32)
    return inputs, targets


def popularity(histories, num_items: int) -> np.ndarray:
    """Interaction counts ``[num_items + 1]`` (index 0, padding, is 0)."""
    flat = np.concatenate([np.asarray(h, np.int64) for h in histories]) if len(histories) else np.zeros(0, np.int64)
    check_items("histories", flat, num_items)
    return np.bincount(flat, minlength=num_items + 1).astype(np.float64)


def sample_negatives(histories, num_items: int, *, num: int = 100, counts=None, seed: int = 0) -> np.ndarray:
    """``[users, num]`` int32 negatives per user, without replacement, among the items the user never took, with
    probability proportional to popularity ``counts`` (default: counts over ``histories``; items never seen get
    the smallest positive weight, so every item can be drawn)."""
    counts = popularity(histories, num_items) if counts is None else np.asarray(counts, np.float64)
    w = counts[1:].copy()
    w[w <= 0] = w[w > 0].min() if (w > 0).any() else 1.0
    rng = np.random.default_rng(seed)
    out = np.empty((len(histories), num), np.int32)
    for u, h in enumerate(histories):
        p = w.copy()
        p[np.asarray(h) - 1] = 0.0
        if (p > 0).sum() < num:
            raise ValueError(f"user {u} has taken all but {(p > 0).sum()} of the {num_items} items; cannot draw {num} negatives")
        out[u] = rng.choice(num_items, num, replace=False, p=p / p.sum()) + 1
    return out


def ranks(scores, *, seed: int = 0) -> np.ndarray:
    """1-based rank of the target (column 0) among the candidates of each row of ``scores [n, 1 + negatives]``;
    ties with negatives are broken uniformly at random (a constant scorer gets the chance rank, not rank 1)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape [n, 1 + negatives] (target in column 0), got {list(scores.shape)}")
    greater = (scores[:, 1:] > scores[:, :1]).sum(1)
    equal = (scores[:, 1:] == scores[:, :1]).sum(1)
    rng = np.random.default_rng(seed)
    return (1 + greater + rng.integers(0, equal + 1)).astype(np.int64)


def rank_metrics(rank) -> dict:
    """HR@{1,5,10} (target within the top k), NDCG@{5,10} (``1 / log2(rank + 1)`` within the top k, one relevant
    item so IDCG = 1) and MRR (``1 / rank``), each a mean over users."""
    r = np.asarray(rank, np.float64)
    if r.size == 0 or (r < 1).any():
        raise ValueError("rank must be a non-empty array of 1-based ranks")
    out = {f"hr@{k}": float((r <= k).mean()) for k in KS}
    for k in (5, 10):
        out[f"ndcg@{k}"] = float(np.where(r <= k, 1.0 / np.log2(r + 1), 0.0).mean())
    out["mrr"] = float((1.0 / r).mean())
    return out


def movielens(name: str = "movielens/1m-ratings", *, min_len: int = 5, data_dir=None) -> Sessions:
    """Per-user histories from TFDS (``tfds.data_source``; downloads, not used in tests): ratings sorted by
    timestamp, movie ids renumbered ``1..num_items`` by first appearance, users with fewer than ``min_len``
    ratings dropped (the paper keeps users with at least 5)."""
    import tensorflow_datasets as tfds

    src = tfds.data_source(name, split="train", data_dir=data_dir)
    events: dict = {}
    for ex in src:
        events.setdefault(ex["user_id"], []).append((int(ex["timestamp"]), ex["movie_id"]))
    ids: dict = {}
    histories = []
    for user in sorted(events):
        evs = sorted(events[user], key=lambda e: e[0])
        if len(evs) >= min_len:
            histories.append(np.asarray([ids.setdefault(m, len(ids) + 1) for _, m in evs], np.int32))
    return Sessions(histories, len(ids))
