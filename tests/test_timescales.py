"""Autocorrelation timescales (``seqjax.analysis.timescales``), the timescale task networks
(``seqjax.models.timescale_rnn``) and the timescales study script at tiny size."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import lfilter

from seqjax import rnn
from seqjax.analysis import timescales as ts
from seqjax.models import timescale_rnn as tr

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def _ar1(a, n, t, seed):
    e = np.random.default_rng(seed).normal(size=(n, t))
    e[:, 0] /= np.sqrt(1 - a * a)  # start in the stationary distribution
    return lfilter([1.0], [1.0, -a], e, axis=1)


def test_autocorrelation_is_the_trial_mean_of_unbiased_lag_products():
    x = np.random.default_rng(0).normal(size=(3, 40))
    xc = x - x.mean(1, keepdims=True)
    want = [np.mean([np.sum(xc[i, : 40 - k] * xc[i, k:]) / (40 - k) for i in range(3)]) for k in range(6)]
    np.testing.assert_allclose(ts.autocorrelation(x, 5), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("a", [0.6, 0.85])
def test_ar1_timescale_is_minus_one_over_log_a(a):
    x = _ar1(a, 4, 20_000, seed=1)
    ac = ts.autocorrelation(x, 40)
    np.testing.assert_allclose(ac[:4] / ac[0], a ** np.arange(4), atol=0.02)
    want = -1.0 / np.log(a)
    for double in (False, True):
        assert ts.fit_timescale(ac, 20, double=double) == pytest.approx(want, rel=0.08)


def test_two_timescale_mixture_gives_the_slow_one():
    x = _ar1(0.5, 4, 20_000, seed=2) + _ar1(0.95, 4, 20_000, seed=3)
    ac = ts.autocorrelation(x, 60)
    slow = -1.0 / np.log(0.95)
    assert ts.fit_timescale(ac, 30, double=True) == pytest.approx(slow, rel=0.15)
    assert ts.fit_timescale(ac, 30) < 0.98 * ts.fit_timescale(ac, 30, double=True)  # one exponential mixes both


def test_unit_timescales_per_unit_and_nan_for_a_silent_unit():
    act = np.stack([_ar1(0.8, 2, 5000, seed=4), np.zeros((2, 5000))], axis=-1)
    tau = ts.unit_timescales(act, burn=10, max_lag=30, fit_lag=15)
    assert tau[0] == pytest.approx(-1 / np.log(0.8), rel=0.1) and np.isnan(tau[1])


def test_timescale_bad_input_raises():
    with pytest.raises(ValueError, match="max_lag"):
        ts.autocorrelation(np.ones((2, 10)), 10)
    with pytest.raises(ValueError, match="fit_lag"):
        ts.fit_timescale(np.ones(5), 5)
    with pytest.raises(ValueError, match=r"\[trials, time, units\]"):
        ts.unit_timescales(np.ones((10, 3)))
    with pytest.raises(ValueError, match="tau_range"):
        tr.init_params("leaky_paper", jax.random.PRNGKey(0), 4, 1, tau_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="zero_diag"):
        tr.states(tr.init_params("gru", jax.random.PRNGKey(0), 4, 1), jnp.zeros((1, 3)), cell="gru", zero_diag=True)


def _lrelu(v):
    return np.where(v > 0, v, tr.LEAK_SLOPE * v)


def test_leaky_paper_follows_its_equation_without_self_connections():
    p = tr.init_params("leaky_paper", jax.random.PRNGKey(1), 3, 2)
    p["cell"]["tau"] = jnp.array([0.5, 1.0, 3.0])  # τ_raw below 1 runs as τ = 1
    c = {k: np.asarray(v, np.float64) for k, v in p["cell"].items()}
    x = np.array([[1.0, 0.0, 1.0, 1.0]])
    for zero_diag in (False, True):
        w = c["W"] * (1 - np.eye(3)) if zero_diag else c["W"]
        tau, r, want = np.maximum(c["tau"], 1.0), np.zeros(3), []
        for x_t in x[0]:
            r = _lrelu((1 - 1 / tau) * r + (w @ r + c["w_in"] * x_t + c["b"]) / tau)
            want.append(r)
        got = tr.states(p, jnp.asarray(x), cell="leaky_paper", zero_diag=zero_diag)
        np.testing.assert_allclose(got[0], np.array(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tr.trained_tau(p), [1.0, 1.0, 3.0])
    want_logits = np.einsum("h,hkc->kc", np.asarray(got[0, -1]), np.asarray(p["readout"])) + np.asarray(p["readout_b"])
    np.testing.assert_allclose(tr.logits(p, got)[0, -1], want_logits, rtol=1e-5, atol=1e-6)


def test_leaky_zero_diag_equals_the_cell_with_its_diagonal_removed():
    p = tr.init_params("leaky", jax.random.PRNGKey(2), 4, 1)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 6)), jnp.float32)
    masked = {**p["cell"], "R": p["cell"]["R"] * (1 - jnp.eye(4))[None, :, None, :]}
    np.testing.assert_allclose(tr.states(p, x, cell="leaky", zero_diag=True), rnn.rnn("leaky", masked, x[..., None])[0],
                               rtol=1e-6)
    assert not np.allclose(tr.states(p, x, cell="leaky"), tr.states(p, x, cell="leaky", zero_diag=True))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_task_networks_are_the_seqjax_rnn_cells(cell):
    p = tr.init_params(cell, jax.random.PRNGKey(3), 4, 3)
    x = jnp.asarray([[1.0, 0.0, 1.0]])
    np.testing.assert_array_equal(tr.states(p, x, cell=cell), rnn.rnn(cell, p["cell"], x[..., None])[0])
    assert tr.trained_tau(p) is None and p["readout"].shape == (4, 3, 2)


def test_study_two_steps_tiny(tmp_path):
    import timescales

    recs = timescales.main(["study", "--preset=tiny", "--runs=paper:multi", f"--out_dir={tmp_path}"])
    assert {r["kind"] for r in recs} == {"check", "timescales"} and recs[-1]["step"] == 2
    assert all(r["machine"] and r["paper"] and r["seed"] == 0 for r in recs)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(recs)  # written afresh
    table = (tmp_path / "table.md").read_text()
    assert "| paper:multi | leaky_paper | sgd | no | 2 |" in table and (tmp_path / "plot.png").exists()
