"""The chunkwise mLSTM Pallas kernel (interpreted on CPU, compiled on an accelerator) against the float32
reference scan: outputs, the final ``(C, n, m)``, all gradients; T = 1 and not a multiple of the chunk;
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


@pytest.mark.parametrize("t,dk,dv,chunk", [(1, 7, 5, 16), (63, 20, 9, 32), (70, 64, 64, 64), (40, 128, 16, 16)])
def test_kernel_equals_reference(t, dk, dv, chunk):
    x = _inputs(jax.random.PRNGKey(t), t, dk, dv)
    resets = jnp.zeros((1, t), bool).at[:, t // 2].set(True)
    ker = lambda **a: mlstm_chunk(**a, resets=resets, chunk_size=chunk)  # noqa: E731
    ref = lambda **a: ML.mlstm_recurrent(**a, resets=resets)  # noqa: E731
    _close(ker(**x), ref(**x), 2e-5, "values and (C, n, m)")
    _close(_grads(ker, x, jax.random.PRNGKey(1)), _grads(ref, x, jax.random.PRNGKey(1)), 1e-4, "grads")


@pytest.mark.parametrize("f_shift,i_scale", [(12.0, 0.1), (-12.0, 3.0), (0.0, 12.0)])
def test_gate_extremes(f_shift, i_scale):
    """log σ(f) ≈ −6e-6 (weak decay) and ≈ −12 (strong); input gates up to e^{±36} (the stabiliser)."""
    x = _inputs(jax.random.PRNGKey(2), 50, 8, 8, f_shift=f_shift, i_scale=i_scale)
    _close(mlstm_chunk(**x, chunk_size=16), ML.mlstm_recurrent(**x), 2e-5, f"f_shift={f_shift} i_scale={i_scale}")


def test_state_carried_across_a_split_sequence():
    x = _inputs(jax.random.PRNGKey(3), 63, 9, 5)
    want = ML.mlstm_recurrent(**x)
    cut = lambda sl: {n: (a if n == "h0" else a[:, sl]) for n, a in x.items()}  # noqa: E731
    y1, s1 = mlstm_chunk(**cut(slice(0, 40)), chunk_size=32)
    y2, s2 = mlstm_chunk(**{**cut(slice(40, None)), "h0": s1}, chunk_size=32)
    _close((jnp.concatenate([y1, y2], 1), s2), want, 2e-5, "split at 40")


def test_bf16_inputs():
    x = _inputs(jax.random.PRNGKey(4), 48, 16, 16)
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    y, _ = mlstm_chunk(**low, chunk_size=16)
    assert y.dtype == jnp.float32
    want = ML.mlstm_recurrent(**{n: (a.astype(jnp.float32) if n in ("q", "k", "v") else a) for n, a in low.items()})
    _close(y, want[0], 2e-2, "bf16")


def test_mixer_impl_pallas_and_bad_chunk():
    x = ML.make_inputs(jax.random.PRNGKey(5), 1, 21)
    _close(ML.mlstm(**x, impl="pallas", chunk_size=16), ML.mlstm(**x, impl="sequential"), 2e-5, "mlstm impl=pallas")
    with pytest.raises(ValueError, match="power of two"):
        ML.mlstm(**x, impl="pallas", chunk_size=48)


@pytest.mark.parametrize("t,dk,dv,chunk", [(37, 7, 5, 16), (70, 20, 9, 32)])
def test_tpu_kernel_equals_reference(t, dk, dv, chunk):
    """The Mosaic TPU body (``backend="mosaic_tpu"``), interpreted, with h0, resets and large input gates."""
    x = _inputs(jax.random.PRNGKey(t + 7), t, dk, dv, i_scale=6.0)
    resets = jnp.zeros((1, t), bool).at[:, t // 2].set(True)
    ker = lambda **a: mlstm_chunk(**a, resets=resets, chunk_size=chunk, backend="mosaic_tpu")  # noqa: E731
    ref = lambda **a: ML.mlstm_recurrent(**a, resets=resets)  # noqa: E731
    # i up to ±18: exp(x) carries a relative rounding of |x|·eps, so the float32 floor is ~20x the default test's
    _close(ker(**x), ref(**x), 1e-4, "values and (C, n, m)")
    _close(_grads(ker, x, jax.random.PRNGKey(1)), _grads(ref, x, jax.random.PRNGKey(1)), 1e-4, "grads")
