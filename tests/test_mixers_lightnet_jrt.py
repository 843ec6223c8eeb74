"""LightNet (additive recurrence, MD-TPE, MD-LRPE, one scan over a 2-D grid) and JRT prefix linear attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.mixers import jrt as J
from seqjax.mixers import lightnet as L
from seqjax.nn import rms_rel_err


def _grads(f, inputs, key):
    y, h = f(**inputs)
    w = jax.random.normal(key, y.shape)
    wh = [jax.random.normal(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(jax.tree.leaves(h))]

    def loss(inp):
        y, h = f(**inp)
        return jnp.sum(y * w) + sum(jnp.sum(x * v) for x, v in zip(jax.tree.leaves(h), wh))

    return jax.grad(loss)(inputs)


def _close_all(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert rms_rel_err(x, y) <= tol, rms_rel_err(x, y)


# ----------------------------------------------------------------------------- LightNet


@pytest.mark.parametrize("spread", [0.0, 20.0])
def test_lightnet_strong_decays_chunked_equals_reference(spread):
    """f rising by `spread` per step gives a log-decay of about -spread per step; still exact and finite."""
    t = 63
    inp = L.lightnet_make_inputs(jax.random.PRNGKey(0), 2, t)
    inp["f"] = inp["f"] + spread * jnp.arange(t, dtype=jnp.float32)[None, :, None, None]
    resets = jnp.zeros((2, t), bool).at[:, 30].set(True)
    ref = functools.partial(L.lightnet_recurrent, resets=resets)
    par = functools.partial(L.lightnet_chunked, resets=resets, chunk_size=8)
    _close_all(par(**inp), ref(**inp), 1e-5)
    g_ref, g = _grads(ref, inp, jax.random.PRNGKey(1)), _grads(par, inp, jax.random.PRNGKey(1))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    _close_all(g, g_ref, 1e-4)


def test_lightnet_state_is_the_normalised_sum_in_any_order():
    """s_T = sum_j e^{f_j - logsumexp f} k_j v_j^T: additive, so any scan order gives the same final state."""
    inp = L.lightnet_make_inputs(jax.random.PRNGKey(2), 1, 24)
    _, (s, z) = L.lightnet(**inp)
    w = jnp.exp(inp["f"] - jax.scipy.special.logsumexp(inp["f"], axis=1, keepdims=True))
    direct = jnp.einsum("bthk,bthv->bhkv", w * inp["k"], inp["v"])
    assert rms_rel_err(s, direct) < 1e-5
    perm = jax.random.permutation(jax.random.PRNGKey(3), 24)
    _, (s2, z2) = L.lightnet(**{n: x[:, perm] for n, x in inp.items()})
    assert rms_rel_err(s2, s) < 1e-5 and rms_rel_err(z2, z) < 1e-6


GRID = (3, 4)


def _grid_inputs(key, grid=GRID, kd=4):
    t = int(np.prod(grid))
    inp = L.lightnet_make_inputs(key, 1, t, key_dim=kd)
    ang = L.lrpe_angles(L.raster_positions(grid), kd, base=10.0)
    return inp, ang


def _featurise(inp, ang):
    q = L.md_lrpe(inp["q"], ang)
    k = L.md_lrpe(jnp.ones_like(inp["q"]), ang)
    return dict(q=q, k=k, v=inp["v"], f=jnp.concatenate([inp["f"], inp["f"]], -1))


def test_md_lrpe_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.PRNGKey(4), (1, 12, 1, 6))
    k = jax.random.normal(jax.random.PRNGKey(5), (1, 12, 1, 6))
    pos = L.raster_positions(GRID)
    scores = lambda p: jnp.einsum(
        "bthk,bjhk->btj", L.md_lrpe(q, L.lrpe_angles(p, 6, base=10.0)), L.md_lrpe(k, L.lrpe_angles(p, 6, base=10.0))
    )
    np.testing.assert_allclose(scores(pos + jnp.array([[2, 5]])), scores(pos), rtol=1e-4, atol=1e-5)
    # and equals sum_i q_i k_i cos(theta_i (pos_t - pos_j)) with axis-0 channels first
    ang = L.lrpe_angles(pos, 6, base=10.0)
    direct = jnp.einsum("thk,jhk,tjk->tj", q[0], k[0], jnp.cos(ang[:, None] - ang[None]))
    np.testing.assert_allclose(scores(pos)[0], direct, rtol=1e-4, atol=1e-5)


def test_one_raster_scan_is_global_attention_on_the_grid():
    """Non-causal LightNet on a grid: the final state of ONE raster scan gives every output, equal to the
    direct formula o_t = sum_j sum_i q_ti softmax_j(f_ji) cos(phi_ti - phi_ji) v_j, and a column-major
    scan gives the same state (so no per-direction scans are needed)."""
    inp, ang = _grid_inputs(jax.random.PRNGKey(6))
    x = _featurise(inp, ang)
    _, (s, _) = L.lightnet(**x)
    y = jnp.einsum("bthk,bhkv->bthv", x["q"], s)
    p = jax.nn.softmax(inp["f"], axis=1)  # [b, j, h, K]
    cos = jnp.cos(ang[:, None] - ang[None])  # [t, j, K]
    direct = jnp.einsum("bthk,bjhk,tjk,bjhv->bthv", inp["q"], p, cos, inp["v"])
    assert rms_rel_err(y, direct) < 1e-5
    col_major = jnp.argsort(L.raster_positions(GRID)[:, 1] * GRID[0] + L.raster_positions(GRID)[:, 0])
    _, (s2, _) = L.lightnet(**{n: a[:, col_major] for n, a in x.items()})
    assert rms_rel_err(s2, s) < 1e-5
    # causal raster scan: o_t only mixes j <= t (raster order), renormalised over the prefix
    yc, _ = L.lightnet(**x)
    mask = jnp.tril(jnp.ones((12, 12), bool))
    pc = jnp.exp(jnp.where(mask[None, :, :, None, None], inp["f"][:, None] - jax.lax.cumlogsumexp(inp["f"], axis=1)[:, :, None], -jnp.inf))
    direct_c = jnp.einsum("bthk,btjhk,tjk,bjhv->bthv", inp["q"], pc, cos, inp["v"])
    assert rms_rel_err(yc, direct_c) < 1e-5


def test_md_tpe_is_a_toeplitz_operator_per_axis_and_shift_equivariant():
    x = jax.random.normal(jax.random.PRNGKey(7), (1, 5, 6, 3))
    coef = jax.random.normal(jax.random.PRNGKey(8), (2, 3))
    ld = -jnp.abs(jax.random.normal(jax.random.PRNGKey(9), (2, 3)))
    y = L.md_tpe(x, coef, ld)
    xn, c, lam = np.asarray(x[0], np.float64), np.asarray(coef, np.float64), np.exp(np.asarray(ld, np.float64))
    direct = np.zeros_like(xn)
    for r in range(5):
        for col in range(6):
            for r2 in range(r + 1):
                direct[r, col] += c[0] * lam[0] ** (r - r2) * xn[r2, col]
            for c2 in range(col + 1):
                direct[r, col] += c[1] * lam[1] ** (col - c2) * xn[r, c2]
    np.testing.assert_allclose(y[0], direct, rtol=1e-5, atol=1e-5)
    for axis in (1, 2):  # shifting the input (zero fill) shifts the output
        xs = jnp.roll(x, 1, axis=axis)
        xs = xs.at[:, 0].set(0.0) if axis == 1 else xs.at[:, :, 0].set(0.0)
        ys = L.md_tpe(xs, coef, ld)
        sl = (slice(None), slice(1, None)) if axis == 1 else (slice(None), slice(None), slice(1, None))
        sl0 = (slice(None), slice(0, -1)) if axis == 1 else (slice(None), slice(None), slice(0, -1))
        np.testing.assert_allclose(ys[sl], y[sl0], rtol=1e-5, atol=1e-6)


def test_lightnet_grid_layer():
    layer = L.LightNet(16, num_heads=2, key_dim=4, grid=GRID, causal=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(10), (2, 12, 16))
    y, cache = layer(x)
    assert cache is None and y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    # non-causal: the last token changes the first position's output
    y2, _ = layer(x.at[:, -1].add(1.0))
    assert float(jnp.max(jnp.abs(y2[:, 0] - y[:, 0]))) > 1e-6
    with pytest.raises(ValueError, match="prod"):
        layer(x[:, :11])


def test_lightnet_bad_inputs():
    inp = L.lightnet_make_inputs(jax.random.PRNGKey(11), 2, 5)
    with pytest.raises(ValueError, match="f must have the same shape"):
        L.lightnet(inp["q"], inp["k"], inp["v"], inp["f"][..., :3])
    with pytest.raises(ValueError, match="negative_eigen"):
        L.lightnet(**inp, negative_eigen=True)


# ----------------------------------------------------------------------------- JRT


def _jrt_inputs(key, t, b=2):
    inp = J.jrt_make_inputs(key, b, t)
    inp["v_enc"] = jax.random.normal(jax.random.fold_in(key, 9), inp["v"].shape)
    return inp


@pytest.mark.parametrize("t,prefix", [(1, 5), (63, 5), (63, 300), (257, 40)])
def test_jrt_prefix_chunked_equals_reference(t, prefix):
    inp = _jrt_inputs(jax.random.PRNGKey(t), t)
    resets = None if t < 60 else jnp.zeros((2, t), bool).at[:, t // 2].set(True)
    ref = functools.partial(J.jrt_recurrent, resets=resets, prefix_len=prefix)
    par = functools.partial(J.jrt_chunked, resets=resets, prefix_len=prefix, chunk_size=16)
    _close_all(par(**inp), ref(**inp), 1e-5)
    _close_all(_grads(par, inp, jax.random.PRNGKey(0)), _grads(ref, inp, jax.random.PRNGKey(0)), 1e-4)


def test_jrt_prefix_is_noncausal_and_the_rest_causal():
    p, t = 6, 20
    inp = _jrt_inputs(jax.random.PRNGKey(1), t)
    y, _ = J.jrt(**inp, prefix_len=p)
    bump = lambda i: {n: (x.at[:, i].add(0.5) if n != "v_enc" else x) for n, x in inp.items()}
    # a prefix token's change reaches the first output (prefix outputs see the whole prefix) ...
    y1, _ = J.jrt(**bump(p - 1), prefix_len=p)
    assert float(jnp.max(jnp.abs(y1[:, 0] - y[:, 0]))) > 1e-4
    # ... while a change at t >= prefix_len leaves every earlier output unchanged
    for i in (p, p + 5):
        y2, _ = J.jrt(**bump(i), prefix_len=p)
        np.testing.assert_array_equal(np.asarray(y2[:, :i]), np.asarray(y[:, :i]))
        assert float(jnp.max(jnp.abs(y2[:, i] - y[:, i]))) > 0


def test_jrt_without_prefix_is_causal_linear_attention():
    inp = J.jrt_make_inputs(jax.random.PRNGKey(2), 2, 30)
    y, _ = J.jrt(**inp, prefix_len=0)
    q, k, v = (np.asarray(inp[n], np.float64) for n in "qkv")
    a = np.einsum("bthk,bshk->bhts", q, k) * np.tril(np.ones((30, 30)))
    direct = np.einsum("bhts,bshv->bthv", a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    assert rms_rel_err(y, direct) < 1e-5


def test_jrt_decode_continues_after_the_prefix():
    p, t = 7, 16
    inp = _jrt_inputs(jax.random.PRNGKey(3), t)
    y, h_full = J.jrt(**inp, prefix_len=p)
    y_pre, h = J.jrt(**{n: x[:, :p] for n, x in inp.items()}, prefix_len=p)
    ys = [y_pre]
    for i in range(p, t):
        y_t, h = J.jrt_step(h, inp["q"][:, i], inp["k"][:, i], inp["v"][:, i])
        ys.append(y_t[:, None])
    assert rms_rel_err(jnp.concatenate(ys, 1), y) < 1e-5
    _close_all(h, h_full, 1e-5)


def test_jrt_materialize_has_a_full_prefix_block():
    p, t = 5, 12
    inp = J.jrt_make_inputs(jax.random.PRNGKey(4), 1, t)
    m = J.jrt_materialize(**inp, prefix_len=p)
    assert float(jnp.min(m[..., :p, :p])) > 0  # every prefix position sees every prefix token
    np.testing.assert_array_equal(np.asarray(jnp.triu(m[..., p:, :], 1 + p)), 0.0)
    assert float(jnp.max(jnp.abs(m[..., :p, p:]))) == 0.0  # nor the decoder tokens after it


def test_jrt_layer_packs_documents_with_their_own_prefix():
    layer = J.JRT(16, prefix_len=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 14, 16))
    seg = jnp.array([[0] * 6 + [1] * 8])
    y, _ = layer(x, segment_ids=seg)
    ya, _ = layer(x[:, :6])
    yb, _ = layer(x[:, 6:])
    assert rms_rel_err(y, jnp.concatenate([ya, yb], 1)) < 1e-5


def test_jrt_bad_inputs():
    inp = J.jrt_make_inputs(jax.random.PRNGKey(6), 2, 5)
    with pytest.raises(ValueError, match="k_enc must have the same shape"):
        J.jrt(**{**inp, "k_enc": inp["k_enc"][..., :2]})
    with pytest.raises(ValueError, match="prefix_len"):
        J.jrt(**inp, prefix_len=-1)
    with pytest.raises(ValueError, match="k must have the same shape"):
        J.jrt(inp["q"], inp["k"][:, :3], inp["v"])
    with pytest.raises(ValueError, match="negative_eigen"):
        J.jrt(**inp, negative_eigen=True)
