"""Recurrent relational networks and Sudoku: every generated puzzle has exactly one solution (checked by an
independent exact-cover solver), the generator is deterministic by seed, message passing over an edge list equals
the dense-adjacency reference (values and gradients), the RRN is equivariant to relabelling the nodes of its
graph, clear errors before tracing, and the experiment for two steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.models import rrn as R
from seqjax.tasks import sudoku as S

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


# ----------------------------------------------------------------------------- an independent solver


def _exact_cover_count(puzzle, size, limit=2):
    """Solutions of ``puzzle`` counted up to ``limit`` by Knuth's Algorithm X on dicts of sets (no bitmasks)."""
    br, bc = S.BOXES[size]
    box = lambda r, c: (r // br, c // bc)
    rows = {(r, c, d): [("cell", r, c), ("row", r, d), ("col", c, d), ("box", box(r, c), d)]
            for r in range(size) for c in range(size) for d in range(1, size + 1)}
    cols = {}
    for key, items in rows.items():
        for it in items:
            cols.setdefault(it, set()).add(key)

    def select(key):
        removed = []
        for j in rows[key]:
            for i in cols[j]:
                for k in rows[i]:
                    if k != j:
                        cols[k].remove(i)
            removed.append(cols.pop(j))
        return removed

    def deselect(key, removed):
        for j in reversed(rows[key]):
            cols[j] = removed.pop()
            for i in cols[j]:
                for k in rows[i]:
                    if k != j:
                        cols[k].add(i)

    grid = np.asarray(puzzle).reshape(size, size)
    for r in range(size):
        for c in range(size):
            if grid[r, c]:
                if any(it not in cols or (r, c, grid[r, c]) not in cols[it] for it in rows[r, c, grid[r, c]]):
                    return 0
                select((r, c, int(grid[r, c])))

    def search():
        if not cols:
            return 1
        j = min(cols, key=lambda k: len(cols[k]))
        total = 0
        for key in list(cols[j]):
            removed = select(key)
            total += search()
            deselect(key, removed)
            if total >= limit:
                break
        return total

    return search()


def _valid_solution(grid, size):
    g = np.asarray(grid).reshape(size, size)
    br, bc = S.BOXES[size]
    units = [g[r] for r in range(size)] + [g[:, c] for c in range(size)]
    units += [g[r:r + br, c:c + bc].ravel() for r in range(0, size, br) for c in range(0, size, bc)]
    return all(sorted(u.tolist()) == list(range(1, size + 1)) for u in units)


# ----------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("size,num,givens", [(4, 40, (4, 6)), (6, 8, (10, 14)), (9, 3, (30, 36))])
def test_every_generated_puzzle_has_exactly_one_solution(size, num, givens):
    b = S.generate(num, size, givens, seed=size)
    assert b.puzzles.shape == b.solutions.shape == (num, size * size)
    np.testing.assert_array_equal((b.puzzles > 0).sum(1), b.givens)
    assert ((givens[0] <= b.givens) & (b.givens <= givens[1])).all()
    for p, s in zip(b.puzzles, b.solutions):
        assert _valid_solution(s, size)
        np.testing.assert_array_equal(p[p > 0], s[p > 0])  # the givens are the solution's
        assert _exact_cover_count(p, size) == 1
        assert S.count_solutions(p, size) == 1
        np.testing.assert_array_equal(S.solve(p, size), s)


def test_the_solver_counts_all_288_shidoku_grids():
    assert S.count_solutions(np.zeros(16, np.int32), 4, limit=10_000) == 288
    assert _exact_cover_count(np.zeros(16, np.int32), 4, limit=10_000) == 288
    p = S.generate(1, 4, 12, seed=0).puzzles[0].copy()
    p[:4] = 0  # a blank row is forced by its columns
    assert S.count_solutions(p, 4) == 1
    p = np.zeros(16, np.int32)
    p[[0, 5]] = [1, 1]  # two 1s in one box: no solution
    assert S.solve(np.zeros(16, np.int32), 4) is not None
    assert _exact_cover_count(p, 4) == 0


def test_add_givens_and_permute_digits_keep_one_solution():
    b = S.generate(6, 6, 10, seed=1)
    more = S.add_givens(b, (12, 20), seed=2)
    assert ((more.givens >= 12) & (more.givens <= 20)).all()
    np.testing.assert_array_equal(np.where(b.puzzles > 0, more.puzzles, b.puzzles), b.puzzles)  # givens kept
    np.testing.assert_array_equal(np.where(more.puzzles > 0, more.solutions, 0), more.puzzles)  # from the solution
    perm = S.permute_digits(more, seed=3)
    np.testing.assert_array_equal(perm.puzzles > 0, more.puzzles > 0)
    for p, s, p0, s0 in zip(perm.puzzles, perm.solutions, more.puzzles, more.solutions):
        assert _valid_solution(s, 6) and _exact_cover_count(p, 6) == 1
        relabel = dict(zip(s0.tolist(), s.tolist()))  # one consistent relabelling of the digits
        assert len(set(relabel.values())) == 6 and all(relabel[a] == c for a, c in zip(p0[p0 > 0], p[p > 0]))
    assert not np.array_equal(perm.solutions, more.solutions)


def test_the_generator_is_deterministic_by_seed():
    a, b, c = S.generate(5, 9, (30, 36), seed=7), S.generate(5, 9, (30, 36), seed=7), S.generate(5, 9, (30, 36), seed=8)
    np.testing.assert_array_equal(a.puzzles, b.puzzles)
    np.testing.assert_array_equal(a.solutions, b.solutions)
    assert not np.array_equal(a.puzzles, c.puzzles)
    np.testing.assert_array_equal(S.permute_digits(a, seed=1).puzzles, S.permute_digits(b, seed=1).puzzles)
    np.testing.assert_array_equal(S.add_givens(a, 40, seed=1).puzzles, S.add_givens(b, 40, seed=1).puzzles)


@pytest.mark.parametrize("size", [4, 6, 9])
def test_edges_are_the_cells_that_share_a_unit(size):
    s, r = S.edges(size)
    br, bc = S.BOXES[size]
    want = {(i, j) for i in range(size * size) for j in range(size * size) if i != j and (
        i // size == j // size or i % size == j % size
        or (i // size // br, i % size // bc) == (j // size // br, j % size // bc))}
    assert set(zip(s.tolist(), r.tolist())) == want and len(s) == len(want)
    assert len(s) == size * size * (3 * size - 1 - br - bc)  # 20 neighbours a cell at 9x9
    np.testing.assert_array_equal(S.adjacency(size), S.adjacency(size).T)


def test_sudoku_names_bad_input():
    with pytest.raises(ValueError, match="size must be one of"):
        S.generate(1, 5)
    with pytest.raises(ValueError, match="size must be one of"):
        S.edges(8)
    with pytest.raises(ValueError, match="givens"):
        S.generate(1, 9, 16)  # below the 17 a unique 9x9 puzzle needs
    with pytest.raises(ValueError, match="givens"):
        S.generate(1, 4, (6, 5))
    grid = np.zeros((4, 4), np.int32)
    grid[0, 0] = grid[0, 3] = 2
    with pytest.raises(ValueError, match="digit 2 appears twice in row 0"):
        S.check_grid("puzzle", grid, 4)
    grid = np.zeros(16, np.int32)
    grid[[1, 13]] = 3
    with pytest.raises(ValueError, match="digit 3 appears twice in column 1"):
        S.count_solutions(grid, 4)
    grid = np.zeros(81, np.int32)
    grid[[0, 20]] = 9
    with pytest.raises(ValueError, match="digit 9 appears twice in box 0"):
        S.solve(grid, 9)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 16\]"):
        S.check_grid("puzzle", np.zeros(15, np.int32), 4)
    with pytest.raises(ValueError, match="digits in 0..4"):
        S.check_grid("puzzle", np.full(16, 5), 4)
    with pytest.raises(ValueError, match="digits in 1..4"):
        S.check_grid("solution", np.zeros(16, np.int32), 4, complete=True)


# ----------------------------------------------------------------------------- message passing and the RRN


def _random_graph(n, e, seed):
    rng = np.random.default_rng(seed)
    s, r = rng.integers(0, n, e).astype(np.int32), rng.integers(0, n - 1, e).astype(np.int32)  # node n-1 receives nothing
    s[:3], r[:3] = 0, 1  # a repeated edge counts three times; self-loops allowed
    return s, r


def test_message_passing_equals_the_dense_reference():
    n, d, b = 7, 5, 3
    s, r = _random_graph(n, 30, 0)
    adj = np.zeros((n, n), np.float32)
    np.add.at(adj, (s, r), 1.0)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    h = (jax.random.normal(k[0], (b, n, d)), jax.random.normal(k[1], (b, n, 2)))  # a pytree of node features
    A, B = jax.random.normal(k[2], (d, 4)), jax.random.normal(k[3], (2, 4))
    fn = lambda src, dst: jnp.tanh(src[0] @ A + dst[1] @ B) * dst[0][..., :1] + src[1][..., :1]  # not symmetric
    sparse = lambda h: R.message_passing(h, jnp.asarray(s), jnp.asarray(r), fn)
    dense = lambda h: R.message_passing_dense(h, adj, fn)
    np.testing.assert_allclose(sparse(h), dense(h), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sparse(h)[:, n - 1], 0.0)
    naive = np.zeros((b, n, 4), np.float32)  # one edge at a time
    for i, j in zip(s, r):
        naive[:, j] += np.asarray(fn((h[0][:, i], h[1][:, i]), (h[0][:, j], h[1][:, j])))
    np.testing.assert_allclose(sparse(h), naive, rtol=1e-5, atol=1e-5)
    gs, gd = (jax.grad(lambda h: jnp.sum(jnp.sin(f(h))))(h) for f in (jax.jit(sparse), dense))
    for a, c in zip(gs, gd):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_pair_messages_equal_the_mlp_on_each_concatenated_pair(layers):
    n, d, b = 6, 4, 2
    s, r = _random_graph(n, 20, layers)
    adj = np.zeros((n, n), np.float32)
    np.add.at(adj, (s, r), 1.0)
    keys = jax.random.split(jax.random.PRNGKey(layers), 2 * layers + 1)
    dims = [2 * d] + [d] * layers
    params = [(jax.random.normal(keys[2 * k], (dims[k], dims[k + 1])), jax.random.normal(keys[2 * k + 1], (dims[k + 1],)))
              for k in range(layers)]
    h = jax.random.normal(keys[-1], (b, n, d))
    naive = np.zeros((b, n, d), np.float32)
    for i, j in zip(s, r):
        naive[:, j] += np.asarray(R.mlp(params, jnp.concatenate([h[:, i], h[:, j]], -1)))
    np.testing.assert_allclose(R.pair_messages(params, h, jnp.asarray(s), jnp.asarray(r)), naive, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(R.pair_messages(params, h, adjacency=adj), naive, rtol=1e-4, atol=1e-4)


def _rrn(seed=0, **kw):
    return R.RRN(5, 4, d=6, d_embed=3, mlp_layers=2, msg_layers=3, rngs=nnx.Rngs(seed), **kw)


def test_rrn_over_the_edge_list_equals_the_dense_reference_values_and_gradients():
    b = S.generate(3, 4, (5, 8), seed=0)
    x, y = jnp.asarray(b.puzzles), jnp.asarray(b.solutions - 1)
    s, r = S.edges(4)
    model = _rrn()
    sparse = model(x, s, r, steps=4)
    dense = model(x, steps=4, adjacency=S.adjacency(4))
    assert sparse.shape == (4, 3, 16, 4)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(sparse[0] - sparse[-1]))) > 1e-3  # the steps do change the output
    params = model.param_dict()
    loss = lambda p, **g: R.rrn_loss(R.rrn(p, x, steps=4, **g), y)[0]
    g_sparse = jax.jit(jax.grad(lambda p: loss(p, senders=s, receivers=r)))(params)
    g_dense = jax.jit(jax.grad(lambda p: loss(p, adjacency=S.adjacency(4))))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(p, senders=s, receivers=r, remat=True)))(params)
    for a, c, e in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_dense), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_rrn_is_equivariant_to_relabelling_the_nodes_of_any_graph():
    n = 9
    s, r = _random_graph(n, 25, 3)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 5, (2, n)), jnp.int32)
    perm = np.random.default_rng(1).permutation(n)  # node i becomes node inv[i]
    inv = np.argsort(perm)
    model = _rrn()
    out = model(x, s, r, steps=3)
    out_perm = model(x[:, perm], inv[s].astype(np.int32), inv[r].astype(np.int32), steps=3)
    np.testing.assert_allclose(out_perm, out[:, :, perm], rtol=1e-5, atol=1e-5)


