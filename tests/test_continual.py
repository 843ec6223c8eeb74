"""Continual learning: the RNN hypernetwork generates the target's exact shapes and dtypes and refuses unseen
tasks; its output regulariser is exactly zero on an unchanged hypernetwork; the Hebbian (Oja-subspace)
projector finds the top principal subspace of a known covariance (numpy eigh) and the projected updates are
orthogonal to it; EWC's penalty and Fisher by hand; the metrics on a hand-made accuracy matrix; the task
sequences; the experiment for two steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx

from seqjax.models import hypernet as H
from seqjax.tasks import continual as T
from seqjax.train import continual as C

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


# ----------------------------------------------------------------------------- hypernetwork


def _mixed_target():
    return {"enc": {"w": jax.ShapeDtypeStruct((5, 7), jnp.float32), "b": jax.ShapeDtypeStruct((7,), jnp.float32)},
            "norm": jax.ShapeDtypeStruct((7,), jnp.bfloat16), "head": [jax.ShapeDtypeStruct((7, 3, 2), jnp.float16)]}


def test_generated_weights_have_the_targets_shapes_and_dtypes():
    target = _mixed_target()
    spec = H.target_spec(target)
    assert spec.size == 5 * 7 + 7 + 7 + 42
    params = H.init(jax.random.PRNGKey(0), spec, 2, chunk_size=13, hidden=8, task_dim=4, chunk_dim=3)
    assert params["chunk_emb"].shape == (-(-spec.size // 13), 3)
    w = H.weights(params, spec, 1)
    assert jax.tree.structure(w) == jax.tree.structure(target)
    for got, want in zip(jax.tree.leaves(w), jax.tree.leaves(target)):
        assert got.shape == want.shape and got.dtype == want.dtype
    # the raw output starts near unit variance (exactly for task 0: init rescales the head on task 0's own
    # embedding, whatever the key); leaves at 1/sqrt(fan_in)
    raw = H.generate(params, spec, 1)[0]
    assert abs(float(jnp.std(H.generate(params, spec, 0)[0])) - 1.0) < 1e-4 and 0.3 < float(jnp.std(raw)) < 3
    for seed, n in ((1, 1), (2, 5)):
        p = H.init(jax.random.PRNGKey(seed), spec, n, chunk_size=13, hidden=8, task_dim=4, chunk_dim=3)
        assert abs(float(jnp.std(H.generate(p, spec, 0)[0])) - 1.0) < 1e-4
    # with no task yet the head is rescaled on a random embedding: the first added task starts near unit scale
    p0 = H.add_task(H.init(jax.random.PRNGKey(3), spec, 0, chunk_size=13, hidden=8, task_dim=4, chunk_dim=3),
                    jax.random.PRNGKey(4))
    assert 0.3 < float(jnp.std(H.generate(p0, spec, 0)[0])) < 3
    np.testing.assert_allclose(np.asarray(w["enc"]["w"]).ravel(), np.asarray(raw[7:42]) / np.sqrt(5), rtol=1e-6)  # key order: enc.b, enc.w


def test_hypernetwork_module_drives_an_nnx_model_and_chunks_depend_on_earlier_chunks():
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    hnet = H.HyperNetwork(model, 2, chunk_size=8, hidden=8, task_dim=4, chunk_dim=3, rngs=nnx.Rngs(0))
    w = hnet(1)
    ref = nnx.state(model, nnx.Param)
    assert jax.tree.map(jnp.shape, w) == jax.tree.map(jnp.shape, ref)
    x = jnp.ones((3, 4))
    y = hnet.apply(w, x)
    kernel = w["layers"][0]["kernel"][...]
    h1 = jax.nn.relu(x @ kernel + w["layers"][0]["bias"][None])
    np.testing.assert_allclose(y, h1 @ w["layers"][2]["kernel"][...] + w["layers"][2]["bias"][None], rtol=1e-5, atol=1e-6)
    # dependency preserving: changing the first chunk's embedding changes later chunks too
    p = hnet.param_dict()
    spec = hnet.spec
    p2 = dict(p, chunk_emb=p["chunk_emb"].at[0].add(1.0))
    a, b = H.generate(p, spec, 0)[0], H.generate(p2, spec, 0)[0]
    assert float(jnp.max(jnp.abs(a[8:16] - b[8:16]))) > 1e-4
    assert hnet.add_task(nnx.Rngs(5)) == 2 and hnet(2)["layers"][0]["kernel"].shape == (4, 6)


def test_a_task_the_hypernetwork_has_not_seen_raises():
    spec = H.target_spec({"w": jnp.ones((3, 2))})
    params = H.init(jax.random.PRNGKey(0), spec, 2, chunk_size=4, hidden=4)
    with pytest.raises(ValueError, match="task id 2 has not been seen.*tasks 0..1"):
        H.weights(params, spec, 2)
    with pytest.raises(ValueError, match="task id -1 has not been seen"):
        H.generate(params, spec, [0, -1])
    params = H.add_task(params, jax.random.PRNGKey(1))
    assert H.weights(params, spec, 2)["w"].shape == (3, 2)
    with pytest.raises(ValueError, match="raw must have shape \\[6\\]"):
        H.unflatten(spec, jnp.zeros(5))
    with pytest.raises(TypeError, match="leaf 0 of tree must have a float dtype"):
        H.target_spec({"w": jnp.ones((3,), jnp.int32)})


def test_output_regulariser_is_zero_unchanged_and_positive_after_a_change():
    spec = H.target_spec({"w": jax.ShapeDtypeStruct((6, 5), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.float32)})
    params = H.init(jax.random.PRNGKey(0), spec, 3, chunk_size=7, hidden=8, task_dim=4, chunk_dim=3)
    targets = C.hnet_targets(params, spec, 2)
    assert targets.shape == (2, 35)
    assert float(C.hnet_regularizer(params, spec, targets)) == 0.0
    assert float(jax.jit(C.hnet_regularizer, static_argnums=1)(params, spec, targets)) < 1e-10
    # the new task's embedding and the old tasks' embeddings do not move the regulariser's gradient target
    g = jax.grad(C.hnet_regularizer)(dict(params, w_out=params["w_out"] + 0.01), spec, targets)
    assert float(jnp.abs(g["task_emb"]).max()) == 0.0 and float(jnp.abs(g["w_out"]).max()) > 0
    changed = dict(params, w_out=params["w_out"] + 0.01)
    out = H.generate(changed, spec, [0, 1])
    want = float(jnp.mean(jnp.sum((out - targets) ** 2, -1)))
    got = float(C.hnet_regularizer(changed, spec, targets))
    assert got > 0 and got == pytest.approx(want, rel=1e-6)
    # a mask keeps rows: one row kept is that row's error; no row kept is 0
    err1 = float(jnp.sum((out[1] - targets[1]) ** 2))
    assert float(C.hnet_regularizer(changed, spec, targets, np.array([False, True]))) == pytest.approx(err1, rel=1e-6)
    assert float(C.hnet_regularizer(changed, spec, targets, np.array([False, False]))) == 0.0
    with pytest.raises(ValueError, match="targets must have shape \\[tasks, 35\\]"):
        C.hnet_regularizer(params, spec, targets[:, :5])


# ----------------------------------------------------------------------------- Hebbian projection


def _known_covariance(n=8, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.array([10.0, 8.0, 6.0, 2.0, 1.0, 0.5, 0.3, 0.1])
    cov = q @ np.diag(lam) @ q.T
    return rng, np.linalg.cholesky(cov), np.linalg.eigh(cov)[1][:, ::-1]


def test_hebbian_projector_finds_the_top_principal_subspace_then_the_next():
    rng, chol, eig = _known_covariance()
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    tx = C.hebbian_projection({"w": True, "b": False}, 5, lr=0.3)
    state = C.hebbian_start_task(tx.init(params), 3)
    observe = jax.jit(lambda s, x: C.hebbian_observe(s, {"w": x, "b": None}, lr=0.3))
    for _ in range(400):
        state = observe(state, jnp.asarray(rng.normal(size=(256, 8)) @ chol.T, jnp.float32))
    lateral = np.asarray(state.lateral["w"][:3])
    assert np.degrees(scipy.linalg.subspace_angles(lateral.T, eig[:, :3])).max() < 3.0
    np.testing.assert_allclose(lateral @ lateral.T, np.eye(3), atol=0.02)  # Oja's rule keeps the rows orthonormal
    state = C.hebbian_start_task(C.hebbian_consolidate(state), 2)
    for _ in range(400):
        state = observe(state, jnp.asarray(rng.normal(size=(256, 8)) @ chol.T, jnp.float32))
    basis = np.asarray(C.hebbian_consolidate(state).basis["w"])
    np.testing.assert_allclose(basis.T @ basis, np.diag([1.0] * 5), atol=1e-5)
    assert np.degrees(scipy.linalg.subspace_angles(basis, eig[:, :5])).max() < 3.0
    with pytest.raises(ValueError, match="exceed k_max=5"):
        C.hebbian_start_task(C.hebbian_consolidate(state), 1)


def test_projected_updates_are_orthogonal_to_the_stored_subspace_inside_a_chain():
    rng, chol, _ = _known_covariance()
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    proj = C.hebbian_projection(lambda p: {"w": True, "b": False}, 4, lr=0.3)
    tx = optax.chain(optax.adam(1e-2), proj)
    state = tx.init(params)
    state = (state[0], C.hebbian_start_task(state[1], 3))
    x = jnp.asarray(rng.normal(size=(64, 8)) @ chol.T, jnp.float32)
    grads = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.ones((4,))}
    upd, state = tx.update(grads, state, params, hebbian_inputs={"w": x, "b": None})  # nothing stored yet
    assert float(jnp.abs(upd["w"]).min()) > 0
    assert not np.allclose(state[1].lateral["w"], tx.init(params)[1].lateral["w"])  # the Hebbian step ran
    state = (state[0], C.hebbian_consolidate(state[1]))
    U = np.asarray(state[1].basis["w"][:, :3])
    upd, _ = tx.update(grads, state, params)
    assert np.abs(U.T @ np.asarray(upd["w"])).max() < 1e-6
    np.testing.assert_allclose(np.asarray(C.project_out(upd["w"], state[1].basis["w"])), upd["w"], atol=1e-6)
    # on an input of the stored subspace the layer's output does not move
    assert np.abs((x @ U @ U.T) @ np.asarray(upd["w"])).max() < 1e-5
    with pytest.raises(ValueError, match="projected leaf 0 must be a 2-d weight"):
        C.hebbian_projection({"w": False, "b": True}, 2).init(params)


# ----------------------------------------------------------------------------- EWC and metrics


def test_ewc_penalty_by_hand():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    anchor = {"a": jnp.array([0.0, 2.0]), "b": jnp.array(1.0)}
    fisher = {"a": jnp.array([2.0, 5.0]), "b": jnp.array(0.5)}
    # 4/2 · (2·1² + 5·0² + 0.5·2²) = 8; a second anchor at params adds nothing
    assert float(C.ewc_penalty(params, [(anchor, fisher)], 4.0)) == pytest.approx(8.0)
    assert float(C.ewc_penalty(params, [(anchor, fisher), (params, fisher)], 4.0)) == pytest.approx(8.0)
    assert float(C.ewc_penalty(params, [], 4.0)) == 0.0


def test_ewc_merge_has_the_same_gradient_as_the_anchors():
    rng = np.random.default_rng(1)
    params = {"a": jnp.asarray(rng.normal(size=4), jnp.float32)}
    anchors = [({"a": jnp.asarray(rng.normal(size=4), jnp.float32)}, {"a": jnp.asarray(f, jnp.float32)})
               for f in ([1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.5, 0.0])]
    merged = C.ewc_merge(anchors)
    g_all = jax.grad(C.ewc_penalty)(params, anchors, 2.0)
    g_one = jax.grad(C.ewc_penalty)(params, [merged], 2.0)
    np.testing.assert_allclose(g_one["a"], g_all["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[1]["a"], [4.0, 0.0, 2.5, 0.0])
    assert float(merged[0]["a"][1]) == float(anchors[0][0]["a"][1])  # no Fisher: the first anchor, harmless


def test_fisher_diagonal_of_logistic_regression_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 3)).astype(np.float32), (rng.random(10) < 0.5).astype(np.float32)
    w = jnp.asarray(rng.normal(size=3), jnp.float32)

    def loglik(params, xi, yi):
        z = xi @ params["w"]
        return yi * jax.nn.log_sigmoid(z) + (1 - yi) * jax.nn.log_sigmoid(-z)

    F = C.fisher_diagonal(loglik, {"w": w}, x, y, chunk=3)
    p = 1 / (1 + np.exp(-x @ np.asarray(w)))
    np.testing.assert_allclose(F["w"], np.mean(((y - p)[:, None] * x) ** 2, 0), rtol=1e-5)


def test_metrics_on_a_hand_made_accuracy_matrix():
    R = np.array([[0.9, np.nan, np.nan],
                  [0.7, 0.8, np.nan],
                  [0.6, 0.85, 0.95]])
    assert C.average_accuracy(R) == pytest.approx((0.6 + 0.85 + 0.95) / 3)
    # task 0: best 0.9 → 0.6 (0.3); task 1: best 0.8 → 0.85 (−0.05)
    assert C.forgetting(R) == pytest.approx((0.3 - 0.05) / 2)
    assert C.backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)
    assert C.forgetting([[0.5]]) == 0.0 and C.average_accuracy([[0.5]]) == 0.5
    with pytest.raises(ValueError, match="square accuracy matrix"):
        C.forgetting(np.ones((2, 3)))


# ----------------------------------------------------------------------------- tasks and experiment


def test_task_sequences_are_deterministic_and_disjoint():
    split = T.sequence("split", 5, seed=3)
    again = T.sequence("split", 5, seed=3)
    assert sorted(c for t in split for c in t.classes) == list(range(10))
    for a, b in zip(split, again):
        assert a.classes == b.classes and np.array_equal(a.x_train, b.x_train)
        assert a.num_classes == 2 and set(np.unique(a.y_train)) == {0, 1} and a.features == 64
    perm = T.sequence("permuted", 3, seed=1)
    assert perm[0].permutation.tolist() == list(range(64))
    np.testing.assert_array_equal(perm[2].x_train, perm[0].x_train[:, perm[2].permutation])
    assert T.chance(split) == 0.5 and T.chance(perm) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="num_tasks=3: a split"):
        T.sequence("split", 3)
    with pytest.raises(ValueError, match="kind='rotated' is not one of"):
        T.sequence("rotated", 3)


def test_continual_experiment_two_steps(tmp_path):
    import continual

    rows = continual.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "continual"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    runs = [r for r in rows if r["kind"] == "run"]
    assert {r["method"] for r in runs} == {"finetune", "ewc", "hnet", "hlop"}
    for r in runs:
        R = np.array(r["R"], dtype=float)
        assert R.shape == (2, 2) and np.all((R[np.tril_indices(2)] >= 0) & (R[np.tril_indices(2)] <= 1))
        assert r["acc"] == pytest.approx(C.average_accuracy(R)) and r["machine"] and r["date"] and r["paper"]
    table = (out / "table.md").read_text()
    assert "| hnet |" in table and "chance" in table and (out / "plot.png").exists()
