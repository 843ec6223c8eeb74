"""ConvS5 and ConvLSTM: the parallel-scan ConvS5 equals its lax.scan reference on values and gradients (odd frame
sizes, T = 1 and 63, weak and strong decays); with 1×1 kernels it is S5 at every pixel; state carried across a
split clip equals one run; step-by-step equals the parallel form (layer and predictor); generation equals the
parallel form fed its own predictions, and a future frame never changes an earlier prediction; ConvLSTM with 1×1
kernels is seqjax's LSTM at every pixel, its receptive field grows by k // 2 per frame and it is causal; SSIM
against closed forms and a float64 reference; bad frames raise ValueError before tracing; the experiment for two
steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax import rnn as R
from seqjax.mixers.s4d import s5
from seqjax.models import convssm as M
from seqjax.rnn import conv as RC

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

HH, WW, U, P, UO = 5, 7, 3, 4, 2  # odd frame sizes
BASE = M.convs5_init(jax.random.PRNGKey(0), U, P, UO, k_B=3, k_C=3, k_D=3)


def _params(decay: str):
    # weak: |Λ̄| = e^{-Δ/2} ≈ 0.9995 (memory over the whole clip); strong: |Λ̄| = e^{-2} per frame
    return dict(BASE, log_dt=jnp.full((P,), np.log(1e-3 if decay == "weak" else 4.0), jnp.float32))


def _inputs(b, t, seed=1):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((b, t, HH, WW, U)).astype(np.float32)
    h0 = (rng.standard_normal((b, HH, WW, P)) + 1j * rng.standard_normal((b, HH, WW, P))).astype(np.complex64)
    return jnp.asarray(u), jnp.asarray(h0)


def _loss(fn, **kw):
    def loss(u, h0, p):
        y, h = fn(u, **p, h0=h0, **kw)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))  # a fixed, non-uniform cotangent
        return jnp.sum(y * w) + jnp.sum(jnp.real(h) * 0.3 - jnp.imag(h) * 0.7), (y, h)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


REF, PAR = _loss(M.convs5_recurrent), _loss(M.convs5, impl="associative")


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1.0)
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("t", [1, 63])
@pytest.mark.parametrize("decay", ["weak", "strong"])
def test_convs5_parallel_scan_equals_lax_scan_reference_values_and_grads(t, decay):
    p, (u, h0) = _params(decay), _inputs(2, t)
    (l_ref, (y_ref, h_ref)), g_ref = REF(u, h0, p)
    (l_par, (y, h)), g_par = PAR(u, h0, p)
    assert y.shape == (2, t, HH, WW, UO) and h.shape == (2, HH, WW, P) and h.dtype == jnp.complex64
    _close(y, y_ref, 2e-5)
    _close(h, h_ref, 2e-5)
    _close(l_par, l_ref, 2e-5)
    for a, b in zip(g_par[:2], g_ref[:2]):  # u, h0
        _close(a, b, 2e-5)
    for name in p:
        _close(g_par[2][name], g_ref[2][name], 5e-5)
    # the decays matter: the weak one keeps the initial state, the strong one forgets it
    h_zero = PAR(u, jnp.zeros_like(h0), p)[0][1][1]
    kept = float(jnp.abs(h - h_zero).max() / jnp.abs(h0).max())
    assert (kept > 0.9) if decay == "weak" else (t == 1 or kept < 1e-6)


def test_convs5_with_1x1_kernels_is_s5_at_every_pixel():
    """The paper's equivalence: with pointwise kernels ConvS5 is S5 run independently at every pixel."""
    p = M.convs5_init(jax.random.PRNGKey(5), U, P, U, k_B=1, k_C=1, k_D=1)
    p["log_dt"] = jnp.asarray(np.linspace(np.log(1e-2), np.log(1.0), P), jnp.float32)
    p["D"] = jnp.asarray(np.diag(np.arange(1.0, U + 1))[None, None], jnp.float32)
    u, h0 = _inputs(2, 6)
    y, h = M.convs5(u, **p, h0=h0)
    flat = lambda a: jnp.moveaxis(a, 1, 3).reshape(-1, a.shape[1], a.shape[-1])  # [b H W, t, ch]
    y_s5, h_s5 = s5(flat(u), p["Lambda"], p["log_dt"], p["B"][0, 0].T, p["C"][0, 0].T, jnp.diag(p["D"][0, 0]),
                    h0=h0.reshape(-1, P))
    _close(flat(y), y_s5, 2e-5)
    _close(h.reshape(-1, P), h_s5, 2e-5)


