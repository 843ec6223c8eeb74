"""NNX layers, bidirectional / stacked wrappers and the seq2seq encoder–decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax import rnn as R
from seqjax.rnn.layers import RNN
from seqjax.rnn.seq2seq import Seq2Seq
from seqjax.rnn.wrappers import Bidirectional, StackedRNN, bidirectional, stacked


def test_bidirectional_equals_two_runs_one_reversed():
    key = jax.random.PRNGKey(0)
    pf = R.init_params("gru", key, 3, 4)
    pb = R.init_params("gru", jax.random.fold_in(key, 1), 3, 4)
    x = jax.random.normal(key, (2, 9, 3))
    y, (hf, hb) = bidirectional("gru", pf, pb, x)
    yf, hf2 = R.rnn("gru", pf, x)
    yb_flip, hb2 = R.rnn("gru", pb, jnp.flip(x, 1))
    np.testing.assert_allclose(y, jnp.concatenate([yf, jnp.flip(yb_flip, 1)], -1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hb, hb2, rtol=1e-6, atol=1e-6)
    # the NNX module computes the same thing from its own parameters
    m = Bidirectional("lstm", 3, 4, heads=2, rngs=nnx.Rngs(0))
    y2, _ = m(x)
    ref, _ = bidirectional("lstm", m.fwd.param_dict(), m.bwd.param_dict(), x)
    np.testing.assert_allclose(y2, ref, rtol=1e-6, atol=1e-6)
    assert y2.shape == (2, 9, 8)


def test_stacked_equals_layer_by_layer_and_carries():
    m = StackedRNN("lstm", 3, 4, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 3))
    y, hs = m(x)
    y_ref, hs_ref = stacked("lstm", [layer.param_dict() for layer in m.layers], x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    ya, ha = m(x[:, :5])
    yb, hb = m(x[:, 5:], ha)
    np.testing.assert_allclose(jnp.concatenate([ya, yb], 1), y, rtol=1e-5, atol=1e-6)
    for a, b in zip(hb, hs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per-layer carries"):
        m(x, [None])


def test_nnx_layer_impls_agree_and_have_logical_axes():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 3))
    m = RNN("gru", 3, 4, heads=2, rngs=nnx.Rngs(0))
    y, h = m(x)
    mp = RNN("gru", 3, 4, heads=2, impl="parallel", parallel={"mode": "quasi", "tol": 1e-7}, rngs=nnx.Rngs(0))
    yp, hp = mp(x)
    np.testing.assert_allclose(yp, y, rtol=1e-5, atol=1e-6)
    assert m.R.get_metadata()["out_sharding"] == ("heads", "head_dim", None, None)
    grads = nnx.grad(lambda mod: jnp.sum(mod(x)[0] ** 2))(mp)
    grads_ref = nnx.grad(lambda mod: jnp.sum(mod(x)[0] ** 2))(m)
    np.testing.assert_allclose(grads.R[...], grads_ref.R[...], rtol=1e-4, atol=1e-6)


def test_seq2seq_teacher_forcing_reproduces_greedy_decoding():
    model = Seq2Seq(3, vocab=7, hidden=8, d_emb=5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 3))
    mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
    toks, logits = model.generate(x, 5, bos=0, src_mask=mask)
    tgt_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), toks[:, :-1]], 1)
    tf = model(x, tgt_in, src_mask=mask)
    np.testing.assert_allclose(tf, logits, rtol=1e-5, atol=1e-5)
    # a training step decreases the teacher-forced cross entropy
    tgt = jax.random.randint(jax.random.PRNGKey(4), (2, 5), 0, 7)

    def loss(m):
        lg = m(x, jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], 1), src_mask=mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tgt[..., None], -1))

    l0 = loss(model)
    g = nnx.grad(loss)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, d: p - 0.5 * d, params, nnx.state(g, nnx.Param)))
    assert float(loss(model)) < float(l0)
