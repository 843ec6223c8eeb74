"""Titans neural memory: the token-by-token rule, the chunked parallel form, and how they relate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.mixers import titans as T
from seqjax.nn import rms_rel_err


def _inputs(key, t, depth=2, b=2):
    return T.titans_make_inputs(key, b, t, depth=depth)


def _err(a, b):
    return max(rms_rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_linear_memory_matches_the_paper_loop():
    """Depth 1, closed-form gradient 2 k (k^T W - v^T): S = eta S - theta grad; W = (1 - alpha) W + S; y = q W."""
    t = 9
    inp = _inputs(jax.random.PRNGKey(0), t, depth=1, b=1)
    inp["w1"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1), inp["w1"].shape)
    y, h = T.titans_recurrent(**inp)
    g = {n: np.asarray(x, np.float64) for n, x in inp.items()}
    w, s = g["w1"].copy(), np.zeros_like(g["w1"])
    ys = []
    for i in range(t):
        k, v, q = g["k"][0, i], g["v"][0, i], g["q"][0, i]  # [h, k], [h, v]
        grad = 2 * np.einsum("hk,hv->hkv", k, np.einsum("hk,hkv->hv", k, w) - v)
        s = g["eta"][0, i][:, None, None] * s - g["theta"][0, i][:, None, None] * grad
        w = (1 - g["alpha"][0, i])[:, None, None] * w + s
        ys.append(np.einsum("hk,hkv->hv", q, w))
    assert rms_rel_err(y[0], np.stack(ys)) < 1e-5
    assert rms_rel_err(h.w[0][0], w) < 1e-5 and rms_rel_err(h.s[0][0], s) < 1e-5


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("t,c", [(20, 4), (23, 8)])
def test_chunked_equals_sequential_chunk_rule(depth, t, c):
    """The parallel form is exactly the paper's chunk rule (gradients at chunk-start weights), evaluated
    token by token — values, final state and gradients w.r.t. every input — also with a packed reset."""
    inp = _inputs(jax.random.PRNGKey(t + depth), t, depth)
    resets = jnp.zeros((2, t), bool).at[:, 11].set(True)
    ref = functools.partial(T.titans_recurrent, resets=resets, chunk_size=c)
    par = functools.partial(T.titans_chunked, resets=resets, chunk_size=c)
    assert _err(par(**inp), ref(**inp)) < 1e-5
    ky = jax.random.PRNGKey(7)

    def loss(f, inp):
        y, h = f(**inp)
        return jnp.sum(y * jax.random.normal(ky, y.shape)) + sum(jnp.sum(x) for x in jax.tree.leaves(h))

    assert _err(jax.grad(functools.partial(loss, par))(inp), jax.grad(functools.partial(loss, ref))(inp)) < 1e-4


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_approximation_converges_to_token_by_token(depth):
    """Chunk size 1 is exact; for c > 1 the chunked form is an approximation (for the linear memory
    too), and its error shrinks as the chunk shrinks."""
    t = 32
    inp = _inputs(jax.random.PRNGKey(3), t, depth)
    exact, _ = T.titans_recurrent(**inp, chunk_size=1)
    errs = {c: rms_rel_err(T.titans_chunked(**inp, chunk_size=c)[0], exact) for c in (1, 2, 4, 16)}
    assert errs[1] < 1e-6
    assert errs[16] > 1e-3  # a real approximation, not exact
    assert errs[1] < errs[2] < errs[4] < errs[16], errs


def test_memory_stores_an_association():
    """Writing the same (k, v) repeatedly drives the retrieval M(k) to v (the associative loss falls)."""
    inp = _inputs(jax.random.PRNGKey(4), 40, depth=2, b=1)
    for n in ("k", "v", "q"):
        src = "k" if n == "q" else n
        inp[n] = jnp.broadcast_to(inp[src][:, :1], inp[src].shape)
    inp["theta"] = jnp.full_like(inp["theta"], 0.2)
    inp["eta"] = jnp.full_like(inp["eta"], 0.5)
    inp["alpha"] = jnp.zeros_like(inp["alpha"])
    y, _ = T.titans(**inp, chunk_size=1)
    err = jnp.linalg.norm(y - inp["v"], axis=-1)[0]  # [t, h]
    assert bool(jnp.all(err[-1] < 0.05 * err[0]))


def test_materialize_linear_memory_equals_jacobian():
    inp = _inputs(jax.random.PRNGKey(5), 10, depth=1, b=1)
    m = T.titans_materialize(**inp)
    jac = jax.jacobian(lambda v: T.titans_recurrent(**{**inp, "v": v})[0][0, :, :, 0])(inp["v"])
    # jac[t, h, b, s, h', v']: take v' = 0, b = 0, h' = h
    direct = jnp.stack([jac[:, h, 0, :, h, 0] for h in range(m.shape[1])])
    assert rms_rel_err(m[0], direct) < 1e-5
    with pytest.raises(ValueError, match="linear"):
        T.titans_materialize(**_inputs(jax.random.PRNGKey(5), 4))


def test_layer_chunked_training_form_is_close_to_exact():
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 16))
    exact = T.NeuralMemory(16, chunk_size=1, rngs=nnx.Rngs(0))
    fast = T.NeuralMemory(16, chunk_size=4, rngs=nnx.Rngs(0))
    y1, _ = exact(x)
    y4, _ = fast(x)
    assert 0 < rms_rel_err(y4, y1) < 0.1
    q = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 2, 8))
    r = exact.retrieve(None, q)
    w = T._initial((exact.w1[...], exact.w2[...]), 2)
    np.testing.assert_allclose(r[:, 1], T.memory_apply(w, q[:, 1]), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    inp = _inputs(jax.random.PRNGKey(8), 5)
    with pytest.raises(ValueError, match="w2 must have shape"):
        T.titans(**{**inp, "w2": inp["w2"][:, :3]})
    with pytest.raises(ValueError, match="theta must have shape"):
        T.titans(**{**inp, "theta": inp["theta"][..., None]})
    with pytest.raises(ValueError, match="chunk_size"):
        T.titans_step(None, *(inp[n][:, 0] for n in ("q", "k", "v", "theta", "eta", "alpha")), inp["w1"], inp["w2"], chunk_size=4)
    with pytest.raises(ValueError, match="negative_eigen"):
        T.titans(**inp, negative_eigen=True)
    with pytest.raises(ValueError, match="depth"):
        T.NeuralMemory(16, depth=3, rngs=nnx.Rngs(0))
