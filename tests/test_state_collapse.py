"""State-collapse mitigations on Mamba-2 (Chen et al. 2024, "Stuffed Mamba"): the sliding window realised as a
state difference, inference-time state normalisation, and the passkey experiment at tiny size."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.mixers import mamba2 as M

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

T, W = 13, 4


@pytest.fixture(scope="module")
def inputs():
    kw = M.mamba2_make_inputs(jax.random.PRNGKey(0), 2, T, heads=4, head_dim=3, groups=2, state=5)
    kw["A"] = -jnp.linspace(0.05, 0.6, 4)  # slow decays: the old tokens matter, so the window is visible
    return kw


def test_window_by_state_difference_equals_recurrence_over_last_w_tokens(inputs):
    y, s = M.mamba2_window(**inputs, window=W, impl="chunked", chunk_size=4)
    # the reference: the plain recurrence over tokens t-W+1 .. t alone, for every t at once (windows stacked on the
    # batch axis; the ones that start before the sequence are front-padded with dt = 0: no input, no decay)
    seq = {k: jnp.pad(inputs[k], [(0, 0), (W - 1, 0)] + [(0, 0)] * (inputs[k].ndim - 2)) for k in ("x", "dt", "B", "C")}
    win = {k: jnp.concatenate([v[:, t : t + W] for t in range(T)]) for k, v in seq.items()}  # [T * b, W, ...]
    y_ref, s_ref = M.mamba2_recurrent(**win, A=inputs["A"], D=inputs["D"])
    np.testing.assert_allclose(y, y_ref[:, -1].reshape(T, 2, *y.shape[2:]).swapaxes(0, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, s_ref[-2:], rtol=1e-4, atol=1e-5)  # the last window's state
    y_full, _ = M.mamba2_recurrent(**inputs)
    assert float(jnp.max(jnp.abs(y_full[:, -1] - y[:, -1]))) > 1e-2  # the window does drop the old tokens


def test_window_at_least_the_length_is_the_plain_scan(inputs):
    y, s = M.mamba2_window(**inputs, window=T, impl="chunked", chunk_size=4)
    y_ref, s_ref = M.mamba2_recurrent(**inputs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)


def test_state_norm_clips_the_state_norm_to_the_threshold():
    # a = 1 and the same input every step: the state grows as t · u (‖u‖_F = c), clipped at τ it stays τ · u / c
    b, t, h, p, n = 1, 6, 2, 2, 3
    x = jnp.ones((b, t, h, p))
    dt = jnp.ones((b, t, h))
    B = jnp.ones((b, t, 1, n))
    C = jnp.ones((b, t, 1, n))
    c = float(np.sqrt(n * p))
    tau = jnp.array([2.5 * c, jnp.inf])
    y, s = M.mamba2_recurrent(x, dt, None, B, C, state_norm=tau)
    steps = np.arange(1, t + 1)
    # y_t = S_t^T C: each entry of S_t is min(t, 2.5) for head 0, t for head 1; C sums n of them
    np.testing.assert_allclose(y[0, :, 0, 0], n * np.minimum(steps, 2.5), rtol=1e-6)
    np.testing.assert_allclose(y[0, :, 1, 0], n * steps, rtol=1e-6)
    np.testing.assert_allclose(float(jnp.linalg.norm(s[0, 0])), 2.5 * c, rtol=1e-6)


def test_state_norm_off_and_bad_inputs(inputs):
    y, _ = M.mamba2_recurrent(**inputs, state_norm=jnp.inf)
    np.testing.assert_allclose(y, M.mamba2_recurrent(**inputs)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="state_norm"):
        M.mamba2_recurrent(**inputs, state_norm=-1.0)
    with pytest.raises(ValueError, match="state_norm"):
        M.mamba2_recurrent(**inputs, state_norm=jnp.ones(3))
    with pytest.raises(ValueError, match="window"):
        M.mamba2_window(**inputs, window=0)


def test_layer_mitigations():
    layer = M.Mamba2(16, head_dim=8, d_state=4, chunk_size=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 16))
    y0, _ = layer(x)
    layer.window = 3
    assert float(jnp.max(jnp.abs(layer(x)[0] - y0))) > 1e-4
    with pytest.raises(ValueError, match="window"):
        layer(x, cache=layer.init_cache(2))
    layer.window = None
    layer.state_norm = nnx.Variable(jnp.full((layer.nheads,), jnp.inf))  # recurrent form, no clipping
    np.testing.assert_allclose(layer(x)[0], y0, rtol=1e-4, atol=1e-5)
    layer.state_norm[...] = jnp.full((layer.nheads,), 1e-3)
    assert float(jnp.max(jnp.abs(layer(x)[0] - y0))) > 1e-4


@pytest.mark.slow  # ~20 s of compiles on one core; the default tier runs passkey.py at tiny size in test_experiments.py
def test_passkey_experiment_two_steps(tmp_path):
    import passkey

    out = tmp_path / "p.jsonl"
    rows = passkey.main(["--preset=tiny", "--mitigation=decay_cap,state_norm,window", "--multiples=2", "--probe_len=32",
                         f"--out={out}"])
    ev = [r for r in rows if r["kind"] == "passkey"]
    assert {r["mitigation"] for r in ev} == {"none", "decay_cap", "state_norm", "window"}
    assert {r["length"] for r in ev} == {64} and all(0.0 <= r["exact"] <= 1.0 for r in ev)
    # 64 tokens hold 3 filler blocks of 16: the needle at block 0 (depth 0.25) or 1 (0.75), QUERY at 55, so the
    # needle is 55 or 39 tokens back, beyond the training length 32: no depth counts as recent
    assert not any(r["recent"] for r in ev)
    b, _ = passkey.eval_sets(passkey.parse(passkey.Config, passkey.PRESETS, ["--preset=tiny", "--multiples=2"]))[64]
    np.testing.assert_array_equal(passkey.needle_distance(b), [55, 55, 39, 39])
    assert out.exists() and out.with_suffix(".png").exists() and out.with_suffix(".md").exists()
    assert "| mitigation |" in out.with_suffix(".md").read_text()
