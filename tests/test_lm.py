"""Pattern language models: the stack, scan vs unrolled, remat, packing, dtypes, embeddings, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax import mixers, sharding
from seqjax.models import LM, LMConfig
from seqjax.models.lm import layer_names
from seqjax.nn import rms_rel_err
from seqjax.types import LOGICAL_AXES

V, D = 19, 16


def _cfg(**kw):
    base = dict(vocab_size=V, d_model=D, num_heads=2, num_layers=2, pattern=("attention",), mlp_ratio=2.0)
    base.update(kw)
    return LMConfig(**base)


def _tokens(b=2, t=11, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, V)


def _recurrent_name():
    """A registered mixer to build hybrids with (Mamba-2 when it is there)."""
    names = mixers.names()
    for n in ("gla", "mamba2", "gated_deltanet", "deltanet"):
        if n in names:
            return n
    return names[0]


def test_pattern_builds_the_stack():
    m = LM(_cfg(pattern=("attention", "swa", "attention"), num_layers=7, window=3, num_kv_heads=1), rngs=nnx.Rngs(0))
    assert layer_names(m.cfg) == ("attention", "swa", "attention") * 2 + ("attention",)
    assert m.num_repeats == 2 and len(m.tail) == 1
    layers = m.blocks.layers
    assert [layer.mixer.window for layer in layers] == [None, 3, None]
    assert layers[0].mixer.wq.shape == (2, D, 2, D // 2)  # stacked over the 2 repeats
    assert layers[0].mixer.wk.shape == (2, D, 1, D // 2)  # one kv head
    assert layers[0].mlp.w_up.shape == (2, D, 24)  # 2.0 * 2/3 * 16 = 21.3 -> 24
    axes = sharding.logical_axes(nnx.state(m, nnx.Param))
    flat = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert all(isinstance(a, tuple) and set(a) <= set(LOGICAL_AXES) for a in flat)
    assert axes["blocks"]["layers"][0]["mixer"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embed"] == ("vocab", "embed")
    # untied head; no MLP when mlp_ratio = 0
    m2 = LM(_cfg(tie_embeddings=False, mlp_ratio=0.0, num_layers=1), rngs=nnx.Rngs(0))
    assert m2.head.shape == (D, V) and m2.blocks.layers[0].mlp is None


def _unrolled_copy(m):
    """An unscanned LM holding the scanned model's parameters layer by layer."""
    u = LM(_cfg(**{**m.cfg.__dict__, "scan_layers": False}), rngs=nnx.Rngs(1))
    period = len(m.cfg.pattern)
    for r in range(m.num_repeats):
        for j in range(period):
            st = jax.tree.map(lambda a: a[r], nnx.state(m.blocks.layers[j]))
            nnx.update(u.tail[r * period + j], st)
    for i, layer in enumerate(m.tail):
        nnx.update(u.tail[m.num_repeats * period + i], nnx.state(layer))
    nnx.update(u.final_norm, nnx.state(m.final_norm))
    u.embed[...] = m.embed[...]
    return u


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_equals_unrolled(remat):
    name = _recurrent_name()
    m = LM(_cfg(pattern=(name, "attention"), num_layers=3, remat=remat), rngs=nnx.Rngs(0))
    u = _unrolled_copy(m)
    toks = _tokens()
    loss = lambda model: jnp.mean(jax.nn.log_softmax(model(toks)[0])[..., 0])
    assert rms_rel_err(u(toks)[0], m(toks)[0]) < 1e-5
    g_m = nnx.grad(loss)(m)
    g_u = nnx.grad(loss)(u)
    assert rms_rel_err(g_u.embed[...], g_m.embed[...]) < 1e-5
    assert rms_rel_err(g_u.tail[1].mixer.wq[...], g_m.blocks.layers[1].mixer.wq[...][0]) < 1e-5


@pytest.mark.parametrize("pattern", [("attention", "swa"), "hybrid"])
def test_packed_equals_separate(pattern):
    if pattern == "hybrid":
        pattern = (_recurrent_name(), "attention")
    m = LM(_cfg(pattern=pattern, window=4), rngs=nnx.Rngs(0))
    toks = _tokens(t=17)
    ta = 7
    seg = jnp.concatenate([jnp.full((2, ta), 3), jnp.full((2, 17 - ta), 4)], axis=1)
    y, _ = m(toks, segment_ids=seg)
    ya, _ = m(toks[:, :ta])
    yb, _ = m(toks[:, ta:])
    assert rms_rel_err(y, jnp.concatenate([ya, yb], 1)) < 1e-4


def test_bf16_compute():
    toks = _tokens()
    m32 = LM(_cfg(pattern=(_recurrent_name(), "attention")), rngs=nnx.Rngs(0))
    m16 = LM(_cfg(pattern=(_recurrent_name(), "attention"), dtype="bfloat16"), rngs=nnx.Rngs(0))
    y16 = m16(toks)[0]
    assert y16.dtype == jnp.float32 and m16.embed.dtype == jnp.float32
    assert rms_rel_err(y16, m32(toks)[0]) < 5e-2


