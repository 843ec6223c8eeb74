"""Each RNN cell against a plain loop written from its paper's equations (tests/rnn_reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import rnn as R
from tests.rnn_reference import reference, to_dense

KINDS = R.KINDS


def make(kind, key, d_in=3, hidden=6, heads=2, **kw):
    """Params with every leaf perturbed (zero-initialised biases would hide bugs)."""
    heads = 1 if kind == "shplrnn" else heads
    p = R.init_params(kind, key, d_in, hidden, heads=heads, peepholes=True, **kw)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(p))
    out = {}
    for k_, (name, v) in zip(keys, sorted(p.items())):
        noise = 0.3 * jax.random.normal(k_, v.shape)
        out[name] = jax.random.uniform(k_, v.shape, minval=1.2, maxval=4.0) if name == "tau" else v + noise
    if kind == "shplrnn":
        out["A"] = jnp.clip(out["A"], -0.9, 0.9)
    return out


def make_h0(kind, key, bsz, hidden):
    s = R.get_cell(kind).num_states
    h0 = 0.5 * jax.random.normal(key, (bsz, s, hidden))
    if kind == "slstm":  # n > 0 (normaliser), any stabiliser m
        h0 = h0.at[:, 2].set(jnp.abs(h0[:, 2]) + 0.5)
    return h0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t,with_h0", [(1, False), (13, True)])
def test_values_match_numpy_loop(kind, t, with_h0):
    key = jax.random.PRNGKey(hash(kind) % 1000)
    p = make(kind, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, t, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 3), 2, 6) if with_h0 else None
    y, h_last = R.rnn(kind, p, x, h0=h0)
    p64 = to_dense(jax.tree.map(lambda v: np.asarray(v, np.float64), p))
    y_ref, h_ref = reference(kind, p64, np.asarray(x, np.float64), None if h0 is None else np.asarray(h0, np.float64))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_grads_match_reference_loop(kind):
    key = jax.random.PRNGKey(7)
    p = make(kind, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 9, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 3), 2, 6)
    wy = jax.random.normal(jax.random.fold_in(key, 4), (2, 9, 6))
    wh = jax.random.normal(jax.random.fold_in(key, 5), h0.shape)

    def loss_seqjax(p, x, h0):
        y, h = R.rnn(kind, p, x, h0=h0)
        return jnp.sum(y * wy) + jnp.sum(h * wh)

    def loss_ref(p, x, h0):
        y, h = reference(kind, to_dense(p, jnp), x, h0, jnp)
        return jnp.sum(y * wy) + jnp.sum(h * wh)

    got = jax.grad(loss_seqjax, argnums=(0, 1, 2))(p, x, h0)
    want = jax.grad(loss_ref, argnums=(0, 1, 2))(p, x, h0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["rnn_tanh", "leaky", "lstm", "gru", "slstm"])
def test_headwise_equals_block_diagonal_dense(kind):
    """G heads equal the dense (G = 1) cell whose recurrent matrix is block-diagonal."""
    key = jax.random.PRNGKey(3)
    g, d = 3, 2
    p = make(kind, key, hidden=g * d, heads=g)
    dense = to_dense(p, jnp)
    k = R.get_cell(kind).num_gates
    q = {"W": dense["Wx"][:, None], "b": dense["b"][None],
         "R": jnp.transpose(dense["R"], (1, 0, 2))[None]}  # [1, H, K, H]
    for name in ("tau", "bhn"):
        if name in p:
            q[name] = dense[name][None]
    if "peep" in p:
        q["peep"] = dense["peep"][None]
    assert q["R"].shape == (1, g * d, k, g * d)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 11, 3))
    y1, h1 = R.rnn(kind, p, x)
    y2, h2 = R.rnn(kind, q, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1, h2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_split_and_carry(kind):
    key = jax.random.PRNGKey(11)
    p = make(kind, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 13, 3))
    y, h = R.rnn(kind, p, x)
    ya, ha = R.rnn(kind, p, x[:, :6])
    yb, hb = R.rnn(kind, p, x[:, 6:], h0=ha)
    np.testing.assert_allclose(jnp.concatenate([ya, yb], 1), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hb, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_reverse_is_flipped_forward(kind):
    key = jax.random.PRNGKey(5)
    p = make(kind, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 10, 3))
    y, h = R.rnn(kind, p, x, reverse=True)
    yf, hf = R.rnn(kind, p, jnp.flip(x, 1))
    np.testing.assert_allclose(y, jnp.flip(yf, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, hf, rtol=1e-6, atol=1e-6)


def test_unroll_and_bf16_input():
    p = make("lstm", jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 3))
    y, _ = R.rnn("lstm", p, x)
    y4, _ = R.rnn("lstm", p, x, unroll=4)
    np.testing.assert_allclose(y4, y, rtol=1e-6, atol=1e-6)
    yb, hb = R.rnn("lstm", p, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16 and hb.dtype == jnp.float32
    np.testing.assert_allclose(yb.astype(jnp.float32), y, atol=3e-2)


def test_bad_input_raises():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="hidden=7 must be divisible by heads=2"):
        R.init_params("lstm", key, 3, 7, heads=2)
    with pytest.raises(ValueError, match="heads must be 1"):
        R.init_params("shplrnn", key, 3, 4, heads=2)
    with pytest.raises(ValueError, match="kind="):
        R.init_params("elman", key, 3, 4)
    p = R.init_params("lstm", key, 3, 4)
    x = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match=r"h0 must have shape \[2, 2, 4\]"):
        R.rnn("lstm", p, x, h0=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"params\['W'\] must have shape \[4"):
        R.rnn("lstm", p, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="x must have 3 dims"):
        R.rnn("lstm", p, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="impl="):
        R.rnn("lstm", p, x, impl="cuda")
    with pytest.raises(ValueError, match="only apply to impl='parallel'"):
        R.rnn("lstm", p, x, tol=1e-3)
