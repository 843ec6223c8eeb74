"""The Pallas linear-scan kernel in interpret mode equals the seqjax reference (values and grads).

Interpret mode is slow, so the cases are few and tiny, chosen to cover: T = 1, T not a multiple of
the time block (several time blocks, so the carry crosses blocks), odd channel counts, more than one
channel block (channel padding), complex64, reverse, h0, bf16 and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_scan import kernel as kmod
from pallas_kernels.linear_scan import linear_scan_pallas
from seqjax.scan import linear_scan


def _loss(fn, a, b, h0, w):
    h, h_last = fn(a, b, h0)
    if jnp.iscomplexobj(h):
        out = jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) * w[::-1])
    else:
        out = jnp.sum(h.astype(jnp.float32) * w)
    return out + jnp.sum(jnp.abs(h_last) ** 2)


def _values_and_grads(fn, a, b, h0, w):
    h, h_last = fn(a, b, h0)
    return h, h_last, jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2))(a, b, h0, w)


def _data(shape, complex_=False, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, shape)
    b = rng.normal(size=shape)
    h0 = rng.normal(size=shape[:1] + shape[2:])
    w = rng.normal(size=shape).astype(np.float32)
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
        b = b + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
        return a.astype(np.complex64), b.astype(np.complex64), h0.astype(np.complex64), w
    return a.astype(np.float32), b.astype(np.float32), h0.astype(np.float32), w


# Interpreted on the CPU (CI), compiled on an accelerator (benchmarks/gpu_check.sh). A GPU program owns the
# whole time axis (no carry across time blocks), so the small time blocks that exercise the carry are CPU-only.
INTERPRET = jax.default_backend() == "cpu"


def _tb(time_block):
    return time_block if INTERPRET else None


def close(x, y, tol=2e-5):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(1.0, float(np.max(np.abs(y)))))


def _check(shape, *, reverse, complex_=False, time_block=None, seed=0):
    a, b, h0, w = _data(shape, complex_, seed)
    kern = functools.partial(linear_scan_pallas, reverse=reverse, interpret=INTERPRET,
                             time_block=_tb(time_block))
    ref = functools.partial(_ref, reverse=reverse)
    got = _values_and_grads(kern, a, b, h0, w)
    want = _values_and_grads(ref, a, b, h0, w)
    close(got[0], want[0])
    close(got[1], want[1])
    for g, r in zip(got[2], want[2]):
        assert g.dtype == r.dtype
        close(g, r, 2e-4)


def _ref(a, b, h0, reverse):
    return linear_scan(a, b, h0=h0, reverse=reverse, impl="sequential")


@pytest.mark.parametrize(
    "shape, reverse, complex_, time_block",
    [
        ((2, 1, 5), False, False, None),  # T = 1
        ((2, 37, 3, 7), False, False, 8),  # 5 time blocks, last one ragged; 21 channels
        ((2, 37, 3, 7), True, False, 8),  # reverse walks the blocks backwards
        ((1, 20, 5), False, True, 8),  # complex64 as real/imag float32 parts
        ((1, 20, 5), True, True, 8),
        ((1, 3, 1030), True, False, None),  # 9 rows of 128 lanes: 2 channel blocks, padded
    ],
)
def test_kernel_matches_reference(shape, reverse, complex_, time_block):
    _check(shape, reverse=reverse, complex_=complex_, time_block=time_block)


def test_kernel_without_h0_and_bf16():
    a, b, _, w = _data((2, 11, 5))
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    h, h_last = linear_scan_pallas(a16, b16, interpret=INTERPRET, time_block=_tb(8))
    assert h.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
    rh, rlast = linear_scan(a16, b16, impl="sequential")
    close(h.astype(jnp.float32), rh.astype(jnp.float32), 1e-2)
    close(h_last, rlast)

    def loss(a, b):
        return jnp.sum(linear_scan_pallas(a, b, interpret=INTERPRET, time_block=_tb(8))[0] * w)

    da, db = jax.grad(loss, argnums=(0, 1))(a16, b16)
    assert da.dtype == db.dtype == jnp.bfloat16
    rda, rdb = jax.grad(lambda a, b: jnp.sum(linear_scan(a, b, impl="sequential")[0] * w),
                        argnums=(0, 1))(a16, b16)
    close(da.astype(jnp.float32), rda.astype(jnp.float32), 2e-2)


def test_engine_pallas_impl_with_resets_and_reverse():
    a, b, h0, w = _data((2, 13, 3))
    resets = np.zeros((2, 13), bool)
    resets[0, [4, 9]] = True

    def fn(impl, a, b, h0):
        return linear_scan(a, b, h0=h0, resets=resets, reverse=True, impl=impl)

    got = _values_and_grads(functools.partial(fn, "pallas"), a, b, h0, w)
    want = _values_and_grads(functools.partial(fn, "sequential"), a, b, h0, w)
    for g, r in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        close(g, r, 2e-4)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("t, c", [(1, 5), (63, 37), (1000, 1030), (4096, 128)])
def test_block_shapes_are_valid(platform, t, c):
    tb, t_pad, lanes, r, rows = kmod._blocks(t, c, None, platform)
    assert t_pad % tb == 0 and t_pad >= t and rows % r == 0 and rows * lanes >= c
    if platform == "tpu":  # last two block dims: multiples of (8, 128) or the full dims
        assert (r % 8 == 0 or r == rows) and (lanes % 128 == 0 or lanes == rows * lanes == c)
    else:  # one time block (grid programs run in parallel), power-of-two tiles
        assert tb == t_pad and tb & (tb - 1) == 0 and r & (r - 1) == 0 and lanes == 128


def test_gpu_rejects_a_carry_across_time_blocks():
    with pytest.raises(ValueError, match=r"time_block=8 must be >= T=20 on GPU"):
        kmod._blocks(20, 5, 8, "gpu")
