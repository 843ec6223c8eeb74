"""The chunked GLA Pallas kernels (per-head and per-channel decay; interpreted on CPU, compiled on GPU) against the seqjax references:
outputs, final states, all gradients (through the Pallas backward kernels); T not a multiple of the chunk; head dims 64 and odd; h0 in and
h_last out; resets; negative-eigenvalue signs; decays −1e-4 … −20; bf16; wired into the mixers."""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gla_chunk import gla_chunk_pallas
from seqjax.mixers import gla as G
from seqjax.mixers import mamba2 as M2
from seqjax.nn import rms_rel_err
from seqjax.ops.gla import recurrent_gla


def _close(x, y, tol, what=""):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert a.shape == b.shape, what
        assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), what
        err = rms_rel_err(a, b)
        assert err <= tol, f"{what}: {err:.2e} > {tol:.0e}"


def _inputs(key, t, dk, dv, lo=-4.0, hi=-1e-3, b=1, h=2, channel=False):
    ks = jax.random.split(key, 6)
    gshape = (b, t, h, dk) if channel else (b, t, h)
    g = -jnp.exp(jax.random.uniform(ks[3], gshape, minval=jnp.log(-hi), maxval=jnp.log(-lo)))
    return dict(
        q=jax.random.normal(ks[0], (b, t, h, dk)),
        k=jax.random.normal(ks[1], (b, t, h, dk)) / dk**0.5,
        v=jax.random.normal(ks[2], (b, t, h, dv)),
        g=g,
        sign=jnp.where(jax.random.bernoulli(ks[4], 0.3, (b, t, h)), -1.0, 1.0),
        h0=jax.random.normal(ks[5], (b, h, dk, dv)),
    )


def _grads(f, inp, key):
    names = ("q", "k", "v", "g", "h0")
    out = f(**inp)
    ws = [jax.random.normal(k, x.shape) for k, x in zip(jax.random.split(key, 2), out)]

    def loss(d):
        o = f(**{**inp, **d})
        return sum(jnp.sum(w * x.astype(jnp.float32)) for w, x in zip(ws, o))

    return jax.grad(loss)({n: inp[n] for n in names})


