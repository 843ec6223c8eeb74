r"""Shared pieces of the linear time-invariant state-space mixers (LSSL, S4D, S5, LRU).

- HiPPO matrices (Gu et al. 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections"):
  LegS ``A``/``B`` and its normal part (S5's HiPPO-N);
- the causal convolution ``y_t = sum_{s <= t} K_{t-s} x_s`` by FFT, and its packed-document form
  (a masked Toeplitz product, since a reset breaks time invariance);
- document masks that say which tokens ``h0`` reaches and which ones feed ``h_last``;
- the input checks the diagonal scans share (LRU, RG-LRU, S4D, S5);
- the complex diagonal MIMO system of LRU and S5 once its coefficients are known:
  ``h_t = λ ⊙ h_{t-1} + B̄ x_t``, ``y_t = c Re(C h_t) + D ⊙ x_t`` as a reference ``lax.scan``
  (:func:`diag_ssm_recurrent`), through the scan engine (:func:`diag_ssm_scan`) and as an operator
  (:func:`mimo_toeplitz`);
- complex parameters: a circular complex normal draw, and a complex array stored as a real pair of
  ``nnx.Param`` (LRU, S4D, S5).

The module name starts with ``_`` so the registry does not import it as a mixer family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from seqjax import _checks
from seqjax.scan import linear_scan

__all__ = [
    "hippo_legs",
    "hippo_legs_normal",
    "causal_fft_conv",
    "causal_conv",
    "document_masks",
    "check_ssm_inputs",
    "resets_or_none",
    "diag_ssm_recurrent",
    "diag_ssm_scan",
    "mimo_toeplitz",
    "complex_normal",
    "complex_params",
]


def hippo_legs(n: int) -> tuple[np.ndarray, np.ndarray]:
    r"""HiPPO-LegS: ``A_{nk} = -\sqrt{2n+1}\sqrt{2k+1}`` (n > k), ``-(n+1)`` (n = k), 0 (n < k);
    ``B_n = \sqrt{2n+1}``. float64 numpy ``([n, n], [n])``."""
    q = np.sqrt(2.0 * np.arange(n) + 1.0)
    a = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n) + 1.0)
    return a, q.copy()


def hippo_legs_normal(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""HiPPO-N, the normal part of LegS: ``S = A + P P^T`` with ``P_n = \sqrt{n + 1/2}``.

    ``S = -I/2 + (\text{skew-symmetric})``, so it is unitarily diagonalisable:
    ``S = V \operatorname{diag}(\Lambda) V^H`` with ``Re \Lambda = -1/2``. Returns ``(Lambda [n],
    V [n, n], B [n])`` (complex128, complex128, float64), eigenvalues sorted by imaginary part.
    """
    a, b = hippo_legs(n)
    p = np.sqrt(np.arange(n) + 0.5)
    s = a + np.outer(p, p)
    # S = -I/2 + K with K skew-symmetric: -iK is Hermitian, so eigh gives an orthonormal V.
    skew = s - np.diag(np.diag(s))
    w, v = np.linalg.eigh(-1j * skew)
    lam = np.mean(np.diag(s)) + 1j * w
    return lam, v, b


def check_ssm_inputs(name: str, x, h0, resets, negative_eigen, step: bool, state_shape) -> None:
    """``x [b, t, channels]`` (``[b, channels]`` for a step), ``h0 [b, *state_shape]``, ``resets [b, t]``."""
    _checks.check_no_negative_eigen(name, negative_eigen)
    _checks.check_ndim("x", x, 2 if step else 3, "[batch, channels]" if step else "[batch, time, channels]")
    _checks.check_dtype("x", x, "float")
    if h0 is not None:
        _checks.check_shape("h0", h0, (x.shape[0], *state_shape), "[batch, ...state]")
    if resets is not None:
        _checks.check_shape("resets", resets, x.shape[:2], "[batch, time]")


def resets_or_none(resets):
    return None if resets is None else jnp.asarray(resets).astype(bool)


def document_masks(resets, t: int):
    """``(first [b, t], last [b, t])``: tokens ``h0`` still reaches (no reset at or before them) and
    tokens in the same document as the last one (those that feed ``h_last``)."""
    doc = jnp.cumsum(resets.astype(jnp.int32), axis=1)
    return doc == 0, doc == doc[:, t - 1 : t]


def causal_fft_conv(x, k):
    """``y[b, t, h] = sum_{s <= t} k[h, t - s] x[b, s, h]`` by FFT (float32).

    ``x`` ``[b, t, h]``, ``k`` ``[h, t]``. Zero padding to a power of two ``>= 2t`` makes the circular
    convolution a linear one.
    """
    t = x.shape[1]
    n = 1 << int(np.ceil(np.log2(max(2 * t, 2))))
    xf = jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=1)
    kf = jnp.fft.rfft(k.astype(jnp.float32).T, n=n, axis=0)  # [n//2+1, h]
    y = jnp.fft.irfft(xf * kf[None], n=n, axis=1)
    return y[:, :t]


