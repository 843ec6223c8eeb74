"""Context parallelism vs the unsharded forms: forward, final state and gradients on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import mixers
from seqjax import sharding as shd
from seqjax.attention.attention import attention
from seqjax.ops.context_parallel import attention_context_parallel, gla_context_parallel, gla_local


def _inputs(key, b=2, t=32, h=2, dk=3, dv=5, scalar=False, strong=False):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk)) / np.sqrt(dk)
    v = jax.random.normal(ks[2], (b, t, h, dv))
    shape = (b, t, h) if scalar else (b, t, h, dk)
    scale = 3.0 if strong else 0.05
    log_a = -scale * jax.nn.softplus(jax.random.normal(ks[3], shape))
    h0 = jax.random.normal(ks[4], (b, h, dk, dv))
    return q, k, v, log_a, h0


def _resets(b, t):
    r = np.zeros((b, t), bool)
    r[0, 5] = r[0, 16] = r[1, 9] = True  # t=16: a document starts exactly at a shard boundary
    return jnp.asarray(r)


def _same_values_and_grads(cp, ref, args, argnums, tol=1e-4):
    """``cp(*args)`` and ``ref(*args)`` (each ``(y, S_last)``) agree, and so do the gradients of a loss that
    reads both outputs, w.r.t. ``args[i]`` for ``i`` in ``argnums``."""
    for got, want in zip(jax.jit(cp)(*args), jax.jit(ref)(*args)):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)

    def loss(f):
        def go(*a):
            y, s = f(*a)
            return jnp.sum(jnp.sin(y)) + jnp.sum(s * s)

        return jax.jit(jax.grad(go, argnums=argnums))

    for g_c, g_r in zip(loss(cp)(*args), loss(ref)(*args)):
        np.testing.assert_allclose(g_c, g_r, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "shape,scalar,strong",
    [((1, 1, 8, 1), False, False), ((2, 1, 2, 2), True, False), ((1, 2, 4, 1), False, True)],
)
def test_gla_context_parallel_matches_unsharded(shape, scalar, strong):
    mesh = shd.make_mesh(shape)
    q, k, v, log_a, h0 = _inputs(jax.random.PRNGKey(1), scalar=scalar, strong=strong)
    resets = _resets(2, 32)

    def ref(q, k, v, log_a, h0):
        la = log_a if log_a.ndim == 4 else jnp.broadcast_to(log_a[..., None], k.shape)
        la = jnp.where(resets[:, :, None, None], -1e30, la)
        return gla_local(q, k, v, la, h0)

    def cp(q, k, v, log_a, h0):
        return gla_context_parallel(q, k, v, log_a, mesh=mesh, h0=h0, resets=resets)

    _same_values_and_grads(cp, ref, (q, k, v, log_a, h0), (0, 1, 2, 3, 4))


def test_attention_context_parallel_matches_unsharded():
    mesh = shd.make_mesh((1, 1, 4, 2))
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(ks[0], (2, 24, 4, 8))
    k = jax.random.normal(ks[1], (2, 24, 2, 8))
    v = jax.random.normal(ks[2], (2, 24, 2, 8))
    seg = jnp.asarray(1 + (np.arange(24)[None] >= np.array([[7], [12]])), jnp.int32)
    ref = lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="reference")
    cp = lambda q, k, v: attention_context_parallel(q, k, v, mesh=mesh, segment_ids=seg)
    np.testing.assert_allclose(jax.jit(cp)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    g_c = jax.grad(lambda *a: jnp.sum(jnp.sin(cp(*a))), argnums=(0, 1, 2))(q, k, v)
    g_r = jax.grad(lambda *a: jnp.sum(jnp.sin(ref(*a))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_c, g_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gla_context_parallel_with_registered_chunked_gla():
    """The local form can be the registry's chunked GLA (``seqjax.mixers.get("gla").fn``)."""
    spec = mixers.get("gla")

    def local(q, k, v, log_a, h0, resets):
        return spec.fn(q, k, v, log_a, h0=h0, resets=resets, impl="chunked", chunk_size=2, scale=1.0)

    mesh = shd.make_mesh((1, 1, 4, 2))
    q, k, v, log_a, h0 = _inputs(jax.random.PRNGKey(3), t=16)
    y_r, s_r = gla_local(q, k, v, log_a, h0)
    y_c, s_c = jax.jit(lambda *a: gla_context_parallel(*a, mesh=mesh, h0=h0, local_fn=local))(q, k, v, log_a)
    np.testing.assert_allclose(y_c, y_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_c, s_r, rtol=1e-4, atol=1e-4)