@pytest.mark.parametrize("t,dk,dv,chunk,channel", [
    (1, 7, 5, 16, False), (40, 7, 5, 16, False), (75, 64, 64, 32, False), (130, 64, 9, 64, False),
    (1, 7, 5, 16, True), (63, 20, 9, 32, True), (130, 64, 9, 64, True), (40, 128, 16, 16, True),
    (20, 16, 128, 16, False), (20, 16, 128, 16, True),  # two value blocks of 64 in the Triton state passes
    (257, 16, 16, 64, False),  # five chunks (not a power of two), one of them nearly all padding
    (40, 9, 200, 16, True),  # dv padded to 256: two value blocks of the per-channel output kernel
    (40, 130, 200, 16, False),  # head dims padded to 256: four key blocks, and 64-column loops, in the gradient kernel
    (20, 250, 9, 16, True),  # dk near 256: four key blocks (each with real channels), 64-column state reads in out and dv
])
def test_kernel_equals_reference(t, dk, dv, chunk, channel):
    inp = _inputs(jax.random.PRNGKey(t), t, dk, dv, channel=channel)
    resets = jnp.zeros((1, t), bool).at[:, t // 2].set(True)
    kern = functools.partial(gla_chunk_pallas, resets=resets, chunk_size=chunk)
    ref = functools.partial(recurrent_gla, resets=resets)
    _close(kern(**inp), ref(**inp), 2e-5, "values")
    _close(_grads(kern, inp, jax.random.PRNGKey(1)), _grads(ref, inp, jax.random.PRNGKey(1)), 1e-4, "grads")


# log -20 every step: the true gradient of g is ~1e-9, so any O(1) terms that should cancel show up
# (the Pallas backward leaves those terms out, see pallas_kernels/gla_chunk/backward.py)
@pytest.mark.parametrize("channel", [False, True])
@pytest.mark.parametrize(
    "lo,hi", [(-1e-4, -1e-4), (-20.0, -20.0 * 0.999), (-20.0, -1e-4)]
)
def test_kernel_decay_extremes(lo, hi, channel):
    inp = _inputs(jax.random.PRNGKey(3), 50, 8, 8, lo=lo, hi=hi, channel=channel)
    kern = functools.partial(gla_chunk_pallas, chunk_size=16)
    _close(kern(**inp), recurrent_gla(**inp), 2e-5, "values")
    _close(_grads(kern, inp, jax.random.PRNGKey(2)), _grads(recurrent_gla, inp, jax.random.PRNGKey(2)), 1e-4, "grads")


@pytest.mark.parametrize("channel", [False, True])
def test_kernel_strong_decay_over_key_blocks(channel):
    """Log decay −20 at a key dim of 72 (padded to 128: two key blocks, whose shares of the decay gradient
    XLA adds) and chunks of 32 (two secondary chunks of 16 in the per-channel kernels)."""
    inp = _inputs(jax.random.PRNGKey(5), 50, 72, 8, lo=-20.0, hi=-20.0 * 0.999, channel=channel)
    kern = functools.partial(gla_chunk_pallas, chunk_size=32)
    _close(kern(**inp), recurrent_gla(**inp), 2e-5, "values")
    _close(_grads(kern, inp, jax.random.PRNGKey(2)), _grads(recurrent_gla, inp, jax.random.PRNGKey(2)), 1e-4, "grads")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("channel", [False, True])
def test_kernel_bf16(channel, backend):
    """bf16 q, k, v (the per-channel states entering each chunk are then written in bf16)."""
    inp = _inputs(jax.random.PRNGKey(4), 48, 16, 16, channel=channel)
    low = {n: (x.astype(jnp.bfloat16) if n in ("q", "k", "v") else x) for n, x in inp.items()}
    o, s = gla_chunk_pallas(**low, chunk_size=16, backend=backend)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    _close((o, s), recurrent_gla(**inp), 2e-2, "bf16")


def test_kernel_bf16_head_dim_near_256():
    """bf16 q, k, v at a per-head key dim padded to 256, where the Triton forward walks the states alone and
    forms the outputs chunk-parallel (``kernel._forward_split``); a reset and a carried state in the sequence."""
    inp = _inputs(jax.random.PRNGKey(6), 70, 250, 70, lo=-3.0)
    low = {n: (x.astype(jnp.bfloat16) if n in ("q", "k", "v") else x) for n, x in inp.items()}
    resets = jnp.zeros((1, 70), bool).at[:, 33].set(True)
    got = gla_chunk_pallas(**low, resets=resets, chunk_size=16)
    _close(got, recurrent_gla(**{n: x.astype(jnp.float32) for n, x in low.items()}, resets=resets), 2e-2, "bf16")


def test_state_carried_across_a_split_sequence():
    inp = _inputs(jax.random.PRNGKey(8), 63, 9, 5, lo=-9.0, channel=True)
    want = recurrent_gla(**inp)
    cut = lambda sl: {n: (x if n == "h0" else x[:, sl]) for n, x in inp.items()}
    o1, s1 = gla_chunk_pallas(**cut(slice(0, 40)), chunk_size=32)
    o2, s2 = gla_chunk_pallas(**{**cut(slice(40, None)), "h0": s1}, chunk_size=32)
    _close((jnp.concatenate([o1, o2], 1), s2), want, 2e-5, "split at 40")


@pytest.mark.parametrize("backend,channel", [("triton", False), ("mosaic_tpu", False), ("triton", True)])
def test_pallas_backward_carries_state_across_a_split(backend, channel):
    """The gradient runs through the Pallas backward kernels (``backward.py``; they are in the jaxpr), and
    the gradient of two calls chained by their state is the whole sequence's: ``dh0`` of the second call
    flows into the first call's last chunk."""
    inp = _inputs(jax.random.PRNGKey(10), 63, 9, 5, lo=-9.0, channel=channel)
    kern = functools.partial(gla_chunk_pallas, chunk_size=16, backend=backend)

    def split(q, k, v, g, sign, h0):
        o1, s1 = kern(q[:, :40], k[:, :40], v[:, :40], g[:, :40], sign=sign[:, :40], h0=h0)
        o2, s2 = kern(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:], sign=sign[:, 40:], h0=s1)
        return jnp.concatenate([o1, o2], 1), s2

    _close(_grads(split, inp, jax.random.PRNGKey(3)), _grads(recurrent_gla, inp, jax.random.PRNGKey(3)), 1e-4, "grads")
    jaxpr = str(jax.make_jaxpr(lambda q: jax.grad(lambda q: jnp.sum(kern(q, inp["k"], inp["v"], inp["g"])[0]))(q))(inp["q"]))
    assert "bwd_grads" in jaxpr and "bwd_dstates" in jaxpr
    loss = lambda q: jnp.sum(kern(q, inp["k"], inp["v"], inp["g"], backward="xla")[0])
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(inp["q"]))
    assert "bwd" not in jaxpr


@pytest.mark.parametrize("channel", [False, True])
def test_pallas_backward_keeps_only_the_inputs(channel):
    """Training memory: the Pallas backward's residuals are the inputs (states are recomputed), while the XLA
    chunked form keeps one state per chunk (here as large as the keys)."""
    inp = _inputs(jax.random.PRNGKey(11), 256, 16, 16, channel=channel)
    args = [inp[n] for n in ("q", "k", "v", "g")]
    size = lambda f: sum(x.size for x in jax.tree.leaves(jax.vjp(f, *args)[1]))
    # q, k, v, g, h0, the kernel's three gate arrays and a mask of the log decays' VJP (plus a few scalars)
    budget = sum(x.size for x in args) + 4 * inp["g"].size + inp["h0"].size + 64
    assert size(functools.partial(gla_chunk_pallas, chunk_size=16)) <= budget
    assert size(functools.partial(gla_chunk_pallas, chunk_size=16, backward="xla")) > budget + inp["k"].size


