"""State-tracking tasks (Grazzi et al. 2025, setup of their public code; Merrill et al. 2024).

All are "answer at the end": the sequence is read causally and one label is scored at its last input
token (the position whose next token, in the authors' shifted format, is the answer).

- :func:`parity`: vocab 3 — bits are tokens 1/2, pad 0; length ``n ~ U{min_len..max_len}`` counts the
  answer token as in the original, so a sequence holds ``n − 1`` bits; the answer is
  ``(#2s mod 2) + 1`` (2 classes).
- :func:`modular_arithmetic`: vocab 10 — 0 PAD, 1 ``+``, 2 ``−``, 3 ``*``, 4 ``=``, numbers 0..4 as 5..9;
  an odd-length expression ``num op num … num`` then ``=``; the answer is its value mod 5 under
  standard precedence (``*`` first, then ``+``/``−`` left to right) (5 classes).
- :func:`modular_arithmetic_brackets`: vocab 12 — numbers 0..4 as 0..4, ``+`` 5, ``−`` 6, ``*`` 7,
  ``(`` 8, ``)`` 9, ``=`` 10, PAD 11; the recursive generator of the authors' code: a terminal ``t``,
  ``−t``, ``(t)`` or ``(−t)`` for short lengths, else ``(L op R)``.
- :func:`word_problem`: S3 / S5 permutation word problems: tokens are group elements (index into
  ``itertools.permutations(range(k))``), the label at every position is the running product
  ``p_t = g_t ∘ p_{t−1}`` (``(p∘q)(i) = p[q[i]]``); pad token ``|G|``.
"""

from __future__ import annotations

import itertools

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch


def _lengths(rng, n, lo, hi):
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= min_len <= max_len, got {lo}, {hi}")
    return rng.integers(lo, hi + 1, size=n)


def parity(num: int, min_len: int, max_len: int, *, seed: int = 0, seq_len: int | None = None) -> TaskBatch:
    if min_len < 2:
        raise ValueError(f"min_len must be >= 2 (one bit and the answer), got {min_len}")
    rng = np.random.default_rng(seed)
    seq_len = seq_len or max_len
    lens = _lengths(rng, num, min_len, max_len)
    inputs = np.zeros((num, seq_len), np.int32)
    targets = np.full((num, seq_len), IGNORE, np.int32)
    for i, n in enumerate(lens):
        bits = rng.integers(1, 3, size=n - 1)
        inputs[i, : n - 1] = bits
        targets[i, n - 2] = (np.sum(bits == 2) % 2) + 1
    return TaskBatch(inputs, targets, num_classes=2, vocab_size=3)


def _eval_mod(nums, ops, mod):
    """Standard precedence: fold ``*`` into terms, then ``+``/``−`` left to right."""
    terms, signs = [nums[0]], []
    for op, x in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] = terms[-1] * x % mod
        else:
            signs.append(op)
            terms.append(x)
    total = terms[0]
    for op, x in zip(signs, terms[1:]):
        total = total + x if op == "+" else total - x
    return total % mod


def modular_arithmetic(num: int, min_len: int, max_len: int, *, seed: int = 0, seq_len: int | None = None) -> TaskBatch:
    """Lengths count the expression, ``=`` and the answer (odd, as in the original)."""
    rng = np.random.default_rng(seed)
    mod, op_tok = 5, {"+": 1, "-": 2, "*": 3}
    seq_len = seq_len or max_len
    lo, hi = -(-min_len // 2), -(-max_len // 2)
    inputs = np.zeros((num, seq_len), np.int32)
    targets = np.full((num, seq_len), IGNORE, np.int32)
    for i in range(num):
        s = 2 * int(rng.integers(max(lo, 2), max(hi, 2) + 1)) - 1  # odd total length >= 3
        s = min(s, seq_len + 1)
        n_nums = (s - 1) // 2
        nums = rng.integers(0, mod, size=n_nums)
        ops = list(rng.choice(["+", "-", "*"], size=n_nums - 1))
        toks = [int(nums[0]) + 5]
        for op, x in zip(ops, nums[1:]):
            toks += [op_tok[op], int(x) + 5]
        toks.append(4)
        inputs[i, : len(toks)] = toks
        targets[i, len(toks) - 1] = _eval_mod([int(x) for x in nums], ops, mod) + 5
    return TaskBatch(inputs, targets, num_classes=5, vocab_size=10)


def _bracket_expr(rng, length, mod, mult):
    """An expression of exactly ``length`` tokens (ids as in the module docstring) and its value."""
    plus, minus, times, lp, rp = mod, mod + 1, mod + 2, mod + 3, mod + 4
    if length < 5:
        t = int(rng.integers(0, mod))
        return {1: ([t], t), 2: ([minus, t], -t % mod), 3: ([lp, t, rp], t), 4: ([lp, minus, t, rp], -t % mod)}[length]
    left_len = int(rng.integers(1, length - 3))  # 1 .. length-4
    left, lv = _bracket_expr(rng, left_len, mod, mult)
    right, rv = _bracket_expr(rng, length - 3 - left_len, mod, mult)
    op = int(rng.choice([plus, minus, times] if mult else [plus, minus]))
    val = {plus: lv + rv, minus: lv - rv, times: lv * rv}[op] % mod
    return [lp, *left, op, *right, rp], val


def modular_arithmetic_brackets(
    num: int, min_len: int, max_len: int, *, seed: int = 0, seq_len: int | None = None, mult: bool = False
) -> TaskBatch:
    """Lengths count expression, ``=``, answer and one trailing PAD (``ℓ = n − 3``), as the original."""
    if min_len < 4:
        raise ValueError(f"min_len must be >= 4, got {min_len}")
    rng = np.random.default_rng(seed)
    mod, vocab = 5, 12
    eq, pad = mod + 5, mod + 6
    seq_len = seq_len or max_len
    inputs = np.full((num, seq_len), pad, np.int32)
    targets = np.full((num, seq_len), IGNORE, np.int32)
    for i, n in enumerate(_lengths(rng, num, min_len, max_len)):
        expr, val = _bracket_expr(rng, int(n) - 3, mod, mult)
        toks = expr + [eq]
        inputs[i, : len(toks)] = toks
        targets[i, len(toks) - 1] = val
    return TaskBatch(inputs, targets, num_classes=mod, vocab_size=vocab)


def group_elements(k: int):
    """The elements of the symmetric group S_k as permutation tuples, and their multiplication table
    ``table[i, j] = index(p_i ∘ p_j)``."""
    elems = list(itertools.permutations(range(k)))
    index = {p: i for i, p in enumerate(elems)}
    table = np.array([[index[tuple(p[q[x]] for x in range(k))] for q in elems] for p in elems], np.int32)
    return elems, table


def word_problem(num: int, min_len: int, max_len: int, *, k: int = 5, seed: int = 0, seq_len: int | None = None) -> TaskBatch:
    """S_k word problem with a label at every position (the running product)."""
    rng = np.random.default_rng(seed)
    _, table = group_elements(k)
    g = len(table)
    seq_len = seq_len or max_len
    inputs = np.full((num, seq_len), g, np.int32)
    targets = np.full((num, seq_len), IGNORE, np.int32)
    for i, n in enumerate(_lengths(rng, num, min_len, max_len)):
        word = rng.integers(0, g, size=n)
        p = word[0]
        inputs[i, :n] = word
        targets[i, 0] = p
        for t in range(1, n):
            p = table[word[t], p]
            targets[i, t] = p
    return TaskBatch(inputs, targets, num_classes=g, vocab_size=g + 1)