def test_lm_layers_run_context_parallel_under_a_context_mesh(monkeypatch):
    """A Mamba-2/attention/Gated-DeltaNet/GLA LM jitted under ``use_rules(mesh)`` with time split 4 ways over
    ``context`` takes the context-parallel forms in every layer and gives the unsharded loss and gradients,
    with a document boundary inside a shard and one exactly at a shard boundary."""
    from flax import nnx

    from seqjax.mixers import mamba2 as m2
    from seqjax.models.lm import LM, LMConfig
    from seqjax.ops import context_parallel as cp

    calls = {"mamba2": 0, "attention": 0, "delta": 0, "gla": 0}

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(m2, "mamba2_context_parallel", spy("mamba2", m2.mamba2_context_parallel))
    monkeypatch.setattr(cp, "attention_context_parallel", spy("attention", cp.attention_context_parallel))
    monkeypatch.setattr(cp, "delta_context_parallel", spy("delta", cp.delta_context_parallel))
    monkeypatch.setattr(cp, "gla_context_parallel", spy("gla", cp.gla_context_parallel))  # Mamba-2's too
    pattern = ("mamba2", "attention", "gated_deltanet", "gla")
    cfg = LMConfig(vocab_size=32, d_model=16, num_layers=4, pattern=pattern, num_heads=2,
                   num_kv_heads=1, mlp_ratio=2.0, scan_layers=False)
    graphdef, state = nnx.split(LM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 32), 0, 32)
    seg = jnp.asarray(1 + (np.arange(32)[None] >= np.array([[5], [16]])), jnp.int32)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(tokens, segment_ids=seg)
        return jnp.mean(jnp.sin(logits))

    want = jax.jit(jax.value_and_grad(loss))(state)
    assert calls == {"mamba2": 0, "attention": 0, "delta": 0, "gla": 0}
    with shd.use_rules(shd.make_mesh((2, 1, 4, 1)), shd.DEFAULT_RULES):
        got = jax.jit(jax.value_and_grad(loss))(state)
    assert min(calls.values()) >= 1 and calls["gla"] >= 2, calls
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape,gated,strong", [((1, 1, 8, 1), False, False), ((2, 1, 2, 2), True, True)])
def test_delta_context_parallel_matches_unsharded(shape, gated, strong):
    """The delta rule with time sharded over ``context`` (dense shard transitions) equals the unsharded
    chunked form: outputs, final state and all gradients; beta in (0, 2) (negative eigenvalues), h0 in,
    documents starting inside a shard and exactly at a shard boundary, weak and strong gates."""
    from seqjax.nn import l2_normalize
    from seqjax.ops.context_parallel import delta_context_parallel
    from seqjax.ops.delta import chunk_delta_rule

    mesh = shd.make_mesh(shape)
    ks = jax.random.split(jax.random.PRNGKey(5), 6)
    b, t, h, dk, dv = 2, 32, 2, 3, 5
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = l2_normalize(jax.random.normal(ks[1], (b, t, h, dk)))
    v = jax.random.normal(ks[2], (b, t, h, dv))
    beta = 2 * jax.random.uniform(ks[3], (b, t, h))
    la = -(3.0 if strong else 0.05) * jax.nn.softplus(jax.random.normal(ks[4], (b, t, h))) if gated else None
    h0 = jax.random.normal(ks[5], (b, h, dk, dv))
    resets = _resets(b, t)
    kw = dict(h0=h0, resets=resets, scale=0.7, chunk_size=4)

    def ref(q, k, v, beta, la):
        return chunk_delta_rule(q, k, v, beta, la, **kw)

    def cp(q, k, v, beta, la):
        return delta_context_parallel(q, k, v, beta, la, mesh=mesh, **kw)

    _same_values_and_grads(cp, ref, (q, k, v, beta, la), (0, 1, 2, 3) + ((4,) if gated else ()))


@pytest.mark.parametrize("name", ["retnet", "linear_attention"])
def test_per_head_decay_layers_run_context_parallel(name, monkeypatch):
    """RetNet's fixed per-head decays and linear attention's none take the same context-parallel path as GLA
    inside the LM: the layer's output under a context mesh equals its unsharded output (packed documents)."""
    from flax import nnx

    from seqjax.ops import context_parallel as cp

    calls, real = [], cp.gla_context_parallel
    monkeypatch.setattr(cp, "gla_context_parallel", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    layer = mixers.get(name).layer(16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 32, 16))
    seg = jnp.asarray(1 + (np.arange(32)[None] >= np.array([[5], [16]])), jnp.int32)
    f = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, segment_ids=seg)[0])
    want = f(state, x)
    with shd.use_rules(shd.make_mesh((2, 1, 4, 1)), shd.DEFAULT_RULES):
        got = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, segment_ids=seg)[0])(state, x)
    assert len(calls) == 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