@pytest.mark.parametrize("channel", [False, True])
def test_pallas_backward_bf16(channel):
    inp = _inputs(jax.random.PRNGKey(12), 48, 16, 16, channel=channel)
    low = {n: (x.astype(jnp.bfloat16) if n in ("q", "k", "v") else x) for n, x in inp.items()}
    kern = functools.partial(gla_chunk_pallas, chunk_size=16)
    got = _grads(kern, low, jax.random.PRNGKey(4))
    assert all(got[n].dtype == jnp.bfloat16 for n in ("q", "k", "v"))
    _close(got, _grads(recurrent_gla, inp, jax.random.PRNGKey(4)), 2e-2, "bf16 grads")
    mixed = {**low, "q": inp["q"]}  # float32 queries with bf16 keys and values: each gradient in its input's dtype
    got = _grads(kern, mixed, jax.random.PRNGKey(4))
    assert [got[n].dtype for n in ("q", "k", "v")] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]


def test_bad_gate_shape_is_named():
    inp = _inputs(jax.random.PRNGKey(9), 8, 4, 4)
    with pytest.raises(ValueError, match="g must be"):
        gla_chunk_pallas(**{**inp, "g": inp["g"][..., None].repeat(3, -1)}, chunk_size=16)
    with pytest.raises(ValueError, match="backward must be"):
        gla_chunk_pallas(**inp, chunk_size=16, backward="triton")


def test_mixers_pallas_impl():
    inp = M2.mamba2_make_inputs(jax.random.PRNGKey(5), 1, 37)
    for neg in (False, True):
        _close(M2.mamba2(**inp, impl="pallas", chunk_size=16, negative_eigen=neg),
               M2.mamba2_recurrent(**inp, negative_eigen=neg), 1e-5, f"mamba2 neg={neg}")
    qkv = G.linear_attention_make_inputs(jax.random.PRNGKey(6), 1, 37)
    _close(G.retnet(**qkv, impl="pallas", chunk_size=16), G.retnet_recurrent(**qkv), 1e-5, "retnet")
    _close(G.linear_attention(**qkv, impl="pallas", chunk_size=16), G.linear_attention_recurrent(**qkv), 1e-5, "linattn")
    gin = G.gla_make_inputs(jax.random.PRNGKey(7), 1, 37)
    _close(G.gla(**gin, impl="pallas", chunk_size=16), G.gla(**gin, impl="sequential"), 1e-5, "gla (per channel)")
    with pytest.raises(ValueError, match="power of two"):
        G.retnet(**qkv, impl="pallas", chunk_size=48)


def test_auto_takes_the_kernel_where_measured(monkeypatch):
    """``impl="auto"`` runs the kernel exactly where ``seqjax._platform.auto_pallas()`` says (a one-GPU
    process) and for per-head decays only, with the XLA backward; per-channel GLA stays on the XLA chunked form."""
    calls, real = [], G.gla_chunk_pallas
    monkeypatch.setattr(G, "gla_chunk_pallas", lambda *a, **kw: calls.append(kw["backward"]) or real(*a, **kw))
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(kk, (1, 19, 2, 16)) for kk in ks[:3])
    gk = -jnp.exp(jax.random.normal(ks[3], (1, 19, 2, 16)))
    monkeypatch.setattr(G, "auto_pallas", lambda chunk_size=None: True)
    _close(G.retnet(q, k, v, impl="auto"), G.retnet(q, k, v, impl="chunked"), 1e-5, "retnet auto")
    assert calls == ["xla"]  # auto differentiates through XLA (seqjax._platform.AUTO_BACKWARD)
    G.retnet(q, k, v, impl="pallas")
    assert calls == ["xla", "pallas"]  # impl="pallas": the kernel's Pallas backward
    calls.pop()
    G.gla(q, k, v, gk, impl="auto")
    assert len(calls) == 1
    monkeypatch.setattr(G, "auto_pallas", lambda chunk_size=None: False)
    G.retnet(q, k, v, impl="auto")
    assert len(calls) == 1
    from seqjax import _platform as P

    monkeypatch.setattr(G, "auto_pallas", lambda chunk_size=None: True)
    monkeypatch.setitem(P.AUTO_BACKWARD, "gla", "pallas")  # the entry a faster Pallas backward earns
    G.retnet(q, k, v, impl="auto")
    assert calls == ["xla", "pallas"]