def test_rrn_loss_is_the_cross_entropy_averaged_over_the_steps():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 4, 5)), jnp.float32)
    labels = jnp.asarray([[0, 1, 2, 3], [4, 4, 0, 1]], jnp.int32)
    loss, per_step = R.rrn_loss(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = -np.log(np.take_along_axis(np.asarray(p), np.asarray(labels)[None, ..., None], -1))[..., 0].mean((1, 2))
    np.testing.assert_allclose(per_step, want, rtol=1e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)


def test_rrn_names_bad_input_before_tracing():
    model = _rrn()
    s, r = S.edges(4)
    x = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"nodes must have 2 dims \[batch, nodes\]"):
        model(jnp.zeros(16, jnp.int32), s, r, steps=2)
    with pytest.raises(TypeError, match="nodes must have a int dtype"):
        model(jnp.zeros((2, 16)), s, r, steps=2)
    with pytest.raises(ValueError, match=r"nodes must hold values in \[0, 5\)"):
        model(x + 5, s, r, steps=2)
    with pytest.raises(ValueError, match=r"senders must hold node ids in \[0, 8\)"):
        model(x[:, :8], s, r, steps=2)
    with pytest.raises(ValueError, match="receivers must have the same shape as senders"):
        model(x, s, r[:-1], steps=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model(x, s, r, steps=0)
    with pytest.raises(ValueError, match=r"adjacency must have shape \[16, 16\]"):
        model(x, steps=2, adjacency=np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="give the graph"):
        model(x, steps=2)
    with pytest.raises(ValueError, match=r"labels must have shape \[2, 16\]"):
        R.rrn_loss(jnp.zeros((2, 2, 16, 4)), jnp.zeros((2, 15), jnp.int32))


# ----------------------------------------------------------------------------- the experiment


def test_naked_singles_solve_a_puzzle_with_one_blank_per_row_but_not_an_empty_grid():
    import sudoku as experiment

    b = S.generate(2, 4, 16, seed=0)
    b.puzzles[0, [0, 5, 10, 15]] = 0  # one blank in each row: each is a single
    b.puzzles[1] = 0
    np.testing.assert_array_equal(experiment.naked_singles(b), [True, False])


def test_sudoku_experiment_two_steps(tmp_path):
    import sudoku as experiment

    rows = experiment.main(["--preset=tiny", f"--out={tmp_path}"])
    tests = [r for r in rows if r["kind"] == "test"]
    assert [r["mp"] for r in tests] == [1, 2, 3] and all(0.0 <= r["solved"] <= 1.0 for r in tests)
    with open(tmp_path / "sudoku4" / "records.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == len(rows) and all({"machine", "date", "seed", "paper"} <= set(r) for r in recs)
    assert "96.6%" in (tmp_path / "sudoku4" / "table.md").read_text()
    assert (tmp_path / "sudoku4" / "plot.png").exists()
