"""The CPU forms of the chunked mixers: the delta rule's chunk-major form with a blocked triangular inverse
(``seqjax.mixers.delta_chunked``), and ``impl="auto"`` evaluating by the scan while differentiating through
the chunked form (``seqjax.mixers._autodiff.primal_by``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import mixers
from seqjax.mixers import deltanet as D
from seqjax.mixers.delta_chunked import chunk_delta_rule_cpu, unit_lower_inverse
from seqjax.ops import delta as E


@pytest.mark.parametrize("c", [5, 16, 40])
def test_unit_lower_inverse_equals_numpy(c):
    a = np.tril(np.random.default_rng(c).normal(size=(3, c, c)) * 0.3, -1) + np.eye(c)
    np.testing.assert_allclose(unit_lower_inverse(jnp.asarray(a, jnp.float32)), np.linalg.inv(a), atol=2e-5, rtol=2e-5)


def _inputs(t=37):
    inp = D.deltanet_make_inputs(jax.random.PRNGKey(3), 2, t, heads=2, dk=6, dv=5, gated=True)
    resets = jnp.zeros((2, t), bool).at[0, 11].set(True).at[1, 30].set(True)
    h0 = jax.random.normal(jax.random.PRNGKey(4), (2, 2, 6, 5))
    return inp, resets, h0


def test_chunk_major_form_equals_engine_values_and_grads():
    inp, resets, h0 = _inputs()
    kw = dict(resets=resets, scale=0.7, chunk_size=16)
    o1, s1 = E.chunk_delta_rule(**inp, h0=h0, **kw)
    o2, s2 = chunk_delta_rule_cpu(**inp, h0=h0, **kw)
    np.testing.assert_allclose(o2, o1, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(s2, s1, atol=2e-5, rtol=1e-4)
    loss = lambda f: lambda d, h0: jnp.sum(f(**d, h0=h0, **kw)[0] ** 2) + jnp.sum(f(**d, h0=h0, **kw)[1])
    g1 = jax.grad(loss(E.chunk_delta_rule), (0, 1))(inp, h0)
    g2 = jax.grad(loss(chunk_delta_rule_cpu), (0, 1))(inp, h0)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_auto_evaluates_the_scan_and_differentiates_the_chunked_form():
    inp, resets, h0 = _inputs(t=20)
    f = lambda impl: lambda d: D.gated_deltanet(**d, h0=h0, resets=resets, impl=impl, chunk_size=8)
    o_auto, s_auto = jax.jit(f("auto"))(inp)
    o_seq, s_seq = jax.jit(f("sequential"))(inp)
    np.testing.assert_array_equal(o_auto, o_seq)  # the scan itself, not a form that agrees to rounding
    np.testing.assert_array_equal(s_auto, s_seq)
    grad = lambda impl: jax.grad(lambda d: jnp.sum(f(impl)(d)[0] ** 2))(inp)
    for a, b in zip(jax.tree.leaves(grad("auto")), jax.tree.leaves(grad("chunked"))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["gla", "retnet", "linear_attention", "mamba2"])
def test_gla_family_auto_evaluates_the_scan_and_differentiates_the_chunked_form(name):
    """Per-channel (GLA), per-head (RetNet, Mamba-2) and no decay (linear attention) alike."""
    spec = mixers.get(name)
    inp = {k: v for k, v in spec.make_inputs(jax.random.PRNGKey(5), 1, 20).items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    f = lambda impl: lambda d: spec.fn(**d, impl=impl, chunk_size=16, **spec.options)[0]
    np.testing.assert_array_equal(jax.jit(f("auto"))(inp), jax.jit(f("sequential"))(inp))
    grad = lambda impl: jax.grad(lambda d: jnp.sum(f(impl)(d) ** 2))(inp)
    for a, b in zip(jax.tree.leaves(grad("auto")), jax.tree.leaves(grad("chunked"))):
        np.testing.assert_array_equal(a, b)
