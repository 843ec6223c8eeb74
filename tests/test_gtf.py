"""Generalized teacher forcing and the dynamical-systems measures: GTF at α = 0 is BPTT of the free-running model and at
α = 1 is teacher forcing (loss and every gradient); the forced recursion against a plain loop (fixed α, sparse, partial
forcing); the Jacobian and the α estimate against autodiff and numpy; D_stsp and D_H zero on identical trajectories and
equal to closed forms (two Gaussians, sinusoids); Lyapunov exponents of a linear map (log of its eigenvalues) and of
Lorenz-63 (≈ 0.9, summing to the divergence); the ODEs and RK4 by hand; clear errors; the experiment for two steps."""

import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from seqjax.analysis import dynamics as A
from seqjax.rnn import cells
from seqjax.tasks import dynamics as D
from seqjax.train import gtf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def _params(m=3, l_=16, n=None, seed=0):
    p = gtf.init_params(jax.random.PRNGKey(seed), m, l_, n)
    return dict(p, b=0.1 * jax.random.normal(jax.random.PRNGKey(seed + 7), p["b"].shape))  # a nonzero h1


def _x(b=2, t=13, n=3, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, t, n), jnp.float32)


def _F(p, z):  # the shPLRNN written out, independent of the cell
    pre = z @ p["W2"].T
    return p["A"][None] * z + (jax.nn.relu(pre + p["h2"][None]) - jax.nn.relu(pre)) @ p["W1"].T + p["b"][0]


def _reference_forward(p, x, alpha, tau):
    n = x.shape[-1]
    z = gtf.initial_state(p, x[:, 0])
    out = []
    for t in range(2, x.shape[1] + 1):  # 1-based time, as in the paper
        z = _F(p, z)
        out.append(z)
        if (t - 1) % tau == 0:
            z = jnp.concatenate([(1 - alpha) * z[:, :n] + alpha * x[:, t - 1], z[:, n:]], -1)
    return jnp.stack(out, 1)


def _assert_tree_close(a, b, **kw):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], **kw, err_msg=k)


# ----------------------------------------------------------------------------- GTF


def test_gtf_alpha_zero_is_bptt_of_the_free_running_model():
    p, x = _params(), _x()

    def free_running(p):
        z, preds = x[:, 0], []
        for _ in range(x.shape[1] - 1):
            z = _F(p, z)
            preds.append(z)
        return jnp.mean((jnp.stack(preds, 1) - x[:, 1:]) ** 2)

    l_ref, g_ref = jax.value_and_grad(free_running)(p)
    l_gtf, g_gtf = jax.value_and_grad(gtf.loss)(p, x, 0.0)
    np.testing.assert_allclose(l_gtf, l_ref, rtol=1e-5)
    _assert_tree_close(g_gtf, g_ref, rtol=1e-4, atol=1e-6)


