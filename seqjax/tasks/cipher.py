"""Substitution ciphers of token sequences (Huang et al. 2023, "Lexinvariant Language Models", §5).

A key is a bijection of the vocabulary (``key[v]`` is the cipher symbol of plaintext token ``v``), drawn fresh per
sequence from the seed; tokens listed in ``keep`` map to themselves (e.g. a pad id). A lexinvariant LM assigns an
enciphered sequence the same probability as its plaintext; in-context deciphering is recovering each position's
plaintext token from the ciphertext read so far.

:func:`cipher_batch` turns plaintext rows ``[n, T]`` into a :class:`~seqjax.tasks.TaskBatch` whose ``inputs`` are
the ciphertext and whose ``targets`` are the plaintext at the same position (``meta``: each row's key);
:func:`decipher_accuracy` scores predicted plaintext exactly, overall and per position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch

__all__ = ["substitution_key", "invert_key", "encipher", "cipher_batch", "decipher_accuracy"]


def substitution_key(vocab_size: int, seed: int | Sequence[int], keep=()) -> np.ndarray:
    """A random bijection of ``[0, vocab_size)`` (``[vocab_size]`` int32) fixing the tokens in ``keep``; ``seed``
    is an int or a sequence of non-negative ints (``np.random.default_rng``'s seed sequence)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    keep = sorted(set(int(k) for k in keep))
    if keep and not (0 <= keep[0] and keep[-1] < vocab_size):
        raise ValueError(f"keep must hold token ids in [0, {vocab_size}), got {keep}")
    key = np.arange(vocab_size, dtype=np.int32)
    free = np.setdiff1d(key, keep)
    key[free] = np.random.default_rng(seed).permutation(free)
    return key


def invert_key(key) -> np.ndarray:
    """The deciphering map: ``invert_key(key)[key[v]] == v``."""
    key = np.asarray(key)
    if key.ndim != 1 or not np.array_equal(np.sort(key), np.arange(len(key))):
        raise ValueError(f"key must be a bijection of [0, {len(key)}) as a [vocab] int array")
    inv = np.empty_like(key)
    inv[key] = np.arange(len(key), dtype=key.dtype)
    return inv


def encipher(tokens, key) -> np.ndarray:
    """``key[tokens]``: every token replaced by its cipher symbol."""
    tokens, key = np.asarray(tokens), np.asarray(key)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(key)):
        raise ValueError(f"tokens must be ids in [0, {len(key)}) (the key's vocabulary), got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    return key[tokens].astype(np.int32)


def cipher_batch(plain, vocab_size: int, seed: int, keep=()) -> TaskBatch:
    """Each row of ``plain`` (``[n, T]`` int) enciphered with its own key (row ``i`` uses seed ``(seed, i)``)."""
    plain = np.asarray(plain)
    if plain.ndim != 2 or not np.issubdtype(plain.dtype, np.integer):
        raise ValueError(f"plain must be [n, T] integer token ids, got {plain.dtype} {list(plain.shape)}")
    keys = [substitution_key(vocab_size, [seed, i], keep) for i in range(len(plain))]
    inputs = np.stack([encipher(row, k) for row, k in zip(plain, keys)]) if len(plain) else plain.astype(np.int32)
    return TaskBatch(inputs, plain.astype(np.int32), num_classes=vocab_size, vocab_size=vocab_size, meta=keys)


def decipher_accuracy(pred, plain, per_position: bool = False):
    """Fraction of positions (``plain != IGNORE``) whose predicted plaintext ``pred`` is right; with
    ``per_position``, also the accuracy at each position ``[T]`` (NaN where no row is scored)."""
    pred, plain = np.asarray(pred), np.asarray(plain)
    if pred.shape != plain.shape:
        raise ValueError(f"pred must have the shape of plain {list(plain.shape)}, got {list(pred.shape)}")
    mask = plain != IGNORE
    if not mask.any():
        raise ValueError("plain has no scored positions")
    hit = (pred == plain) & mask
    acc = float(hit.sum() / mask.sum())
    if not per_position:
        return acc
    counts = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return acc, np.where(counts > 0, hit.sum(0) / np.maximum(counts, 1), np.nan)
