"""Delta-rule family beyond the shared contract: the WY/UT chunked engine against the reference over
chunk sizes x lengths x head dims (values, final states, every gradient; beta up to 2, resets, h0),
gate extremes, special cases (DeltaProduct n_h = 1 = DeltaNet, Gated DeltaNet alpha = 1 = DeltaNet),
negative eigenvalues (reflection, parity), DeltaProduct's operator, bf16, bad input, the layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax import mixers
from seqjax._linalg import solve_unit_lower
from seqjax.mixers import deltanet as D
from seqjax.nn import l2_normalize, rms_rel_err
from seqjax.ops import delta as E


def _inputs(key, b, t, h, dk, dv, *, beta_max=2.0, decay=(-8.0, 1.0), reset_p=0.0):
    ks = jax.random.split(key, 7)
    return dict(
        q=jax.random.normal(ks[0], (b, t, h, dk)),
        k=l2_normalize(jax.random.normal(ks[1], (b, t, h, dk))),
        v=jax.random.normal(ks[2], (b, t, h, dv)),
        beta=beta_max * jax.random.uniform(ks[3], (b, t, h)),
        log_alpha=-jnp.exp(jax.random.uniform(ks[4], (b, t, h), minval=decay[0], maxval=decay[1])),
        resets=jax.random.bernoulli(ks[5], reset_p, (b, t)),
        h0=jax.random.normal(ks[6], (b, h, dk, dv)),
    )


def _grads(f, x, key):
    """Gradients of a random linear functional of (o, h_last) w.r.t. q, k, v, beta, log_alpha, h0."""
    resets = x["resets"]
    args = {n: x[n] for n in ("q", "k", "v", "beta", "log_alpha", "h0")}
    o, hl = f(**args, resets=resets)
    wo, wh = jax.random.normal(key, o.shape), jax.random.normal(jax.random.fold_in(key, 1), hl.shape)

    def loss(args):
        o, hl = f(**args, resets=resets)
        return jnp.sum(o * wo) + jnp.sum(hl * wh)

    return (o, hl), jax.grad(loss)(args)


def _close(a, b, tol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), what
        err = rms_rel_err(x, y)
        assert err <= tol, f"{what}: rms-rel err {err:.2e} > {tol:.0e}"


def _ref(q, k, v, beta, log_alpha, h0, resets):
    return E.recurrent_delta_rule(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=0.5)


@pytest.mark.parametrize("d", [7, 16, 64])
@pytest.mark.parametrize("t", [1, 63, 257])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_equals_reference(chunk, t, d):
    x = _inputs(jax.random.PRNGKey(t * d + chunk), 1, t, 2, d, d, reset_p=0.03)

    def chunked(q, k, v, beta, log_alpha, h0, resets):
        return E.chunk_delta_rule(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=0.5, chunk_size=chunk)

    key = jax.random.PRNGKey(1)
    out_ref, g_ref = _grads(_ref, x, key)
    out, g = _grads(chunked, x, key)
    _close(out, out_ref, 1e-4, f"chunk={chunk} t={t} d={d} values")
    _close(g, g_ref, 1e-3, f"chunk={chunk} t={t} d={d} grads")


@pytest.mark.parametrize("log_decay", [-1e-4, -1.0, -20.0, "mixed"])
def test_gate_extremes(log_decay):
    t = 70
    x = _inputs(jax.random.PRNGKey(3), 2, t, 2, 6, 5, decay=(np.log(1e-4), np.log(20.0)))
    if log_decay != "mixed":
        x["log_alpha"] = jnp.full_like(x["log_alpha"], log_decay)
    chunked = lambda **a: E.chunk_delta_rule(**a, scale=0.5, chunk_size=32)
    out_ref, g_ref = _grads(lambda **a: _ref(**a), x, jax.random.PRNGKey(4))
    out, g = _grads(chunked, x, jax.random.PRNGKey(4))
    _close(out, out_ref, 1e-4, f"log_decay={log_decay} values")
    _close(g, g_ref, 1e-3, f"log_decay={log_decay} grads")
    if log_decay == -20.0:  # the state forgets everything each step: o_t = scale beta_t (q_t.k_t) v_t
        q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
        want = 0.5 * (beta * jnp.sum(q * k, -1))[..., None] * v
        np.testing.assert_allclose(out[0][:, 1:], want[:, 1:], atol=1e-5)


def test_deltaproduct_one_householder_equals_deltanet():
    x = D.deltanet_make_inputs(jax.random.PRNGKey(5), 2, 45)
    h0 = jax.random.normal(jax.random.PRNGKey(6), (2, 2, 7, 5))
    one = lambda a: a[:, :, :, None]
    for impl in ("sequential", "chunked"):
        y, h = D.deltanet(**x, h0=h0, impl=impl, chunk_size=16)
        yp, hp = D.deltaproduct(x["q"], one(x["k"]), one(x["v"]), one(x["beta"]), h0=h0, impl=impl, chunk_size=16)
        _close((yp, hp), (y, h), 1e-5, f"deltaproduct n_h=1 {impl}")
    yr, hr = D.deltaproduct_recurrent(x["q"], one(x["k"]), one(x["v"]), one(x["beta"]), h0=h0)
    _close((yr, hr), (y, h), 1e-5, "deltaproduct_recurrent n_h=1")


def test_gated_deltanet_with_unit_gate_equals_deltanet():
    x = D.deltanet_make_inputs(jax.random.PRNGKey(7), 2, 40)
    zero = jnp.zeros(x["beta"].shape)
    for impl in ("sequential", "chunked"):
        want = D.deltanet(**x, impl=impl, negative_eigen=True)
        got = D.gated_deltanet(**x, log_alpha=zero, impl=impl, negative_eigen=True)
        _close(got, want, 1e-6, f"gated alpha=1 {impl}")


def test_deltaproduct_operator_equals_forward():
    x = D.deltanet_make_inputs(jax.random.PRNGKey(8), 2, 19, gated=True, householder=3)
    resets = jnp.zeros((2, 19), bool).at[:, 7].set(True)
    y, _ = D.deltaproduct(**x, resets=resets, negative_eigen=True)
    m = D.deltaproduct_materialize(**x, resets=resets, negative_eigen=True)
    assert m.shape == (2, 2, 19, 19, 3)
    _close(jnp.einsum("bhtsj,bshjv->bthv", m, x["v"]), y, 1e-5, "deltaproduct operator")
    assert float(jnp.max(jnp.abs(jnp.triu(jnp.moveaxis(m, -1, 2), k=1)))) == 0.0  # causal
    assert float(jnp.max(jnp.abs(m[:, :, 7:, :7]))) == 0.0  # the reset cuts the operator


@pytest.mark.parametrize("negative_eigen", [False, True])
def test_beta_two_is_a_reflection(negative_eigen):
    """beta = 2 (or sigma = 1 with the flag) and ||k|| = 1: the transition is I - 2kkᵀ, eigenvalue -1 on k."""
    dk = 5
    k = l2_normalize(jax.random.normal(jax.random.PRNGKey(9), (1, 1, dk)))
    beta = jnp.full((1, 1), 1.0 if negative_eigen else 2.0)
    zero_v, q = jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, dk))

    def transition(S):  # [dk] -> [dk] (dv = 1), the linear part of one step
        return D.deltanet_step(S.reshape(1, 1, dk, 1), q, k, zero_v, beta, negative_eigen=negative_eigen)[1].reshape(dk)

    A = jax.jacobian(transition)(jnp.zeros(dk))
    np.testing.assert_allclose(A, jnp.eye(dk) - 2 * jnp.outer(k[0, 0], k[0, 0]), atol=1e-6)
    np.testing.assert_allclose(A @ A, jnp.eye(dk), atol=1e-6)
    np.testing.assert_allclose(A @ k[0, 0], -k[0, 0], atol=1e-6)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(np.asarray(A))), [-1.0] + [1.0] * (dk - 1), atol=1e-6)


@pytest.mark.parametrize("impl", ["sequential", "chunked"])
def test_hand_built_deltanet_solves_parity(impl):
    """dk = dv = 1, k = q = 1. A start token writes S = 1 (beta = 1, v = 1); each bit b writes beta = 2b,
    v = 0, so S_t = (-1)^(b_1 + ... + b_t): the sign of o_t is the running parity, exactly."""
    t = 300
    bits = jax.random.bernoulli(jax.random.PRNGKey(10), 0.5, (2, t)).astype(jnp.float32)
    ones = jnp.ones((2, t + 1, 1, 1))
    beta = jnp.concatenate([jnp.ones((2, 1)), 2 * bits], axis=1)[..., None]
    v = jnp.zeros((2, t + 1, 1, 1)).at[:, 0].set(1.0)
    o, _ = D.deltanet(ones, ones, v, beta, impl=impl, chunk_size=64)
    parity = jnp.cumsum(bits, axis=1) % 2
    np.testing.assert_array_equal(np.asarray(o[:, 1:, 0, 0]), np.asarray(1.0 - 2.0 * parity))
    # with beta restricted to [0, 1] the eigenvalue 1 - beta >= 0 never flips the sign
    o_pos, _ = D.deltanet(ones, ones, v, jnp.minimum(beta, 1.0), impl=impl)
    assert bool(jnp.all(o_pos >= 0))


def test_bf16_inputs_accumulate_in_float32():
    x = _inputs(jax.random.PRNGKey(11), 2, 100, 2, 16, 16, beta_max=2.0)
    low = {n: x[n].astype(jnp.bfloat16) for n in ("q", "k", "v", "beta", "log_alpha")}
    o16, h16 = E.chunk_delta_rule(**low, h0=x["h0"], chunk_size=32)
    assert o16.dtype == jnp.bfloat16 and h16.dtype == jnp.float32
    o32, h32 = E.recurrent_delta_rule(**{n: a.astype(jnp.float32) for n, a in low.items()}, h0=x["h0"])
    _close((o16, h16), (o32, h32), 1e-2, "bf16 inputs")


def test_bad_input_raises():
    x = D.deltanet_make_inputs(jax.random.PRNGKey(12), 2, 8)
    with pytest.raises(ValueError, match="k must have shape"):
        D.deltanet(x["q"], x["k"][..., :5], x["v"], x["beta"])
    with pytest.raises(ValueError, match="v must have shape"):
        D.deltanet(x["q"], x["k"], x["v"][:, :7], x["beta"])
    with pytest.raises(ValueError, match="beta must have shape"):
        D.deltanet(x["q"], x["k"], x["v"], x["beta"][..., None])
    with pytest.raises(ValueError, match="log_alpha must have shape"):
        D.gated_deltanet(**x, log_alpha=x["beta"][:, :, :1])
    with pytest.raises(ValueError, match="h0 must have shape"):
        D.deltanet(**x, h0=jnp.zeros((2, 2, 5, 7)))
    with pytest.raises(ValueError, match="resets must have shape"):
        D.deltanet(**x, resets=jnp.zeros((2, 9), bool))
    with pytest.raises(ValueError, match="impl"):
        D.deltanet(**x, impl="fast")
    with pytest.raises(ValueError, match="negative_eigen must be a bool"):
        D.deltanet(**x, negative_eigen="yes")
    p = D.deltanet_make_inputs(jax.random.PRNGKey(12), 2, 8, householder=2)
    with pytest.raises(ValueError, match="beta must have shape"):
        D.deltaproduct(p["q"], p["k"], p["v"], x["beta"])
    with pytest.raises(ValueError, match="v must have shape"):
        D.deltaproduct(p["q"], p["k"], p["v"][:, :, :, :1], p["beta"])


@pytest.mark.parametrize("name", [n for n in mixers.names() if mixers.get(n).functional and not mixers.get(n).negative_eigen])
def test_negative_eigen_flag_on_mixer_without_it_raises(name):
    spec = mixers.get(name)
    inputs = spec.make_inputs(jax.random.PRNGKey(13), 1, 4)
    with pytest.raises((ValueError, TypeError), match="negative_eigen"):
        spec.fn(**inputs, negative_eigen=True)


@pytest.mark.parametrize("name", ["deltanet_negeig", "gated_deltanet", "deltaproduct_negeig"])
def test_layer_packed_documents_equal_separate_runs(name):
    """segment ids reset the state and mask the short convs: [docA | docB] equals two runs."""
    layer = mixers.get(name).layer(16, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(14), (2, 11, 16))
    seg = jnp.concatenate([jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 7), jnp.int32)], axis=1)
    y, _ = layer(x, segment_ids=seg)
    ya, _ = layer(x[:, :4])
    yb, _ = layer(x[:, 4:])
    _close(y, jnp.concatenate([ya, yb], axis=1), 1e-5, f"{name} packed layer")


def test_layer_negative_eigen_doubles_beta():
    """Same parameters, flag on: the layer's recurrence sees beta = 2 sigmoid(.) (here: all outputs change
    but equal a DeltaNet run with the doubled beta)."""
    pos = D.DeltaNet(12, rngs=nnx.Rngs(2))
    neg = D.DeltaNetNegEig(12, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.PRNGKey(15), (1, 6, 12))
    assert float(jnp.max(jnp.abs(pos(x)[0] - neg(x)[0]))) > 1e-3
    pos.negative_eigen = True
    _close(pos(x)[0], neg(x)[0], 1e-6, "negeig layer")


@pytest.mark.parametrize("c", [1, 13, 64])
def test_solve_unit_lower_equals_triangular_solve(c):
    """The CPU forward substitution (and its custom VJP) against LAPACK's trsm, on values and gradients."""
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)[None, None]
    # beta K K^T-like entries, up to |2| (beta up to 2 with unit keys)
    a = jnp.where(strict, jnp.clip(0.7 * jax.random.normal(ks[0], (2, 3, c, c)), -2, 2) / np.sqrt(c), 0.0) + jnp.eye(c)[None, None]
    rhs = jax.random.normal(ks[1], (2, 3, c, 5))
    w = jax.random.normal(ks[2], (2, 3, c, 5))
    lapack = lambda a, r: jax.lax.linalg.triangular_solve(a, r, left_side=True, lower=True, unit_diagonal=True)
    np.testing.assert_array_less(rms_rel_err(solve_unit_lower(a, rhs), lapack(a, rhs)), 1e-5)
    g = jax.grad(lambda a, r: jnp.sum(w * solve_unit_lower(a, r)), (0, 1))(a, rhs)
    g_ref = jax.grad(lambda a, r: jnp.sum(w * lapack(a, r)), (0, 1))(a, rhs)
    np.testing.assert_array_less(rms_rel_err(g[0], jnp.where(strict, g_ref[0], 0.0)), 1e-5)
    np.testing.assert_array_less(rms_rel_err(g[1], g_ref[1]), 1e-5)


def test_chunked_form_avoids_lapack_trsm_on_cpu():
    """jaxlib's CPU trsm can deadlock XLA's thread pool when two batched solves run at once (it hung a
    DeltaNet training step at batch 64 on 2 cores), so the CPU lowering of the chunked form must not call it."""
    q, k, v = (jax.random.normal(key, (2, 40, 2, 8)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    beta = jnp.full((2, 40, 2), 0.5)
    f = lambda q, k, v, beta: jnp.sum(E.chunk_delta_rule(q, l2_normalize(k), v, beta, chunk_size=16)[0])
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).lower(q, k, v, beta).as_text()
    assert "trsm" not in text and "lapack" not in text
    lapack = jax.jit(lambda a, r: jax.lax.linalg.triangular_solve(a, r, left_side=True, lower=True, unit_diagonal=True))
    assert "trsm" in lapack.lower(jnp.eye(4)[None], jnp.ones((1, 4, 2))).as_text()  # the check can see it
