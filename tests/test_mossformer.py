"""MossFormer2 and the separation task: SI-SNR against closed forms, PIT's choice, the FSMN's causality and
receptive field, streaming equals the full causal run, joint attention against a loop, the encoder/decoder pair."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.models import mossformer as M
from seqjax.tasks import separation as S

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

TINY = dict(enc_dim=8, dim=8, layers=1, expansion=1, qk_dim=4, group=8, conv_kernel=5, inner=6, lorder=3, depth=2)


# ----------------------------------------------------------------------------- metrics


def test_si_snr_matches_closed_form_and_is_scale_invariant():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 400))
    e = rng.normal(size=(3, 400))
    s -= s.mean(-1, keepdims=True)
    e -= e.mean(-1, keepdims=True)
    e -= np.sum(e * s, -1, keepdims=True) / np.sum(s * s, -1, keepdims=True) * s  # e ⟂ s
    a = np.array([0.5, 2.0, -3.0])[:, None]
    want = 10 * np.log10(np.sum((a * s) ** 2, -1) / np.sum(e**2, -1))
    got = np.asarray(S.si_snr(a * s + e, s))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(S.si_snr(7.0 * (a * s + e) + 3.0, 0.1 * s)), want, rtol=1e-4, atol=1e-4)


def test_pit_picks_the_right_permutation_and_mixture_scores_zero():
    batch = S.mixtures(3, 300, seed=1)
    ref = batch.sources
    est = ref + 0.05 * np.random.default_rng(0).normal(size=ref.shape).astype(np.float32)
    swapped = est.copy()
    swapped[1] = est[1, ::-1]
    best, perm = jax.jit(S.pit_si_snr)(swapped, ref)
    np.testing.assert_array_equal(np.asarray(perm), [[0, 1], [1, 0], [0, 1]])
    np.testing.assert_allclose(np.asarray(best), np.asarray(S.si_snr(est, ref).mean(-1)), rtol=1e-5)
    wrong = np.asarray(S.si_snr(swapped, ref).mean(-1))[1]
    assert wrong < float(best[1]) - 20
    mix = np.broadcast_to(batch.mixture[:, None], ref.shape)
    improvement = jax.jit(S.si_snr_improvement)
    np.testing.assert_allclose(np.asarray(improvement(mix, ref, batch.mixture)), 0.0, atol=1e-4)
    assert np.all(np.asarray(improvement(est, ref, batch.mixture)) > 10)


def test_pit_gradient_flows_through_the_chosen_assignment_only():
    ref = S.mixtures(1, 200, seed=2).sources
    est = jnp.asarray(ref[:, ::-1] + 0.1)
    g = jax.jit(jax.grad(lambda e: -S.pit_si_snr(e, ref)[0].sum()))(est)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_mixes_as_documented():
    a = S.mixtures(3, 800, seed=5)
    b = S.mixtures(5, 800, seed=5)
    for x, y in ((a.mixture, b.mixture[:3]), (a.sources, b.sources[:3]), (a.noise, b.noise[:3])):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.mixture, S.mixtures(3, 800, seed=6).mixture)
    np.testing.assert_allclose(a.mixture, a.sources.sum(1) + a.noise, atol=1e-5)
    rms = np.sqrt(np.mean(a.sources**2, -1))
    np.testing.assert_allclose(rms[:, 0], 1.0, rtol=1e-4)
    assert np.all(np.abs(20 * np.log10(rms[:, 1])) <= 5.0 + 1e-4)
    snr = 10 * np.log10(np.mean(a.sources.sum(1) ** 2, -1) / np.mean(a.noise**2, -1))
    assert np.all((snr > 18) & (snr < 32))
    assert np.all(S.mixtures(2, 800, seed=5, snr_db=None).noise == 0)


@pytest.mark.parametrize("call, match", [
    (lambda: S.mixtures(2, 1), "length"),
    (lambda: S.mixtures(0, 100), "num"),
    (lambda: S.si_snr(np.zeros((2, 5)), np.zeros((2, 6))), "reference"),
    (lambda: S.pit_si_snr(np.zeros((2, 5)), np.zeros((2, 5))), "estimates must have 3 dims"),
    (lambda: S.si_snr_improvement(np.zeros((2, 2, 5)), np.zeros((2, 2, 5)), np.zeros((2, 4))), "mixture"),
])
def test_bad_inputs_raise_before_tracing(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- model pieces


def _fsmn_params(c=3, lorder=3, depth=2, causal=True, seed=0):
    k = lorder if causal else 2 * lorder - 1
    r = np.random.default_rng(seed)
    return {"taps": tuple(jnp.asarray(r.normal(size=(i + 1, k, c)), jnp.float32) for i in range(depth)),
            "scale": jnp.ones((depth, c)), "bias": jnp.zeros((depth, c)), "alpha": jnp.full((depth, c), 0.25)}


@pytest.mark.parametrize("causal", [True, False])
def test_dilated_fsmn_reads_exactly_its_receptive_field(causal):
    t, p, lorder, depth = 40, 20, 3, 2
    params = _fsmn_params(causal=causal)
    past, future = M.fsmn_receptive_field(lorder, depth, causal=causal)
    assert (past, future) == ((2 + 4, 0) if causal else (2 + 4, 2 + 4))
    # per-frame norms make every frame's output a function of its window only when causal; the instance norm of
    # the non-causal form reads the whole sequence, so there the test compares the conv stack without it
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, t, 3)), jnp.float32)
    dx = jnp.zeros_like(x).at[:, p].set(1.0)
    f = lambda z: M.dilated_dense_fsmn(params, z, causal=causal)[0]
    if not causal:
        f = lambda z: _conv_stack(params, z)
    changed = np.abs(np.asarray(f(x + dx) - f(x)))[0].max(-1) > 1e-6
    assert not changed[: p - future].any() if future else not changed[:p].any()
    assert changed[p] and changed[min(p + past, t - 1)]
    assert not changed[p + past + 1:].any()


def _conv_stack(params, z):
    """The non-causal dense dilated stack with identity norms: the conv reach without instance statistics."""
    srcs = [z]
    for i, w in enumerate(params["taps"]):
        inp = jnp.concatenate(srcs, -1)
        y, _ = M.depthwise_conv(inp, jnp.moveaxis(w, 0, 1).reshape(w.shape[1], -1), dilation=2**i)
        srcs.append(y.reshape(*z.shape[:2], i + 1, -1).sum(2))
    return srcs[-1]


@pytest.fixture(scope="module")
def causal_block():
    """A causal recurrent block as one jitted pure function ``run(x, state) -> (y, state)`` and its ``init_state``."""
    block = M.RecurrentBlock(6, 5, lorder=3, depth=2, kernel=4, causal=True, rngs=nnx.Rngs(0))
    graph, params = nnx.split(block)
    run = jax.jit(lambda x, s: nnx.merge(graph, params)(x, s))
    return run, block.init_state


def test_causal_recurrent_block_never_reads_the_future(causal_block):
    run, init = causal_block
    x = jax.random.normal(jax.random.key(0), (2, 24, 6))
    y, _ = run(x, init(2))
    y2, _ = run(x.at[:, 15].add(1.0), init(2))
    np.testing.assert_array_equal(np.asarray(y[:, :15]), np.asarray(y2[:, :15]))
    assert float(jnp.abs(y2[:, 15:] - y[:, 15:]).max()) > 1e-3


def test_streaming_in_chunks_and_frame_by_frame_equals_the_full_causal_run(causal_block):
    run, init = causal_block
    x = jax.random.normal(jax.random.key(1), (2, 24, 6))
    full, last = run(x, init(2))
    state, outs = init(2), []
    for at in range(0, 24, 8):  # chunks longer than the conv windows (3) and shorter than the FSMN's reach (6)
        y, state = run(x[:, at:at + 8], state)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)

    def body(s, xt):
        y, s = run(xt[:, None], s)
        return s, y[:, 0]

    state, ys = jax.lax.scan(body, init(2), jnp.moveaxis(x, 1, 0))  # one frame at a time
    np.testing.assert_allclose(np.asarray(jnp.moveaxis(ys, 0, 1)), np.asarray(full), atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(last)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _joint_attention_loop(qq, qk, lq, lk, w, g, causal):
    t = w.shape[1]
    out = np.zeros_like(w)
    for i in range(t):
        ci = i // g
        for j in range(t):
            if j // g == ci and (j <= i or not causal):
                out[:, i] += np.maximum(np.sum(qq[:, i] * qk[:, j], -1) / g, 0)[:, None] ** 2 * w[:, j]
            if causal and j // g < ci:
                out[:, i] += np.sum(lq[:, i] * lk[:, j], -1)[:, None] / g * w[:, j]
            if not causal:
                out[:, i] += np.sum(lq[:, i] * lk[:, j], -1)[:, None] / t * w[:, j]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_joint_attention_matches_a_loop_over_frames(causal):
    r = np.random.default_rng(0)
    qq, qk, lq, lk = (r.normal(size=(2, 11, 3)).astype(np.float32) for _ in range(4))
    w = r.normal(size=(2, 11, 5)).astype(np.float32)
    got = M.joint_attention(qq, qk, lq, lk, w, group=4, causal=causal)
    np.testing.assert_allclose(np.asarray(got), _joint_attention_loop(qq, qk, lq, lk, w, 4, causal), rtol=1e-4, atol=1e-4)


def test_decoder_overlap_adds_what_the_encoder_frames():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 1.0, size=(2, 29)), jnp.float32)
    eye = jnp.eye(4)
    e = M.encode(eye, x, stride=2)  # relu of positive frames = the frames
    assert e.shape == (2, 14, 4)  # ⌈(29 − 4) / 2⌉ + 1
    y = M.decode(eye, e, stride=2, length=29)
    count = np.full(29, 2.0)
    count[:2] = count[28:] = 1.0  # the first and last stride are covered by one frame
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) * count, rtol=1e-6)


# ----------------------------------------------------------------------------- the separator


@pytest.mark.parametrize("blocks", M.BLOCKS)
def test_separator_shapes_for_every_block_kind(blocks):
    m = M.MossFormer2(blocks=blocks, kernel_size=4, rngs=nnx.Rngs(0), **TINY)
    y = jax.eval_shape(m, jax.ShapeDtypeStruct((2, 37), jnp.float32))
    assert y.shape == (2, 2, 37) and y.dtype == jnp.float32


def test_causal_separator_never_reads_past_its_encoder_window():
    k, p = 4, 30
    x = jax.random.normal(jax.random.key(0), (1, 60))
    xs = jnp.concatenate([x, x.at[:, p].add(1.0)])
    for causal in (True, False):
        graph, params = nnx.split(M.MossFormer2(kernel_size=k, causal=causal, rngs=nnx.Rngs(0), **TINY))
        y = np.asarray(jax.jit(lambda x: nnx.merge(graph, params)(x))(xs))
        dy = np.abs(y[1] - y[0]).max(0)
        if causal:  # output sample n reads input samples up to ⌊n / stride⌋·stride + k − 1
            assert dy[: p - k + 1].max() == 0.0 and dy[p:].max() > 0
        else:
            assert dy[: p - k].max() > 0


@pytest.mark.parametrize("x, err, match", [
    (jnp.ones((2, 3)), ValueError, "shorter than the encoder"),
    (jnp.ones((2, 1, 40)), ValueError, "mixture must have 2 dims"),
    (jnp.ones((2, 40), jnp.int32), TypeError, "mixture"),
])
def test_separator_rejects_bad_mixtures_before_tracing(x, err, match):
    m = M.MossFormer2(kernel_size=4, rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(err, match=match):
        m(x)


def test_separation_experiment_two_steps(tmp_path):
    import separation

    rows = separation.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "separation"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    names = [r["model"] for r in rows]
    assert names[0] == "mixture (no separation)" and "mossformer2" in names and "mossformer" in names
    assert rows[0]["si_snri"] == pytest.approx(0.0, abs=1e-3)
    assert all(np.isfinite(r["si_snri"]) and r["machine"] and r["date"] and r["paper"] for r in rows)
    assert "| mossformer2 |" in (out / "table.md").read_text() and (out / "plot.png").exists()
