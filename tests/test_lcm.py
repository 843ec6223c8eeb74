"""Learnable commutative monoids: the symmetrised operator commutes exactly; the tree is invariant to padding
(up to rounding) and exactly to swapping siblings, equals the sequential fold for associative operators (+, max) at awkward
sizes; the set tasks' labels by hand; clear errors; the experiment for two steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.models import lcm as L
from seqjax.rnn import cells
from seqjax.tasks import multisets as M

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

D = 6
tree_reduce = jax.jit(L.tree_reduce, static_argnums=0)  # one compile per shape, not one dispatch per op
fold = jax.jit(L.fold, static_argnums=0)


@pytest.fixture(scope="module")
def op():
    params = cells.init_params("gru", jax.random.PRNGKey(0), D, D)
    return L.symmetrise(lambda x, y: L.gru_op(params, x, y))


def _x(b, n, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, n, D), jnp.float32)


def test_symmetrised_operator_commutes_exactly(op):
    a, b, c = _x(3, 5, 1), _x(3, 5, 2), _x(3, 5, 3)
    np.testing.assert_array_equal(op(a, b), op(b, a))
    assert float(jnp.max(jnp.abs(op(op(a, b), c) - op(a, op(b, c))))) > 1e-4  # but it is not associative


def test_tree_is_invariant_to_padding_amount_and_place(op):
    x = _x(2, 5)
    ref = tree_reduce(op, x)
    rng = np.random.default_rng(0)
    for total in (5, 6, 8, 13):
        slots = np.sort(rng.choice(total, 5, replace=False))  # where the real elements sit, in order
        junk = np.asarray(_x(2, total, seed=total)).copy()
        junk[:, slots] = np.asarray(x)
        mask = np.zeros((2, total), bool)
        mask[:, slots] = True
        # equal up to rounding: the combines run on arrays of other shapes
        np.testing.assert_allclose(tree_reduce(op, jnp.asarray(junk), jnp.asarray(mask)), ref, rtol=1e-6, atol=1e-7)


def test_tree_is_invariant_to_swapping_siblings(op):
    """Reversing 2^k elements swaps the children of every node: equal by commutativity alone."""
    x = _x(2, 8)
    np.testing.assert_array_equal(tree_reduce(op, x[:, ::-1]), tree_reduce(op, x))
    pairs = x.reshape(2, 4, 2, D)[:, :, ::-1].reshape(2, 8, D)  # swap within each pair
    np.testing.assert_array_equal(tree_reduce(op, pairs), tree_reduce(op, x))
    # the full tree (no mask, 2^k elements) takes a path without the padding logic: the same numbers
    np.testing.assert_allclose(tree_reduce(op, x, jnp.ones((2, 8), bool)), tree_reduce(op, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("assoc", [jnp.add, jnp.maximum], ids=["add", "max"])
@pytest.mark.parametrize("n", [1, 2, 7, 63])
def test_tree_equals_fold_for_an_associative_operator(assoc, n):
    x = _x(3, n, seed=n)
    mask = jnp.asarray(np.random.default_rng(n).random((3, n)) < 0.7).at[:, 0].set(True)
    tree, seq = tree_reduce(assoc, x, mask), fold(assoc, x, mask, init=jnp.full((D,), -1e30) if assoc is jnp.maximum else None)
    np.testing.assert_allclose(tree, seq, rtol=1e-5, atol=1e-5)
    perm = np.random.default_rng(1).permutation(n)  # and so the tree is permutation invariant
    np.testing.assert_allclose(tree_reduce(assoc, x[:, perm], mask[:, perm]), tree, rtol=1e-5, atol=1e-5)
    if assoc is jnp.add:
        np.testing.assert_allclose(tree, L.pool("sum", x, mask), rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(tree, L.pool("max", x, mask), rtol=1e-6)


def test_empty_sets_give_the_identity(op):
    x, e = _x(2, 4), jnp.arange(D, dtype=jnp.float32)
    mask = jnp.array([[False] * 4, [True, False, False, False]])
    out = tree_reduce(op, x, mask, e)
    np.testing.assert_array_equal(out[0], e)
    np.testing.assert_array_equal(out[1], x[1, 0])  # one element: itself, never combined with the identity
    for kind in ("sum", "mean", "max"):
        np.testing.assert_array_equal(L.pool(kind, x, mask)[0], jnp.zeros(D))
    np.testing.assert_allclose(L.pool("mean", x, mask)[1], x[1, 0])


def test_associativity_gap(op):
    a, b, c = _x(4, 1, 1)[:, 0], _x(4, 1, 2)[:, 0], _x(4, 1, 3)[:, 0]
    assert float(L.associativity_gap(jnp.add, a, b, c)) < 1e-10
    assert float(L.associativity_gap(op, a, b, c)) > 1e-6


def test_set_model_is_invariant_to_padding_and_pooling_to_order():
    vals = jnp.array([[3, 1, 4, 1, 5, 10, 10, 10]])
    mask = vals < 10
    perm = jnp.array([4, 2, 0, 3, 1, 5, 6, 7])
    for agg in L.AGGREGATORS:
        m = L.SetModel(11, 10, agg, d=8, rngs=nnx.Rngs(0))
        out = m(vals, mask)
        assert out.shape == (1, 10)
        np.testing.assert_allclose(m(vals[:, :5], mask[:, :5]), out, rtol=1e-5, atol=1e-6)  # padding
        if agg in ("sum", "mean", "max"):
            np.testing.assert_allclose(m(vals[:, perm], mask[:, perm]), out, rtol=1e-5, atol=1e-6)


def test_lcm_names_bad_input(op):
    with pytest.raises(ValueError, match="x must have 3 dims"):
        L.tree_reduce(op, jnp.zeros((4, D)))
    with pytest.raises(ValueError, match="mask must have shape"):
        L.tree_reduce(op, _x(2, 4), jnp.ones((2, 3), bool))
    with pytest.raises(TypeError, match="mask must have a bool dtype"):
        L.fold(op, _x(2, 4), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="aggregator='median' is not one of"):
        L.SetModel(11, 10, "median", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="values must have a int dtype"):
        L.SetModel(11, 10, "sum", d=4, rngs=nnx.Rngs(0))(jnp.zeros((2, 3)))


def test_set_task_labels_by_hand():
    assert M.label("second_minimum", [3, 1, 4, 1, 5], 10) == 1  # the minimum twice
    assert M.label("second_minimum", [3, 1, 4, 2], 10) == 2
    assert M.label("count_parity", [3, 1, 4, 1, 5], 10) == 0 and M.label("count_parity", [3, 4, 6], 10) == 1
    assert M.label("product", [3, 5, 6], 7) == 90 % 7
    b = M.multiset("second_minimum", 50, (2, 9), values=10, seed=0)
    assert b.values.shape == (50, 9) and b.vocab_size == 11 and b.num_classes == 10
    for row, m, y in zip(b.values, b.mask, b.labels):
        assert np.all(row[~m] == 10) and m[:2].all() and sorted(row[m])[1] == y
    p = M.multiset("product", 20, 5, values=7, seed=1)
    assert p.values[p.mask].min() >= 1 and all(np.prod(r.astype(int)) % 7 == y for r, y in zip(p.values, p.labels))
    np.testing.assert_array_equal(M.multiset("count_parity", 5, 4, seed=3).values, M.multiset("count_parity", 5, 4, seed=3).values)
    assert M.multiset("count_parity", 5, 4, seed=3).num_classes == 2


def test_set_tasks_name_bad_input():
    with pytest.raises(ValueError, match="task='median' is not one of"):
        M.multiset("median", 2)
    with pytest.raises(ValueError, match="n must be"):
        M.multiset("second_minimum", 2, 1)
    with pytest.raises(ValueError, match="values must be a prime"):
        M.multiset("product", 2, 3, values=10)


def test_lcm_experiment_two_steps(tmp_path):
    import lcm

    rows = lcm.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "lcm"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    tests = [r for r in rows if r["kind"] == "test"]
    assert {(r["aggregator"], r["n"]) for r in tests} == {(a, n) for a in ("sum", "lcm") for n in (4, 8)}
    assert all(0.0 <= r["acc"] <= 1.0 and r["machine"] and r["date"] and r["paper"] for r in tests)
    timing = [r for r in rows if r["kind"] == "timing"]
    assert len(timing) == 1 and timing[0]["depth_tree"] == 4 and timing[0]["tree_s"] > 0
    assert "| lcm |" in (out / "table.md").read_text() and (out / "plot.png").exists()
