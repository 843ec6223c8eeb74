"""LRCN: the frame encoder equals nnx.Conv + dense layers, clip predictions are the average of step predictions
(closed form), step outputs are causal, the single-frame baseline ignores frame order and LRCN does not, greedy
captions are what teacher forcing scores, clear errors before tracing, and the experiment for two steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.models.lrcn import LRCN, average_predictions, feature_map_size, frame_features
from seqjax.tasks.moving_digits import moving_digits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

B, T, S = 2, 4, 24
KW = dict(vocab=24, size=S, conv=(4, 4), features=8, hidden=8, d_emb=4)


@pytest.fixture(scope="module")
def models():
    return {r: LRCN((10, 8), recurrent=r, rngs=nnx.Rngs(1), **KW) for r in (True, False)}


@pytest.fixture(scope="module")
def frames():
    return jnp.asarray(moving_digits(B, T, size=S, turn=True, seed=5)["frames"])


def test_frame_features_equal_flax_layers(models, frames):
    m = models[True]
    x = frames.reshape((B * T, S, S, 1))
    for conv in m.convs:
        x = jax.nn.relu(conv(x))
    assert x.shape[1] == feature_map_size(S, 2) == 6
    want = jax.nn.relu(m.fc(x.reshape(B, T, -1)))
    got = frame_features([(c.kernel[...], c.bias[...]) for c in m.convs], (m.fc.kernel[...], m.fc.bias[...]), frames)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert feature_map_size(7, 2) == 2 and feature_map_size(32, 3) == 4


def test_average_predictions_closed_form():
    logits = jnp.array([[[0.0, np.log(3.0)], [np.log(3.0), 0.0], [0.0, 0.0]]])  # softmax rows 1/4 3/4, 3/4 1/4, 1/2 1/2
    np.testing.assert_allclose(np.exp(average_predictions(logits)), [[0.5, 0.5]], atol=1e-6)
    logits = jnp.array([[[0.0, np.log(3.0)], [0.0, 0.0]]])
    np.testing.assert_allclose(np.exp(average_predictions(logits)), [[3 / 8, 5 / 8]], atol=1e-6)


def test_shapes_and_clip_logits(models, frames):
    for m in models.values():
        steps = m(frames)
        assert [z.shape for z in steps] == [(B, T, 10), (B, T, 8)]
        for z, c in zip(steps, m.clip_logits(frames)):
            p = jax.nn.softmax(z, -1).mean(1)
            np.testing.assert_allclose(np.exp(c), p, rtol=1e-5, atol=1e-7)


def test_causality(models, frames):
    """A change in frame t0 leaves every step output before t0 unchanged (LRCN and baseline); after it LRCN's
    outputs change, the baseline's only at t0 (each step sees its own frame)."""
    t0 = 2
    other = frames.at[:, t0:].set(jnp.flip(frames[:, t0:], axis=2))
    for m in models.values():
        a, b = m(frames)[1], m(other)[1]
        np.testing.assert_array_equal(a[:, :t0], b[:, :t0])
        assert np.abs(a[:, t0] - b[:, t0]).max() > 1e-4
    a, b = models[True](frames)[1], models[True](other.at[:, t0 + 1:].set(frames[:, t0 + 1:]))[1]
    assert np.abs(a[:, t0 + 1:] - b[:, t0 + 1:]).max() > 1e-4  # the LSTM carries frame t0 forward
    a, b = models[False](frames)[1], models[False](other.at[:, t0 + 1:].set(frames[:, t0 + 1:]))[1]
    np.testing.assert_array_equal(a[:, t0 + 1:], b[:, t0 + 1:])


def test_baseline_ignores_frame_order_lrcn_does_not(models, frames):
    rev = frames[:, ::-1]
    tgt = jnp.ones((B, 3), jnp.int32)
    base = models[False]
    np.testing.assert_allclose(base.clip_logits(rev)[1], base.clip_logits(frames)[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(base.caption_logits(rev, tgt), base.caption_logits(frames, tgt), rtol=1e-5, atol=1e-6)
    lrcn = models[True]
    assert np.abs(lrcn.clip_logits(rev)[1] - lrcn.clip_logits(frames)[1]).max() > 1e-4


def test_generate_is_what_teacher_forcing_scores(models, frames):
    for m in models.values():
        toks, logits = m.generate(frames, 5, 1)
        assert toks.shape == (B, 5) and toks.dtype == jnp.int32
        np.testing.assert_array_equal(toks, jnp.argmax(logits, -1))
        tgt_in = jnp.concatenate([jnp.ones((B, 1), jnp.int32), toks[:, :-1]], 1)
        np.testing.assert_allclose(m.caption_logits(frames, tgt_in), logits, rtol=1e-5, atol=1e-5)


def test_bad_input(models, frames):
    m = models[True]
    with pytest.raises(ValueError, match=r"frames must have 5 dims \[batch, time, 24, 24, 1\]"):
        m(frames[0])
    with pytest.raises(ValueError, match=r"frames must have shape \[\*, \*, 24, 24, 1\]"):
        m(jnp.concatenate([frames, frames], -1))
    with pytest.raises(ValueError, match="frames must have shape"):
        m(frames[:, :, :20, :20])
    with pytest.raises(TypeError, match="frames must have a float"):
        m(frames.astype(jnp.int32))
    with pytest.raises(ValueError, match="tgt_in must have the batch"):
        m.caption_logits(frames, jnp.ones((B + 1, 3), jnp.int32))
    with pytest.raises(ValueError, match="vocab > 0"):
        LRCN((10,), size=S, conv=(4,), features=8, hidden=8, rngs=nnx.Rngs(0)).generate(frames, 3, 1)


def test_lrcn_table_met_and_missed():
    import lrcn

    cfg = lrcn.Config(eval_size=10)
    rows = [{"kind": "test", "model": "lrcn", "digit_acc": 0.9, "direction_acc": 0.8, "caption_exact": 0.6},
            {"kind": "test", "model": "single_frame", "digit_acc": 0.9, "direction_acc": 0.4, "caption_exact": 0.2}]
    assert "| 0.800 vs 0.400; 0.600 vs 0.200 | met |" in lrcn.tables(rows, cfg)
    rows[1]["caption_exact"] = 0.7
    assert "| missed |" in lrcn.tables(rows, cfg)


def test_lrcn_experiment_two_steps(tmp_path):
    import lrcn

    rows = lrcn.main(["--preset=tiny", "--models=lrcn", f"--out={tmp_path}"])
    out = tmp_path / "lrcn"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    tests = {r["model"]: r for r in rows if r["kind"] == "test"}
    assert set(tests) == {"lrcn", "chance", "majority"}
    assert tests["chance"]["direction_acc"] == 1 / 8 and tests["chance"]["caption_exact"] == 1 / 560
    assert all(0.0 <= r[k] <= 1.0 for r in tests.values() for k in ("digit_acc", "direction_acc", "caption_exact"))
    assert all(r["machine"] and r["date"] and r["paper_claim"] for r in rows)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert "| lrcn |" in (out / "table.md").read_text() and (out / "plot.png").exists()
