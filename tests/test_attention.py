"""Softmax attention: RoPE, GQA, windows, packed masks and caches against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.attention import Attention, attention, attention_reference, positions_from_segment_ids, rope
from seqjax.nn import rms_rel_err


def _qkv(key, b, t, h, kvh, d):
    k1, k2, k3 = jax.random.split(key, 3)
    return (
        jax.random.normal(k1, (b, t, h, d)),
        jax.random.normal(k2, (b, t, kvh, d)),
        jax.random.normal(k3, (b, t, kvh, d)),
    )


def _loop_attention(q, k, v, window=None, seg=None):
    """Per-query numpy softmax over the visible keys (the definition)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            for n in range(h):
                js = [
                    j
                    for j in range(i + 1)
                    if (window is None or i - j < window) and (seg is None or seg[bi, i] == seg[bi, j])
                ]
                s = np.array([q[bi, i, n] @ k[bi, j, n // g] for j in js]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, n] = sum(pj * v[bi, j, n // g] for pj, j in zip(p, js))
    return out


def test_reference_is_the_definition():
    q, k, v = _qkv(jax.random.PRNGKey(0), 2, 7, 4, 2, 6)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1], [3, 3, 3, 3, 3, 5, 5]])
    for window, s in [(None, None), (3, None), (None, seg), (2, seg)]:
        y = attention(q, k, v, window=window, segment_ids=s, impl="reference")
        np.testing.assert_allclose(np.asarray(y), _loop_attention(q, k, v, window, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 63])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_dot_product_attention_equals_reference(t, window, packed):
    q, k, v = _qkv(jax.random.PRNGKey(t), 2, t, 6, 2, 10)
    seg = None
    if packed:
        seg = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(1), 0.1, (2, t)), axis=1).astype(jnp.int32)
    f = lambda q, k, v, impl: attention(q, k, v, window=window, segment_ids=seg, impl=impl)
    y, y_ref = f(q, k, v, None), f(q, k, v, "reference")
    assert rms_rel_err(y, y_ref) < 1e-5
    w = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    g = jax.grad(lambda *a: jnp.sum(f(*a, None) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(f(*a, "reference") * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        assert rms_rel_err(a, b) < 1e-5


def test_rope_is_relative():
    """<rope(q, p), rope(k, s)> depends only on p - s, and position 0 is the identity."""
    q, k, _ = _qkv(jax.random.PRNGKey(3), 1, 1, 1, 1, 10)
    np.testing.assert_allclose(rope(q, jnp.zeros((1, 1), jnp.int32)), q, rtol=0, atol=0)
    dots = {}
    for p, s in [(5, 2), (9, 6), (3, 0), (2, 5), (7, 10)]:
        a = rope(q, jnp.array([[p]]))
        c = rope(k, jnp.array([[s]]))
        dots.setdefault(p - s, []).append(float(jnp.sum(a * c)))
    for vals in dots.values():
        np.testing.assert_allclose(vals, vals[0], rtol=1e-5)
    assert abs(dots[3][0] - dots[-3][0]) > 1e-3
    # the rotation keeps norms
    r = rope(q, jnp.array([[123]]))
    np.testing.assert_allclose(jnp.linalg.norm(r), jnp.linalg.norm(q), rtol=1e-5)


def test_positions_from_segment_ids():
    seg = jnp.array([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(positions_from_segment_ids(seg), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
    cont = positions_from_segment_ids(seg, prev_seg=jnp.array([0, 3]), offset=jnp.array([7, 7]))
    np.testing.assert_array_equal(cont, [[7, 8, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])


def _layer(window=None, qk_norm=False, heads=4, kv=2):
    return Attention(24, num_heads=heads, num_kv_heads=kv, head_dim=6, window=window, qk_norm=qk_norm, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("window", [None, 4])
def test_packed_equals_separate(window):
    layer = _layer(window, qk_norm=True)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 19, 24))
    ta = 8
    seg = jnp.concatenate([jnp.zeros((2, ta), jnp.int32), jnp.ones((2, 19 - ta), jnp.int32)], axis=1)
    y, _ = layer(x, segment_ids=seg)
    ya, _ = layer(x[:, :ta])
    yb, _ = layer(x[:, ta:])
    assert rms_rel_err(y, jnp.concatenate([ya, yb], 1)) < 1e-5


@pytest.mark.parametrize("window", [None, 3, 5])
def test_cache_prefill_and_decode_equal_forward(window):
    """Global KV cache and ring buffer (prefills longer and shorter than the window)."""
    layer = _layer(window)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 13, 24))
    y, _ = layer(x)
    cache = layer.init_cache(2, 16)
    if window is not None:
        assert cache["k"].shape[1] == window  # constant memory
    outs = []
    for lo, hi in [(0, 4), (4, 5), (5, 11), (11, 12), (12, 13)]:
        yi, cache = layer(x[:, lo:hi], cache=cache)
        outs.append(yi)
    assert rms_rel_err(jnp.concatenate(outs, 1), y) < 1e-5
    assert int(cache["index"]) == 13


def test_cache_with_segments():
    """A packed prefill, then decode continuing the last document (positions continue from the cache)."""
    layer = _layer(None)
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 10, 24))
    seg = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    y, _ = layer(x, segment_ids=seg)
    cache = layer.init_cache(1, 12)
    y1, cache = layer(x[:, :7], segment_ids=seg[:, :7], cache=cache)
    outs = [y1]
    for i in range(7, 10):
        yi, cache = layer(x[:, i : i + 1], cache=cache)
        outs.append(yi)
    assert rms_rel_err(jnp.concatenate(outs, 1), y) < 1e-5
    np.testing.assert_array_equal(cache["next_pos"], [6])


def test_gqa_equals_repeated_kv_heads():
    """GQA with kv heads shared by groups equals MHA with those kv heads repeated."""
    gqa = _layer(heads=4, kv=2)
    mha = _layer(heads=4, kv=4)
    mha.wq.value = gqa.wq[...]
    mha.wo.value = gqa.wo[...]
    mha.wk.value = jnp.repeat(gqa.wk[...], 2, axis=1)
    mha.wv.value = jnp.repeat(gqa.wv[...], 2, axis=1)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 9, 24))
    assert rms_rel_err(gqa(x)[0], mha(x)[0]) < 1e-6


def test_bf16_close():
    layer = Attention(24, num_heads=4, head_dim=6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ref = Attention(24, num_heads=4, head_dim=6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 9, 24))
    y = layer(x)[0]
    assert y.dtype == jnp.float32
    assert rms_rel_err(y, ref(x)[0]) < 3e-2


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(24, num_heads=4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model"):
        Attention(25, num_heads=4, rngs=nnx.Rngs(0))
    q, k, v = _qkv(jax.random.PRNGKey(0), 1, 4, 3, 2, 6)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k[:, :, :1], v[:, :, :1], impl="flash")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 24))
    with pytest.raises(ValueError, match="x must have 3 dims"):
        _layer()(x[0])
