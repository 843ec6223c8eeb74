"""State-space mixers beyond the shared contract: the two modes of LTI SSMs agree (annotated-s4's
``test_cnn_is_rnn``), HiPPO against its closed form, complex paths, negative eigenvalues (range and an
exact parity construction), extreme decays, RG-LRU's bounded gradient, packed documents in the layers,
and clear errors on bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.mixers import _ssm
from seqjax.mixers import lru as lru_mod
from seqjax.mixers import lssl as lssl_mod
from seqjax.mixers import mamba as mamba_mod
from seqjax.mixers import s4d as s4d_mod
from seqjax.mixers import s5 as s5_mod
from seqjax.nn import rms_rel_err
from seqjax.scan import linear_scan

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- HiPPO


def test_hippo_legs_closed_form():
    n = 7
    a, b = _ssm.hippo_legs(n)
    want = np.zeros((n, n))
    for i in range(n):
        for k in range(n):
            if i > k:
                want[i, k] = -np.sqrt(2 * i + 1) * np.sqrt(2 * k + 1)
            elif i == k:
                want[i, k] = -(i + 1)
    np.testing.assert_allclose(a, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b, np.sqrt(2 * np.arange(n) + 1), rtol=0, atol=1e-12)
    # LegS memorises a constant input as the first Legendre coefficient: the fixed point -A^{-1}B = e0.
    np.testing.assert_allclose(-np.linalg.solve(a, b), np.eye(n)[0], atol=1e-10)
    # Lower triangular: eigenvalues -(n+1).
    np.testing.assert_allclose(np.sort(np.linalg.eigvals(a).real), -np.arange(n, 0, -1.0), atol=1e-8)


def test_hippo_normal_part_and_eigendecomposition():
    n = 8
    a, _ = _ssm.hippo_legs(n)
    p = np.sqrt(np.arange(n) + 0.5)
    s = a + np.outer(p, p)
    np.testing.assert_allclose(s + s.T, -np.eye(n), atol=1e-10)  # -I/2 plus skew-symmetric
    lam, v, _ = _ssm.hippo_legs_normal(n)
    np.testing.assert_allclose(v.conj().T @ v, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.conj().T, s, atol=1e-9)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
    # conjugate pairs: the spectrum is closed under conjugation, so S5 keeps half of it
    np.testing.assert_allclose(np.sort(lam.imag), np.sort(-lam.imag), atol=1e-9)


# ----------------------------------------------------------------------------- conv mode == recurrent mode


def test_lssl_cnn_is_rnn():
    inp = lssl_mod.lssl_make_inputs(KEY, 2, 100, channels=3, state=12)
    h0 = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 12))
    y_rnn, h_rnn = lssl_mod.lssl(**inp, h0=h0, impl="sequential")
    y_cnn, h_cnn = lssl_mod.lssl(**inp, h0=h0, impl="conv")
    assert rms_rel_err(y_cnn, y_rnn) < 1e-5
    assert rms_rel_err(h_cnn, h_rnn) < 1e-5
    # the Krylov kernel equals C Ā^l B̄ by explicit matrix powers
    a_bar, b_bar = lssl_mod.discretize_bilinear(inp["log_dt"], inp["A"], inp["B"])
    k = lssl_mod.lssl_kernel(inp["log_dt"], inp["A"], inp["B"], inp["C"], 9)
    for c in range(3):
        for l in (0, 1, 5, 8):
            want = inp["C"][c] @ np.linalg.matrix_power(np.asarray(a_bar[c], np.float64), l) @ b_bar[c]
            np.testing.assert_allclose(k[c, l], want, rtol=1e-4, atol=1e-6)
    # bilinear discretisation of a stable A is stable: spectral radius < 1
    assert float(jnp.max(jnp.abs(jnp.linalg.eigvals(a_bar)))) < 1.0


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_cnn_is_rnn(init):
    inp = s4d_mod.s4d_make_inputs(KEY, 2, 90, channels=3, modes=6)
    inp["A"] = s4d_mod.s4d_init(3, 6, init)
    h0 = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 6)) + 1j * jax.random.normal(KEY, (2, 3, 6))
    y_rnn, h_rnn = s4d_mod.s4d_recurrent(**inp, h0=h0)
    for impl in ("conv", "associative"):
        y, h = s4d_mod.s4d(**inp, h0=h0, impl=impl)
        assert rms_rel_err(y, y_rnn) < 1e-5, impl
        assert rms_rel_err(h, h_rnn) < 1e-5, impl
    assert h_rnn.dtype == jnp.complex64
    # Vandermonde kernel vs the closed form 2 Re Σ C B̄ Ā^l
    k = s4d_mod.s4d_kernel(inp["log_dt"], inp["A"], inp["B"], inp["C"], 5)
    dt = np.exp(np.asarray(inp["log_dt"], np.float64))[:, None]
    a = np.asarray(inp["A"], np.complex128)
    b_bar = (np.exp(dt * a) - 1) / a * np.asarray(inp["B"])
    want = np.stack([2 * np.real(np.sum(np.asarray(inp["C"]) * b_bar * np.exp(dt * a * l), -1)) for l in range(5)], 1)
    np.testing.assert_allclose(k, want, rtol=1e-4, atol=1e-5)


def test_s4d_init_values():
    lin = np.asarray(s4d_mod.s4d_init(1, 4, "lin"))[0]
    inv = np.asarray(s4d_mod.s4d_init(1, 4, "inv"))[0]
    np.testing.assert_allclose(lin, -0.5 + 1j * np.pi * np.arange(4), rtol=1e-6)
    np.testing.assert_allclose(inv, -0.5 + 1j * 4 / np.pi * (4 / (2 * np.arange(4) + 1) - 1), rtol=1e-6)


# ----------------------------------------------------------------------------- complex paths


def test_s5_conjugate_symmetry_gives_real_full_system():
    """Keeping one mode per conjugate pair with 2 Re(·) equals the full system, whose output is real."""
    inp = s4d_mod.s5_make_inputs(KEY, 2, 30, channels=3, modes=4)
    y, _ = s4d_mod.s5_recurrent(**inp)
    full = dict(
        x=inp["x"],
        Lambda=jnp.concatenate([inp["Lambda"], jnp.conj(inp["Lambda"])]),
        log_dt=jnp.concatenate([inp["log_dt"], inp["log_dt"]]),
        B=jnp.concatenate([inp["B"], jnp.conj(inp["B"])]),
        C=jnp.concatenate([inp["C"], jnp.conj(inp["C"])], axis=1),
        D=inp["D"],
    )
    # s5 returns 2 Re(C h) + D x; with C/2 the full system gives Re(C_full h_full) + D x
    y_full, h_full = s4d_mod.s5(**{**full, "C": full["C"] / 2}, impl="associative")
    assert rms_rel_err(y_full, y) < 1e-5
    out = jnp.einsum("hp,btp->bth", full["C"], linear_scan(*_s5_ab(full), impl="sequential")[0])
    assert float(jnp.max(jnp.abs(jnp.imag(out)))) < 1e-4 * float(jnp.max(jnp.abs(out)))


def _s5_ab(p):
    dt_l, b_bar = s5_mod._s5_zoh(p["Lambda"], p["log_dt"], p["B"])
    bu = jnp.einsum("ph,bth->btp", b_bar, p["x"].astype(jnp.complex64))
    return jnp.broadcast_to(jnp.exp(dt_l)[None, None], bu.shape), bu


def test_lru_ring_init_and_closed_form():
    nu_log, theta_log = lru_mod.lru_ring_init(KEY, 512, r_min=0.4, r_max=0.9, max_phase=np.pi / 4)
    lam = np.exp(-np.exp(np.asarray(nu_log)) + 1j * np.exp(np.asarray(theta_log)))
    assert 0.4 - 1e-5 <= np.abs(lam).min() and np.abs(lam).max() <= 0.9 + 1e-5
    assert 0 <= np.angle(lam).min() and np.angle(lam).max() <= np.pi / 4 + 1e-5
    # one mode, one channel: y_t = Re(C Σ_s λ^{t-s} γ B x_s) + D x_t
    inp = lru_mod.lru_make_inputs(KEY, 1, 12, channels=1, state=1)
    y, h = lru_mod.lru(**inp, impl="chunked")
    lam0 = complex(np.exp(-np.exp(float(inp["nu_log"][0])) + 1j * np.exp(float(inp["theta_log"][0]))))
    gamma = np.sqrt(1 - abs(lam0) ** 2)
    x = np.asarray(inp["x"][0, :, 0], np.float64)
    b, c = complex(inp["B"][0, 0]), complex(inp["C"][0, 0])
    hs = [sum(lam0 ** (t - s) * gamma * b * x[s] for s in range(t + 1)) for t in range(12)]
    want = np.real(c * np.asarray(hs)) + float(inp["D"][0]) * x
    np.testing.assert_allclose(np.asarray(y[0, :, 0]), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(complex(h[0, 0]), hs[-1], rtol=1e-4)


# ----------------------------------------------------------------------------- negative eigenvalues


def test_negative_eigen_transition_range():
    dt = jnp.exp(jnp.linspace(-8.0, 0.5, 200))[None, :, None]  # Δ A in [-12, -5e-5]  # [1, 200, 1]
    a_mat = -jnp.exp(jnp.linspace(-2.0, 2.0, 5))[None]  # [1, 5]
    pos, log_decay = mamba_mod._transition(dt, a_mat, False)
    neg, log_decay2 = mamba_mod._transition(dt, a_mat, True)
    assert log_decay and not log_decay2
    assert float(jnp.min(jnp.exp(pos))) > 0 and float(jnp.max(jnp.exp(pos))) < 1
    assert float(jnp.min(neg)) > -1 and float(jnp.max(neg)) < 1
    assert float(jnp.min(neg)) < -0.99 and float(jnp.max(neg)) > 0.99  # the whole range is reached
    np.testing.assert_allclose(neg, 2 * jnp.exp(pos) - 1, atol=1e-6)
    # the flag changes the transition only: one step from h0 with zero input
    inp = mamba_mod.mamba_make_inputs(KEY, 2, 1)
    h0 = jax.random.normal(KEY, (2, 3, 4))
    _, h = mamba_mod.mamba(**{**inp, "x": jnp.zeros_like(inp["x"])}, h0=h0, negative_eigen=True)
    a_bar = jnp.exp(inp["dt"][:, 0, :, None] * inp["A"][None])
    np.testing.assert_allclose(h, (2 * a_bar - 1) * h0, rtol=1e-5, atol=1e-6)
    _, h1 = mamba_mod.mamba(**{**inp, "x": jnp.ones_like(inp["x"])}, negative_eigen=True)
    _, h2 = mamba_mod.mamba(**{**inp, "x": jnp.ones_like(inp["x"])})
    np.testing.assert_allclose(h1, h2, rtol=0, atol=0)  # the input term Δ B x is unchanged


def _parity_weights(bits):
    """One channel, one state: a start token writes h = 1; then a bit 1 flips the sign (Δ A → -∞,
    2 e^{ΔA} - 1 = -1) and a bit 0 keeps it (Δ = 0); B = 0 after the start, C = 1, D = 0."""
    b, t = bits.shape
    start = jnp.zeros((b, t + 1), jnp.float32).at[:, 0].set(1.0)
    dt = jnp.concatenate([jnp.ones((b, 1)), 200.0 * bits.astype(jnp.float32)], axis=1)
    return dict(x=jnp.ones((b, t + 1, 1)), dt=dt[..., None], A=-jnp.ones((1, 1)), B=start[..., None],
                C=jnp.ones((b, t + 1, 1)), D=jnp.zeros((1,)))


def test_negative_eigen_represents_parity_exactly():
    bits = jax.random.bernoulli(KEY, 0.5, (3, 200))
    inputs = _parity_weights(bits)
    parity = jnp.cumsum(bits.astype(jnp.int32), axis=1) % 2
    want = (1 - 2 * parity).astype(jnp.float32)  # +1 even, -1 odd
    for impl in ("sequential", "associative", "chunked", "fused"):
        y, _ = mamba_mod.mamba(**inputs, impl=impl, negative_eigen=True)
        np.testing.assert_array_equal(np.asarray(y[:, 1:, 0]), np.asarray(want), err_msg=impl)
    # with transitions in (0, 1] and no input after the start, h only decays: it never changes sign
    y, _ = mamba_mod.mamba(**inputs)
    assert float(jnp.min(y)) >= 0.0 and bool(jnp.any(want < 0))


# ----------------------------------------------------------------------------- extreme decays


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(jnp.abs(x)))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("negative_eigen", [False, True])
def test_mamba_log_decay_minus_20_finite(negative_eigen):
    inp = mamba_mod.mamba_make_inputs(KEY, 2, 65)
    inp["A"] = jnp.full_like(inp["A"], -20.0)
    inp["dt"] = jnp.ones_like(inp["dt"])  # Δ A = -20 per step
    ref = mamba_mod.mamba_recurrent(**inp, negative_eigen=negative_eigen)
    for impl in ("chunked",):
        out = mamba_mod.mamba(**inp, impl=impl, negative_eigen=negative_eigen)
        assert _finite(out) and rms_rel_err(out[0], ref[0]) < 1e-4
        g = jax.grad(lambda a: jnp.sum(mamba_mod.mamba(**{**inp, "A": a}, impl=impl,
                                                      negative_eigen=negative_eigen)[0]))(inp["A"])
        assert _finite(g)
    assert _finite(mamba_mod.mamba_materialize(**inp, negative_eigen=negative_eigen))


@pytest.mark.parametrize("negative_eigen", [False, True])
@pytest.mark.parametrize("delta_a", [-20.0, -1e-4])
def test_mamba_fused_gradients_at_strong_and_weak_decay(delta_a, negative_eigen):
    """The fused form's hand-written backward against autodiff of the reference at Δ A = -20 (the state
    forgets in one step; with negative eigenvalues the transition is -1) and Δ A = -1e-4 (it keeps nearly
    everything), across two saved blocks and a reset."""
    t = 2 * mamba_mod.FUSED_BLOCK + 5
    inp = mamba_mod.mamba_make_inputs(KEY, 2, t, channels=3, state=5)
    inp["dt"] = jnp.full_like(inp["dt"], 0.5)
    inp["A"] = jnp.full_like(inp["A"], 2 * delta_a)
    h0 = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 5))
    resets = jnp.zeros((2, t), bool).at[1, 20].set(True)
    w = jax.random.normal(jax.random.PRNGKey(5), (2, t, 3))

    def loss(f, args):
        y, h = f(**args, resets=resets, negative_eigen=negative_eigen)
        return jnp.sum(y * w) + jnp.sum(jnp.sin(h))

    args = {**inp, "h0": h0}
    fused = jax.grad(functools.partial(loss, functools.partial(mamba_mod.mamba, impl="fused")))(args)
    ref = jax.grad(functools.partial(loss, mamba_mod.mamba_recurrent))(args)
    for k in args:
        assert _finite(fused[k])
        assert rms_rel_err(fused[k], ref[k]) < 1e-5, k


def test_diagonal_ssms_log_decay_minus_20_finite():
    s4 = s4d_mod.s4d_make_inputs(KEY, 1, 70)
    s4["log_dt"] = jnp.full_like(s4["log_dt"], np.log(40.0))  # Δ Re(A) = -20
    rg = lru_mod.rglru_make_inputs(KEY, 1, 70)
    rg["a_param"] = jnp.full_like(rg["a_param"], 2.5)  # c softplus(Λ) ≈ 20.6
    rg["gate_a"] = jnp.full_like(rg["gate_a"], 30.0)
    lr = lru_mod.lru_make_inputs(KEY, 1, 70)
    lr["nu_log"] = jnp.full_like(lr["nu_log"], np.log(20.0))
    for fn, inp, impls in ((s4d_mod.s4d, s4, ("chunked", "conv")),
                           (lru_mod.rglru, rg, ("associative",)),
                           (lru_mod.lru, lr, ("chunked",))):
        for impl in impls:
            out = fn(**inp, impl=impl)
            g = jax.grad(lambda x: jnp.sum(fn(**{**inp, "x": x}, impl=impl)[0]))(inp["x"])
            assert _finite(out) and _finite(g), (fn.__name__, impl)
    assert _finite(lru_mod.rglru_materialize(**rg))


# ----------------------------------------------------------------------------- RG-LRU


def test_sqrt_bounded_derivative():
    g = jax.vmap(jax.grad(lru_mod.sqrt_bounded))(jnp.array([0.0, 1e-12, 1e-6, 0.25, 1.0]))
    np.testing.assert_allclose(g, [1000.0, 1000.0, 500.0, 1.0, 0.5], rtol=1e-5)


def test_rglru_gradient_bounded_near_a_equals_one():
    inp = lru_mod.rglru_make_inputs(KEY, 2, 20)
    inp["a_param"] = jnp.full_like(inp["a_param"], -200.0)  # softplus underflows: a = 1 exactly

    def loss(gate_a, a_param):
        return jnp.sum(lru_mod.rglru(**{**inp, "gate_a": gate_a, "a_param": a_param}, impl="sequential")[0])

    assert _finite(jax.grad(loss, argnums=(0, 1))(inp["gate_a"], inp["a_param"]))

    # the multiplier alone: bounded vs plain sqrt at 1 - a² = 0
    def mult(a_param, sqrt):
        log_a = -8.0 * jax.nn.sigmoid(inp["gate_a"]) * jax.nn.softplus(a_param)[None, None]
        return jnp.sum(sqrt(-jnp.expm1(2.0 * log_a)))

    assert _finite(jax.grad(mult)(inp["a_param"], lru_mod.sqrt_bounded))
    assert not _finite(jax.grad(mult)(inp["a_param"], jnp.sqrt))
    # near a = 1 (not at it) the bounded derivative is capped at 1000 where sqrt's is larger
    x = jnp.array([1e-9, 1e-8])
    np.testing.assert_allclose(jax.vmap(jax.grad(lru_mod.sqrt_bounded))(x), [1000.0, 1000.0], rtol=1e-6)
    assert float(jnp.min(jax.vmap(jax.grad(jnp.sqrt))(x))) > 1000.0


def test_rglru_reset_skips_multiplier():
    inp = lru_mod.rglru_make_inputs(KEY, 2, 10)
    resets = jnp.zeros((2, 10), bool).at[:, 4].set(True)
    h0 = jax.random.normal(KEY, (2, 5))
    y, _ = lru_mod.rglru(**inp, h0=h0, resets=resets)
    gated = jax.nn.sigmoid(inp["gate_x"]) * inp["x"]
    np.testing.assert_allclose(y[:, 4], gated[:, 4], rtol=1e-6)  # a zeroed, no sqrt(1 - a²)
    y0, _ = lru_mod.rglru(**inp)  # h0=None: t = 0 starts a document
    np.testing.assert_allclose(y0[:, 0], gated[:, 0], rtol=1e-6)
    log_a = -8.0 * jax.nn.sigmoid(inp["gate_a"][:, 1]) * jax.nn.softplus(inp["a_param"])[None]
    a = jnp.exp(log_a)
    np.testing.assert_allclose(y0[:, 1], a * y0[:, 0] + jnp.sqrt(1 - a**2) * gated[:, 1], rtol=1e-5)


# ----------------------------------------------------------------------------- layers: packed documents


@pytest.mark.parametrize("layer_cls", [mamba_mod.Mamba, lru_mod.RGLRU, s4d_mod.S4D])
def test_layer_packed_documents_equal_separate_runs(layer_cls):
    layer = layer_cls(8, rngs=nnx.Rngs(0))
    xa = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 8))
    xb = jax.random.normal(jax.random.PRNGKey(4), (1, 7, 8))
    seg = jnp.array([[0] * 5 + [1] * 7])
    y, _ = layer(jnp.concatenate([xa, xb], axis=1), segment_ids=seg)
    ya, _ = layer(xa)
    yb, _ = layer(xb)
    assert rms_rel_err(y, jnp.concatenate([ya, yb], axis=1)) < 1e-5


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    m = mamba_mod.mamba_make_inputs(KEY, 2, 6)
    with pytest.raises(ValueError, match="B must have shape"):
        mamba_mod.mamba(**{**m, "B": m["B"][..., :3]})
    with pytest.raises(ValueError, match="A must have shape"):
        mamba_mod.mamba(**{**m, "A": m["A"][:2]})
    with pytest.raises(ValueError, match="h0 must have shape"):
        mamba_mod.mamba(**m, h0=jnp.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="impl"):
        mamba_mod.mamba(**m, impl="fft")
    with pytest.raises(ValueError, match="conv"):
        mamba_mod.mamba(**m, impl="conv")
    s = s4d_mod.s4d_make_inputs(KEY, 2, 6)
    with pytest.raises(TypeError, match="A must have a complex dtype"):
        s4d_mod.s4d(**{**s, "A": jnp.real(s["A"])})
    with pytest.raises(ValueError, match="C must have shape"):
        s4d_mod.s4d(**{**s, "C": s["C"][:, :2]})
    with pytest.raises(ValueError, match="x must have 3 dims"):
        lru_mod.rglru(**{**lru_mod.rglru_make_inputs(KEY, 2, 6), "x": jnp.zeros((2, 6))})
    with pytest.raises(ValueError, match="gate_a must have the same shape"):
        r = lru_mod.rglru_make_inputs(KEY, 2, 6)
        lru_mod.rglru(**{**r, "gate_a": r["gate_a"][:, :5]})
    # the negative-eigenvalue flag on mixers without it
    cases = [
        (lssl_mod.lssl, lssl_mod.lssl_make_inputs(KEY, 1, 4)),
        (s4d_mod.s4d, s),
        (s4d_mod.s5, s4d_mod.s5_make_inputs(KEY, 1, 4)),
        (lru_mod.lru, lru_mod.lru_make_inputs(KEY, 1, 4)),
        (lru_mod.rglru, lru_mod.rglru_make_inputs(KEY, 1, 4)),
    ]
    for fn, inp in cases:
        with pytest.raises(ValueError, match="negative_eigen"):
            fn(**inp, negative_eigen=True)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_cpu_safe_solve_equals_linalg_solve(n):
    """seqjax._linalg.solve (Gauss-Jordan in XLA on CPU, used by LSSL's bilinear discretisation instead of
    LAPACK getrf, which can deadlock XLA's thread pool) equals jnp.linalg.solve on values and gradients."""
    from seqjax import _linalg

    ks = jax.random.split(jax.random.PRNGKey(n), 3)
    # well-conditioned, not diagonally dominant enough to skip pivoting (|a_ij| ~ 1 against a diagonal of 2),
    # plus the case it serves: LSSL's I - dt/2 A with HiPPO-LegS A
    a = 2.0 * jnp.eye(n)[None] + jax.random.normal(ks[0], (3, n, n)) / np.sqrt(n) * np.sqrt(3.0)
    a = a.at[0].set(jnp.eye(n) - 0.25 * jnp.asarray(_ssm.hippo_legs(n)[0], jnp.float32))
    b, w = jax.random.normal(ks[1], (3, n, 5)), jax.random.normal(ks[2], (3, n, 5))
    assert rms_rel_err(_linalg.solve(a, b), jnp.linalg.solve(a, b)) < 1e-5
    g = jax.grad(lambda a, b: jnp.sum(w * _linalg.solve(a, b)), (0, 1))(a, b)
    g_ref = jax.grad(lambda a, b: jnp.sum(w * jnp.linalg.solve(a, b)), (0, 1))(a, b)
    assert rms_rel_err(g[0], g_ref[0]) < 1e-5 and rms_rel_err(g[1], g_ref[1]) < 1e-5
    assert "lapack" not in jax.jit(_linalg.solve).lower(a, b).as_text()
