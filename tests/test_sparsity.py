"""Sparse RNNs: magnitude masks prune exactly round(s·N) of the selected weights (the smallest), the prune and
fixed-mask transforms keep them zero through optimizer updates of a seqjax model, the gradual schedule's values,
random-graph masks with their generators' degree statistics, graph properties by hand, clear errors, and the
experiment for two steps."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqjax.rnn import StackedRNN
from seqjax.train import sparsity as sp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def _model(kind="gru", hidden=8, layers=2):
    return StackedRNN(kind, 3, hidden, layers, rngs=nnx.Rngs(0))


def _params(m):
    return nnx.as_pure(nnx.state(m, nnx.Param))


def test_filter_selects_input_and_recurrent_weights():
    p = _params(_model())
    assert sorted(sp.select(p, sp.rnn_weights())) == ["layers.0.R", "layers.0.W", "layers.1.R", "layers.1.W"]
    assert sorted(sp.select(p, sp.rnn_weights(inputs=False))) == ["layers.0.R", "layers.1.R"]
    assert sorted(sp.select(p, sp.by_name(r"^layers\.1\.", min_ndim=4))) == ["layers.1.R", "layers.1.W"]
    assert sorted(sp.select(p, sp.by_name(r"^layers\.1\."))) == ["layers.1.R", "layers.1.W", "layers.1.b", "layers.1.bhn"]
    with pytest.raises(ValueError, match="selects no parameter"):
        sp.select(p, sp.by_name("nothing"))


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_mask_prunes_exactly_and_the_smallest(s, scope):
    p = _params(_model())
    leaves = sp.select(p, sp.rnn_weights())
    mask = sp.magnitude_mask(p, s, scope=scope)
    if scope == "global":
        n = sum(v.size for v in leaves.values())
        assert sum(int((~m).sum()) for m in mask.values()) == round(s * n)
        kept = np.concatenate([np.abs(np.asarray(leaves[k]))[np.asarray(m)] for k, m in mask.items()])
        gone = np.concatenate([np.abs(np.asarray(leaves[k]))[~np.asarray(m)] for k, m in mask.items()])
        if len(gone) and len(kept):
            assert gone.max() <= kept.min()
    else:
        for k, m in mask.items():
            assert int((~m).sum()) == round(s * leaves[k].size)
    pruned = sp.apply_mask(p, mask)
    n_all = sum(v.size for v in leaves.values())
    assert sp.sparsity_of(pruned) == sum(int((~m).sum()) for m in mask.values()) / n_all
    np.testing.assert_array_equal(pruned["layers"][0]["b"], p["layers"][0]["b"])  # biases untouched


def test_ties_still_prune_exactly():
    p = {"R": jnp.zeros((1, 4, 1, 4))}
    mask = sp.magnitude_mask(p, 0.25, sp.by_name("R"))
    assert int((~mask["R"]).sum()) == 4


def test_prune_transform_keeps_sparsity_through_updates():
    """One-shot pruning to 70 % at update 0; 20 Adam steps later the selected weights still have exactly that many
    zeros (the mask's), the rest moved."""
    m = _model()
    n = sum(v.size for v in sp.select(_params(m), sp.rnn_weights()).values())
    opt = nnx.Optimizer(m, optax.chain(optax.adam(1e-2), sp.prune(0.7)), wrt=nnx.Param)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))

    @nnx.jit
    def step(m, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x)[0] - 1.0) ** 2))(m)
        opt.update(m, g)
        return loss

    p0 = _params(m)
    for _ in range(20):
        step(m, opt)
    p = _params(m)
    mask = opt.opt_state[1].mask
    zeros = sum(int(np.sum(np.asarray(v) == 0)) for v in sp.select(p, sp.rnn_weights()).values())
    assert zeros == round(0.7 * n) == sum(int((~np.asarray(v[...])).sum()) for v in mask.values())
    for k, v in sp.select(p, sp.rnn_weights()).items():
        np.testing.assert_array_equal(np.asarray(v)[~np.asarray(mask[k][...])], 0.0)
    assert not np.allclose(p["layers"][0]["b"], p0["layers"][0]["b"])


def test_gradual_schedule_and_pruning_on_it():
    sched = sp.polynomial_schedule(0.8, begin=2, end=6)
    np.testing.assert_allclose([float(sched(t)) for t in (0, 2, 4, 6, 9)], [0.0, 0.0, 0.8 - 0.8 * 0.5**3, 0.8, 0.8], rtol=1e-6)
    params = {"R": jax.random.normal(jax.random.PRNGKey(0), (1, 10, 1, 10))}
    tx = optax.chain(optax.sgd(1e-3), sp.prune(sched, sp.by_name("R"), begin=2, end=6, every=2))
    st = tx.init(params)
    seen = []
    for _ in range(8):
        u, st = tx.update({"R": jnp.ones_like(params["R"])}, st, params)
        params = optax.apply_updates(params, u)
        seen.append(int(np.sum(np.asarray(params["R"]) == 0)))
    # re-pruned at t = 2, 4, 6 to round(100 s_t) = 0, 70, 80 zeros, held in between and after
    assert seen == [0, 0, 0, 0, 70, 70, 80, 80]