def test_auto_pallas_needs_one_gpu_and_a_kernel_chunk_size(monkeypatch):
    """``auto_pallas``: a GPU, one device or a ``use_rules`` mesh, and a chunk size the kernel takes (a power
    of two >= 16)."""
    from seqjax import _platform as P

    monkeypatch.setattr(P, "kernel_platform", lambda: "cpu")
    monkeypatch.setattr(P.jax, "device_count", lambda: 1)
    assert not P.auto_pallas(64)  # a CPU process (the kernels would be interpreted)
    monkeypatch.setattr(P, "kernel_platform", lambda: "gpu")
    monkeypatch.setattr(P.jax, "device_count", lambda: 8)
    assert not P.auto_pallas(64)  # 8 devices and no mesh: a pallas_call has no sharding rule
    from seqjax import sharding

    with sharding.use_rules(sharding.make_mesh((2, 1, 1, 2), devices=jax.devices()[:4])):
        assert P.auto_pallas(64)  # under a mesh the kernels run inside shard_map (kernel_call)
    monkeypatch.setattr(P.jax, "device_count", lambda: 1)
    assert P.auto_pallas() and P.auto_pallas(64) and P.auto_pallas(16)
    # only kernels whose current forward passed the GPU tests
    assert P.auto_pallas(64, kernel="gla") and not P.auto_pallas(64, kernel="no such kernel")
    for name in ("gla", "delta", "mlstm"):
        assert P.auto_pallas(64, kernel=name) == (name in P.GPU_TESTED), name
    monkeypatch.setattr(P, "GPU_TESTED", P.GPU_TESTED | {"delta"})
    assert P.auto_pallas(kernel="delta")
    assert not P.auto_pallas(48) and not P.auto_pallas(8)


# ----------------------------------------------------------------------------- Mosaic TPU


@pytest.mark.parametrize("t,dk,dv,chunk,channel", [
    (1, 7, 5, 16, False), (75, 20, 9, 32, False), (130, 64, 64, 64, False), (75, 20, 9, 32, True), (130, 64, 9, 64, True),
])
def test_tpu_kernel_equals_reference(t, dk, dv, chunk, channel):
    """The Mosaic TPU bodies (chunk per grid step, state in VMEM scratch), interpreted: values, state, grads."""
    inp = _inputs(jax.random.PRNGKey(t + 1), t, dk, dv, channel=channel)
    resets = jnp.zeros((1, t), bool).at[:, t // 2].set(True)
    kern = functools.partial(gla_chunk_pallas, resets=resets, chunk_size=chunk, backend="mosaic_tpu")
    ref = functools.partial(recurrent_gla, resets=resets)
    _close(kern(**inp), ref(**inp), 2e-5, "values")
    _close(_grads(kern, inp, jax.random.PRNGKey(1)), _grads(ref, inp, jax.random.PRNGKey(1)), 1e-4, "grads")


@pytest.mark.parametrize("name", ["gla", "delta", "mlstm"])
def test_kernels_run_in_shard_map_under_a_mesh(name):
    """Under ``seqjax.sharding.use_rules(mesh)`` the mixers run their kernels inside ``shard_map`` (batch on
    ``data``, heads on ``tensor``; ``seqjax._platform.kernel_call``): same values and gradients as one device."""
    from seqjax import sharding
    from seqjax.mixers import deltanet as D
    from seqjax.mixers import mlstm as ML

    mesh = sharding.make_mesh((2, 1, 1, 2), devices=jax.devices()[:4])
    ks = jax.random.split(jax.random.PRNGKey(20), 6)
    q, k, v = (jax.random.normal(kk, (2, 19, 2, 8)) for kk in ks[:3])
    g, beta = -jnp.exp(jax.random.normal(ks[3], (2, 19, 2))), jax.nn.sigmoid(jax.random.normal(ks[4], (2, 19, 2)))
    resets = jnp.zeros((2, 19), bool).at[1, 7].set(True)
    forms = {
        "gla": lambda q, k, v: G._run(q, k, v, g, h0=None, resets=resets, impl="pallas", chunk_size=16,
                                                  scale=1.0),
        "delta": lambda q, k, v: D.delta_rule(q, k / jnp.linalg.norm(k, axis=-1, keepdims=True), v, beta, g,
                                              resets=resets, impl="pallas", chunk_size=16),
        "mlstm": lambda q, k, v: ML.mlstm(q, k, v, g, -g, resets=resets, impl="pallas", chunk_size=16),
    }
    f = forms[name]
    loss = lambda q, k, v: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(f(q, k, v)))
    want = (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
    with sharding.use_rules(mesh):
        step = jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
        assert "shard_map" in str(jax.make_jaxpr(step)(q, k, v))
        got = step(q, k, v)
    _close(got, want, 1e-5, name)
