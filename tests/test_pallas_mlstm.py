"""The chunkwise mLSTM Pallas kernel (interpreted on CPU, compiled on an accelerator) against the float32
reference scan: outputs, the final ``(C, n, m)``, all gradients (through the Pallas backward); T = 1 and not a multiple of the chunk;
head dims 64, 128 and odd ones; strong and weak forget gates and large input gates (the stabiliser at
work); resets; h0 in and the state carried across a split sequence; bf16 inputs; wiring as ``impl``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mlstm_chunk import mlstm_chunk
from seqjax.mixers import mlstm as ML
from seqjax.nn import rms_rel_err


def _inputs(key, t, dk, dv, b=1, h=2, f_shift=0.0, i_scale=3.0):
    ks = jax.random.split(key, 8)
    return dict(
        q=jax.random.normal(ks[0], (b, t, h, dk)),
        k=jax.random.normal(ks[1], (b, t, h, dk)),
        v=jax.random.normal(ks[2], (b, t, h, dv)),
        i=i_scale * jax.random.normal(ks[3], (b, t, h)),
        f=f_shift + 3.0 * jax.random.normal(ks[4], (b, t, h)),
        h0=(jax.random.normal(ks[5], (b, h, dk, dv)), jax.random.normal(ks[6], (b, h, dk)),
            jax.random.normal(ks[7], (b, h))),
    )


def _close(a, b, tol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape, what
        assert np.all(np.isfinite(np.asarray(x, np.float32))), what
        err = rms_rel_err(x, y)
        assert err <= tol, f"{what}: rms-rel err {err:.2e} > {tol:.0e}"


def _grads(f, x, key):
    out = f(**x)
    ws = [jax.random.normal(k, o.shape) for k, o in zip(jax.random.split(key, 4), jax.tree.leaves(out))]

    def loss(x):
        return sum(jnp.sum(w * o.astype(jnp.float32)) for w, o in zip(ws, jax.tree.leaves(f(**x))))

    return jax.grad(loss)(x)


@pytest.mark.parametrize("t,dk,dv,chunk", [(1, 7, 5, 16), (63, 20, 9, 32), (70, 64, 64, 64), (40, 128, 16, 16),
                                            (20, 16, 128, 16),  # two value blocks in the state passes
                                            (257, 16, 16, 64),  # five chunks (not a power of two), the last nearly all padding
                                            (20, 130, 9, 16),  # key dim padded to 256: readouts in key tiles of 64
                                            (20, 250, 250, 16)])  # both near 256: value tiles of 32-64 with key tiles
                                            # inside, every tile holding real columns
def test_kernel_equals_reference(t, dk, dv, chunk):
    x = _inputs(jax.random.PRNGKey(t), t, dk, dv)
    resets = jnp.zeros((1, t), bool).at[:, t // 2].set(True)
    ker = lambda **a: mlstm_chunk(**a, resets=resets, chunk_size=chunk)
    ref = lambda **a: ML.mlstm_recurrent(**a, resets=resets)
    # at T = 257 the XLA chunked form is as far from the reference (3.7e-5 values, 1.2e-4 gradients; float32
    # rounding of the stabilised sums over 257 steps), so the bounds scale with the length
    long = t > 200
    _close(ker(**x), ref(**x), 1e-4 if long else 2e-5, "values and (C, n, m)")
    _close(_grads(ker, x, jax.random.PRNGKey(1)), _grads(ref, x, jax.random.PRNGKey(1)), 3e-4 if long else 1e-4, "grads")


@pytest.mark.parametrize("f_shift,i_scale,dk", [(12.0, 0.1, 8), (-12.0, 3.0, 8), (0.0, 12.0, 8), (-12.0, 3.0, 72)])
def test_gate_extremes(f_shift, i_scale, dk):
    """log σ(f) ≈ −6e-6 (weak decay) and ≈ −12 (strong); input gates up to e^{±36} (the stabiliser); at a key
    dim of 72 too (padded to 128: two key blocks, whose shares of db, di XLA adds)."""
    x = _inputs(jax.random.PRNGKey(2), 50, dk, 8, f_shift=f_shift, i_scale=i_scale)
    ker = lambda **a: mlstm_chunk(**a, chunk_size=16)
    _close(ker(**x), ML.mlstm_recurrent(**x), 2e-5, f"f_shift={f_shift} i_scale={i_scale}")
    key = jax.random.PRNGKey(5)
    _close(_grads(ker, x, key), _grads(ML.mlstm_recurrent, x, key), 1e-4, f"grads f_shift={f_shift} i_scale={i_scale}")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_pallas_backward_carries_state_across_a_split(backend):
    """The gradient runs through the Pallas backward (named in the jaxpr; ``backward="xla"`` avoids it), and
    two calls chained by their state ``(C, n, m)`` differentiate like the whole sequence — the final
    stabiliser's gradient included (it reaches the next call's output only through ``C e^m``)."""
    x = _inputs(jax.random.PRNGKey(11), 63, 9, 5)
    resets = jnp.zeros((1, 63), bool).at[:, 20].set(True)
    ker = lambda **a: mlstm_chunk(**a, chunk_size=16, backend=backend)

    def split(**a):
        y1, s1 = ker(**{n: (y if n == "h0" else y[:, :40]) for n, y in a.items()}, resets=resets[:, :40])
        y2, s2 = ker(**{n: y[:, 40:] for n, y in a.items() if n != "h0"}, h0=s1, resets=resets[:, 40:])
        return jnp.concatenate([y1, y2], 1), s2

    key = jax.random.PRNGKey(6)
    ref = lambda **a: ML.mlstm_recurrent(**a, resets=resets)
    _close(_grads(split, x, key), _grads(ref, x, key), 1e-4, "split grads")
    loss = lambda f: lambda q: jnp.sum(f(**{**x, "q": q})[0] ** 2)
    assert "mlstm_chunk_bwd_grads" in str(jax.make_jaxpr(jax.grad(loss(ker)))(x["q"]))
    xla = lambda **a: mlstm_chunk(**a, chunk_size=16, backend=backend, backward="xla")
    assert "mlstm_chunk_bwd" not in str(jax.make_jaxpr(jax.grad(loss(xla)))(x["q"]))


def test_bf16_grads_at_head_dims_near_256():
    """bf16 q, k, v where the gradient kernels take key and value tiles (head dims padded to 256)."""
    x = _inputs(jax.random.PRNGKey(5), 20, 250, 250)
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    key = jax.random.PRNGKey(3)
    got = _grads(lambda **a: mlstm_chunk(**a, chunk_size=16), low, key)
    want = _grads(ML.mlstm_recurrent, {n: (a.astype(jnp.float32) if n in ("q", "k", "v") else a) for n, a in low.items()}, key)
    _close(got, want, 3e-2, "bf16 grads at head dims 250")


def test_pallas_backward_keeps_only_the_inputs_and_takes_bf16():
    x = _inputs(jax.random.PRNGKey(12), 256, 16, 16)
    args = [x[n] for n in ("q", "k", "v", "i", "f")]
    size = lambda **kw: sum(a.size for a in jax.tree.leaves(jax.vjp(lambda *a: mlstm_chunk(*a, chunk_size=16, **kw), *args)[1]))
    # q, k, v, h0 and gate-sized [b, t, h] arrays (the gates, their chunk layout, the XLA final-m path's masks)
    budget = 3 * x["q"].size + 32 * x["i"].size + sum(a.size for a in x["h0"])
    assert size() <= budget
    assert size(backward="xla") > budget + x["k"].size
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    low = {n: (a if n == "h0" else a[:, :48]) for n, a in low.items()}
    key = jax.random.PRNGKey(3)
    got = _grads(lambda **a: mlstm_chunk(**a, chunk_size=16), low, key)
    assert all(got[n].dtype == jnp.bfloat16 for n in ("q", "k", "v"))
    want = _grads(ML.mlstm_recurrent, {n: (a.astype(jnp.float32) if n in ("q", "k", "v") else a) for n, a in low.items()}, key)
    _close(got, want, 3e-2, "bf16 grads")
    with pytest.raises(ValueError, match="backward must be"):
        mlstm_chunk(*args, chunk_size=16, backward="triton")


def test_state_carried_across_a_split_sequence():
    x = _inputs(jax.random.PRNGKey(3), 63, 9, 5)
    want = ML.mlstm_recurrent(**x)
    cut = lambda sl: {n: (a if n == "h0" else a[:, sl]) for n, a in x.items()}
    y1, s1 = mlstm_chunk(**cut(slice(0, 40)), chunk_size=32)
    y2, s2 = mlstm_chunk(**{**cut(slice(40, None)), "h0": s1}, chunk_size=32)
    _close((jnp.concatenate([y1, y2], 1), s2), want, 2e-5, "split at 40")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_bf16_inputs(backend):
    """bf16 q, k, v: the states entering each chunk are written in bf16 (as the output's matmuls take them)."""
    x = _inputs(jax.random.PRNGKey(4), 48, 16, 16)
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    y, _ = mlstm_chunk(**low, chunk_size=16, backend=backend)
    assert y.dtype == jnp.float32
    want = ML.mlstm_recurrent(**{n: (a.astype(jnp.float32) if n in ("q", "k", "v") else a) for n, a in low.items()})
    _close(y, want[0], 2e-2, "bf16")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_many_chunks_resets_and_two_value_blocks(backend):
    """Ten chunks with a reset in most of them (the stabilisers' and normalisers' associative scans across
    documents), two batch rows, and dv = 200 (padded to 256: two value blocks of the output kernel)."""
    t = 150
    x = _inputs(jax.random.PRNGKey(21), t, 9, 200, b=2)
    resets = jax.random.bernoulli(jax.random.PRNGKey(22), 0.06, (2, t))
    ker = lambda **a: mlstm_chunk(**a, resets=resets, chunk_size=16, backend=backend)
    ref = lambda **a: ML.mlstm_recurrent(**a, resets=resets)
    _close(ker(**x), ref(**x), 2e-5, "values and (C, n, m)")
    _close(_grads(ker, x, jax.random.PRNGKey(2)), _grads(ref, x, jax.random.PRNGKey(2)), 1e-4, "grads")


def test_chunk_stabilisers_equal_the_chunk_by_chunk_walk():
    """``chunk_stabilisers``' associative scans against the recurrences walked chunk by chunk
    (``m⁺ = max(a + m, m_loc)``, ``n'⁺ = φ n' + Kᵀ ε``), over 80 chunks with resets."""
    from pallas_kernels.mlstm_chunk.forward import NEG, _pad_state, _prepare, chunk_stabilisers

    b, t, h, c = 2, 1280, 2, 16
    x = _inputs(jax.random.PRNGKey(23), t, 8, 4, b=b, h=h)
    resets = jax.random.bernoulli(jax.random.PRNGKey(24), 0.03, (b, t)).astype(jnp.float32)
    qh, kh, _, bt, st, it, et, n = _prepare(x["q"], x["k"], x["v"], x["i"], x["f"], resets, c)
    _, n0, m0 = _pad_state(x["h0"], kh.shape[-1], 16)
    m_in, ew, fo, n_in, (n_t, m_t) = jax.jit(chunk_stabilisers, static_argnums=7)(bt, st, it, et, kh, n0, m0, c)
    ch = lambda a: jnp.moveaxis(a.reshape(b, h, n, c, *a.shape[3:]), 2, 0)

    def walk(carry, xs):  # one chunk
        m, nv = carry
        bb, ss, ee, ii, kk = xs
        live = ss == ss[..., -1:]
        m_loc = jnp.max(jnp.where(live, bb[..., -1:] - bb + ee, NEG), axis=-1)
        a = jnp.where(ss[..., -1] == 0.0, bb[..., -1], NEG)
        m_new = jnp.maximum(a + m, m_loc)
        w = jnp.where(live, jnp.exp(bb[..., -1:] - bb + ii - m_new[..., None]), 0.0)
        nv_new = jnp.exp(a + m - m_new)[..., None] * nv + jnp.einsum("bhc,bhck->bhk", w, kk, precision="highest")
        return (m_new, nv_new), (m, nv)

    (m, nv), (ms, ns) = jax.lax.scan(walk, (m0, n0), (ch(bt), ch(st), ch(et), ch(it), ch(kh.astype(jnp.float32))))
    ms, ns = jnp.moveaxis(ms, 0, 2), jnp.moveaxis(ns, 0, 2)
    np.testing.assert_allclose(m_in, ms, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(m_t, m, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(n_in, ns, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(n_t, nv, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(ew))) and np.all(np.asarray(fo) <= 1.0)


def test_mixer_impl_pallas_and_bad_chunk():
    x = ML.mlstm_make_inputs(jax.random.PRNGKey(5), 1, 21)
    _close(ML.mlstm(**x, impl="pallas", chunk_size=16), ML.mlstm(**x, impl="sequential"), 2e-5, "mlstm impl=pallas")
    with pytest.raises(ValueError, match="power of two"):
        ML.mlstm(**x, impl="pallas", chunk_size=48)


def test_auto_takes_the_kernel_with_the_xla_backward(monkeypatch):
    """``impl="auto"`` (a one-GPU process, patched) differentiates through the XLA chunked form until the
    Pallas backward is timed on a GPU; ``impl="pallas"`` takes the Pallas backward."""
    calls, real = [], ML.mlstm_chunk
    monkeypatch.setattr(ML, "mlstm_chunk", lambda *a, **kw: calls.append(kw["backward"]) or real(*a, **kw))
    monkeypatch.setattr(ML, "auto_pallas", lambda chunk_size=None, kernel="gla": kernel == "mlstm")
    x = ML.mlstm_make_inputs(jax.random.PRNGKey(6), 1, 9)
    _close(ML.mlstm(**x, impl="auto", chunk_size=16), ML.mlstm(**x, impl="sequential"), 2e-5, "auto")
    ML.mlstm(**x, impl="pallas", chunk_size=16)
    assert calls == ["xla", "pallas"]


@pytest.mark.parametrize("t,dk,dv,chunk", [(37, 7, 5, 16), (70, 20, 9, 32)])
def test_tpu_kernel_equals_reference(t, dk, dv, chunk):
    """The Mosaic TPU body (``backend="mosaic_tpu"``), interpreted, with h0, resets and large input gates."""
    x = _inputs(jax.random.PRNGKey(t + 7), t, dk, dv, i_scale=6.0)
    resets = jnp.zeros((1, t), bool).at[:, t // 2].set(True)
    ker = lambda **a: mlstm_chunk(**a, resets=resets, chunk_size=chunk, backend="mosaic_tpu")
    ref = lambda **a: ML.mlstm_recurrent(**a, resets=resets)
    # i up to ±18: exp(x) carries a relative rounding of |x|·eps, so the float32 floor is ~20x the default test's
    _close(ker(**x), ref(**x), 1e-4, "values and (C, n, m)")
    _close(_grads(ker, x, jax.random.PRNGKey(1)), _grads(ref, x, jax.random.PRNGKey(1)), 1e-4, "grads")