def test_lexinvariant_embedding():
    m = LM(_cfg(embedding="lexinvariant"), rngs=nnx.Rngs(0))
    assert m.embed is None
    toks = jnp.tile(_tokens(b=1), (2, 1))  # two rows with the same tokens
    k = jax.random.PRNGKey(3)
    y1, _ = m(toks, embed_key=k)
    y2, _ = m(toks, embed_key=k)
    np.testing.assert_array_equal(y1, y2)  # deterministic given the key
    assert float(jnp.max(jnp.abs(y1[0] - y1[1]))) > 1e-3  # each row has its own embedding
    # one Gaussian vector per token id per row: the table scores the output too
    table = m._table(2, k)
    assert table.shape == (2, V, D)
    np.testing.assert_allclose(float(jnp.std(table)), D**-0.5, rtol=0.1)
    y3, _ = m(toks, embed_key=jax.random.PRNGKey(5))
    assert float(jnp.max(jnp.abs(y3 - y1))) > 1e-3


def test_bad_config():
    with pytest.raises(ValueError, match="unknown layer 'nope'.*attention"):
        LM(_cfg(pattern=("attention", "nope")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        LM(_cfg(num_heads=4, num_kv_heads=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        LM(_cfg(num_heads=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window"):
        LM(_cfg(pattern=("swa",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat"):
        _cfg(remat="some")
    m = LM(_cfg(num_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must have 2 dims"):
        m(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="tokens"):
        m(jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="segment_ids"):
        m(jnp.zeros((1, 3), jnp.int32), segment_ids=jnp.zeros((1, 4), jnp.int32))


# ------------------------------------------------------------------------------------- Titans
def _titans_cfg(name, **kw):
    mk = {name: dict(num_persistent=2, memory=dict(num_heads=2, depth=2), **({"chunk": 4} if name == "titans_mac" else {}))}
    return _cfg(pattern=(name,), num_layers=1, window=3, mixer_kwargs=mk, **kw)


@pytest.mark.parametrize("name", ["titans_mag", "titans_mal", "titans_mac"])
def test_titans_decode_equals_forward(name):
    """MAG / MAL: persistent tokens stay visible past the window; MAC: segments of 4, the prefill crosses a
    segment boundary and decoding completes the second segment and starts a third; prefill + decode equals
    forward for all three."""
    m = LM(_titans_cfg(name), rngs=nnx.Rngs(0))
    toks = _tokens(t=9)
    y, _ = m(toks)
    cache = m.init_cache(2, 12)
    y1, cache = m(toks[:, :5], cache=cache)
    outs = [y1]
    for i in range(5, 9):
        yi, cache = m(toks[:, i : i + 1], cache=cache)
        outs.append(yi)
    assert rms_rel_err(jnp.concatenate(outs, 1), y) < 1e-4


def test_persistent_tokens_are_seen_by_every_query():
    from seqjax.attention import Attention, attention_reference

    layer = Attention(D, num_heads=2, window=2, num_persistent=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, D))
    pos = jnp.arange(6)[None]
    q, k, v = layer.qkv(x, pos)
    p = layer.persistent[...]
    pk = jnp.einsum("nd,dhk->nhk", p, layer.wk[...])[None]
    pv = jnp.einsum("nd,dhk->nhk", p, layer.wv[...])[None]
    i = jnp.arange(6)
    mask = jnp.concatenate([jnp.ones((6, 3), bool), (i[None] <= i[:, None]) & (i[:, None] - i[None] < 2)], 1)
    o = attention_reference(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), mask[None, None])
    assert rms_rel_err(layer(x)[0], layer.out(o)) < 1e-5


def test_titans_mac_is_causal_and_matches_one_segment_reference():
    from seqjax.attention import attention_reference

    m = LM(_titans_cfg("titans_mac"), rngs=nnx.Rngs(0))
    toks = _tokens(t=10)
    y = m(toks)[0]
    toks2 = toks.at[:, 6:].set((toks[:, 6:] + 1) % V)
    y2 = m(toks2)[0]
    np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(y[:, 6:] - y2[:, 6:]))) > 1e-4
    # one segment by hand: retrieve from the initial memory, attend over [P || h_<=j || x_<=j], write y
    mac = m.blocks.layers[0].mixer
    mac_one = jax.tree.map(lambda a: a[0], nnx.state(mac))
    mac_one = nnx.merge(nnx.graphdef(mac), mac_one)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, D))
    pos = jnp.broadcast_to(jnp.arange(4)[None], (2, 4))
    got = mac_one(x)[0]
    mem0 = mac_one.memory.init_cache(2, 4)
    h = mac_one.retrieve(mem0, x)
    q, kx, vx = mac_one.attn.qkv(x, pos)
    _, kh, vh = mac_one.attn.qkv(h, pos)
    p = mac_one.attn.persistent[...]
    pk = jnp.broadcast_to(jnp.einsum("nd,dhk->nhk", p, mac_one.attn.wk[...])[None], (2, 2, 2, D // 2))
    pv = jnp.broadcast_to(jnp.einsum("nd,dhk->nhk", p, mac_one.attn.wv[...])[None], (2, 2, 2, D // 2))
    i = jnp.arange(4)
    c = i[None] <= i[:, None]
    mask = jnp.concatenate([jnp.ones((4, 2), bool), c, c], 1)[None, None]
    o = attention_reference(q, jnp.concatenate([pk, kh, kx], 1), jnp.concatenate([pv, vh, vx], 1), mask)
    ya = mac_one.attn.out(o)
    ym, _ = mac_one.memory(ya, cache=mem0)
    assert rms_rel_err(got, ya * jax.nn.sigmoid(mac_one.norm_m(ym))) < 1e-5
    with pytest.raises(ValueError, match="segment_ids"):
        m(toks, segment_ids=jnp.ones_like(toks))
