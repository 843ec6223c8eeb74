"""Read-Process-Write and the sorting task: labels against the definition of sorting, determinism, the Process
block against a plain loop of the paper's equations and its permutation invariance, the model's equivariance,
the pointer's masks, the order-search loss on hand-made numbers, clear errors; the experiment for two steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.models import order_matters as O
from seqjax.models import pointer as P
from seqjax.tasks import IGNORE
from seqjax.tasks import sorting as S

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


# ----------------------------------------------------------------------------- the task


@pytest.mark.parametrize("input_order", S.INPUT_ORDERS)
def test_natural_labels_are_the_argsort(input_order):
    b = S.sort_sets(40, (2, 9), input_order=input_order, seed=3)
    assert b.values.shape == (40, 9) and b.values.dtype == np.float32 and b.targets.dtype == np.int32
    for i in range(40):
        n = int(b.mask[i].sum())
        v = b.values[i, :n].tolist()
        assert b.mask[i, :n].all() and np.all(b.values[i, n:] == 0) and np.all(b.targets[i, n:] == IGNORE)
        assert len(set(v)) == n and all(0 <= a < 1 for a in v)  # distinct, in [0, 1)
        assert b.targets[i, :n].tolist() == sorted(range(n), key=v.__getitem__)  # the definition of sorting
        if input_order == "sorted":
            assert b.targets[i, :n].tolist() == list(range(n))


def test_fixed_and_reverse_orders_emit_the_ranks_they_name():
    b = S.sort_sets(50, (3, 8), output_order="fixed", seed=1, order_seed=7)
    perms = {}
    for i in range(50):
        n = int(b.mask[i].sum())
        v = b.values[i, :n]
        ranks = np.argsort(np.argsort(v))  # rank of each element, 0 = smallest
        emitted = [int(ranks[j]) for j in b.targets[i, :n]]  # the rank pointed at, step by step
        assert sorted(emitted) == list(range(n))
        assert emitted != list(range(n)) and emitted != list(range(n))[::-1]  # neither ascending nor descending
        assert perms.setdefault(n, emitted) == emitted  # one fixed permutation per set size
    assert len(perms) == 6
    rev = b.targets_in("reverse")
    for i in range(50):
        n = int(b.mask[i].sum())
        assert np.all(np.diff(b.values[i, rev[i, :n]]) < 0)
    assert S.rank_order("fixed", 6, 7).tolist() == perms[6] and S.rank_order("fixed", 6, 8).tolist() != perms[6]


def test_generator_is_deterministic_by_seed_and_sorted_input_holds_the_same_sets():
    a, b = S.sort_sets(16, (5, 15), seed=4), S.sort_sets(16, (5, 15), seed=4)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.values, S.sort_sets(16, (5, 15), seed=5).values)
    s = S.sort_sets(16, (5, 15), input_order="sorted", seed=4)
    np.testing.assert_array_equal(np.sort(np.where(a.mask, a.values, 2), 1), np.where(s.mask, s.values, 2))
    f1 = S.sort_sets(8, 6, output_order="fixed", seed=1)
    f2 = S.sort_sets(8, 6, output_order="fixed", seed=2)  # another data seed keeps the fixed order
    emitted = lambda b: {tuple(np.argsort(np.argsort(b.values[i]))[b.targets[i]]) for i in range(len(b))}
    assert emitted(f1) == emitted(f2) and len(emitted(f1)) == 1


def test_exact_order_and_chance_by_hand():
    b = S.sort_sets(3, 4, seed=0)
    preds = np.stack([b.targets[0], b.targets_in("reverse")[1], b.targets[2][[1, 0, 2, 3]]])  # two swapped: none
    assert S.exact_order(b, preds).tolist() == [0, 1, -1]
    longer = np.concatenate([b.targets, np.full((3, 2), IGNORE)], 1)  # IGNORE after the end is fine
    assert S.exact_order(b, longer).tolist() == [0, 0, 0]
    assert S.chance_accuracy(5) == pytest.approx(1 / 120) and S.chance_accuracy(2) == 0.5


def test_generator_names_bad_input():
    for n in (1, (5, 3), 1001, (0, 4), "5", (2, 3, 4), 5.0):
        with pytest.raises(ValueError, match="n must be an int or a"):
            S.sort_sets(2, n)
    with pytest.raises(ValueError, match="input_order='backwards' is not one of"):
        S.sort_sets(2, 5, input_order="backwards")
    with pytest.raises(ValueError, match="output_order='random' is not one of"):
        S.sort_sets(2, 5, output_order="random")
    with pytest.raises(ValueError, match="num must be >= 1"):
        S.sort_sets(0, 5)


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def net():
    return O.ReadProcessWrite(1, 12, 3, rngs=nnx.Rngs(0))


def _sets(num=5, n=(3, 7), seed=0):
    b = S.sort_sets(num, n, seed=seed)
    return jnp.asarray(b.values[..., None]), jnp.asarray(b.mask), b


def _process_reference(params, m, mask, steps):
    """The paper's equations, one set at a time, in numpy: q_t = LSTM(q*_{t-1}), e = <m_i, q_t>, r = Σ a_i m_i."""
    cp = {k: np.asarray(v, np.float64) for k, v in params["process"].items()}
    h = m.shape[-1]
    w, bias, r_mat = cp["W"][:, 0], cp["b"][0], cp["R"][0]  # [2H, 4, H], [4, H], [H, 4, H]; gates i, f, z, o
    sig = lambda z: 1 / (1 + np.exp(-z))
    out = []
    for mi, ki in zip(m, mask):
        mi = np.asarray(mi, np.float64)[np.asarray(ki)]
        q, c, q_star = np.zeros(h), np.zeros(h), np.zeros(2 * h)
        for _ in range(steps):
            pre = np.einsum("d,dkh->kh", q_star, w) + bias + np.einsum("d,dkh->kh", q, r_mat)
            c = sig(pre[1]) * c + sig(pre[0]) * np.tanh(pre[2])
            q = sig(pre[3]) * np.tanh(c)
            e = mi @ q
            a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
            q_star = np.concatenate([q, a @ mi])
        out.append(q_star)
    return np.stack(out)


