"""Annealed gradient noise: the schedule's values exactly, the transform's per-step variance against the formula
(within its standard error), its use in the pretraining optimizer and the experiment runner, clear errors, and the
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

from seqjax.tasks import TaskBatch, runner
from seqjax.train.config import OptimConfig
from seqjax.train.noise import GAMMA, gradient_noise, noise_variance
from seqjax.train.step import make_optimizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def test_schedule_values_exactly():
    t = np.arange(6)
    np.testing.assert_allclose(noise_variance(t, 0.3, 0.55), 0.3 / (1.0 + t) ** 0.55, rtol=1e-6)
    assert float(noise_variance(0, 1.0)) == 1.0
    np.testing.assert_allclose(float(noise_variance(3, 1.0, 0.5)), 0.5, rtol=1e-7)  # 1 / sqrt(4)
    np.testing.assert_allclose(float(noise_variance(99, 0.01, 1.0)), 1e-4, rtol=1e-6)
    assert GAMMA == 0.55


def test_noise_variance_per_step_matches_formula():
    """Zero gradients of 20,000 entries: the noise at update t has sample variance eta/(1+t)^gamma, within 5
    standard errors of a variance estimate (sd of s^2 is sigma^2 sqrt(2/(n-1))), and mean 0 within 5 sd."""
    eta, gamma, n = 0.3, 0.55, 20_000
    tx = gradient_noise(eta, gamma, seed=3)
    grads = {"a": jnp.zeros((100, 100)), "b": jnp.zeros((10_000,))}
    state = tx.init(grads)
    update = jax.jit(tx.update)
    for t in range(5):
        noisy, state = update(grads, state)
        draws = np.concatenate([np.asarray(noisy["a"]).ravel(), np.asarray(noisy["b"])])
        var = eta / (1 + t) ** gamma
        assert abs(draws.var(ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1)), (t, draws.var(), var)
        assert abs(draws.mean()) < 5 * np.sqrt(var / n)
    assert int(state.count) == 5


def test_noise_is_added_to_the_gradient_and_keys_are_plain_data():
    tx = gradient_noise(0.01, seed=0)
    g = {"w": jnp.full((1000,), 2.0)}
    st = tx.init(g)
    assert st.rng_key.dtype == jnp.uint32 and st.rng_key.shape == (2,)  # orbax-friendly
    out, st2 = tx.update(g, st)
    np.testing.assert_allclose(np.mean(np.asarray(out["w"])), 2.0, atol=5 * 0.1 / np.sqrt(1000))
    out2, _ = tx.update(g, st)
    np.testing.assert_array_equal(out["w"], out2["w"])  # deterministic given the state
    out3, _ = tx.update(g, st2)
    assert not np.array_equal(out["w"], out3["w"])  # a fresh draw each step


def test_pretraining_optimizer_and_runner_use_it():
    tx, _ = make_optimizer(OptimConfig(grad_noise=0.01), total_steps=10)
    params = {"w": jnp.zeros((4, 4))}
    states = tx.init(params)
    assert any(isinstance(s, optax.AddNoiseState) for s in states)
    assert runner.RunConfig().grad_noise == 0.0 and runner.RunConfig().grad_noise_gamma == 0.55
    cfg = runner.RunConfig(model="gru", d_model=8, num_layers=1, steps=2, batch_size=4, warmup=1, eval_every=2,
                           progress=False, grad_noise=0.5)
    task = runner.TaskSpec("toy", 5, lambda step, b, seed: _toy(b, step), lambda: {"test": _toy(4, 99)},
                           lambda p, b: {"acc": float((p == b.targets).mean())})
    recs = runner.run(task, cfg)
    assert recs[-1]["step"] == 2 and 0.0 <= recs[-1]["acc"] <= 1.0


def _toy(b, seed):
    x = np.random.default_rng(seed).integers(0, 5, (b, 6)).astype(np.int32)
    return TaskBatch(inputs=x, targets=x)


@pytest.mark.parametrize("eta,gamma", [(-0.1, 0.55), (0.1, -1.0), ("x", 0.55)])
def test_bad_noise_arguments(eta, gamma):
    with pytest.raises(ValueError, match="eta|gamma"):
        gradient_noise(eta, gamma)


def test_gradient_noise_experiment_two_steps(tmp_path):
    import gradient_noise as exp

    rows = exp.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "gradient_noise"
    recs = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(recs) == len(rows) > 0
    assert {"machine", "date", "seed", "paper"} <= set(recs[0])
    verdicts = re.findall(r"\| (met|missed)[^|]* \|\s*$", open(out / "table.md").read(), re.M)
    assert verdicts, "every claim row ends in a met / missed verdict"