def test_convs5_state_carried_across_a_split_clip_equals_one_run():
    p, (u, h0) = _params("weak"), _inputs(2, 5)
    y, h = M.convs5(u, **p, h0=h0)
    y1, h1 = M.convs5(u[:, :2], **p, h0=h0)
    y2, h2 = M.convs5(u[:, 2:], **p, h0=h1)
    _close(jnp.concatenate([y1, y2], 1), y, 1e-5)
    _close(h2, h, 1e-5)


def test_convs5_step_by_step_equals_parallel():
    p, (u, h0) = _params("weak"), _inputs(2, 5)
    y, h_last = M.convs5(u, **p, h0=h0)
    h, ys = h0, []
    for t in range(u.shape[1]):
        y_t, h = M.convs5_step(h, u[:, t], **p)
        ys.append(y_t)
    _close(jnp.stack(ys, 1), y, 1e-5)
    _close(h, h_last, 1e-5)
    y0, _ = M.convs5_step(jnp.zeros_like(h0), u[:, 0], **p)
    _close(y0, M.convs5(u, **p, h0=jnp.zeros_like(h0))[0][:, 0], 1e-5)


class _Models(dict):
    """Predictors built on first use (one compiled constructor each)."""

    def __missing__(self, bk):
        self[bk] = nnx.jit(lambda r: M.FramePredictor(bk, d_model=6, ssm_size=4, num_layers=2, rngs=r))(nnx.Rngs(0))
        return self[bk]


@pytest.fixture(scope="module")
def models():
    return _Models()


FWD = nnx.jit(lambda m, f: m(f))
STEP = nnx.jit(lambda m, s, f: m.step(s, f))
GEN = nnx.jit(lambda m, c: m.generate(c, 4))
T = 5


# ConvLSTM's step is its scan on one frame; its own step and causality tests below stay in the default tier
@pytest.mark.parametrize("backbone", ["convs5", pytest.param("convlstm", marks=pytest.mark.slow)])
def test_predictor_step_by_step_and_generation_equal_the_parallel_form(models, backbone):
    model = models[backbone]
    frames = jax.random.uniform(jax.random.PRNGKey(2), (2, T, HH, WW, 1))
    pred, states = FWD(model, frames)
    assert pred.shape == frames.shape and float(pred.min()) >= 0.0 and float(pred.max()) <= 1.0
    s, outs = model.init_states(2, HH, WW), []
    for t in range(T):
        o, s = STEP(model, s, frames[:, t])
        outs.append(o)
    _close(jnp.stack(outs, 1), pred, 1e-5)
    for a, b in zip(s, states):
        _close(a, b, 1e-5)
    gen = GEN(model, frames[:, :2])  # condition on k = 2, predict n = 4
    assert gen.shape == (2, 4, HH, WW, 1)
    # fed its own predictions, the parallel form gives the generated frames back
    fed = FWD(model, jnp.concatenate([frames[:, :2], gen[:, :-1]], 1))[0]
    _close(fed[:, 1:], gen, 1e-5)
    # a future frame never changes an earlier prediction
    pred2 = FWD(model, frames.at[:, 3].set(1.0 - frames[:, 3]))[0]
    np.testing.assert_array_equal(pred[:, :3], pred2[:, :3])
    assert float(jnp.abs(pred[:, 3] - pred2[:, 3]).max()) > 1e-4


def test_conv_lstm_with_1x1_kernels_is_the_lstm_at_every_pixel():
    c, f = 3, 5
    p = RC.conv_lstm_init(jax.random.PRNGKey(4), c, f, kernel=1)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 7, 3, 2, c))
    st0 = jax.random.normal(jax.random.PRNGKey(6), (2, 2, 3, 2, f))
    y, st = RC.conv_lstm(p, x, h0=st0)
    lp = {"W": p["Wx"][0, 0].reshape(c, 1, 4, f), "R": p["Wh"][0, 0].reshape(1, f, 4, f), "b": p["b"].reshape(1, 4, f)}
    flat = lambda a: jnp.moveaxis(a, 1, 3).reshape(-1, a.shape[1], a.shape[-1])
    y_l, st_l = R.rnn("lstm", lp, flat(x), h0=flat(st0), impl="sequential")
    _close(flat(y), y_l, 1e-5)
    _close(flat(st), st_l, 1e-5)


