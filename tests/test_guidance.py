"""CKA and guidance: CKA is 1 for identical representations, invariant to orthogonal transforms and isotropic
scaling, equals a hand-computed case and a plain numpy reference (linear, RBF, debiased); the depth pairing by the
paper's rule; the guidance loss is zero against itself, trains only the target and lowers; clear errors; the
experiment for two steps."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.analysis import cka as C
from seqjax.train import guidance as G

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def _reps(n=40, p=7, q=5, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, p)).astype(np.float32)
    y = (x[:, :q] @ r.normal(size=(q, q)) + 0.5 * r.normal(size=(n, q))).astype(np.float32)
    return x, y


def _ref_cka(x, y, kernel="linear", debiased=False, threshold=1.0):
    """Kornblith et al.'s reference, in float64 numpy with an explicit centring matrix."""
    x, y = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (x, y))
    n = len(x)

    def gram(a):
        if kernel == "linear":
            return a @ a.T
        d2 = ((a[:, None] - a[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * (threshold * np.median(np.sqrt(d2))) ** 2))

    def hsic(k, lm):
        if not debiased:
            h = np.eye(n) - np.ones((n, n)) / n
            return np.trace(k @ h @ lm @ h)
        k, lm = k - np.diag(np.diag(k)), lm - np.diag(np.diag(lm))  # Song et al. (2012), eq. 5
        one = np.ones(n)
        return (np.trace(k @ lm) + (one @ k @ one) * (one @ lm @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ k @ lm @ one) / (n * (n - 3))

    k, lm = gram(x), gram(y)
    return hsic(k, lm) / np.sqrt(hsic(k, k) * hsic(lm, lm))


@pytest.mark.parametrize("kernel", C.KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_reference(kernel, debiased):
    x, y = _reps()
    np.testing.assert_allclose(float(C.cka(x, y, kernel, debiased=debiased)), _ref_cka(x, y, kernel, debiased), rtol=2e-4)
    np.testing.assert_allclose(float(C.cka(x, y, kernel, threshold=0.5)), _ref_cka(x, y, kernel, threshold=0.5), rtol=2e-4)


@pytest.mark.parametrize("kernel", C.KERNELS)
def test_cka_identity_orthogonal_and_scale_invariance(kernel):
    x, y = _reps()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(7, 7)))
    np.testing.assert_allclose(float(C.cka(x, x, kernel)), 1.0, rtol=1e-5)
    base = float(C.cka(x, y, kernel))
    assert 0.05 < base < 0.99
    np.testing.assert_allclose(float(C.cka(x @ q.astype(np.float32), y, kernel)), base, rtol=1e-4)
    np.testing.assert_allclose(float(C.cka(x, 7.5 * y, kernel)), base, rtol=1e-4)
    np.testing.assert_allclose(float(C.cka(y, x, kernel)), base, rtol=1e-5)  # symmetric
    np.testing.assert_allclose(float(C.cka(x + 3.0, y, kernel)), base, rtol=1e-4)  # centring removes offsets


def test_cka_hand_computed():
    """One feature each: linear CKA is the squared correlation. x - mean = (-1.5, -.5, .5, 1.5), y - mean =
    (-.5, .5, -.5, .5): cov sum 1, sum of squares 5 and 1, so CKA = 1 / 5."""
    x = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    y = np.array([[0.0], [1.0], [0.0], [1.0]], np.float32)
    np.testing.assert_allclose(float(C.linear_cka(x, y)), 0.2, rtol=1e-6)
    # an orthogonal embedding is a rotation away from CKA 1: [n, 2] rows (a, 0) vs (0, a)
    np.testing.assert_allclose(float(C.linear_cka(np.c_[x, 0 * x], np.c_[0 * x, x])), 1.0, rtol=1e-6)
    assert float(C.linear_cka(x, np.ones_like(x))) == 0.0  # a constant representation: 0 by convention


def test_cka_flattens_examples_and_is_differentiable():
    x, y = _reps(n=12, p=6, q=6)
    x3 = x.reshape(12, 2, 3)
    np.testing.assert_allclose(float(C.cka(x3, y)), float(C.cka(x, y)), rtol=1e-6)
    g = jax.grad(lambda a: C.cka(a, y, "rbf"))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


def test_cka_bad_input():
    x, y = _reps()
    with pytest.raises(ValueError, match="same sample count.*40 and 39"):
        C.cka(x, y[:39])
    with pytest.raises(ValueError, match="n_samples >= 4"):
        C.cka(x[:3], y[:3], debiased=True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        C.cka(x[:, 0], y)
    with pytest.raises(ValueError, match="kernel"):
        C.cka(x, y, "cosine")
    with pytest.raises(TypeError, match="float"):
        C.cka(x.astype(np.int32), y)


def test_pair_layers_by_depth():
    assert G.pair_layers(5, 3) == [(0, 0), (2, 1), (4, 2)]
    assert G.pair_layers(20, 4) == [(0, 0), (6, 1), (13, 2), (19, 3)]  # round(i*19/3): 6.33, 12.67
    assert G.pair_layers(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert G.pair_layers(6, 1) == [(5, 0)]


def test_unpairable_guide_errors():
    x, _ = _reps()
    with pytest.raises(ValueError, match="cannot pair a guide of 5 layers with a target of 3"):
        G.pair_layers(3, 5)
    with pytest.raises(ValueError, match="cannot pair"):
        G.guidance_loss([x] * 3, [x] * 5)
    with pytest.raises(ValueError, match="cannot pair"):
        G.guidance_loss([x], [])
    with pytest.raises(ValueError, match="out of range"):
        G.guidance_loss([x] * 2, [x] * 2, pairs=[(0, 2)])
    with pytest.raises(ValueError, match="same batch"):
        G.guidance_loss([x], [x[:10]])
    with pytest.raises(ValueError, match="tokenwise"):
        G.guidance_loss([x], [x], tokenwise=True)


def test_guidance_loss_values_and_gradients():
    x, y = _reps()
    acts = [jnp.asarray(x), jnp.asarray(y)]
    assert float(G.guidance_loss(acts, acts)) == pytest.approx(0.0, abs=1e-5)
    want = (1 - _ref_cka(x, y)) + (1 - _ref_cka(y, y))  # pairs (0, 0), (1, 1) with guide [y, y]
    np.testing.assert_allclose(float(G.guidance_loss(acts, [y, y])), want, rtol=1e-4)
    seq = np.stack([x, x[::-1], x * 2], 1)  # [n, 3, p]
    np.testing.assert_allclose(float(G.guidance_loss([seq], [seq], tokenwise=True)), 0.0, atol=1e-5)
    # only the target gets a gradient
    gt, gg = jax.grad(lambda a, b: G.guidance_loss([a], [b]), argnums=(0, 1))(acts[0], jnp.asarray(y))
    assert float(jnp.abs(gt).sum()) > 0 and float(jnp.abs(gg).sum()) == 0
    total, g = G.guided_loss(jnp.float32(1.0), acts, [y, y], 0.5)
    np.testing.assert_allclose(float(total), 1.0 + 0.5 * float(g), rtol=1e-6)


def test_guidance_aligns_a_linear_map():
    """Gradient descent on 1 - CKA(x W, guide) raises the alignment from a random W."""
    x, y = _reps(n=64, p=8, q=4)
    w = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    loss = jax.jit(lambda w: G.guidance_loss([jnp.tanh(jnp.asarray(x) @ w)], [y]))
    start = float(loss(w))
    for _ in range(100):
        w = w - 0.5 * jax.grad(loss)(w)
    assert float(loss(w)) < 0.5 * start


def test_guidance_experiment_two_steps(tmp_path):
    import guidance as exp

    rows = exp.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "guidance"
    recs = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(recs) == len(rows) > 0
    assert {"machine", "date", "seed", "paper"} <= set(recs[0])
    assert {r["guide"] for r in recs} >= {"none", "random"}
    verdicts = re.findall(r"\| (met|missed)[^|]* \|\s*$", open(out / "table.md").read(), re.M)
    assert verdicts, "every claim row ends in a met / missed verdict"
