"""Parallel-in-time evaluation (DEER, quasi-DEER, quasi-ELK) equals the sequential scan, values and
gradients (implicit function theorem)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import rnn as R
from seqjax.rnn import deer as D
from tests.test_rnn_cells import make, make_h0

CASES = [("rnn_tanh", "full", 0.0), ("rnn_tanh", "quasi", 0.0), ("gru", "full", 0.0),
         ("gru", "quasi", 0.0), ("lstm", "full", 0.0), ("lstm", "quasi", 0.0), ("lstm", "quasi", 0.5),
         ("slstm", "quasi", 0.0), ("leaky", "quasi", 0.0), ("shplrnn", "quasi", 0.0)]


@pytest.mark.parametrize("kind,mode,damping", CASES)
def test_parallel_equals_sequential(kind, mode, damping):
    key = jax.random.PRNGKey(1)
    p = make(kind, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 23, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 3), 2, 6)
    y, h = R.rnn(kind, p, x, h0=h0)
    yp, hp, info = R.rnn(kind, p, x, h0=h0, impl="parallel", mode=mode, damping=damping, tol=1e-6,
                         max_iters=200 if damping else None, return_info=True)
    np.testing.assert_allclose(yp, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hp, h, rtol=1e-4, atol=1e-5)
    assert 1 <= int(info["iters"]) <= (200 if damping else 23) and float(info["residual"]) <= 1e-6


@pytest.mark.parametrize("kind,mode", [("rnn_tanh", "full"), ("gru", "quasi"), ("lstm", "full"), ("lstm", "quasi")])
def test_parallel_gradients_equal_sequential(kind, mode):
    key = jax.random.PRNGKey(2)
    p = make(kind, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 7, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 3), 2, 6)
    wy = jax.random.normal(jax.random.fold_in(key, 4), (2, 7, 6))
    wh = jax.random.normal(jax.random.fold_in(key, 5), h0.shape)

    def loss(p, x, h0, **kw):
        y, h = R.rnn(kind, p, x, h0=h0, **kw)
        return jnp.sum(y * wy) + jnp.sum(h * wh)

    want = jax.grad(loss, argnums=(0, 1, 2))(p, x, h0)
    got = jax.jit(jax.grad(lambda *a: loss(*a, impl="parallel", mode=mode, tol=1e-7), argnums=(0, 1, 2)))(p, x, h0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_full_deer_converges_fast_and_t1():
    """Newton (full Jacobians) converges quadratically: few iterations on a contractive tanh RNN;
    T = 1 is one step."""
    key = jax.random.PRNGKey(4)
    p = R.init_params("rnn_tanh", key, 3, 6)
    p["R"] = 0.3 * p["R"]
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 64, 3))
    y, _ = R.rnn("rnn_tanh", p, x)
    yp, _, info = R.rnn("rnn_tanh", p, x, impl="parallel", mode="full", tol=1e-6, return_info=True)
    np.testing.assert_allclose(yp, y, atol=1e-5)
    assert int(info["iters"]) <= 10
    y1, _ = R.rnn("gru", make("gru", key), x[:, :1])
    y1p, _, i1 = R.rnn("gru", make("gru", key), x[:, :1], impl="parallel", return_info=True)
    np.testing.assert_allclose(y1p, y1, atol=1e-6)
    assert int(i1["iters"]) <= 2


def test_quasi_diag_is_jacobian_diagonal():
    key = jax.random.PRNGKey(6)
    for kind in ("lstm", "gru", "slstm", "shplrnn"):
        p = make(kind, key)
        s = make_h0(kind, key, 2, 6)
        xp = R.project(p, jax.random.normal(key, (2, 1, 3)))[:, 0]
        n = s.shape[1] * s.shape[2]
        flat = s.reshape(2, n)
        full = D._full_jacobian(kind, p, flat, xp)
        diag = D._diag_jacobian(kind, p, flat, xp)
        np.testing.assert_allclose(diag, jnp.diagonal(full, axis1=1, axis2=2), rtol=1e-5, atol=1e-6)


def test_deer_bad_options():
    p = R.init_params("gru", jax.random.PRNGKey(0), 3, 4)
    x = jnp.ones((1, 5, 3))
    with pytest.raises(ValueError, match="mode="):
        R.rnn("gru", p, x, impl="parallel", mode="newton")
    with pytest.raises(ValueError, match="damping"):
        R.rnn("gru", p, x, impl="parallel", mode="full", damping=1.0)
    with pytest.raises(ValueError, match="max_iters"):
        R.rnn("gru", p, x, impl="parallel", max_iters=0)


@pytest.mark.parametrize("t", [1, 63, 257])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 100.0])
def test_damped_solve_parallel_equals_thomas_and_dense(t, lam):
    """quasi-ELK's tridiagonal step: the parallel solve (associative Möbius scan + two linear scans) equals the
    sequential Thomas sweep and a dense float64 solve of the same least-squares problem, for Jacobian
    diagonals up to 1.5 in size (strong and weak coupling) and weak to strong damping."""
    rng = np.random.default_rng(t)
    b, n = 2, 3
    a = rng.uniform(-1.5, 1.5, (b, t, n)).astype(np.float32)
    r, g = (rng.normal(size=(b, t, n)).astype(np.float32) for _ in range(2))
    h0 = rng.normal(size=(b, n)).astype(np.float32)
    a, r, g, h0 = map(jnp.asarray, (a, r, g, h0))
    par = np.asarray(D._solve_damped(a, r, h0, g, lam))
    seq = np.asarray(D._solve_damped_sequential(a, r, h0, g, lam))
    a, r, g, h0 = map(np.asarray, (a, r, g, h0))
    # dense: minimise sum_t (s_t - a_t s_{t-1} - r_t)^2 + lam (s_t - g_t)^2, s_{-1} = h0
    want = np.zeros((b, t, n))
    for i in range(b):
        for j in range(n):
            A = np.eye(t) - np.diag(a[i, 1:, j].astype(np.float64), -1)
            y = r[i, :, j].astype(np.float64).copy()
            y[0] += a[i, 0, j] * h0[i, j]
            M = np.vstack([A, np.sqrt(lam) * np.eye(t)])
            rhs = np.concatenate([y, np.sqrt(lam) * g[i, :, j]])
            want[i, :, j] = np.linalg.lstsq(M, rhs, rcond=None)[0]
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(seq, want, atol=2e-4 * scale, rtol=0)
    np.testing.assert_allclose(par, want, atol=2e-4 * scale, rtol=0)
