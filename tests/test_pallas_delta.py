"""The chunked delta-rule Pallas kernel (interpreted on CPU, compiled on an accelerator) against the
seqjax reference scan: outputs, final states and gradients (through the Pallas backward); T not a multiple of the chunk; head dims
64 and odd; beta up to 2; log-decays -1e-4 .. -20; resets; h0 in / h_last out; bf16 inputs; wiring as
``impl="pallas"``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.delta_chunk import delta_chunk
from seqjax.mixers import _delta_rule as DR
from seqjax.mixers import deltanet as D
from seqjax.nn import l2_normalize, rms_rel_err
from seqjax.ops import delta as E


def _inputs(key, b, t, h, dk, dv, decay=(-8.0, 3.0)):
    ks = jax.random.split(key, 7)
    return dict(
        q=jax.random.normal(ks[0], (b, t, h, dk)),
        k=l2_normalize(jax.random.normal(ks[1], (b, t, h, dk))),
        v=jax.random.normal(ks[2], (b, t, h, dv)),
        beta=2.0 * jax.random.uniform(ks[3], (b, t, h)),
        log_alpha=-jnp.exp(jax.random.uniform(ks[4], (b, t, h), minval=decay[0], maxval=decay[1])),
        h0=jax.random.normal(ks[6], (b, h, dk, dv)),
    ), jax.random.bernoulli(ks[5], 0.05, (b, t))


def _close(a, b, tol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), what
        err = rms_rel_err(x, y)
        assert err <= tol, f"{what}: rms-rel err {err:.2e} > {tol:.0e}"


def _value_and_grads(f, x, key):
    o, hl = f(**x)
    wo, wh = jax.random.normal(key, o.shape), jax.random.normal(jax.random.fold_in(key, 1), hl.shape)
    loss = lambda x: jnp.sum(f(**x)[0].astype(jnp.float32) * wo) + jnp.sum(f(**x)[1] * wh)
    return (o, hl), jax.grad(loss)(x)


@pytest.mark.parametrize("dk,dv,t,chunk", [(5, 3, 1, 16), (7, 5, 37, 16), (64, 64, 20, 16), (128, 33, 70, 64),
                                            (16, 128, 20, 16),  # two value blocks in the state passes
                                            (9, 200, 40, 16),  # dv padded to 256: two value blocks of the output kernel
                                            (16, 16, 257, 64),  # five chunks (not a power of two), the last nearly all padding
                                            (130, 9, 20, 16),  # key dim padded to 256: the state walk in key tiles of 64
                                            (250, 250, 20, 16)])  # both near 256: every key and value tile of the
                                            # gradient kernels holds real columns (padding leaves the last ones zero)
def test_kernel_equals_reference(dk, dv, t, chunk):
    """chunk 64 exercises the blocked inverse (four 16 x 16 diagonal blocks and their merges)."""
    x, resets = _inputs(jax.random.PRNGKey(dk), 1, t, 2, dk, dv)
    ref = lambda **a: E.recurrent_delta_rule(**a, resets=resets, scale=0.3)
    ker = lambda **a: delta_chunk(**a, resets=resets, scale=0.3, chunk_size=chunk)
    key = jax.random.PRNGKey(1)
    out_ref, g_ref = _value_and_grads(ref, x, key)
    out, g = _value_and_grads(ker, x, key)
    _close(out, out_ref, 1e-4, f"dk={dk} values/h_last")
    _close(g, g_ref, 1e-3, f"dk={dk} grads")


@pytest.mark.parametrize("log_decay,dk", [(-1e-4, 6), (-20.0, 6), (-20.0, 72)])
def test_kernel_gate_extremes(log_decay, dk):
    """Values and gradients at log-decay −1e-4 and −20 per step (at −20 the true gradient of the decays is
    ~1e-9: the backward must not add and subtract O(1) terms; see ``backward.py``); at a key dim of 72 too
    (padded to 128: two key blocks, whose shares of the decay gradient XLA adds)."""
    x, _ = _inputs(jax.random.PRNGKey(2), 1, 33, 1, dk, 3)
    x["log_alpha"] = jnp.full_like(x["log_alpha"], log_decay)
    key = jax.random.PRNGKey(7)
    out_ref, g_ref = _value_and_grads(E.recurrent_delta_rule, x, key)
    out, g = _value_and_grads(lambda **a: delta_chunk(**a, chunk_size=16), x, key)
    _close(out, out_ref, 1e-4, f"log_decay={log_decay}")
    _close(g, g_ref, 1e-3, f"log_decay={log_decay} grads")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_pallas_backward_carries_state_across_a_split(backend):
    """The gradient runs through the Pallas backward kernels (named in the jaxpr; ``backward="xla"`` avoids
    them), and two calls chained by their state differentiate like the whole sequence."""
    x, resets = _inputs(jax.random.PRNGKey(12), 1, 63, 2, 9, 4, decay=(-9.0, 1.0))
    ker = lambda **a: delta_chunk(**a, chunk_size=16, backend=backend)

    def split(**a):
        o1, h1 = ker(**{n: (y if n == "h0" else y[:, :40]) for n, y in a.items()}, resets=resets[:, :40])
        o2, h2 = ker(**{n: y[:, 40:] for n, y in a.items() if n != "h0"}, h0=h1, resets=resets[:, 40:])
        return jnp.concatenate([o1, o2], 1), h2

    key = jax.random.PRNGKey(2)
    _, g_ref = _value_and_grads(lambda **a: E.recurrent_delta_rule(**a, resets=resets), x, key)
    _close(_value_and_grads(split, x, key)[1], g_ref, 1e-3, "split grads")
    loss = lambda f: lambda q: jnp.sum(f(**{**x, "q": q})[0] ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(ker)))(x["q"]))
    assert "delta_chunk_bwd_grads" in jaxpr and "delta_chunk_bwd_dstates" in jaxpr
    xla = lambda **a: delta_chunk(**a, chunk_size=16, backend=backend, backward="xla")
    assert "delta_chunk_bwd" not in str(jax.make_jaxpr(jax.grad(loss(xla)))(x["q"]))


def test_bf16_grads_at_head_dims_near_256():
    """bf16 q, k, v where the gradient kernels take key and value tiles (head dims padded to 256): each tile's
    matmul operands are cast to bf16 on their own."""
    x, _ = _inputs(jax.random.PRNGKey(5), 1, 20, 2, 250, 250)
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    key = jax.random.PRNGKey(3)
    _, g = _value_and_grads(lambda **a: delta_chunk(**a, chunk_size=16), low, key)
    _, g_ref = _value_and_grads(E.recurrent_delta_rule, {n: a.astype(jnp.float32) for n, a in low.items()}, key)
    _close(g, g_ref, 3e-2, "bf16 grads at head dims 250")


def test_pallas_backward_keeps_only_the_inputs_and_takes_bf16():
    """Training memory: the residuals are the inputs (WY factors and states are recomputed), where the XLA
    chunked form keeps per-chunk states and factors. bf16 inputs: gradients in bf16, float32 inside."""
    x, _ = _inputs(jax.random.PRNGKey(13), 1, 256, 2, 16, 16)
    args = [x[n] for n in ("q", "k", "v", "beta", "log_alpha")]
    size = lambda **kw: sum(a.size for a in jax.tree.leaves(jax.vjp(lambda *a: delta_chunk(*a, chunk_size=16, **kw), *args)[1]))
    budget = sum(a.size for a in args) + 4 * x["beta"].size + x["h0"].size + 64  # + the gates' cumsums, a mask
    assert size() <= budget
    assert size(backward="xla") > budget + x["k"].size
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    low = {n: (a[:, :48] if n != "h0" else a) for n, a in low.items()}
    key = jax.random.PRNGKey(3)
    _, g = _value_and_grads(lambda **a: delta_chunk(**a, chunk_size=16), low, key)
    assert all(g[n].dtype == jnp.bfloat16 for n in ("q", "k", "v"))
    _, g_ref = _value_and_grads(E.recurrent_delta_rule, {n: a.astype(jnp.float32) for n, a in low.items()}, key)
    _close(g, g_ref, 3e-2, "bf16 grads")
    with pytest.raises(ValueError, match="backward must be"):
        delta_chunk(*args, chunk_size=16, backward="triton")


def test_state_carried_across_a_split_sequence():
    x, _ = _inputs(jax.random.PRNGKey(6), 1, 63, 2, 9, 4, decay=(-9.0, 1.0))
    want_o, want_h = E.recurrent_delta_rule(**x)
    head = {n: (a if n == "h0" else a[:, :40]) for n, a in x.items()}
    tail = {n: a[:, 40:] for n, a in x.items() if n != "h0"}
    o1, h1 = delta_chunk(**head, chunk_size=32)
    o2, h2 = delta_chunk(**{**tail, "h0": h1}, chunk_size=32)
    _close((jnp.concatenate([o1, o2], 1), h2), (want_o, want_h), 1e-4, "split at 40")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_kernel_bf16_inputs(backend):
    """bf16 q, k, v: the states entering each chunk and ``U'`` are written in bf16 (the output's matmuls take them)."""
    x, _ = _inputs(jax.random.PRNGKey(3), 1, 24, 2, 16, 8)
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    o, hl = delta_chunk(**low, chunk_size=16, backend=backend)
    assert o.dtype == jnp.bfloat16 and hl.dtype == jnp.float32
    want = E.recurrent_delta_rule(**{n: a.astype(jnp.float32) for n, a in low.items()})
    _close((o, hl), want, 1e-2, "bf16")


def test_mixers_impl_pallas():
    """``impl="pallas"`` in the mixers (negative eigenvalues on; DeltaProduct via micro-tokens)."""
    x = D.deltanet_make_inputs(jax.random.PRNGKey(4), 1, 21, gated=True)
    want = D.gated_deltanet(**x, impl="sequential", negative_eigen=True)
    _close(D.gated_deltanet(**x, impl="pallas", negative_eigen=True), want, 1e-4, "gated_deltanet pallas")
    p = D.deltanet_make_inputs(jax.random.PRNGKey(5), 1, 9, gated=True, householder=2)
    want = D.deltaproduct(**p, impl="sequential", chunk_size=16)
    _close(D.deltaproduct(**p, impl="pallas", chunk_size=16), want, 1e-4, "deltaproduct pallas")


@pytest.mark.parametrize("dk,dv,t,chunk", [(7, 5, 37, 16), (20, 33, 70, 64)])
def test_tpu_kernels_equal_reference(dk, dv, t, chunk):
    """The Mosaic TPU bodies (``backend="mosaic_tpu"``), interpreted: values, h_last and gradients."""
    x, resets = _inputs(jax.random.PRNGKey(dk + 100), 1, t, 2, dk, dv)
    ref = lambda **a: E.recurrent_delta_rule(**a, resets=resets, scale=0.3)
    ker = lambda **a: delta_chunk(**a, resets=resets, scale=0.3, chunk_size=chunk, backend="mosaic_tpu")
    key = jax.random.PRNGKey(1)
    out_ref, g_ref = _value_and_grads(ref, x, key)
    out, g = _value_and_grads(ker, x, key)
    _close(out, out_ref, 1e-4, f"dk={dk} values/h_last")
    _close(g, g_ref, 1e-3, f"dk={dk} grads")


def test_auto_takes_the_kernel_with_the_xla_backward(monkeypatch):
    """``impl="auto"`` (a one-GPU process, patched here) runs the kernel and differentiates through the XLA
    form (``seqjax._platform.AUTO_BACKWARD``); ``impl="pallas"`` takes the Pallas backward."""
    calls, real = [], DR.delta_chunk
    monkeypatch.setattr(DR, "delta_chunk", lambda *a, **kw: calls.append(kw["backward"]) or real(*a, **kw))
    x, _ = _inputs(jax.random.PRNGKey(14), 1, 9, 1, 4, 3)
    monkeypatch.setattr(DR, "auto_pallas", lambda chunk_size=None, kernel="gla": kernel == "delta")
    _close(D.delta_rule(**x, impl="auto", chunk_size=16), E.recurrent_delta_rule(**x), 1e-4, "auto")
    D.delta_rule(**x, impl="pallas", chunk_size=16)
    assert calls == ["xla", "pallas"]
