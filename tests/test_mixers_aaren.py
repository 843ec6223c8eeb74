"""Aaren (attention as an RNN): the (m, u, w) scan equals causal softmax attention with the learned query."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.mixers import aaren as A
from seqjax.nn import rms_rel_err


def _softmax_attention(q, k, v, scale=None):
    """Direct: o_t = sum_{j<=t} softmax_j(scale q.k_j) v_j, a masked softmax over the T x T scores."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bthk,hk->bht", np.asarray(k, np.float64), np.asarray(q, np.float64)) * scale
    t = s.shape[-1]
    logits = np.where(np.tril(np.ones((t, t), bool)), s[:, :, None, :], -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshv->bthv", p, np.asarray(v, np.float64))


@pytest.mark.parametrize("t", [1, 63])
@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_equals_causal_softmax_attention(t, impl):
    inp = A.aaren_make_inputs(jax.random.PRNGKey(t), 2, t)
    y, _ = A.aaren(**inp, impl=impl)
    assert rms_rel_err(y, _softmax_attention(**inp)) < 1e-5


def test_large_scores_stay_exact():
    """The running max keeps exp() in range: scores of +-300 would overflow a naive sum of exps."""
    inp = A.aaren_make_inputs(jax.random.PRNGKey(1), 2, 40)
    inp["k"] = inp["k"] * 150.0
    ref = _softmax_attention(**inp)
    for impl in ("sequential", "associative"):
        y, h = A.aaren(**inp, impl=impl)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(h))
        assert rms_rel_err(y, ref) < 1e-5


def test_combine_is_associative_with_identity():
    ks = jax.random.split(jax.random.PRNGKey(2), 9)
    def state(i):
        return (3 * jax.random.normal(ks[3 * i], (2, 3)), jnp.exp(jax.random.normal(ks[3 * i + 1], (2, 3))),
                jax.random.normal(ks[3 * i + 2], (2, 3, 4)))
    a, b, c = state(0), state(1), state(2)
    left = A.combine(A.combine(a, b), c)
    right = A.combine(a, A.combine(b, c))
    for x, y in zip(left, right):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    e = A.zero_state(2, 3, 4)
    for x, y in zip(A.combine(e, a), a):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_step_is_constant_memory_and_exact():
    inp = A.aaren_make_inputs(jax.random.PRNGKey(3), 2, 30)
    ref = _softmax_attention(**inp)
    step = jax.jit(A.aaren_step)
    h, shapes = None, set()
    for i in range(30):
        y, h = step(h, inp["q"], inp["k"][:, i], inp["v"][:, i])
        shapes.add(tuple(x.shape for x in h))
        assert rms_rel_err(y, ref[:, i]) < 1e-5
    assert shapes == {((2, 2), (2, 2), (2, 2, 7))}  # the state never grows with t


def test_resets_restart_the_softmax():
    inp = A.aaren_make_inputs(jax.random.PRNGKey(4), 1, 20)
    resets = jnp.zeros((1, 20), bool).at[:, 8].set(True)
    y, _ = A.aaren(**inp, resets=resets, impl="associative")
    second = _softmax_attention(inp["q"], inp["k"][:, 8:], inp["v"][:, 8:])
    assert rms_rel_err(y[:, 8:], second) < 1e-5


def test_materialize_rows_are_softmax():
    inp = A.aaren_make_inputs(jax.random.PRNGKey(5), 2, 11)
    m = A.aaren_materialize(**inp)
    np.testing.assert_allclose(jnp.sum(m, -1), 1.0, rtol=1e-6)
    assert float(jnp.min(m)) >= 0.0 and float(jnp.max(jnp.triu(m, 1))) == 0.0


def test_bad_inputs_raise():
    inp = A.aaren_make_inputs(jax.random.PRNGKey(6), 2, 5)
    with pytest.raises(ValueError, match="q must have shape"):
        A.aaren(inp["q"][:, :3], inp["k"], inp["v"])
    with pytest.raises(ValueError, match="v must have shape"):
        A.aaren(inp["q"], inp["k"], inp["v"][:1])
    with pytest.raises(ValueError, match="impl"):
        A.aaren(**inp, impl="chunked")
    with pytest.raises(ValueError, match="negative_eigen"):
        A.aaren(**inp, negative_eigen=True)
    with pytest.raises(ValueError, match="h0"):
        A.aaren(**inp, h0=(jnp.zeros((2, 2)), jnp.zeros((2, 2))))
