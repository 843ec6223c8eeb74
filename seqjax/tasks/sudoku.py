"""Sudoku puzzles with a unique solution, for recurrent relational networks (Palm, Paquet & Winther 2018).

A grid of side ``n`` holds the digits ``1..n`` so that every row, column and box (``BOXES[n]`` = box rows ×
box columns) holds each digit once: ``n = 4`` (Shidoku, 2×2 boxes), ``6`` (2×3 boxes) and ``9`` (3×3 boxes).
Grids are flat, row-major, ``[n*n]`` int; ``0`` is a blank.

:func:`generate` fills a grid by randomised backtracking, then blanks cells in a random order, keeping a blank
only while the puzzle still has exactly one solution, until ``givens`` cells are left (difficulty = number of
givens; a fresh grid is drawn when a removal order gets stuck above the target). The solver is a bitmask
backtracking search that branches on the cell with the fewest candidates. :func:`add_givens` (reveal solution
cells: the paper's augmentation of 17-given puzzles up to 34 givens) and :func:`permute_digits` (relabel the
digits) keep the solution unique. :func:`edges` is the Sudoku graph (cells that share a unit, both directions)
and :func:`check_grid` the validity check (shape, digit range, no digit twice in a unit).

A :class:`SudokuBatch` has ``puzzles`` ``[b, n*n]`` int32 (0 = blank), ``solutions`` ``[b, n*n]`` int32 in
``1..n`` and ``givens`` ``[b]`` int32.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["BOXES", "MIN_GIVENS", "SudokuBatch", "generate", "solve", "count_solutions", "add_givens",
           "permute_digits", "edges", "adjacency", "check_grid", "check_size"]

#: side -> (box rows, box columns)
BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
#: the fewest givens a puzzle with a unique solution can have (Shidoku 4, 6×6 8, Sudoku 17)
MIN_GIVENS = {4: 4, 6: 8, 9: 17}


@dataclasses.dataclass
class SudokuBatch:
    puzzles: np.ndarray  # [b, n*n] int32, 0 = blank
    solutions: np.ndarray  # [b, n*n] int32 in 1..n
    givens: np.ndarray  # [b] int32
    size: int

    def __len__(self):
        return len(self.puzzles)


def check_size(size) -> int:
    if size not in BOXES:
        raise ValueError(f"size must be one of {tuple(BOXES)} (the side of the grid), got {size!r}")
    return int(size)


@functools.cache
def _units(size: int):
    """Per cell: its row, column and box index."""
    br, bc = BOXES[size]
    r, c = np.divmod(np.arange(size * size), size)
    return tuple(r.tolist()), tuple(c.tolist()), tuple(((r // br) * (size // bc) + c // bc).tolist())


def check_grid(name: str, grid, size: int, *, complete: bool = False) -> np.ndarray:
    """``grid`` as an int array ``[..., n*n]`` (or ``[..., n, n]``), or a ``ValueError`` naming ``name``: wrong
    shape, a digit outside ``0..n`` (``1..n`` if ``complete``), or a digit twice in a row, column or box."""
    size = check_size(size)
    g = np.asarray(grid)
    if g.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers (0 = blank, 1..{size}), got dtype {g.dtype}")
    if g.shape[-2:] == (size, size):
        g = g.reshape(g.shape[:-2] + (size * size,))
    if g.ndim < 1 or g.shape[-1] != size * size:
        raise ValueError(f"{name} must have shape [..., {size * size}] or [..., {size}, {size}] for size={size}, "
                         f"got {list(np.shape(grid))}")
    lo = 1 if complete else 0
    if g.size and (g.min() < lo or g.max() > size):
        raise ValueError(f"{name} must hold digits in {lo}..{size}, got values in {g.min()}..{g.max()}")
    rows, cols, boxes = (np.asarray(u) for u in _units(size))
    flat = g.reshape(-1, size * size)
    for kind, unit in (("row", rows), ("column", cols), ("box", boxes)):
        onehot = np.zeros((len(flat), size, size + 1), np.int32)  # [puzzle, unit, digit]
        np.add.at(onehot, (np.arange(len(flat))[:, None], unit[None], flat), 1)
        twice = onehot[:, :, 1:] > 1
        if twice.any():
            p, u, d = np.argwhere(twice)[0]
            where = f" (puzzle {p})" if g.ndim > 1 else ""
            raise ValueError(f"{name} is not a valid Sudoku: digit {d + 1} appears twice in {kind} {u}{where}")
    return g.astype(np.int32)


# ----------------------------------------------------------------------------- the bitmask solver


@functools.cache
def _popcount(size: int):
    return tuple(bin(m).count("1") for m in range(1 << size))


class _Search:
    """Backtracking over bitmasks (bit ``d - 1`` = digit ``d``), branching on the cell with fewest candidates."""

    def __init__(self, flat, size: int, rng=None):
        self.size, self.rng = size, rng
        self.R, self.C, self.B = _units(size)
        self.pop = _popcount(size)
        self.full = (1 << size) - 1
        self.grid = list(flat)
        self.row, self.col, self.box = [0] * size, [0] * size, [0] * size
        self.allowed = [self.full] * (size * size)
        self.empty = []
        for i, v in enumerate(self.grid):
            if v:
                bit = 1 << (v - 1)
                self.row[self.R[i]] |= bit
                self.col[self.C[i]] |= bit
                self.box[self.B[i]] |= bit
            else:
                self.empty.append(i)
        self.first = None

    def run(self, limit: int) -> int:
        return self._rec(self.empty, limit)

    def _rec(self, empty, limit) -> int:
        if not empty:
            if self.first is None:
                self.first = list(self.grid)
            return 1
        row, col, box, R, C, B, pop = self.row, self.col, self.box, self.R, self.C, self.B, self.pop
        best, best_k, best_m, best_n = -1, -1, 0, self.size + 1
        for k, i in enumerate(empty):
            m = self.allowed[i] & ~(row[R[i]] | col[C[i]] | box[B[i]])
            n = pop[m]
            if n < best_n:
                best, best_k, best_m, best_n = i, k, m, n
                if n <= 1:
                    break
        if best_n == 0:
            return 0
        rest = empty[:best_k] + empty[best_k + 1:]
        bits = []
        m = best_m
        while m:
            bit = m & -m
            bits.append(bit)
            m ^= bit
        if self.rng is not None and len(bits) > 1:
            bits = [bits[j] for j in self.rng.permutation(len(bits))]
        r, c, b = R[best], C[best], B[best]
        total = 0
        for bit in bits:
            row[r] |= bit
            col[c] |= bit
            box[b] |= bit
            self.grid[best] = bit.bit_length()
            total += self._rec(rest, limit - total)
            row[r] ^= bit
            col[c] ^= bit
            box[b] ^= bit
            self.grid[best] = 0
            if total >= limit:
                break
        return total


def count_solutions(puzzle, size: int, limit: int = 2) -> int:
    """The number of solutions of ``puzzle`` (``[n*n]`` or ``[n, n]``, 0 = blank), counted up to ``limit``."""
    g = check_grid("puzzle", puzzle, size)
    return _Search(g.reshape(-1).tolist(), size).run(limit)


def solve(puzzle, size: int) -> np.ndarray | None:
    """One solution ``[n*n]`` int32 of ``puzzle``, or ``None`` when it has none."""
    g = check_grid("puzzle", puzzle, size)
    s = _Search(g.reshape(-1).tolist(), size)
    s.run(1)
    return None if s.first is None else np.asarray(s.first, np.int32)


def _fill(size: int, rng) -> list[int]:
    s = _Search([0] * (size * size), size, rng)
    s.run(1)
    return s.first


def _has_other_solution(puzzle: list[int], cell: int, digit: int, size: int) -> bool:
    """Whether ``puzzle`` (with ``cell`` blank) has a solution with another digit than ``digit`` there."""
    s = _Search(puzzle, size)
    s.allowed[cell] = s.full & ~(1 << (digit - 1))
    return s.run(1) > 0


def _reduce(solution: list[int], target: int, size: int, rng) -> list[int] | None:
    puzzle, left = list(solution), size * size
    for cell in rng.permutation(size * size).tolist():
        digit, puzzle[cell] = puzzle[cell], 0
        if _has_other_solution(puzzle, cell, digit, size):
            puzzle[cell] = digit
        else:
            left -= 1
            if left == target:
                return puzzle
    return None


def generate(num: int, size: int = 9, givens=(30, 36), *, seed: int = 0, max_tries: int = 200) -> SudokuBatch:
    """``num`` puzzles with exactly one solution; ``givens`` an int or a ``(lo, hi)`` pair drawn per puzzle."""
    size = check_size(size)
    lo, hi = (givens, givens) if np.isscalar(givens) else tuple(givens)
    if not MIN_GIVENS[size] <= lo <= hi <= size * size:
        raise ValueError(f"givens must be an int or a (lo, hi) pair with {MIN_GIVENS[size]} <= lo <= hi <= "
                         f"{size * size} for size={size}, got {givens!r}")
    rng = np.random.default_rng(seed)
    puzzles, solutions, counts = [], [], rng.integers(lo, hi + 1, size=num)
    for g in counts.tolist():
        for _ in range(max_tries):
            solution = _fill(size, rng)
            puzzle = solution if g == size * size else _reduce(solution, g, size, rng)
            if puzzle is not None:
                break
        else:
            raise RuntimeError(f"no puzzle with {g} givens found in {max_tries} random grids of size {size}; "
                               "ask for more givens")
        puzzles.append(puzzle)
        solutions.append(solution)
    return SudokuBatch(np.asarray(puzzles, np.int32).reshape(num, size * size),
                       np.asarray(solutions, np.int32).reshape(num, size * size), counts.astype(np.int32), size)


def add_givens(batch: SudokuBatch, givens, *, seed: int = 0) -> SudokuBatch:
    """Reveal solution cells at random until each puzzle has ``givens`` (an int or ``(lo, hi)`` drawn per puzzle,
    never fewer than it has): a puzzle with more givens than a uniquely solvable one is uniquely solvable."""
    lo, hi = (givens, givens) if np.isscalar(givens) else tuple(givens)
    n2 = batch.size * batch.size
    if not 0 <= lo <= hi <= n2:
        raise ValueError(f"givens must be an int or a (lo, hi) pair with 0 <= lo <= hi <= {n2}, got {givens!r}")
    rng = np.random.default_rng(seed)
    target = np.maximum(rng.integers(lo, hi + 1, size=len(batch)), batch.givens)
    blank = batch.puzzles == 0
    # reveal the blanks with the smallest random keys: (target - current) of them per puzzle
    keys = np.where(blank, rng.random(blank.shape), np.inf)
    rank = np.argsort(np.argsort(keys, axis=1), axis=1)
    reveal = blank & (rank < (target - batch.givens)[:, None])
    puzzles = np.where(reveal, batch.solutions, batch.puzzles).astype(np.int32)
    return SudokuBatch(puzzles, batch.solutions, (puzzles > 0).sum(1).astype(np.int32), batch.size)


def permute_digits(batch: SudokuBatch, *, seed: int = 0) -> SudokuBatch:
    """Relabel the digits of each puzzle (and its solution) by a random permutation of ``1..n``."""
    rng = np.random.default_rng(seed)
    n = batch.size
    perms = np.stack([np.concatenate([[0], 1 + rng.permutation(n)]) for _ in range(len(batch))]).astype(np.int32)
    take = lambda g: np.take_along_axis(perms, g, axis=1)
    return SudokuBatch(take(batch.puzzles), take(batch.solutions), batch.givens.copy(), n)


@functools.cache
def _edges(size: int):
    rows, cols, boxes = (np.asarray(u) for u in _units(size))
    same = (rows[:, None] == rows[None]) | (cols[:, None] == cols[None]) | (boxes[:, None] == boxes[None])
    np.fill_diagonal(same, False)
    senders, receivers = np.nonzero(same)
    return senders.astype(np.int32), receivers.astype(np.int32)


def edges(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The Sudoku graph: ``(senders, receivers)`` ``[E]`` int32, an edge each way between two cells that share a
    row, column or box (``E = n² · (3n − 1 − br − bc)``: 20 neighbours a cell for 9×9, 7 for 4×4); sorted."""
    s, r = _edges(check_size(size))
    return s.copy(), r.copy()


def adjacency(size: int) -> np.ndarray:
    """The dense ``[n*n, n*n]`` float32 adjacency of :func:`edges` (``A[i, j] = 1`` for an edge ``i → j``)."""
    s, r = edges(size)
    a = np.zeros((size * size, size * size), np.float32)
    a[s, r] = 1.0
    return a
