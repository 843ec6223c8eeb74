"""Analysis tools against closed forms and planted structure: unit matching (convergent learning), the interaction
basis (a linear layer's is its SVD), criticality constants and kernel recursions (against Monte Carlo), exact
permutation ensembles, the substitution cipher; clear errors; each experiment for two steps at tiny size."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.analysis import criticality as CR
from seqjax.analysis import interaction as IB
from seqjax.analysis import matching as MA
from seqjax.analysis import permutation as PE
from seqjax.tasks import IGNORE
from seqjax.tasks import cipher as CI

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


# ----------------------------------------------------------------------------- matching


def test_hungarian_recovers_a_permutation_of_units():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 12))
    perm = rng.permutation(12)
    b = a[:, perm] * rng.uniform(0.5, 2, 12) + 0.05 * rng.normal(size=(500, 12))  # b_j = scaled a_perm[j] + noise
    m = MA.match_units(a, b)
    assert np.array_equal(m.cols[np.argsort(m.rows)], np.argsort(perm))
    assert m.corr.min() > 0.98 and MA.near_perfect_fraction(m, 0.98) == 1.0
    semi = MA.match_units(a, b, method="semi")
    assert np.array_equal(semi.cols, np.argsort(perm))


def test_hungarian_uses_each_unit_once_where_semi_matching_repeats():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 400))
    a, b = np.stack([x, x + 0.5 * y], 1), np.stack([x, y], 1)  # both of a's units follow b_0 best
    assert MA.match_units(a, b, "semi").cols.tolist() == [0, 0]
    assert MA.match_units(a, b).cols.tolist() == [0, 1]


def test_sparse_prediction_recovers_planted_one_to_many_map():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(800, 10))
    # b0 = a3 (one-to-one); b1 = a1 + a7 (two-to-one); b2 = a0 + a2 + a5 (three-to-one)
    b = np.stack([a[:, 3], a[:, 1] + a[:, 7], a[:, 0] + a[:, 2] + a[:, 5]], 1) + 0.05 * rng.normal(size=(800, 3))
    sp = MA.sparse_prediction(a, b, alpha=0.05)
    assert [p.tolist() for p in sp.predictors(0.2)] == [[3], [1, 7], [0, 2, 5]]
    assert sp.r2.min() > 0.9


def test_spectral_groups_recover_planted_groups():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(600, 3))  # three latent factors, each spanned by units of both networks
    a = np.concatenate([z[:, [g]] * rng.uniform(0.5, 1.5, (1, 3)) for g in range(3)], 1) + 0.2 * rng.normal(size=(600, 9))
    b = np.concatenate([z[:, [g]] * rng.uniform(0.5, 1.5, (1, 2)) for g in range(3)], 1) + 0.2 * rng.normal(size=(600, 6))
    la, lb = MA.spectral_groups(a, b, 3)
    truth_a, truth_b = np.repeat(np.arange(3), 3), np.repeat(np.arange(3), 2)
    # same partition up to relabelling
    for labels, truth in ((la, truth_a), (lb, truth_b)):
        for g in range(3):
            assert len(set(labels[truth == g])) == 1
    assert len({la[0], la[3], la[6]}) == 3
    assert [la[0], la[3], la[6]] == [lb[0], lb[2], lb[4]]


def test_matching_errors_name_the_problem():
    with pytest.raises(ValueError, match="same samples"):
        MA.match_units(np.zeros((10, 3)), np.zeros((9, 3)))
    with pytest.raises(ValueError, match="samples, units"):
        MA.correlation(np.zeros(10), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="method"):
        MA.match_units(np.ones((4, 2)), np.ones((4, 2)), method="greedy")
    with pytest.raises(ValueError, match="n_groups"):
        MA.spectral_groups(np.ones((4, 2)), np.ones((4, 2)), 9)


# ----------------------------------------------------------------------------- interaction basis


def _whitened(n, d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, d)))
    return q * np.sqrt(n)  # E[f fᵀ] = I exactly


def _align_sign(A, B):
    return A * np.sign(np.sum(A * B, 0, keepdims=True))


def test_interaction_basis_of_a_linear_layer_is_its_svd():
    d_in, d_out = 6, 5
    rng = np.random.default_rng(4)
    W = rng.normal(size=(d_out, d_in))
    W[-1] = W[0] + W[1]  # rank 4: one null direction of the Jacobian metric is dropped
    f0 = _whitened(400, d_in, 5)
    fn = lambda x: jnp.asarray(W, jnp.float32) @ x
    f1 = f0 @ W.T
    bases = IB.interaction_bases([fn], [f0, f1])
    _, s, vt = np.linalg.svd(W)
    assert bases[0].rank == 4 and bases[1].rank == 4
    np.testing.assert_allclose(bases[0].eigvals, s[:4] ** 2, rtol=1e-4)
    np.testing.assert_allclose(np.abs(bases[0].C.T @ vt[:4].T), np.eye(4), atol=1e-4)  # right singular vectors
    # the next layer's PCA basis holds the left singular vectors, so every feature talks to one feature
    E = IB.interaction_graph(fn, f0, bases[0], bases[1])
    np.testing.assert_allclose(np.sort(np.diag(E))[::-1], s[:4] ** 2, rtol=1e-3)
    assert np.abs(E - np.diag(np.diag(E))).max() < 1e-6 * E.max()
    assert IB.edge_sparsity(E) == pytest.approx(4 / 16)


def test_importance_scaled_basis_of_a_linear_layer_is_its_svd_scaled_by_sigma():
    rng = np.random.default_rng(7)
    W = rng.normal(size=(4, 6))
    f0 = _whitened(300, 6, 8)
    fn = lambda x: jnp.asarray(W, jnp.float32) @ x
    b = IB.interaction_bases([fn], [f0, f0 @ W.T], importance=True)[0]
    _, s, vt = np.linalg.svd(W)
    np.testing.assert_allclose(b.eigvals, s**2, rtol=1e-4)  # Λ_i = E[g̃_i f̃_i] = σ_i²
    np.testing.assert_allclose(np.abs(b.C.T @ vt[:4].T), np.diag(s), rtol=1e-4, atol=1e-4)  # columns σ_i v_i
    np.testing.assert_allclose((f0 @ b.C) @ b.C_pinv, f0 @ vt[:4].T @ vt[:4], atol=1e-5)


def test_interaction_basis_drops_null_activation_directions_and_reconstructs():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 5))  # rank-3 activations in 5 dims
    W = rng.normal(size=(4, 5))
    fn = lambda x: jnp.tanh(jnp.asarray(W, jnp.float32) @ x)
    b = IB.interaction_basis(fn, f)
    assert b.rank == 3
    fh = f @ b.C
    np.testing.assert_allclose(fh.T @ fh / len(f), np.eye(3), atol=1e-6)  # whitened features
    np.testing.assert_allclose(fh @ b.C_pinv, f, atol=1e-6)


def test_modularity_of_two_disjoint_cliques():
    A = np.zeros((6, 6))
    A[:3, :3] = A[3:, 3:] = 1
    np.fill_diagonal(A, 0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert IB.modularity(A, labels) == pytest.approx(0.5)  # 1 − 2·(1/2)²
    assert IB.modularity(A, np.zeros(6)) == pytest.approx(0.0)
    found = IB.find_modules(A + 1e-3 * (1 - np.eye(6)), 2)
    assert len(set(found[:3])) == 1 and len(set(found[3:])) == 1 and found[0] != found[3]
    L = IB.layered_adjacency([np.eye(2), np.ones((1, 2))])
    assert L.shape == (5, 5) and L[2, 0] == L[0, 2] == 1 and L[4, 2] == 1


def test_interaction_errors_name_the_problem():
    f0, f1 = np.ones((10, 3)), np.ones((9, 2))
    with pytest.raises(ValueError, match="same 10 samples"):
        IB.interaction_bases([lambda x: x[:2]], [f0, f1])
    with pytest.raises(ValueError, match="no map"):
        IB.interaction_bases([None], [f0, np.ones((10, 2))])
    with pytest.raises(ValueError, match="no Jacobian"):
        IB.interaction_basis(lambda x: (x > 0).astype(jnp.int32), np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match="one map per pair"):
        IB.interaction_bases([], [f0, f0])


# ----------------------------------------------------------------------------- criticality


def test_critical_constants_are_the_textbook_values():
    assert CR.critical_init("tanh") == (0.0, 1.0)
    assert CR.critical_init("relu") == (0.0, 2.0)
    assert CR.critical_init("linear") == (0.0, 1.0)
    assert CR.susceptibilities("relu", 2.0, 0.7) == (1.0, 1.0)
    chi_par, chi_perp = CR.susceptibilities("tanh", 1.0, 1e-4)
    assert chi_par == pytest.approx(1.0, abs=1e-3) and chi_perp == pytest.approx(1.0, abs=1e-3)
    # ReLU at criticality: the kernel is the same at every depth; off it, it grows or shrinks by C_W/2 per layer
    np.testing.assert_allclose(CR.kernel_recursion("relu", 2.0, 0.0, 1.3, 20), 1.3)
    np.testing.assert_allclose(CR.kernel_recursion("relu", 2.5, 0.0, 1.0, 5), 1.25 ** np.arange(5))
    # tanh at criticality: K* = 0 approached as 1/(2ℓ)
    K = CR.kernel_recursion("tanh", 1.0, 0.0, 1.0, 2000)
    assert K[-1] * 2 * 2000 == pytest.approx(1.0, rel=0.05)
    assert CR.fixed_point("tanh", 0.8, 0.0) < 1e-8 and CR.fixed_point("relu", 2.2, 0.0) == float("inf")
    assert CR.fixed_point("tanh", 2.0, 0.0) > 0.5  # chaotic phase: a nonzero fixed point ...
    assert CR.susceptibilities("tanh", 2.0, CR.fixed_point("tanh", 2.0, 0.0))[1] > 1  # ... where gradients explode


def test_gauss_expect_closed_forms():
    assert CR.gauss_expect(lambda z: z**2, 2.5) == pytest.approx(2.5)
    assert CR.gauss_expect(lambda z: z**4, 2.0) == pytest.approx(12.0)
    # the arc-cosine kernel equals quadrature of ReLU products
    k = CR.kernel_recursion_pair("relu", 2.0, 0.0, [[1.0, 0.3], [0.3, 2.0]], 2)[1]
    mc = np.random.default_rng(0).multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 2.0]], 400_000)
    np.testing.assert_allclose(k, 2.0 * np.maximum(mc, 0).T @ np.maximum(mc, 0) / len(mc), rtol=0.02)


@pytest.mark.parametrize("activation,C_W,C_b", [("tanh", 1.0, 0.0), ("tanh", 1.5, 0.1), ("relu", 2.0, 0.0)])
def test_kernel_recursion_matches_monte_carlo(activation, C_W, C_b):
    x = np.ones((1, 16), np.float32) * np.sqrt(1.5)  # ‖x‖²/n_0 = 1.5
    K1 = C_b + C_W * 1.5
    want = CR.kernel_recursion(activation, C_W, C_b, K1, 6)
    Ks = np.stack([CR.mlp_diagnostics(jax.random.PRNGKey(s), jnp.asarray(x), activation, 512, 6, C_W, C_b).K
                   for s in range(24)])
    np.testing.assert_allclose(Ks.mean(0), want, rtol=0.08)


def test_gradients_scale_by_chi_perp_per_layer_and_rnn_kernel():
    x = jnp.ones((8, 32)) * 0.5
    d = CR.mlp_diagnostics(jax.random.PRNGKey(0), x, "relu", 1024, 10, 2.4, 0.0)
    ratio = d.grad_sq[:-1] / d.grad_sq[1:]
    np.testing.assert_allclose(np.exp(np.log(ratio).mean()), 1.2, rtol=0.1)  # χ_⊥ = C_W / 2
    xs = jax.random.normal(jax.random.PRNGKey(1), (16, 12, 8)) * 0.5
    r = CR.rnn_diagnostics(jax.random.PRNGKey(2), xs, "tanh", 512, 1.0, 0.0, C_U=1.0)
    want = CR.rnn_kernel_recursion("tanh", 1.0, 0.0, 1.0, np.mean(np.asarray(xs) ** 2, axis=(0, 2)))
    np.testing.assert_allclose(r.K, want, rtol=0.15)


@pytest.mark.parametrize("widths", [(3, 8, 16), (3, 8, 16, 16), (3, 8, 8, 16, 16)])
def test_mlp_forward_of_unequal_widths_matches_a_python_loop(widths):
    """Only square layers of the carry's width share the scan; the others run one by one."""
    params = CR.init_mlp(jax.random.PRNGKey(4), widths, 1.0, 0.1)
    x = jax.random.normal(jax.random.PRNGKey(5), (5, widths[0]))
    want, h = [], x
    for W, b in params:
        want.append(h @ W + b[None, :])
        h = jnp.tanh(want[-1])
    got = CR.mlp_forward(params, x, "tanh")
    assert [z.shape for z in got] == [(5, n) for n in widths[1:]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_criticality_errors():
    with pytest.raises(ValueError, match="activation"):
        CR.critical_init("sigmoid")
    with pytest.raises(ValueError, match="x must have 2 dims"):
        CR.mlp_diagnostics(jax.random.PRNGKey(0), jnp.ones(3), "tanh", 4, 2, 1.0, 0.0)


# ----------------------------------------------------------------------------- permutations


def test_permutation_ensemble_is_exact_on_every_nonzero_binary_input():
    k, perm = 3, np.array([2, 0, 1])
    params = PE.train_ensemble(jax.random.PRNGKey(0), perm, 32, 256, steps=400)
    X, Y = PE.permutation_pairs(perm)
    np.testing.assert_allclose(jax.vmap(PE.apply, (0, None))(params, jnp.asarray(X)), np.broadcast_to(Y, (32, k, k)), atol=1e-3)
    bits, x = PE.nonzero_binary_inputs(k)
    assert bits.shape == (7, 3)
    outs = np.asarray(jax.vmap(PE.apply, (0, None))(params, jnp.asarray(x)))
    assert PE.exact_fraction(outs.mean(0), bits, perm, "top_s") == 1.0
    multi = bits.sum(1) >= 2  # the paper's sign rule, on the inputs outside the training set
    assert PE.exact_fraction(outs[:, multi].mean(0), bits[multi], perm, "sign") == 1.0


def test_permutation_scoring_by_hand():
    perm = np.array([1, 2, 0])  # P e_0 = e_1, P e_1 = e_2, P e_2 = e_0
    bits = np.array([[1, 0, 0], [1, 1, 0]])
    good = np.array([[-0.1, 0.9, -0.2], [-0.1, 0.4, 0.3]])
    assert PE.exact_fraction(good, bits, perm) == 1.0
    assert PE.exact_fraction(np.array([[0.1, 0.9, -0.2], [-0.1, 0.4, 0.3]]), bits, perm) == 0.5
    assert PE.exact_fraction(np.array([[0.5, 0.9, 0.2], [0.0, 0.4, 0.3]]), bits, perm, "top_s") == 1.0
    outs = np.stack([good + [[0.3, 0, 0], [0, 0, 0]], good - [[0.2, 0, 0], [0, 0, 0]], good])  # 1st alone wrong
    assert PE.ensemble_size_needed(outs, bits, perm) == 2


def test_permutation_errors():
    with pytest.raises(ValueError, match="too large to enumerate"):
        PE.nonzero_binary_inputs(PE.MAX_ENUMERATE_K + 1)
    with pytest.raises(ValueError, match="permutation"):
        PE.permutation_pairs([0, 0, 1])
    with pytest.raises(ValueError, match="rounding"):
        PE.round_outputs(np.zeros((1, 2)), rounding="half")


# ----------------------------------------------------------------------------- cipher


def test_cipher_key_is_a_bijection_and_inverts():
    key = CI.substitution_key(50, seed=3, keep=(0,))
    assert sorted(key.tolist()) == list(range(50)) and key[0] == 0
    assert not np.array_equal(key, np.arange(50))
    plain = np.random.default_rng(0).integers(0, 50, (4, 20))
    b = CI.cipher_batch(plain, 50, seed=1)
    for row, c, k in zip(plain, b.inputs, b.meta):
        assert np.array_equal(CI.invert_key(k)[c], row)
    assert not np.array_equal(b.meta[0], b.meta[1])  # a fresh key per row
    np.testing.assert_array_equal(CI.cipher_batch(plain, 50, seed=1).inputs, b.inputs)  # deterministic
    for i, k in enumerate(b.meta):  # row i's key: the seed sequence (seed, i), distinct for distinct pairs
        np.testing.assert_array_equal(k, CI.substitution_key(50, (1, i)))


def test_decipher_accuracy_by_hand():
    plain = np.array([[1, 2, 3], [4, 5, IGNORE]])
    pred = np.array([[1, 0, 3], [4, 0, 7]])
    acc, per = CI.decipher_accuracy(pred, plain, per_position=True)
    assert acc == pytest.approx(3 / 5)
    np.testing.assert_allclose(per, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="bijection"):
        CI.invert_key([0, 0, 2])
    with pytest.raises(ValueError, match="shape"):
        CI.decipher_accuracy(pred[:, :2], plain)
    with pytest.raises(ValueError, match="tokens must be ids"):
        CI.encipher([5], np.arange(3))


# ----------------------------------------------------------------------------- experiments, two steps at tiny size


def _written(tmp_path, name):
    d = tmp_path / name
    assert {p.name for p in d.iterdir()} == {"records.jsonl", "table.md", "plot.png"}
    records = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
    assert records and all({"machine", "date", "seed"} <= set(r) for r in records)
    return records, (d / "table.md").read_text()


def test_criticality_experiment_two_steps(tmp_path):
    import criticality

    rows = criticality.main(["--preset=tiny", f"--out={tmp_path}"])
    records, table = _written(tmp_path, "criticality")
    assert len(records) == len(rows) == 9 + 2 + 2  # 9 propagation rows, 2 C_W × 1 depth, 2 (L, n) pairs
    relu = next(r for r in records if r["kind"] == "propagation" and r["activation"] == "relu" and r["critical"])
    assert relu["K_theory"] == pytest.approx(1.0) and relu["grad_theory"] == pytest.approx(1.0)
    assert "Trainability" in table and "Depth-to-width" in table


def test_convergent_experiment_two_steps(tmp_path):
    import convergent

    rows = convergent.main(["--preset=tiny", f"--out={tmp_path}"])
    records, table = _written(tmp_path, "convergent")
    assert {r["layer"] for r in records} == {"embed", "rnn1", "logits"} and {r["state"] for r in rows} == {"trained", "init"}
    assert all(0.0 <= r["near_perfect"] <= 1.0 and -1.0 <= r["mean_corr"] <= 1.0 for r in records)


def test_permutation_learning_experiment_two_steps(tmp_path):
    import permutation_learning

    permutation_learning.main(["--preset=tiny", f"--out={tmp_path}"])
    records, table = _written(tmp_path, "permutation_learning")
    assert [r["k"] for r in records] == [3] and records[0]["paper_size_90_two_hot"] == 2
    assert "| 3 | 3 |" in table


def test_interaction_basis_experiment_two_steps(tmp_path):
    import interaction_basis

    interaction_basis.main(["--preset=tiny", f"--out={tmp_path}"])
    records, table = _written(tmp_path, "interaction_basis")
    basis = {r["basis"]: r for r in records if r["kind"] == "basis"}
    assert set(basis) == {"interaction", "interaction+Λ", "pca", "neuron"}
    assert basis["neuron"]["ranks"] == [64, 8, 8, 10] and all(0 < s <= 1 for s in basis["interaction"]["sparsity"])


def test_lexinvariant_experiment_two_steps(tmp_path):
    import lexinvariant

    lexinvariant.main(["--preset=tiny", f"--out={tmp_path}"])
    records, table = _written(tmp_path, "lexinvariant")
    ppl = [r for r in records if r["kind"] == "ppl"]
    assert {(r["embedding"], r["text"]) for r in ppl} == {(e, t) for e in ("standard", "lexinvariant") for t in ("plain", "cipher")}
    assert all(r["ppl"] > 1 for r in ppl)
    assert all(0 <= r["acc"] <= 1 for r in records if r["kind"] == "decipher")