def causal_conv(x, k, resets=None):
    """The causal convolution, by FFT, or with ``resets`` as a masked Toeplitz product ``O(t^2)``:
    a token only sees tokens of its own document."""
    if resets is None:
        return causal_fft_conv(x, k)
    t = x.shape[1]
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]  # t - s
    toeplitz = jnp.where(lag >= 0, k[:, jnp.clip(lag, 0, t - 1)], 0.0)  # [h, t, s]
    doc = jnp.cumsum(resets.astype(jnp.int32), axis=1)
    same = doc[:, :, None] == doc[:, None, :]  # [b, t, s]
    m = jnp.where(same[:, None], toeplitz[None], 0.0)
    return jnp.einsum("bhts,bsh->bth", m, x.astype(jnp.float32))


def _diag_ssm_out(C, D, hs, x, out_scale):
    """``y = out_scale Re(C h) + D ⊙ x`` in float32, for states ``hs [..., n]`` and inputs ``x [..., H]``."""
    y = out_scale * jnp.real(jnp.einsum("hn,...n->...h", C.astype(jnp.complex64), hs))
    d = D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return y + d * x.astype(jnp.float32)


def diag_ssm_recurrent(x, log_lam, b_bar, C, D, h0, resets, out_scale):
    """The reference ``lax.scan`` of ``h_t = e^{log λ} ⊙ h_{t-1} + B̄ x_t``, ``y_t = out_scale Re(C h_t) + D ⊙ x_t``
    (LRU, S5; a reset zeroes the carried state): ``x [b, t, H]``, ``log_lam [n]``, ``b_bar [n, H]``, ``C [H, n]``
    complex64 -> ``(y [b, t, H] in x's dtype, h_last [b, n] complex64)``. Inputs checked by the caller."""
    bsz, t, _ = x.shape
    lam = jnp.exp(log_lam)
    state = jnp.zeros((bsz, log_lam.shape[0]), jnp.complex64) if h0 is None else h0.astype(jnp.complex64)
    keep = jnp.ones((bsz, t), bool) if resets is None else ~jnp.asarray(resets, bool)

    def step(state, inp):
        x_t, keep_t = inp
        state = jnp.where(keep_t[:, None], lam[None] * state, 0.0)
        state = state + jnp.einsum("nh,bh->bn", b_bar, x_t.astype(jnp.complex64))
        return state, _diag_ssm_out(C, D, state, x_t, out_scale)

    state, ys = lax.scan(step, state, (jnp.moveaxis(x.astype(jnp.float32), 1, 0), keep.T))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state


def diag_ssm_scan(x, log_lam, b_bar, C, D, h0, resets, out_scale, impl):
    """:func:`diag_ssm_recurrent` through the scan engine (``seqjax.scan.linear_scan``, ``impl`` one of its
    impls); ``resets`` bool or ``None``."""
    bu = jnp.einsum("nh,bth->btn", b_bar, x.astype(jnp.complex64))
    hs, h_last = linear_scan(log_lam[None, None], bu, h0=h0, resets=resets, log_decay=True, impl=impl)
    return _diag_ssm_out(C, D, hs, x, out_scale).astype(x.dtype), h_last


def mimo_toeplitz(x, log_lam, C, gb, D):
    """``M[t, s] = Re(C diag(e^{(t-s) log λ}) gb) + diag(D) [t = s]`` for ``s ≤ t``, else 0 (LRU, S5)."""
    t = x.shape[1]
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    powers = jnp.exp(jnp.maximum(lag, 0)[..., None].astype(jnp.float32) * log_lam[None, None])  # [T, T, N]
    m = jnp.real(jnp.einsum("hn,tsn,ni->tshi", C, powers, gb))
    m = jnp.where((lag >= 0)[..., None, None], m, 0.0)
    m = m + jnp.eye(t)[:, :, None, None] * jnp.diag(D.astype(jnp.float32))[None, None]
    return jnp.broadcast_to(m[None], (x.shape[0], *m.shape))


def complex_normal(key, shape, scale=1.0):
    """``scale (n_re + i n_im) / sqrt(2)`` complex64 (``n`` standard normal): ``E|z|² = scale²``."""
    kr, ki = jax.random.split(key)
    return (scale * (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)) / np.sqrt(2)).astype(
        jnp.complex64)


def complex_params(re, im, axes):
    """A complex parameter as two float32 ``nnx.Param`` (real part of ``re``, ``im``) sharded over ``axes``."""
    return nnx.Param(jnp.real(re).astype(jnp.float32), out_sharding=axes), nnx.Param(
        jnp.asarray(im, jnp.float32), out_sharding=axes)
