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
        assert cache.k.shape[1] == window  # constant memory
    outs = []
    for lo, hi in [(0, 4), (4, 5), (5, 11), (11, 12), (12, 13)]:
        yi, cache = layer(x[:, lo:hi], cache=cache)
        outs.append(yi)
    assert rms_rel_err(jnp.concatenate(outs, 1), y) < 1e-5
    assert int(cache.index) == 13


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
    np.testing.assert_array_equal(cache.next_pos, [6])


def test_gqa_equals_repeated_kv_heads():
    """GQA with kv heads shared by groups equals MHA with those kv heads repeated."""
    gqa = _layer(heads=4, kv=2)
    mha = _layer(heads=4, kv=4)
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)
    mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
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


# ---------------------------------------------------------------------------------- variants
from seqjax.attention.combiner import CombinerAxial, combiner_axial, combiner_axial_reference  # noqa: E402
from seqjax.attention.ngram import NgramHead, ngram_head  # noqa: E402
from seqjax.attention.tcnca import TCNCA, chunked_attention, dilated_causal_conv  # noqa: E402


def test_dilated_causal_conv_equals_loop():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 13, 5)))
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 5)))
    for dil in (1, 2, 4):
        want = np.zeros_like(x)
        for t in range(13):
            for m in range(3):
                if t - m * dil >= 0:
                    want[:, t] += w[2 - m] * x[:, t - m * dil]
        np.testing.assert_allclose(dilated_causal_conv(jnp.asarray(x), jnp.asarray(w), dilation=dil), want, rtol=1e-5, atol=1e-5)


def test_chunked_attention_equals_block_mask():
    q, k, v = _qkv(jax.random.PRNGKey(2), 2, 11, 4, 2, 6)
    i = jnp.arange(11)
    mask = ((i[:, None] // 4) == (i[None, :] // 4)) & (i[None, :] <= i[:, None])
    y = chunked_attention(q, k, v, chunk=4)
    assert rms_rel_err(y, attention_reference(q, k, v, mask[None, None])) < 1e-5


def test_tcnca_layer_is_causal():
    layer = TCNCA(16, num_heads=2, chunk=4, kernel_size=2, num_conv_layers=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 20, 16))
    x2 = x.at[:, 12:].set(jax.random.normal(jax.random.PRNGKey(4), (1, 8, 16)))
    y, y2 = layer(x)[0], layer(x2)[0]
    np.testing.assert_allclose(y[:, :12], y2[:, :12], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(y[:, 12:] - y2[:, 12:]))) > 1e-3
    # the TCN reaches 1 + (K-1)(2^L - 1) = 8 tokens back: token 12's change is seen at 19, beyond its chunk
    u, u2 = layer.tcn(x), layer.tcn(x2)
    np.testing.assert_allclose(u[:, :12], u2[:, :12], rtol=0, atol=1e-6)


@pytest.mark.parametrize("t,row", [(10, 3), (16, 4), (7, None)])
def test_combiner_axial_equals_reference(t, row):
    q, k, v = _qkv(jax.random.PRNGKey(t), 2, t, 2, 2, 5)
    w = jax.random.normal(jax.random.PRNGKey(9), (2, 5))
    y = combiner_axial(q, k, v, w, row=row)
    assert rms_rel_err(y, combiner_axial_reference(q, k, v, w, row=row)) < 1e-5
    g = jax.grad(lambda q, k, v, w: jnp.sum(jnp.sin(combiner_axial(q, k, v, w, row=row))), argnums=(0, 1, 2, 3))
    g_ref = jax.grad(lambda q, k, v, w: jnp.sum(jnp.sin(combiner_axial_reference(q, k, v, w, row=row))), argnums=(0, 1, 2, 3))
    for a, b in zip(g(q, k, v, w), g_ref(q, k, v, w)):
        assert rms_rel_err(a, b) < 1e-4


def test_combiner_axial_special_cases():
    q, k, v = _qkv(jax.random.PRNGKey(5), 2, 8, 2, 2, 5)
    w = jax.random.normal(jax.random.PRNGKey(6), (2, 5))
    # q = 0 and w = 0 (mean-pooled summaries): uniform over all earlier positions (full support)
    y0 = combiner_axial(jnp.zeros_like(q), k, v, jnp.zeros_like(w), row=3)
    mean = jnp.cumsum(v, axis=1) / jnp.arange(1, 9)[None, :, None, None]
    assert rms_rel_err(y0, mean) < 1e-5
    # at most one earlier row: every region is a single key -> exact softmax attention
    y = combiner_axial(q, k, v, w, row=4)
    assert rms_rel_err(y, attention(q, k, v, impl="reference")) < 1e-5
    layer = CombinerAxial(8, num_heads=2, rngs=nnx.Rngs(0))
    assert layer(jax.random.normal(jax.random.PRNGKey(0), (1, 9, 8)))[0].shape == (1, 9, 8)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_head_equals_loop(n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 3, (2, 23))
    seg = np.concatenate([np.zeros((2, 11), int), np.ones((2, 12), int)], axis=1)
    h = rng.normal(size=(2, 23, 4)).astype(np.float32)
    for s in (None, seg):
        want = np.zeros_like(h)
        for b in range(2):
            for i in range(23):
                hits = []
                for src in range(1, i + 1):
                    j = src - 1
                    ok = j - n + 1 >= 0 and i - n + 1 >= 0 and all(tokens[b, i - m] == tokens[b, j - m] for m in range(n))
                    if s is not None:
                        ok = ok and len({s[b, x] for x in range(j - n + 1, i + 1)}) == 1
                    if ok:
                        hits.append(src)
                if hits:
                    want[b, i] = h[b, hits].mean(0)
        got = ngram_head(jnp.asarray(tokens), jnp.asarray(h), ngram=n, segment_ids=None if s is None else jnp.asarray(s))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    layer = NgramHead(4, ngram=n, rngs=nnx.Rngs(0))
    y = layer(jnp.asarray(h), jnp.asarray(tokens))
    want = layer.w0(ngram_head(jnp.asarray(tokens), jnp.asarray(h), ngram=n)) + layer.w1(jnp.asarray(h))
    np.testing.assert_allclose(y, want, rtol=1e-6)
