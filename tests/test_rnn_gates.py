"""The closed-form LSTM / GRU backward (impl="fused", seqjax/rnn/gates.py) equals the lax.scan reference:
outputs, final state and every gradient (parameters, input, h0), over awkward lengths and sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import rnn as R
from seqjax.rnn import functional as F
from seqjax.rnn import gates
from tests.test_rnn_cells import make, make_h0


def _params(kind, key, d_in, hidden, heads):
    p = make(kind, key, d_in=d_in, hidden=hidden, heads=heads)
    p.pop("peep", None)  # the closed form is for the LSTM without peepholes
    return p


def _loss_and_grads(kind, p, x, h0, impl, reverse=False):
    wy = jax.random.normal(jax.random.PRNGKey(3), x.shape[:2] + (h0.shape[-1],))
    wh = jax.random.normal(jax.random.PRNGKey(4), h0.shape)

    def loss(p, x, h0):
        y, h = R.rnn(kind, p, x, h0=h0, impl=impl, reverse=reverse)
        return jnp.sum(y * wy) + jnp.sum(h * wh), (y, h)

    (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(p, x, h0)
    return y, h, grads


def _assert_same(got, want):
    y, h, g = got
    y_ref, h_ref, g_ref = want
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(g) == jax.tree.structure(g_ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("t,d_in,hidden,heads,reverse", [
    (1, 3, 6, 2, False),
    (63, 5, 7, 1, False),  # one full time chunk and a tail of 31; odd sizes
    (63, 5, 7, 1, True),
    (70, 4, 6, 3, False),  # head_dim 2
    (64, 3, 5, 1, False),  # two full time chunks, no tail
])
def test_closed_form_matches_reference(kind, t, d_in, hidden, heads, reverse):
    key = jax.random.PRNGKey(t + hidden)
    p = _params(kind, key, d_in, hidden, heads)
    x = jax.random.normal(jax.random.fold_in(key, 1), (3, t, d_in))
    h0 = make_h0(kind, jax.random.fold_in(key, 2), 3, hidden)
    want = _loss_and_grads(kind, p, x, h0, "sequential", reverse)
    _assert_same(_loss_and_grads(kind, p, x, h0, "fused", reverse), want)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_closed_form_saturated_gates(kind):
    """Preactivations of tens (gates at 0 or 1, tanh at +-1): the per-chunk gate factors lose nothing."""
    key = jax.random.PRNGKey(7)
    p = jax.tree.map(lambda v: 6.0 * v, _params(kind, key, 4, 5, 1))
    x = 4.0 * jax.random.normal(jax.random.fold_in(key, 1), (2, 40, 4))
    h0 = make_h0(kind, jax.random.fold_in(key, 2), 2, 5)
    assert jnp.mean(jnp.abs(jnp.einsum("bti,igkd->btgkd", x, p["W"])) > 5.0) > 0.5  # most gates saturated
    _assert_same(_loss_and_grads(kind, p, x, h0, "fused"), _loss_and_grads(kind, p, x, h0, "sequential"))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_closed_form_unrolled_equals_reference(kind):
    key = jax.random.PRNGKey(1)
    p = _params(kind, key, 3, 5, 1)
    x = jax.random.normal(key, (2, 37, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 2), 2, 5)
    want = _loss_and_grads(kind, p, x, h0, "sequential")

    def loss(p, x, h0):
        y, h = R.rnn(kind, p, x, h0=h0, impl="fused", unroll=4)
        return jnp.sum(y * jax.random.normal(jax.random.PRNGKey(3), y.shape)) + jnp.sum(
            h * jax.random.normal(jax.random.PRNGKey(4), h.shape)), (y, h)

    (_, (y, h)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(p, x, h0)
    _assert_same((y, h, g), want)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_closed_form_state_carried_across_a_split(kind):
    """Two calls chained through h_last equal one call, values and gradients (h0 of the second call is
    the first call's output, so its gradient flows back through the first)."""
    key = jax.random.PRNGKey(11)
    p = _params(kind, key, 3, 6, 2)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 45, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 2), 2, 6)
    w = jax.random.normal(jax.random.fold_in(key, 3), (2, 45, 6))

    def whole(p, x, h0):
        y, h = R.rnn(kind, p, x, h0=h0)
        return jnp.sum(y * w) + jnp.sum(h)

    def split(p, x, h0):
        ya, ha = R.rnn(kind, p, x[:, :34], h0=h0, impl="fused")
        yb, hb = R.rnn(kind, p, x[:, 34:], h0=ha, impl="fused")
        return jnp.sum(jnp.concatenate([ya, yb], 1) * w) + jnp.sum(hb)

    np.testing.assert_allclose(split(p, x, h0), whole(p, x, h0), rtol=1e-5)
    got = jax.grad(split, argnums=(0, 1, 2))(p, x, h0)
    want = jax.grad(whole, argnums=(0, 1, 2))(p, x, h0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_closed_form_on_precomputed_projections(kind):
    """rnn_scan (xp given, the projection outside) takes the closed form too, with the same gradients."""
    key = jax.random.PRNGKey(5)
    p = _params(kind, key, 3, 6, 2)
    xp = R.project(p, jax.random.normal(key, (2, 40, 3)))
    h0 = make_h0(kind, jax.random.fold_in(key, 2), 2, 6)

    def loss(p, xp, h0, impl):
        y, h = R.rnn_scan(kind, p, xp, h0=h0, impl=impl)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h ** 2)

    got = jax.grad(loss, argnums=(0, 1, 2))(p, xp, h0, "fused")
    want = jax.grad(loss, argnums=(0, 1, 2))(p, xp, h0, "sequential")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_closed_form_bf16_input():
    p = _params("lstm", jax.random.PRNGKey(0), 3, 6, 1)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 3))
    y, _ = R.rnn("lstm", p, x)
    yb, hb = R.rnn("lstm", p, x.astype(jnp.bfloat16), impl="fused")
    assert yb.dtype == jnp.bfloat16 and hb.dtype == jnp.float32
    np.testing.assert_allclose(yb.astype(jnp.float32), y, atol=3e-2)


def test_auto_takes_the_closed_form_where_there_is_one():
    key = jax.random.PRNGKey(0)
    assert F.resolve_impl("lstm", R.init_params("lstm", key, 3, 4), "auto") == "fused"
    assert F.resolve_impl("gru", R.init_params("gru", key, 3, 4), "auto") == "fused"
    peep = R.init_params("lstm", key, 3, 4, peepholes=True)
    assert not gates.has_rule("lstm", peep)
    assert F.resolve_impl("lstm", peep, "auto") == "sequential"
    assert F.resolve_impl("slstm", R.init_params("slstm", key, 3, 4), "auto") == "sequential"
    p = R.init_params("gru", key, 3, 4)
    x = jax.random.normal(key, (2, 5, 3))
    np.testing.assert_allclose(R.rnn("gru", p, x, impl="auto")[0], R.rnn("gru", p, x)[0], rtol=1e-5, atol=1e-6)
