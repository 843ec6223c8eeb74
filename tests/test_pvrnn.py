"""PV-RNN: the KL against closed forms, the MTRNN step, the meta-prior's two limits, error regression's locality."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqjax.models import pvrnn as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

TAUS = (1.0, 4.0)
D, Z, XD = (6, 5), (2, 1), 2


def _setup(batch=2, steps=8, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = P.init_params(k1, XD, D, Z)
    A = {"mu": tuple(0.5 * jax.random.normal(jax.random.fold_in(k2, i), (batch, steps, z)) for i, z in enumerate(Z)),
         "sigma": tuple(-0.5 + 0.3 * jax.random.normal(jax.random.fold_in(k3, i), (batch, steps, z))
                        for i, z in enumerate(Z))}
    x = jax.random.normal(k4, (batch, steps, XD))
    return params, A, x


def _kl_hand(mq, sq, mp, sp):
    return np.sum(np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5, axis=-1)


def test_kl_matches_hand_formula_and_monte_carlo():
    rng = np.random.default_rng(0)
    mq, mp = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    lq, lp = 0.4 * rng.normal(size=(4, 3)), 0.4 * rng.normal(size=(4, 3))
    got = np.asarray(P.kl_diag_gaussian(*(jnp.asarray(a, jnp.float32) for a in (mq, lq, mp, lp))))
    np.testing.assert_allclose(got, _kl_hand(mq, np.exp(lq), mp, np.exp(lp)), rtol=1e-5, atol=1e-6)
    # Monte Carlo: E_q[log q(z) - log p(z)] with 400k draws per row
    z = mq[:, None] + np.exp(lq)[:, None] * rng.normal(size=(4, 400_000, 3))

    def logn(z, m, ls):
        return np.sum(-0.5 * ((z - m[:, None]) / np.exp(ls)[:, None]) ** 2 - ls[:, None] - 0.5 * np.log(2 * np.pi), -1)

    mc = np.mean(logn(z, mq, lq) - logn(z, mp, lp), axis=1)
    np.testing.assert_allclose(got, mc, atol=0.02)
    assert np.all(np.asarray(P.kl_diag_gaussian(*(jnp.asarray(a, jnp.float32) for a in (mq, lq, mq, lq)))) == 0)


def test_loss_is_reconstruction_plus_weighted_normalised_kl():
    params, A, x = _setup()
    key, w = jax.random.key(5), (0.3, 2.0)
    value, aux = P.loss(params, A, x, key, TAUS, w)
    x_hat, stats, _ = P.run(params, A, key, TAUS)
    rec = np.mean((np.asarray(x) - np.asarray(x_hat)) ** 2, -1)
    kl = sum(wl * _kl_hand(np.tanh(np.asarray(Aq)), np.exp(np.asarray(As)), np.asarray(s[2]), np.exp(np.asarray(s[3]))) / z
             for wl, Aq, As, s, z in zip(w, A["mu"], A["sigma"], stats, Z))
    np.testing.assert_allclose(float(value), np.mean(rec + kl), rtol=1e-5)
    # the prior at t = 0 is the unit Gaussian
    for s in stats:
        assert np.all(np.asarray(s[2][:, 0]) == 0) and np.all(np.asarray(s[3][:, 0]) == 0)


def test_mtrnn_with_tau_one_is_a_plain_rnn_step():
    h, pre = jnp.ones((3, 4)), jnp.arange(12.0).reshape(3, 4)
    assert np.array_equal(P.mtrnn_update(h, pre, 1.0), pre)
    np.testing.assert_allclose(P.mtrnn_update(h, pre, 4.0), 0.75 * h + 0.25 * pre, rtol=1e-6)
    # whole model, one layer, tau = 1, means only: d_t = tanh(W_dd d_{t-1} + W_zd tanh(A_t) + b)
    params = P.init_params(jax.random.key(1), XD, (5,), (3,))
    A = {"mu": (jax.random.normal(jax.random.key(2), (2, 6, 3)),), "sigma": (jnp.zeros((2, 6, 3)),)}
    x_hat, _, _ = P.run(params, A, jax.random.key(0), (1.0,), sample=False)
    p = jax.tree.map(np.asarray, params["layers"][0])
    d, ref = np.zeros((2, 5)), []
    for t in range(6):
        d = np.tanh(d @ p["w_dd"] + np.tanh(np.asarray(A["mu"][0][:, t])) @ p["w_zd"] + p["b"])
        ref.append(d @ np.asarray(params["w_out"]) + np.asarray(params["b_out"]))
    np.testing.assert_allclose(np.asarray(x_hat), np.stack(ref, 1), rtol=1e-5, atol=1e-6)


def test_meta_prior_zero_gives_prior_no_gradient():
    params, A, x = _setup()
    prior_keys = ("w_mu", "b_mu", "w_sig", "b_sig")
    for w, zero in ((0.0, True), (1.0, False)):
        g = jax.grad(lambda p, w=w: P.loss(p, A, x, jax.random.key(3), TAUS, w)[0])(params)
        for layer in g["layers"]:
            norms = [float(jnp.sum(jnp.abs(layer[k]))) for k in prior_keys]
            assert all(n == 0 for n in norms) if zero else sum(norms) > 1e-4


def _mean_kl(params, A):
    _, stats, _ = P.run(params, A, jax.random.key(0), TAUS, sample=False)
    return float(sum(jnp.mean(P.kl_diag_gaussian(*s)) for s in stats))


def test_large_meta_prior_pulls_posterior_to_prior():
    params, A, x = _setup(batch=1, steps=6)
    kls = {}
    for w in (0.001, 100.0):
        A_fit, _ = P.error_regression(params, A, x, jax.random.key(1), TAUS, w, window=6, iters=150, lr=0.05,
                                      sample=False)
        kls[w] = _mean_kl(params, A_fit)
    assert kls[100.0] < 0.02 and kls[100.0] < 0.1 * kls[0.001]


def test_error_regression_changes_only_the_window_and_lowers_its_loss():
    params, A, x = _setup(batch=2, steps=8)
    window = 3
    A_new, losses = P.error_regression(params, A, x, jax.random.key(7), TAUS, 0.1, window=window, iters=30,
                                       sample=False)
    for k in ("mu", "sigma"):
        for old, new in zip(A[k], A_new[k]):
            assert np.array_equal(np.asarray(old[:, :-window]), np.asarray(new[:, :-window]))
            assert np.all(np.any(np.asarray(old[:, -window:]) != np.asarray(new[:, -window:]), axis=(0, 2)))

    def window_loss(a):
        x_hat, stats, _ = P.run(params, a, jax.random.key(0), TAUS, sample=False)
        rec = jnp.mean((x - x_hat) ** 2, -1)
        kl = sum(0.1 * P.kl_diag_gaussian(*s) / z for s, z in zip(stats, Z))
        return float(jnp.mean((rec + kl)[:, -window:]))

    before, after = window_loss(A), window_loss(A_new)
    np.testing.assert_allclose([float(losses[0]), float(losses[-1])], [before, after], rtol=1e-5)
    assert after < 0.8 * before
    # predicting forward runs the prior after the observed steps
    future = P.predict(params, A_new, jax.random.key(0), TAUS, 4)
    full = P.run(params, A_new, jax.random.key(0), TAUS, horizon=4, sample=False)[0]
    assert future.shape == (2, 4, XD) and np.array_equal(np.asarray(future), np.asarray(full[:, -4:]))


def test_extending_from_the_prior_continues_the_prior_mean_path():
    params, A, _ = _setup(batch=2, steps=5)
    A_ext = P.extend_adaptive(params, A, TAUS, 3)
    for k in ("mu", "sigma"):
        for old, new in zip(A[k], A_ext[k]):
            assert new.shape[1] == 8 and np.array_equal(np.asarray(old), np.asarray(new[:, :5]))
    ahead = P.predict(params, A, jax.random.key(0), TAUS, 3)
    posterior = P.run(params, A_ext, jax.random.key(0), TAUS, sample=False)[0][:, -3:]
    np.testing.assert_allclose(np.asarray(posterior), np.asarray(ahead), rtol=1e-4, atol=1e-5)


def test_determinism_by_seed():
    params, A, x = _setup()
    a = P.loss(params, A, x, jax.random.key(11), TAUS, 1.0)[0]
    b = P.loss(params, A, x, jax.random.key(11), TAUS, 1.0)[0]
    c = P.loss(params, A, x, jax.random.key(12), TAUS, 1.0)[0]
    assert float(a) == float(b) and float(a) != float(c)
    g1 = P.generate(params, jax.random.key(3), TAUS, 7, batch=2)
    g2 = P.generate(params, jax.random.key(3), TAUS, 7, batch=2)
    assert np.array_equal(np.asarray(g1), np.asarray(g2))
    assert not np.array_equal(np.asarray(g1), np.asarray(P.generate(params, jax.random.key(4), TAUS, 7, batch=2)))
    e1 = P.error_regression(params, A, x, jax.random.key(2), TAUS, 1.0, window=2, iters=3)[0]
    e2 = P.error_regression(params, A, x, jax.random.key(2), TAUS, 1.0, window=2, iters=3)[0]
    assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(e1), jax.tree.leaves(e2)))


def test_prior_mean_rollout_matches_a_hand_written_two_layer_mtrnn():
    """Generation from the prior, noise off: z_t = mu_p(d_{t-1}) (0 at t = 0), top layer first, leaky updates."""
    params, _, _ = _setup()
    got = np.asarray(P.run(params, P.init_adaptive(1, 0, Z), jax.random.key(0), TAUS, horizon=6, sample=False)[0])
    L = [jax.tree.map(np.asarray, p) for p in params["layers"]]
    h = [np.zeros((1, d)) for d in D]
    ref = []
    for t in range(6):
        d_prev = [np.tanh(hl) for hl in h]
        above = None
        for layer in (1, 0):
            p = L[layer]
            z = np.zeros((1, Z[layer])) if t == 0 else np.tanh(d_prev[layer] @ p["w_mu"] + p["b_mu"])
            pre = d_prev[layer] @ p["w_dd"] + z @ p["w_zd"] + p["b"] + (0 if above is None else above @ p["w_top"])
            h[layer] = (1 - 1 / TAUS[layer]) * h[layer] + pre / TAUS[layer]
            above = np.tanh(h[layer])
        ref.append(above @ np.asarray(params["w_out"]) + np.asarray(params["b_out"]))
    np.testing.assert_allclose(got, np.stack(ref, 1), rtol=1e-5, atol=1e-6)
    # sampled generation differs from the mean path and between seeds
    g1, g2 = (np.asarray(P.generate(params, jax.random.key(k), TAUS, 6)) for k in (0, 1))
    assert not np.allclose(g1, got) and not np.allclose(g1, g2)


@pytest.mark.parametrize("case, match", [
    ("window_long", "window"), ("window_zero", "window"), ("w_negative", "w "), ("tau_small", "taus"),
    ("x_dim", "x must have shape"), ("A_shape", "A"), ("x_nan", "finite"), ("taus_count", "taus"),
])
def test_bad_inputs_raise_clear_errors(case, match):
    params, A, x = _setup(steps=5)
    key = jax.random.key(0)
    calls = {
        "window_long": lambda: P.error_regression(params, A, x, key, TAUS, 1.0, window=6),
        "window_zero": lambda: P.error_regression(params, A, x, key, TAUS, 1.0, window=0),
        "w_negative": lambda: P.loss(params, A, x, key, TAUS, -0.1),
        "tau_small": lambda: P.loss(params, A, x, key, (0.5, 2.0), 1.0),
        "taus_count": lambda: P.run(params, A, key, (1.0,)),
        "x_dim": lambda: P.loss(params, A, x[..., :1], key, TAUS, 1.0),
        "A_shape": lambda: P.loss(params, A, x[:, :4], key, TAUS, 1.0),
        "x_nan": lambda: P.loss(params, A, x.at[0, 0, 0].set(jnp.nan), key, TAUS, 1.0),
    }
    with pytest.raises(ValueError, match=match):
        calls[case]()


def test_nnx_module_matches_functional_loss_and_trains():
    x = jax.random.normal(jax.random.key(0), (3, 6, XD))
    model = P.PVRNN(XD, D, Z, TAUS, n_seq=3, steps=6, rngs=nnx.Rngs(0))
    value, _ = model.loss(x, jax.random.key(1), 0.5)
    ref, _ = P.loss(model.param_dict(), model.adaptive(), x, jax.random.key(1), TAUS, 0.5)
    assert float(value) == float(ref)
    n_leaves = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_leaves == 8 + 7 + 2 + 2 * len(Z)  # layer weights, read-out, adaptive vectors

    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def f(m):
            return m.loss(x, jax.random.key(1), 0.5)[0]
        v, g = nnx.value_and_grad(f)(model)
        opt.update(model, g)
        return v

    vals = [float(step(model, opt)) for _ in range(20)]
    assert vals[-1] < vals[0]


def test_pvrnn_experiment_two_steps(tmp_path):
    import pvrnn

    rows = pvrnn.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "pvrnn"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    assert [r["w"] for r in rows] == [0.01, 1.0]
    assert all(r["transition_kl"] >= 0 and r["uniform_kl"] > 0 and r["machine"] and r["date"] and r["paper"] for r in rows)
    assert "| 0.01 |" in (out / "table.md").read_text() and (out / "plot.png").exists()
    cfg = pvrnn.parse(pvrnn.Config, pvrnn.PRESETS, ["--preset=tiny"])
    x_test = pvrnn.sequences(cfg, pvrnn.primitives(cfg), pvrnn.transition_matrix(cfg), cfg.test_seq, cfg.seed + 1000)
    future = x_test[:, cfg.period: cfg.period + cfg.horizon]  # obs_periods = 1, horizon = period
    assert rows[0]["zero_mse"] == pytest.approx(float(np.mean(future ** 2)), rel=1e-6)
    assert rows[0]["repeat_last_period_mse"] == pytest.approx(float(np.mean((x_test[:, :cfg.period] - future) ** 2)), rel=1e-6)
    assert all(np.isfinite(r["er_mse"]) and np.isfinite(r["no_er_mse"]) and len(r["er_window_loss"]) == 2 for r in rows)
