"""The scan engine: every impl equals the reference on values and gradients, and the reference equals
an independent float64 NumPy loop (values) and JAX autodiff of a plain ``lax.scan`` (gradients).

Shapes are tiny; the Pallas impl has its own (slower, interpret-mode) tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from seqjax import scan as scan_mod
from seqjax.scan import choose_impl, linear_scan

FAST = ("associative", "chunked")  # "auto" resolves to one of these (test_auto_is_choose_impl)
CHUNK = 16  # small, so T = 63, 257, 1000 give several (and ragged) chunks


# ----------------------------------------------------------------------------- references


def np_scan(a, b, h0=None, reverse=False, resets=None):
    """Float64 (complex128) loop: h_t = a_t h_{t-1} + b_t, the carry cut at resets."""
    a, b = np.broadcast_to(np.asarray(a), np.shape(b)), np.asarray(b)
    dtype = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    h = np.zeros(b.shape[:1] + b.shape[2:], dtype) if h0 is None else np.asarray(h0, dtype)
    out = np.zeros(b.shape, dtype)
    ts = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    prev = None
    for t in ts:
        a_t = a[:, t].astype(dtype)
        if resets is not None:
            cut = resets[:, prev] if (reverse and prev is not None) else (
                resets[:, t] if not reverse else np.zeros(b.shape[0], bool))
            a_t = np.where(cut.reshape((-1,) + (1,) * (b.ndim - 2)), 0, a_t)
        h = a_t * h + b[:, t]
        out[:, t] = h
        prev = t
    return out, h


def lax_ref(a, b, h0, reverse=False):
    """Plain float32 ``lax.scan``, differentiated by JAX (no custom_vjp): the gradient reference."""
    xs = (jnp.moveaxis(jnp.broadcast_to(a, b.shape), 1, 0), jnp.moveaxis(b, 1, 0))
    h_last, hs = lax.scan(lambda h, x: (x[0] * h + x[1],) * 2, h0, xs, reverse=reverse)
    return jnp.moveaxis(hs, 0, 1), h_last


def _loss(fn, a, b, h0, w):
    h, h_last = fn(a, b, h0)
    # Real loss that weights every output (and h_last) differently; complex via Re and Im.
    out = jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) * w[::-1]) if jnp.iscomplexobj(h) else (
        jnp.sum(h.astype(jnp.float32) * w))
    return out + jnp.sum(jnp.abs(h_last) ** 2)


def _values_and_grads(fn, a, b, h0, w):
    """((h, h_last), (da, db, dh0)) from one forward pass."""
    def loss(a, b, h0):
        out = fn(a, b, h0)
        return _loss(lambda *_: out, a, b, h0, w), out

    grads, (h, h_last) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(a, b, h0)
    return h, h_last, grads


@functools.partial(jax.jit, static_argnames=("impl", "reverse", "log_decay"))
def run(a, b, h0, w, resets=None, *, impl, reverse=False, log_decay=False):
    """(h, h_last, (da, db, dh0)) for one impl, jitted once per (shape, impl, options)."""
    def fn(a, b, h0):
        return linear_scan(a, b, h0=h0, reverse=reverse, resets=resets, log_decay=log_decay,
                           impl=impl, chunk_size=CHUNK)

    return _values_and_grads(fn, a, b, h0, w)


@functools.partial(jax.jit, static_argnames=("reverse",))
def run_ref(a, b, h0, w, *, reverse=False):
    return _values_and_grads(functools.partial(lax_ref, reverse=reverse), a, b, h0, w)


def close(x, y, tol=2e-5):
    """Equal up to ``tol`` relative to the largest magnitude (float32 summation order differs)."""
    x, y = np.asarray(x), np.asarray(y)
    scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale)


def make(shape, decay="mixed", seed=0, dtype=np.float32, complex_=False):
    rng = np.random.default_rng(seed)
    lo, hi = {"mixed": (-1.0, 1.0), "small": (0.0, 1e-3), "near1": (1 - 1e-6, 1 - 1e-6),
              "negative": (-1.0, -0.05), "positive": (0.5, 1.0)}[decay]
    a = rng.uniform(lo, hi, shape)
    b = rng.normal(size=shape)
    h0 = rng.normal(size=shape[:1] + shape[2:])
    w = rng.normal(size=shape).astype(np.float32)
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
        b = b + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
        return a.astype(np.complex64), b.astype(np.complex64), h0.astype(np.complex64), w
    return a.astype(dtype), b.astype(dtype), h0.astype(np.float32), w


def check_against_reference(a, b, h0, w, impl, reverse=False, tol=2e-5):
    h, h_last, grads = run(a, b, h0, w, impl=impl, reverse=reverse)
    rh, rlast, rgrads = run(a, b, h0, w, impl="sequential", reverse=reverse)
    close(h, rh, tol)
    close(h_last, rlast, tol)
    for g, rg in zip(grads, rgrads):
        close(g, rg, tol * 10)
    return rh, rlast, rgrads


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("t", [1, 63, 257])
def test_sequential_matches_numpy_and_autodiff(t, complex_, reverse):
    a, b, h0, w = make((2, t, 5), complex_=complex_)
    h, h_last, grads = run(a, b, h0, w, impl="sequential", reverse=reverse)
    nh, nlast = np_scan(a, b, h0, reverse)
    close(h, nh)
    close(h_last, nlast)
    _, _, rgrads = run_ref(a, b, h0, w, reverse=reverse)
    for g, rg in zip(grads, rgrads):
        close(g, rg)


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 37), (2, 63, 37), (2, 257, 37), (2, 1000, 37), (2, 63, 3, 7)])
@pytest.mark.parametrize("impl", FAST)
def test_impls_match_sequential(impl, shape, reverse):
    a, b, h0, w = make(shape, seed=shape[1])
    rh, _, _ = check_against_reference(a, b, h0, w, impl, reverse)
    close(rh, np_scan(a, b, h0, reverse)[0])


@pytest.mark.parametrize("decay", ["small", "near1", "negative"])
@pytest.mark.parametrize("impl", ("associative", "chunked"))
def test_decay_regimes(impl, decay):
    a, b, h0, w = make((2, 257, 5), decay=decay)
    rh, rlast, _ = check_against_reference(a, b, h0, w, impl, reverse=decay == "negative")
    nh, nlast = np_scan(a, b, h0, reverse=decay == "negative")
    close(rh, nh)
    close(rlast, nlast)
    if decay == "negative":  # the sign alternates through the state, as state tracking needs
        assert np.all(np.isfinite(rh))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", ("sequential",) + FAST)
def test_complex64(impl, reverse):
    a, b, h0, w = make((2, 63, 5), complex_=True)
    rh, rlast, _ = check_against_reference(a, b, h0, w, impl, reverse)
    h, h_last, grads = run(a, b, h0, w, impl=impl, reverse=reverse)
    assert h.dtype == jnp.complex64 and h_last.dtype == jnp.complex64
    assert [g.dtype for g in grads] == [jnp.complex64] * 3
    close(h, np_scan(a, b, h0, reverse)[0])


@pytest.mark.parametrize("impl", ("sequential",) + FAST)
def test_bf16_inputs(impl):
    a, b, h0, w = make((2, 63, 5), decay="positive")
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    h, h_last, (da, db, dh0) = run(a16, b16, h0, w, impl=impl)
    assert h.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
    assert da.dtype == db.dtype == jnp.bfloat16 and dh0.dtype == jnp.float32
    # Same rounded inputs in float32: h differs only by the final bf16 rounding (float32 state).
    h32, last32, g32 = run(a16.astype(jnp.float32), b16.astype(jnp.float32), h0, w, impl=impl)
    close(h.astype(jnp.float32), h32, tol=1e-2)
    close(h_last, last32, tol=1e-5)
    close(da.astype(jnp.float32), g32[0], tol=1e-2)
    # And against the unrounded float32 run, bf16 input rounding is all that separates them.
    close(h.astype(jnp.float32), np_scan(a, b, h0)[0], tol=5e-2)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", ("sequential",) + FAST)
def test_resets(impl, reverse):
    a, b, h0, w = make((3, 63, 5), seed=1)
    resets = np.zeros((3, 63), bool)
    resets[0, [0, 10, 11, 40]] = True
    resets[1, [5, 62]] = True
    h, h_last, grads = run(a, b, h0, w, resets, impl=impl, reverse=reverse)
    nh, nlast = np_scan(a, b, h0, reverse, resets)
    close(h, nh)
    close(h_last, nlast)
    _, _, rgrads = run(a, b, h0, w, resets, impl="sequential", reverse=reverse)
    for g, rg in zip(grads, rgrads):
        close(g, rg, 2e-4)
    # No leak: changing document [10, 11) of row 0 changes nothing outside it in either direction.
    b2 = b.copy()
    b2[0, 10] += 100.0
    h2 = run(a, b2, h0, w, resets, impl=impl, reverse=reverse)[0]
    diff = np.any(np.asarray(h2) != np.asarray(h), axis=-1)
    assert np.flatnonzero(diff[0]).tolist() == [10] and not diff[1:].any()


def test_resets_as_int_ids_starts():
    a, b, h0, _ = make((1, 8, 2))
    resets = np.array([[0, 0, 1, 0, 0, 1, 0, 0]], np.int32)
    h, _ = linear_scan(a, b, h0=h0, resets=resets, impl="sequential")
    close(h, np_scan(a, b, h0, resets=resets.astype(bool))[0])


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("impl", ("sequential",) + FAST)
def test_log_decay(impl, complex_):
    a, b, h0, w = make((2, 63, 5), decay="positive", complex_=complex_)
    log_a = np.log(a)
    h, h_last, grads = run(log_a, b, h0, w, impl=impl, log_decay=True)
    rh, rlast, rgrads = run(a, b, h0, w, impl="sequential")
    close(h, rh)
    close(h_last, rlast)
    close(grads[0], np.asarray(rgrads[0]) * a, 2e-4)  # d/dlog a = a * d/da
    close(grads[1], rgrads[1], 2e-4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", ("sequential",) + FAST)
def test_split_carries_state(impl, reverse):
    a, b, h0, _ = make((2, 100, 5), seed=3)
    scan = jax.jit(functools.partial(linear_scan, reverse=reverse, impl=impl, chunk_size=CHUNK))
    whole, last = scan(a, b, h0=h0)
    s = 37  # the first part in scan order is [0, s) forward, [s, T) in reverse
    first, later = (slice(s, None), slice(None, s)) if reverse else (slice(None, s), slice(s, None))
    h1, mid = scan(a[:, first], b[:, first], h0=h0)
    h2, end = scan(a[:, later], b[:, later], h0=mid)
    parts = (h2, h1) if reverse else (h1, h2)
    close(np.concatenate(parts, axis=1), whole)
    close(end, last)


def test_broadcast_decay_gradient():
    a, b, h0, _ = make((2, 30, 5), decay="positive")
    a_row = a[0, 0]  # one decay per channel, broadcast over batch and time

    def f(a_row):
        return jnp.sum(linear_scan(a_row, b, h0=h0, impl="chunked", chunk_size=8)[0])

    def f_ref(a_row):
        return jnp.sum(lax_ref(jnp.broadcast_to(a_row, b.shape), b, h0)[0])

    g = jax.jit(jax.grad(f))(a_row)
    assert g.shape == (5,)
    close(g, jax.jit(jax.grad(f_ref))(a_row), 1e-4)


def test_long_sequence_65536():
    t = 65_536
    rng = np.random.default_rng(0)
    a = rng.uniform(0.9, 1.0, (1, t, 3)).astype(np.float32)
    a[0, :, 2] = 1 - 1e-6  # a near-integrator: the state grows like a random walk, still finite
    b = rng.normal(size=(1, t, 3)).astype(np.float32)
    w = np.ones((1, t, 3), np.float32)
    h0 = np.zeros((1, 3), np.float32)
    nh, nlast = np_scan(a, b)
    for impl in ("sequential", "associative", "chunked"):
        h, h_last, grads = run(a, b, h0, w, impl=impl)
        assert all(np.all(np.isfinite(x)) for x in (h, h_last, *grads))
        close(h, nh, 1e-4)
        close(h_last, nlast, 1e-4)


# ----------------------------------------------------------------------------- dispatch


def test_auto_is_choose_impl():
    a, b, h0, _ = make((2, 63, 5))
    impl = choose_impl(b.shape, jnp.float32)
    auto = linear_scan(a, b, h0=h0, impl="auto")
    chosen = linear_scan(a, b, h0=h0, impl=impl)
    np.testing.assert_array_equal(auto[0], chosen[0])
    close(auto[0], np_scan(a, b, h0)[0])


def test_choose_impl_is_known():
    for platform in ("cpu", "gpu", "tpu"):
        for shape in ((8, 512, 256), (1, 16384, 16), (2, 1, 3)):
            for dtype in (jnp.float32, jnp.complex64):
                impl = choose_impl(shape, dtype, platform)
                assert impl in scan_mod.IMPLS and impl != "auto"
                if jnp.issubdtype(dtype, jnp.complexfloating) or platform != "tpu":
                    assert impl != "pallas"


# ----------------------------------------------------------------------------- bad input


def _no_trace(monkeypatch):
    def boom(*args):
        raise AssertionError("reached the traced computation before validating")

    monkeypatch.setattr(scan_mod, "_scan", boom)


B2 = np.zeros((2, 6, 3), np.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(a=np.zeros((2, 5, 3), np.float32)), ValueError, r"a must .*\[2, 6, 3\].*got \[2, 5, 3\]"),
        (dict(a=np.zeros((2, 6, 3), np.int32)), TypeError, r"a must have a inexact dtype"),
        (dict(b=np.zeros((2, 6, 3), np.int32)), TypeError, r"b must have a inexact dtype"),
        (dict(b=np.zeros((6,), np.float32)), ValueError, r"b must have .*\[batch, time, \.\.\.\]"),
        (dict(b=np.zeros((2, 0, 3), np.float32), a=1.0), ValueError, r"b must have at least 1 time"),
        (dict(h0=np.zeros((2, 6, 3), np.float32)), ValueError, r"h0 must have shape \[2, 3\]"),
        (dict(h0=np.zeros((2, 3), np.int32)), TypeError, r"h0 must have a inexact dtype"),
        (dict(resets=np.zeros((2, 6), np.float32)), TypeError, r"resets must have a int or bool"),
        (dict(resets=np.zeros((2, 5), bool)), ValueError, r"resets must have shape \[2, 6\]"),
        (dict(impl="fast"), ValueError, r"impl='fast' is not one of"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int"),
        (dict(chunk_size=2.5), ValueError, r"chunk_size must be a positive int"),
        (dict(chunk_size=True), ValueError, r"chunk_size must be a positive int"),
    ],
)
def test_bad_input_raises_before_tracing(monkeypatch, kwargs, exc, match):
    _no_trace(monkeypatch)
    args = dict(a=B2, b=B2)
    args.update(kwargs)
    a, b = args.pop("a"), args.pop("b")
    with pytest.raises(exc, match=match):
        linear_scan(a, b, **args)


def test_bad_input_raises_under_jit():
    with pytest.raises(ValueError, match=r"h0 must have shape \[2, 3\]"):
        jax.jit(lambda a, b: linear_scan(a, b, h0=jnp.zeros((3, 2))))(B2, B2)