def test_fixed_mask_zeroes_and_holds():
    m = _model(hidden=6, layers=1)
    p = _params(m)
    adj = sp.graph("erdos_renyi", 6, seed=1, p=0.4)
    mask = sp.recurrent_mask(p, adj)
    assert mask["layers.0.R"].shape == (1, 6, 3, 6)
    for k in range(3):
        np.testing.assert_array_equal(mask["layers.0.R"][0, :, k, :], adj)
    tx = optax.chain(optax.adam(1e-1), sp.fixed_mask(mask))
    st = tx.init(p)
    for _ in range(3):
        g = jax.tree.map(jnp.ones_like, p)
        u, st = tx.update(g, st, p)
        p = optax.apply_updates(p, u)
        np.testing.assert_array_equal(np.asarray(p["layers"][0]["R"])[~np.asarray(mask["layers.0.R"])], 0.0)
    assert np.all(np.asarray(p["layers"][0]["R"])[np.asarray(mask["layers.0.R"])] != 0)


def test_graph_degree_statistics():
    n = 200
    ws = sp.graph("watts_strogatz", n, seed=0, k=6, p=0.0)
    np.testing.assert_array_equal(ws.sum(1), 6)  # a ring lattice: every degree k
    ws_r = sp.graph("watts_strogatz", n, seed=0, k=6, p=0.3)
    assert ws_r.sum() // 2 == n * 6 // 2  # rewiring keeps the edge count
    ba = sp.graph("barabasi_albert", n, seed=0, m=3)
    # networkx starts from a star on m + 1 nodes (m edges), then each new node brings m edges
    assert ba.sum() // 2 == 3 * (n - 3) and ba.sum(1)[4:].min() >= 3
    assert ba.sum(1).max() > 4 * 6  # heavy tail: hubs far above the mean degree 6
    p = 0.05
    er = sp.graph("erdos_renyi", n, seed=0, p=p)
    edges, pairs = er.sum() // 2, n * (n - 1) // 2
    assert abs(edges - p * pairs) < 4 * np.sqrt(pairs * p * (1 - p))  # binomial edge count
    for a in (ws, ba, er):
        assert a.dtype == bool and np.array_equal(a, a.T) and not a.diagonal().any()


def test_graph_properties_by_hand():
    ring = sp.graph("watts_strogatz", 6, k=2, p=0.0)  # the 6-cycle
    props = sp.graph_properties(ring)
    assert props["edges"] == 6 and props["clustering"] == 0.0 and props["diameter"] == 3
    np.testing.assert_allclose(props["path_length"], (1 + 1 + 2 + 2 + 3) / 5)  # from any node: 1, 1, 2, 2, 3
    tri = np.ones((3, 3), bool) & ~np.eye(3, dtype=bool)
    assert sp.graph_properties(tri)["clustering"] == 1.0 and sp.graph_properties(tri)["path_length"] == 1.0


def test_bad_input_errors():
    p = _params(_model())
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity .* \[0, 1\)"):
            sp.magnitude_mask(p, s)
        with pytest.raises(ValueError, match=r"sparsity .* \[0, 1\)"):
            sp.prune(s)
    with pytest.raises(ValueError, match="adj must be"):
        sp.recurrent_mask(p, np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="kind='lattice' is not one of"):
        sp.graph("lattice", 10)
    with pytest.raises(ValueError, match="scope='row' is not one of"):
        sp.magnitude_mask(p, 0.5, scope="row")
    with pytest.raises(ValueError, match="mask entry"):
        sp.apply_mask(p, {"nope": np.ones(3, bool)})
    with pytest.raises(ValueError, match="needs the parameters"):
        tx = sp.prune(0.5)
        tx.update(p, tx.init(p))


def test_sparse_rnn_experiment_two_steps(tmp_path):
    import sparse_rnn

    rows = sparse_rnn.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "sparse_rnn"
    recs = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(recs) == len(rows) > 0
    assert {"machine", "date", "seed", "paper"} <= set(recs[0])
    kinds = {r["kind"] for r in recs}
    assert {"dense", "prune", "graph"} <= kinds
    verdicts = re.findall(r"\| (met|missed)[^|]* \|\s*$", open(out / "table.md").read(), re.M)
    assert verdicts, "every claim row ends in a met / missed verdict"