def test_conv_lstm_receptive_field_grows_by_half_the_kernel_per_frame_and_is_causal():
    c, f, t = 2, 3, 3
    p = RC.conv_lstm_init(jax.random.PRNGKey(7), c, f, kernel=3)
    x = jnp.zeros((1, t, 9, 9, c))
    y0, _ = RC.conv_lstm(p, x)
    y1, st = RC.conv_lstm(p, x.at[0, 0, 4, 4].set(1.0))
    assert y1.shape == (1, t, 9, 9, f) and st.shape == (1, 2, 9, 9, f)
    changed = np.asarray(jnp.abs(y1 - y0).max(-1) > 0)[0]  # [t, 9, 9]
    for s in range(t):  # frame s reaches the pixels within Chebyshev distance s + 1 of the impulse, no further
        d = np.max(np.abs(np.stack(np.nonzero(changed[s])) - 4), axis=0)
        assert d.max() == s + 1
    # a later frame changes nothing earlier
    y2, _ = RC.conv_lstm(p, x.at[0, 2, 4, 4].set(1.0))
    np.testing.assert_array_equal(y2[:, :2], y0[:, :2])
    # the step form agrees
    ys, s_ = [], None
    for i in range(t):
        o, s_ = RC.conv_lstm_step(p, s_, x.at[0, 0, 4, 4].set(1.0)[:, i])
        ys.append(o)
    _close(jnp.stack(ys, 1), y1, 1e-6)


def test_bad_frames_raise_before_tracing(models):
    p = _params("weak")
    u, _ = _inputs(1, 2)
    with pytest.raises(ValueError, match=r"u must have 5 dims \[batch, time, height, width, channels\]"):
        M.convs5(u[0], **p)
    with pytest.raises(ValueError, match="u must have 3 channels"):
        M.convs5(u[..., :2], **p)
    with pytest.raises(ValueError, match="h0 must have shape"):
        M.convs5(u, **p, h0=jnp.zeros((1, HH, WW, P + 1), jnp.complex64))
    with pytest.raises(ValueError, match=r"u must have 4 dims \[batch, height, width, channels\]"):
        M.convs5_step(None, u, **p)
    with pytest.raises(ValueError, match="B must have an odd kernel size"):
        M.convs5(u, **dict(p, B=jnp.zeros((2, 2, U, P), jnp.complex64)))
    with pytest.raises(ValueError, match="impl='pallas' is not one of"):
        M.convs5(u, **p, impl="pallas")
    lp = RC.conv_lstm_init(jax.random.PRNGKey(0), 3, 4)
    with pytest.raises(ValueError, match="x must have 5 dims"):
        RC.conv_lstm(lp, u[:, 0])
    with pytest.raises(ValueError, match=r"params\['Wx'\] must have shape"):
        RC.conv_lstm(lp, u[..., :2])
    model = models["convs5"]
    with pytest.raises(ValueError, match="frames must have 1 channels"):
        model(u)
    with pytest.raises(ValueError, match="frames must have 5 dims"):
        model.generate(u[:, 0, ..., :1], 3)
    with pytest.raises(ValueError, match="frame must have 1 channels"):
        model.step(model.init_states(1, HH, WW), u[:, 0])
    with pytest.raises(ValueError, match="backbone='transformer' is not one of"):
        M.FramePredictor("transformer", rngs=nnx.Rngs(0))


def _ssim64(x, y, sigma=1.5, c1=1e-4, c2=9e-4):
    """One 11×11 window, float64: the definition written out."""
    g = np.exp(-0.5 * ((np.arange(11) - 5) / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2, (w * x * y).sum() - mx * my
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_closed_forms_and_reference():
    rng = np.random.default_rng(0)
    x1, y1 = rng.random((11, 11)), rng.random((11, 11))  # 11×11: one window position
    a, b = 0.2, 0.7
    xs = np.stack([x1, np.full((11, 11), a), x1, x1])[..., None]
    ys = np.stack([x1, np.full((11, 11), b), 0.5 * x1 + 0.5 * y1, 1.0 - x1])[..., None]
    s = np.asarray(M.ssim(xs, ys))
    np.testing.assert_allclose(s[0], 1.0, atol=1e-6)  # SSIM(x, x) = 1
    # constant images: only the luminance term is left, (2ab + c1) / (a² + b² + c1)
    np.testing.assert_allclose(s[1], (2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rtol=1e-4)
    np.testing.assert_allclose(s[2], _ssim64(x1, 0.5 * x1 + 0.5 * y1), rtol=1e-4)  # the float64 definition
    np.testing.assert_allclose(s[3], _ssim64(x1, 1.0 - x1), rtol=1e-4)
    assert s[3] < 0  # anti-correlated structure


def test_convssm_experiment_two_steps(tmp_path):
    import convssm

    rows = convssm.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "convssm"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {r["model"] for r in evals} == {"convs5", "convlstm", "copy_last", "mean_frame"}
    assert all(len(r["mse_by_horizon"]) == len(r["ssim_by_horizon"]) == r["horizon"] for r in evals)
    assert all(r["machine"] and r["date"] and r["paper"] for r in rows)
    assert "| convs5 |" in (out / "table.md").read_text() and (out / "plot.png").exists()