@pytest.mark.parametrize("steps", [0, 1, 4])
def test_process_block_equals_the_papers_equations(net, steps):
    x, mask, _ = _sets()
    params = net.param_dict()
    m = O.read(params, x)
    got, _ = O.process("lstm", params, m, mask, steps)
    np.testing.assert_allclose(got, _process_reference(params, np.asarray(m), np.asarray(mask), steps), atol=1e-5)


def test_process_block_is_permutation_and_padding_invariant(net):
    x, mask, b = _sets(num=4, n=(4, 8), seed=2)
    params = net.param_dict()
    q = net.process_state(x, mask)
    rng = np.random.default_rng(0)
    perm = np.stack([rng.permutation(x.shape[1]) for _ in range(len(b))])  # moves padding between real elements
    xp = jnp.take_along_axis(x, perm[..., None], 1)
    mp = jnp.take_along_axis(mask, perm, 1)
    xp = jnp.where(mp[..., None], xp, 0.9)  # padding values never matter
    np.testing.assert_allclose(net.process_state(xp, mp), q, atol=1e-5)
    padded = jnp.concatenate([x, jnp.full((len(b), 5, 1), 0.3)], 1)
    np.testing.assert_allclose(net.process_state(padded, jnp.pad(mask, ((0, 0), (0, 5)))), q, atol=1e-5)
    assert np.abs(np.asarray(q)).max() > 1e-3 and not np.allclose(q[0], q[1])  # not trivially constant
    q0, _ = O.process("lstm", params, O.read(params, x), mask, 0)
    assert np.all(np.asarray(q0) == 0)  # P = 0: the Write block starts from a constant state


@pytest.mark.parametrize("mode", ["tour", "free"])
def test_model_is_permutation_equivariant(net, mode):
    x, mask, b = _sets(num=4, n=6, seed=5)
    toks, lp = net.decode(x, mask, mode=mode)
    perm = np.random.default_rng(1).permutation(6)
    inv = np.argsort(perm)
    toks_p, lp_p = net.decode(x[:, perm], mask, mode=mode)
    np.testing.assert_array_equal(np.asarray(toks_p), inv[np.asarray(toks)])  # pointers follow their elements
    np.testing.assert_allclose(lp_p, lp, atol=1e-5)


def test_pointer_never_points_at_padding_or_a_used_element(net):
    x, mask, b = _sets(num=6, n=(3, 9), seed=7)
    for beam in (1, 3):
        toks = np.asarray(net.decode(x, mask, beam=beam)[0])
        for i in range(len(b)):
            n = int(b.mask[i].sum())
            assert sorted(toks[i, :n].tolist()) == list(range(n)) and np.all(toks[i, n:] == IGNORE)
    y = jnp.asarray(b.targets)
    logits = np.asarray(net(x, y, mask))
    for i in range(len(b)):
        n = int(b.mask[i].sum())
        for t in range(n):
            banned = set(range(n, x.shape[1])) | set(b.targets[i, :t].tolist())
            assert all(logits[i, t, j] <= -1e8 for j in banned)
            assert all(logits[i, t, j] > -1e8 for j in set(range(n)) - banned)
    free = np.asarray(net.decode(x, mask, mode="free")[0])  # repeats allowed, padding never
    for i in range(len(b)):
        n = int(b.mask[i].sum())
        assert np.all((free[i, :n] >= 0) & (free[i, :n] < n)) and np.all(free[i, n:] == IGNORE)