def test_gtf_alpha_one_is_full_teacher_forcing():
    p, x = _params(), _x()
    one_step = lambda p: jnp.mean((_F(p, x[:, :-1].reshape(-1, 3)).reshape(x[:, 1:].shape) - x[:, 1:]) ** 2)
    l_ref, g_ref = jax.value_and_grad(one_step)(p)
    l_gtf, g_gtf = jax.value_and_grad(gtf.loss)(p, x, 1.0)
    np.testing.assert_allclose(l_gtf, l_ref, rtol=1e-5)
    _assert_tree_close(g_gtf, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,tau,m", [(0.3, 1, 3), (1.0, 4, 3), (0.6, 3, 5)])
def test_gtf_forced_recursion_matches_a_plain_loop(alpha, tau, m):
    p, x = _params(m=m, n=3), _x()
    np.testing.assert_allclose(gtf.forward(p, x, alpha, tau), _reference_forward(p, x, alpha, tau), rtol=1e-5,
                               atol=1e-6)
    g = jax.grad(gtf.loss)(p, x, alpha, tau)
    g_ref = jax.grad(lambda p: jnp.mean((_reference_forward(p, x, alpha, tau)[..., :3] - x[:, 1:]) ** 2))(p)
    _assert_tree_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert set(g) == set(p) and ("L0" in g) == (m > 3)


def test_gtf_bounds_the_jacobian_product_by_one_minus_alpha():
    # d z_T / d z_1 = J (prod over the T-2 forced steps of (1 - alpha) J): with N >= ||J|| everywhere (the
    # parameter bound) and alpha = 1 - 1/N, its norm is at most N, however long the sequence
    p, x = _params(l_=32), _x(b=1, t=30)
    a, nrm = gtf.estimate_alpha(p, x, "jacobian_upper_bound")
    assert float(nrm) > 1.0 and 0.0 < float(a) < 1.0
    prod = jax.jacrev(lambda z1: gtf.forward(p, x.at[:, 0].set(z1), float(a))[:, -1])(x[:, 0]).reshape(3, 3)
    assert float(jnp.linalg.norm(prod, 2)) <= float(nrm) * (1 + 1e-5)


def test_jacobian_matches_autodiff_and_the_cell():
    p = _params(m=4, l_=20)
    z = jax.random.normal(jax.random.PRNGKey(3), (5, 4))
    j_ad = jax.vmap(jax.jacfwd(lambda v: gtf.step(p, v[None])[0]))(z)
    np.testing.assert_allclose(gtf.jacobian(p, z), j_ad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gtf.step(p, z), _F(p, z), rtol=1e-6, atol=1e-6)
    diag = cells.diag_jacobian("shplrnn", p, z[:, None, None], None)[:, 0, 0]
    np.testing.assert_allclose(jnp.diagonal(gtf.jacobian(p, z), axis1=-2, axis2=-1), diag, rtol=1e-5, atol=1e-6)


def test_alpha_estimate_is_the_product_bound():
    p, x = _params(l_=32, seed=2), 2.0 * _x(b=3, t=9)
    j = np.asarray(gtf.jacobian(p, x[:, 1:]))
    geo = np.exp(np.log(np.linalg.norm(j, 2, axis=(-2, -1))).mean(1)).max()
    a, nrm = gtf.estimate_alpha(p, x, "product_upper_bound")
    np.testing.assert_allclose(nrm, geo, rtol=1e-4)
    np.testing.assert_allclose(a, max(0.0, 1 - 1 / geo), rtol=1e-4, atol=1e-6)
    upper = np.abs(p["A"]).max() + np.linalg.norm(p["W1"], 2) * np.linalg.norm(p["W2"], 2)
    np.testing.assert_allclose(gtf.estimate_alpha(p, x, "jacobian_upper_bound")[1], upper, rtol=1e-5)
    assert gtf.anneal_alpha(0.2, 0.5) == 0.5  # jumps up at once
    assert gtf.anneal_alpha(0.5, 0.2, gamma=0.9) == pytest.approx(0.47)  # decays slowly


def test_spectral_norm_by_power_iteration():
    j = jax.random.normal(jax.random.PRNGKey(0), (50, 3, 3)) * jnp.array([3.0, 1.0, 0.3])[None, None]
    np.testing.assert_allclose(gtf.spectral_norm(j), np.linalg.norm(np.asarray(j), 2, axis=(-2, -1)), rtol=1e-4)


def test_fit_runs_and_bad_inputs_are_refused():
    x = D.dataset("lorenz63", 300, 300, seed=0).train
    params, hist = gtf.fit(x, gtf.GTFConfig(hidden=8, steps=3, batch_size=2, seq_len=20, alpha_every=1),
                           log_every=1)
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist) and hist[-1]["alpha"] < 1.0
    with pytest.raises(ValueError, match="alpha"):
        gtf.loss(params, jnp.asarray(x[None, :20]), 1.5)
    with pytest.raises(ValueError, match="alpha"):
        gtf.fit(x, gtf.GTFConfig(alpha=-0.1, steps=1, seq_len=20))
    for bad in (np.float32(1.5), np.array(-0.5), jnp.float32(1.5)):  # concrete non-Python scalars are checked too
        with pytest.raises(ValueError, match=re.escape("alpha (the forcing weight) must be in [0, 1]")):
            gtf.forward(params, jnp.asarray(x[None, :20]), bad)
    traced = jax.jit(lambda a: gtf.forward(params, jnp.asarray(x[None, :20]), a))(jnp.float32(0.5))  # traced: unchecked
    np.testing.assert_allclose(traced, gtf.forward(params, jnp.asarray(x[None, :20]), 0.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        gtf.estimate_alpha(params, jnp.asarray(x[None, :20]), "constant")
    with pytest.raises(ValueError, match="N = 3"):
        gtf.loss(params, jnp.zeros((1, 20, 2)), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        gtf.fit(np.where(np.arange(300)[:, None] == 7, np.nan, x), gtf.GTFConfig(steps=1, seq_len=20))
    with pytest.raises(ValueError, match="alpha_method"):
        gtf.fit(x, gtf.GTFConfig(alpha_method="median", steps=1, seq_len=20))


# ----------------------------------------------------------------------------- systems


def test_vector_fields_and_rk4_by_hand():
    np.testing.assert_allclose(D.lorenz63_rhs(np.array([1.0, 1.0, 1.0])), [0.0, 26.0, 1 - 8 / 3])
    np.testing.assert_allclose(D.rossler_rhs(np.array([1.0, 2.0, 3.0])), [-5.0, 1.4, 0.2 + 3 * (1 - 5.7)])
    np.testing.assert_allclose(D.lorenz96_rhs(np.full(6, 8.0)), np.zeros(6))  # the uniform fixed point
    e = np.eye(5)[0]  # dx_0/dt = (x_1 - x_3) x_4 - x_0 + F with the cyclic indices of the paper
    np.testing.assert_allclose(D.lorenz96_rhs(e, forcing=0.0), [-1, 0, 0, 0, 0])
    np.testing.assert_allclose(D.lorenz96_rhs(np.arange(5.0), forcing=0.0)[0], (1 - 3) * 4 - 0)
    h = 0.1  # RK4 on ds/dt = -s multiplies by the 4th-order Taylor polynomial of e^{-h}
    np.testing.assert_allclose(D.rk4_step(lambda s: -s, np.array([2.0]), h), 2 * (1 - h + h**2 / 2 - h**3 / 6 + h**4 / 24))


def test_dataset_is_standardised_noisy_and_deterministic():
    d = D.dataset("lorenz63", 2000, 500, noise=0.05, seed=3)
    np.testing.assert_allclose(d.train_clean.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(d.train_clean.std(0), 1, rtol=1e-4)
    np.testing.assert_allclose((d.train - d.train_clean).std(0), 0.05, rtol=0.1)
    assert d.test.shape == (500, 3) and not np.allclose(d.test[:500], d.train_clean[:500], atol=0.1)
    np.testing.assert_array_equal(D.dataset("lorenz63", 2000, 500, noise=0.05, seed=3).train, d.train)
    assert D.simulate("lorenz96", 10, dim=7).shape == (10, 7)
    # the sampled states follow the flow: one RK4 step of dt reproduces the next sample
    x = D.simulate("rossler", 50, seed=1).astype(np.float64)
    np.testing.assert_allclose(D.rk4_step(D.vector_field("rossler"), x[:-1], 0.1), x[1:], rtol=1e-3, atol=2e-3)


def test_bad_trajectories_are_refused():
    with pytest.raises(ValueError, match="x0 must have shape"):
        D.simulate("lorenz63", 10, x0=np.zeros(4))
    with pytest.raises(ValueError, match="system"):
        D.simulate("duffing", 10)
    with pytest.raises(ValueError, match="non-finite.*time step 2"):
        D.check_trajectory("x", np.array([[0.0, 1.0], [1.0, 2.0], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match="state dim N = 3"):
        D.check_trajectory("x", np.zeros((5, 2)), 3)
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        D.standardise(np.zeros(5))
    x = np.random.default_rng(0).normal(size=(100, 3))
    with pytest.raises(ValueError, match="non-finite"):
        A.state_space_divergence(x, np.where(x > 2, np.inf, x))
    with pytest.raises(ValueError, match="state dim"):
        A.power_spectrum_distance(x, x[:, :2])
    with pytest.raises(ValueError, match="length"):
        A.power_spectrum_distance(x, x[:50])
    with pytest.raises(ValueError, match="x_gen"):
        A.state_space_divergence_gmm(x, x[:, 0])


# ----------------------------------------------------------------------------- measures


def test_measures_vanish_on_identical_trajectories():
    x = D.simulate("lorenz63", 3000, seed=0)
    assert A.state_space_divergence(x, x) == 0.0
    assert A.state_space_divergence_gmm(x, x, max_T=500, mc_samples=200) == 0.0
    assert A.power_spectrum_distance(x, x) == 0.0
    y = D.simulate("lorenz63", 3000, seed=1)
    assert 0 < A.state_space_divergence(x, y) < A.state_space_divergence(x, 0.5 * y)
    assert 0 < A.power_spectrum_distance(x, y) < A.power_spectrum_distance(x, x[np.random.default_rng(0).permutation(3000)])


def test_binned_stsp_of_two_gaussians_is_their_binned_kl():
    n, mu, bins = 200_000, 0.5, 30
    q = norm.ppf((np.arange(n) + 0.5) / n)[:, None]  # deterministic Gaussian "trajectories": exact quantiles
    got = A.state_space_divergence(q, q + mu, bins)
    sd = q.std()
    edges = np.linspace(q.min() - 0.1 * sd, q.max() + 0.1 * sd, bins + 1)
    p_ = np.diff(norm.cdf(edges))
    q_ = np.diff(norm.cdf(edges - mu))
    p_, q_ = p_ / p_.sum(), q_ / q_.sum()
    np.testing.assert_allclose(got, np.sum(p_ * np.log(p_ / q_)), rtol=2e-3)
    np.testing.assert_allclose(got, mu**2 / 2, rtol=0.05)  # the continuous KL(N(0,1) || N(mu,1))


def test_gmm_stsp_of_two_gaussians_is_their_kl():
    a, b, s2, m = np.array([0.0, 1.0, 2.0]), np.array([1.0, 0.0, 2.5]), 0.5, 40_000
    x, y = np.tile(a, (20, 1)), np.tile(b, (20, 1))  # every mixture component at one point: one Gaussian each
    kl = np.sum((a - b) ** 2) / (2 * s2)
    got = A.state_space_divergence_gmm(x, y, sigma2=s2, mc_samples=m)
    assert abs(got - kl) < 4 * np.linalg.norm(a - b) / np.sqrt(s2 * m)  # Monte-Carlo error of the estimate


def test_power_spectrum_hellinger_of_sinusoids():
    t = np.arange(4096)
    s = lambda k, ph=0.0: np.sin(2 * np.pi * k * t / len(t) + ph)[:, None]
    # unsmoothed: each whole-period sinusoid is one frequency bin
    assert A.power_spectrum_distance(s(40), s(40, 1.0), sigma=0) == pytest.approx(0.0, abs=1e-6)  # phase-blind
    assert A.power_spectrum_distance(s(40), s(90), sigma=0) == pytest.approx(1.0, abs=1e-6)  # disjoint spectra
    both = s(40) + s(90)  # half the power at each: H² = 1 - sqrt(1/2)
    assert A.power_spectrum_distance(both, s(40), sigma=0) == pytest.approx(math.sqrt(1 - math.sqrt(0.5)), abs=1e-6)
    # smoothed: each spectrum is the Gaussian kernel (width sigma, cut at 4 sigma) around its bin, delta apart
    sig, delta = 10.0, 25
    j = np.arange(-40, 41)
    w = np.exp(-(j**2) / (2 * sig**2))
    w /= w.sum()
    bc = np.sum(np.sqrt(w[delta:] * w[:-delta]))  # Bhattacharyya coefficient of the two shifted kernels
    got = A.power_spectrum_distance(s(500), s(500 + delta), sigma=sig)
    assert got == pytest.approx(math.sqrt(1 - bc), abs=1e-6)
    assert got == pytest.approx(math.sqrt(1 - math.exp(-(delta**2) / (8 * sig**2))), abs=3e-3)  # untruncated


def test_lyapunov_of_a_linear_map_is_the_log_of_its_eigenvalues():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(3, 3))
    mat = jnp.asarray(p @ np.diag([1.5, 0.5, -0.3]) @ np.linalg.inv(p), jnp.float32)
    step = lambda s: mat @ s
    s0 = jnp.ones(3)
    np.testing.assert_allclose(A.max_lyapunov(step, s0, 200, burn_in=100), math.log(1.5), atol=1e-4)
    np.testing.assert_allclose(A.lyapunov_spectrum(step, s0, 200, burn_in=100),
                               np.log([1.5, 0.5, 0.3]), atol=1e-3)
    np.testing.assert_allclose(A.max_lyapunov(step, s0, 200, burn_in=100, dt=0.5), 2 * math.log(1.5), atol=2e-4)


def test_lyapunov_of_lorenz63_is_about_0_9():
    f = D.vector_field("lorenz63", xp=jnp)
    step = lambda s: D.rk4_step(f, s, 0.01)
    lam = A.lyapunov_spectrum(step, jnp.array([1.0, 1.0, 25.0]), 10_000, burn_in=1000, dt=0.01)
    assert abs(float(lam[0]) - 0.906) < 0.1
    assert abs(float(lam[1])) < 0.02  # the flow direction
    np.testing.assert_allclose(float(lam.sum()), -(10 + 1 + 8 / 3), rtol=1e-3)  # the constant divergence
    with pytest.raises(ValueError, match="k must be"):
        A.lyapunov_spectrum(step, jnp.ones(3), 10, k=4)


# ----------------------------------------------------------------------------- experiment


def test_gtf_experiment_two_steps(tmp_path):
    import gtf as experiment

    rows = experiment.main(["--preset=tiny", "--methods=agtf,bptt", f"--out={tmp_path}"])
    out = tmp_path / "gtf"
    assert {p.name for p in out.iterdir()} == {"records.jsonl", "table.md", "plot.png"}
    recs = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(recs) == len(rows) == 5 and {"machine", "date", "seed", "paper"} <= set(recs[0])
    models = [r for r in recs if r["kind"] == "model"]
    assert [r["method"] for r in models] == ["agtf", "bptt"] and models[1]["alpha_final"] == 0.0
    assert all(r["steps"] == 2 and r["d_h"] >= 0 for r in models)
    table = open(out / "table.md").read()
    row = next(line for line in table.splitlines() if line.startswith("| aGTF reconstructs the attractor"))
    verdict = re.search(r"\| (met|missed) \|$", row)
    want = "met" if models[0]["reconstructs"] and not models[1]["reconstructs"] else "missed"
    assert "BPTT" in table and verdict is not None and verdict.group(1) == want
