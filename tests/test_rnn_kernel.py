"""The fused FlashRNN-style Pallas kernel (interpret mode) equals the lax.scan reference, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import rnn as R
from tests.test_rnn_cells import make, make_h0


@pytest.mark.parametrize("impl", ["pallas", "fused"])
@pytest.mark.parametrize("kind,t", [("lstm", 9), ("lstm", 1), ("gru", 9), ("slstm", 9), ("rnn_tanh", 5), ("leaky", 5)])
def test_kernel_matches_reference_fwd_bwd(kind, t, impl):
    """The Pallas kernel and the fused-backward scan (impl="fused") against the autodiff'd lax.scan."""
    key = jax.random.PRNGKey(t)
    p = make(kind, key, hidden=6, heads=2)  # head_dim 3: not a power of two
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, t, 3))
    h0 = make_h0(kind, jax.random.fold_in(key, 2), 2, 6)
    wy = jax.random.normal(jax.random.fold_in(key, 3), (2, t, 6))
    wh = jax.random.normal(jax.random.fold_in(key, 4), h0.shape)

    def loss(p, x, h0, impl):
        y, h = R.rnn(kind, p, x, h0=h0, impl=impl)
        return jnp.sum(y * wy) + jnp.sum(h * wh), (y, h)

    (_, (y, h)), g_ref = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(p, x, h0, "sequential")
    (_, (yk, hk)), g_ker = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(p, x, h0, impl)
    np.testing.assert_allclose(yk, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hk, h, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(g_ker) == jax.tree.structure(g_ref)
    for a, b in zip(jax.tree.leaves(g_ker), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_kernel_lstm_without_peepholes_and_split():
    """No per-neuron parameters (empty list of resident extras); state carried across a split."""
    key = jax.random.PRNGKey(0)
    p = R.init_params("lstm", key, 3, 8, heads=4)
    x = jax.random.normal(key, (2, 8, 3))
    y, h = R.rnn("lstm", p, x)
    ya, ha = R.rnn("lstm", p, x[:, :3], impl="pallas")
    yb, hb = R.rnn("lstm", p, x[:, 3:], h0=ha, impl="pallas")
    np.testing.assert_allclose(jnp.concatenate([ya, yb], 1), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hb, h, rtol=1e-5, atol=1e-6)


def test_kernel_rejects_shplrnn():
    p = R.init_params("shplrnn", jax.random.PRNGKey(0), 3, 4)
    with pytest.raises(ValueError, match="pointwise form"):
        R.rnn("shplrnn", p, jnp.ones((1, 3, 3)), impl="pallas")


@pytest.mark.parametrize("d, k, fits", [(64, 4, True), (65, 4, False), (128, 1, True), (256, 4, False)])
def test_gpu_head_size_limit_is_checked_before_tracing(d, k, fits):
    """H200 run: an LSTM head of 256 asked for 1 MiB of shared memory (227 KiB exist) and failed in XLA."""
    from pallas_kernels.rnn.flashrnn import check_fits

    check_fits(d, k, "cpu")  # interpret mode has no limit
    if fits:
        check_fits(d, k, "gpu")
    else:
        with pytest.raises(ValueError, match=rf"head size D={d} .* use more heads"):
            check_fits(d, k, "gpu")