def test_teacher_forcing_reproduces_the_decoded_log_probability(net):
    x, mask, _ = _sets(num=3, n=(4, 6), seed=8)
    toks, lp = net.decode(x, mask)
    nll = O.per_example_nll(net(x, toks, mask), toks)
    np.testing.assert_allclose(-nll, lp, rtol=1e-5, atol=1e-5)
    keep = toks != IGNORE
    np.testing.assert_allclose(jnp.sum(nll) / jnp.sum(keep), P.sequence_nll(net(x, toks, mask), toks), rtol=1e-5)


def test_order_search_keeps_the_best_order_and_its_gradient():
    nll = jnp.array([[3.0, 1.0, 2.0], [0.5, 4.0, 0.7]])
    loss, chosen = O.order_search_loss(nll, jax.random.PRNGKey(0))
    assert chosen.tolist() == [1, 0] and float(loss) == pytest.approx((1.0 + 0.5) / 2)
    grad = jax.grad(lambda v: O.order_search_loss(v, jax.random.PRNGKey(0))[0])(nll)
    np.testing.assert_allclose(grad, [[0, 0.5, 0], [0.5, 0, 0]])
    picks = np.stack([O.order_search_loss(nll, jax.random.PRNGKey(s), uniform=True)[1] for s in range(60)])
    assert set(picks[:, 0].tolist()) == {0, 1, 2}  # exploration: every order drawn
    two = np.stack([O.order_search_loss(nll, jax.random.PRNGKey(s), sample=2)[1] for s in range(60)])
    assert set(two[:, 0].tolist()) == {1, 2}  # the best of two drawn orders is never the worst one
    with pytest.raises(ValueError, match="sample must be in"):
        O.order_search_loss(nll, jax.random.PRNGKey(0), sample=4)
    with pytest.raises(ValueError, match=r"nll must have 2 dims \[batch, candidate orders\], got shape \[3\]"):
        O.order_search_loss(nll[0], jax.random.PRNGKey(0))


def test_model_names_bad_input(net):
    x, mask, _ = _sets()
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*, 1\]"):
        net.decode(jnp.zeros((2, 5, 2)), None)
    with pytest.raises(ValueError, match="x must have 3 dims"):
        net.decode(x[..., 0], mask)
    with pytest.raises(TypeError, match="mask must have a bool dtype"):
        net.decode(x, mask.astype(jnp.int32))
    with pytest.raises(ValueError, match="mask must have shape"):
        net.decode(x, mask[:, :2])
    with pytest.raises(ValueError, match="steps"):
        O.ReadProcessWrite(1, 8, -1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode='sorted' is not one of"):
        net.decode(x, mask, mode="sorted")


# ----------------------------------------------------------------------------- the experiment


def test_order_matters_experiment_two_steps(tmp_path):
    import order_matters

    rows = order_matters.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "order_matters"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    tests = [r for r in rows if r["kind"] == "test"]
    assert {(r["run"], r["test_input"], r["n"]) for r in tests} == {
        (run, i, 5) for run in ("ptr-random-natural", "rpw1-sorted-search-masked") for i in ("random", "sorted")}
    assert all(0.0 <= r["exact"] <= 1.0 and r["machine"] and r["date"] and r["paper"] and r["seed"] == 0 for r in tests)
    search = [r for r in tests if r["run"].startswith("rpw1")]
    assert all(r["mode"] == "tour" and r["valid"] == 1.0 for r in search)  # masked: always a permutation
    assert all(r["exact"] == pytest.approx(r["as_natural"] + r["as_reverse"] + r["as_fixed"]) for r in search)
    base = {(r["run"], r["test_input"], r["n"]): r["exact"] for r in rows if r["kind"] == "baseline"}
    assert base["identity pointers", "sorted", 5] == 1.0 and base["chance (1/n!)", "random", 5] == pytest.approx(1 / 120)
    assert "| rpw1-sorted-search-masked |" in (out / "table.md").read_text() and (out / "plot.png").exists()
    merged = order_matters.main(["--preset=tiny", f"--out={tmp_path}", "--merge=order_matters", "--name=merged"])
    assert [r for r in merged if r["kind"] == "test"] == tests  # one table from runs made apart, not rerun
    assert (tmp_path / "merged" / "table.md").read_text().splitlines()[2:] == (out / "table.md").read_text().splitlines()[2:]
    with pytest.raises(SystemExit, match="is not <ptr"):
        order_matters.main(["--preset=tiny", f"--out={tmp_path}", "--runs=rpw-random-natural"])
    with pytest.raises(ValueError, match="n must be"):
        order_matters.main(["--preset=tiny", f"--out={tmp_path}", "--test_n=1"])
