r"""Two-source separation of synthetic "speakers" at 8 kHz (the MossFormer2 task without WSJ0-2mix), and its metrics.

A "speaker" is a harmonic tone whose fundamental glides (a linear chirp over the clip) and wobbles (vibrato),
with a spectral tilt and a few formant-like bumps shaping the harmonic amplitudes, and a syllable-like amplitude
envelope (a slow AM with gaps). Harmonics stop below the Nyquist frequency. Each source is scaled to unit RMS; the
second is then set ``level`` dB (uniform in ``±max_level_db``) relative to the first, as WSJ0-2mix mixes speakers
at a random relative level; white noise at ``snr_db`` (uniform in the given range) below the sources' sum is
added. The targets are the clean sources; ``mixture = s1 + s2 + noise``.

:func:`mixtures` ``(num, length, seed) -> SeparationBatch`` (numpy, float32): ``mixture [num, length]``,
``sources [num, 2, length]``, ``noise [num, length]``. Example ``i`` comes from ``default_rng([seed, i])``, so a
set is the same whatever else is drawn with it.

Metrics (jax, differentiable; numpy arrays work too), on zero-mean signals:

.. math::  s_\text{t} = \frac{\langle \hat s, s\rangle}{\lVert s\rVert^2}\, s,\qquad e = \hat s - s_\text{t},
           \qquad \text{SI-SNR}(\hat s, s) = 10\log_{10}\frac{\lVert s_\text{t}\rVert^2}{\lVert e\rVert^2}.

:func:`si_snr` (``[..., T]`` → ``[...]``), :func:`pairwise_si_snr` (``[b, S, T] × [b, S, T] → [b, S, S]``),
:func:`pit_si_snr` (utterance-level permutation-invariant training: the best mean SI-SNR over the ``S!``
assignments of estimates to references, and the assignment), :func:`si_snr_improvement` (SI-SNRi: the PIT
SI-SNR of the estimates minus that of the mixture used as every estimate, so the mixture itself scores 0 dB).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

from seqjax import _checks

__all__ = ["SAMPLE_RATE", "SeparationBatch", "speaker", "mixtures", "si_snr", "pairwise_si_snr", "pit_si_snr",
           "si_snr_improvement"]

SAMPLE_RATE = 8000
_EPS = 1e-8


@dataclasses.dataclass
class SeparationBatch:
    mixture: np.ndarray  # [n, T] float32
    sources: np.ndarray  # [n, S, T] float32 (clean targets)
    noise: np.ndarray  # [n, T] float32

    def __len__(self):
        return len(self.mixture)


def speaker(rng: np.random.Generator, length: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One synthetic voice ``[length]`` (unit RMS): harmonics of a chirping, vibrato-modulated f0 under an AM
    envelope (see the module docstring)."""
    t = np.arange(length) / sample_rate
    dur = max(length / sample_rate, 1e-3)
    f0 = rng.uniform(90.0, 300.0)
    chirp = rng.uniform(-0.3, 0.3)  # relative f0 change over the clip
    vib_rate, vib_depth = rng.uniform(3.0, 7.0), rng.uniform(0.005, 0.04)
    f_inst = f0 * (1.0 + chirp * t / dur) * (1.0 + vib_depth * np.sin(2 * np.pi * vib_rate * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f_inst) / sample_rate
    n_harm = max(1, int((0.45 * sample_rate) // (f0 * (1 + max(chirp, 0)) * 1.05)))
    k = np.arange(1, n_harm + 1)
    tilt = rng.uniform(0.5, 1.5)
    formants = rng.uniform(300.0, 3200.0, size=3)
    widths = rng.uniform(150.0, 500.0, size=3)
    amp = k ** (-tilt) * (0.3 + np.exp(-0.5 * ((k[:, None] * f0 - formants) / widths) ** 2).sum(1))
    harm_phase = rng.uniform(0, 2 * np.pi, size=n_harm)
    # harmonics above the Nyquist frequency at some instant are silenced there
    alive = (k[:, None] * f_inst[None, :]) < 0.5 * sample_rate
    wave = np.sum(amp[:, None] * np.sin(k[:, None] * phase[None, :] + harm_phase[:, None]) * alive, axis=0)
    am_rate = rng.uniform(2.0, 6.0)
    env = 0.5 * (1 - np.cos(2 * np.pi * am_rate * t + rng.uniform(0, 2 * np.pi)))
    env = np.clip(env * rng.uniform(1.0, 1.6) - rng.uniform(0.0, 0.3), 0.0, 1.0) ** 1.5  # syllables with gaps
    wave = wave * (0.1 + env)
    return (wave / (np.sqrt(np.mean(wave**2)) + _EPS)).astype(np.float32)


def mixtures(num: int, length: int, seed: int = 0, *, sources: int = 2, max_level_db: float = 5.0,
             snr_db: tuple[float, float] | None = (20.0, 30.0), sample_rate: int = SAMPLE_RATE) -> SeparationBatch:
    """``num`` mixtures of ``sources`` synthetic voices, ``length`` samples each (see the module docstring);
    ``snr_db=None`` adds no noise."""
    if not (isinstance(num, (int, np.integer)) and num >= 1):
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not (isinstance(length, (int, np.integer)) and length >= 2):
        raise ValueError(f"length must be an int >= 2 (samples), got {length!r}")
    if not (isinstance(sources, (int, np.integer)) and sources >= 1):
        raise ValueError(f"sources must be a positive int, got {sources!r}")
    if max_level_db < 0:
        raise ValueError(f"max_level_db must be >= 0, got {max_level_db}")
    mix, srcs, noises = [], [], []
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        s = np.stack([speaker(rng, length, sample_rate) for _ in range(sources)])
        gains_db = np.concatenate([[0.0], rng.uniform(-max_level_db, max_level_db, size=sources - 1)])
        s = s * (10.0 ** (gains_db / 20.0))[:, None]
        clean = s.sum(0)
        if snr_db is None:
            n = np.zeros(length)
        else:
            snr = rng.uniform(*snr_db)
            n = rng.normal(size=length) * np.sqrt(np.mean(clean**2) / 10.0 ** (snr / 10.0))
        mix.append(clean + n)
        srcs.append(s)
        noises.append(n)
    f32 = lambda a: np.stack(a).astype(np.float32)
    return SeparationBatch(f32(mix), f32(srcs), f32(noises))


def si_snr(estimate, reference, *, eps: float = _EPS):
    """SI-SNR in dB of ``estimate`` against ``reference`` (same shape ``[..., T]``; both made zero-mean first)."""
    _checks.check_ndim("estimate", estimate, tuple(range(1, 8)), "[..., time]")
    _checks.check_same_shape("estimate", estimate, "reference", reference)
    est = jnp.asarray(estimate, jnp.float32)
    ref = jnp.asarray(reference, jnp.float32)
    est = est - est.mean(-1, keepdims=True)
    ref = ref - ref.mean(-1, keepdims=True)
    target = jnp.sum(est * ref, -1, keepdims=True) / (jnp.sum(ref * ref, -1, keepdims=True) + eps) * ref
    err = est - target
    return 10.0 * jnp.log10((jnp.sum(target**2, -1) + eps) / (jnp.sum(err**2, -1) + eps))


def _check_sources(estimates, references):
    _checks.check_ndim("estimates", estimates, 3, "[batch, sources, time]")
    _checks.check_same_shape("estimates", estimates, "references", references)


def pairwise_si_snr(estimates, references):
    """``[b, S, T] × [b, S, T] -> [b, S, S]``: entry ``[n, i, j]`` is SI-SNR(estimate ``i``, reference ``j``)."""
    _check_sources(estimates, references)
    est = jnp.asarray(estimates)[:, :, None, :]
    ref = jnp.asarray(references)[:, None, :, :]
    return si_snr(jnp.broadcast_to(est, jnp.broadcast_shapes(est.shape, ref.shape)),
                  jnp.broadcast_to(ref, jnp.broadcast_shapes(est.shape, ref.shape)))


def pit_si_snr(estimates, references):
    """Utterance-level PIT: ``(best [b], perm [b, S])`` where ``best`` is the largest mean SI-SNR over the
    assignments and ``perm[n, j]`` is the estimate assigned to reference ``j``. Train on ``-best.mean()``."""
    _check_sources(estimates, references)
    s = np.shape(estimates)[1]
    pair = pairwise_si_snr(estimates, references)  # [b, i (estimate), j (reference)]
    perms = np.array(list(itertools.permutations(range(s))), np.int32)  # [P, S]: perms[p, j] = estimate for j
    scores = jnp.stack([pair[:, p, np.arange(s)].mean(-1) for p in perms], axis=-1)  # [b, P]
    best = jnp.argmax(scores, axis=-1)
    return jnp.max(scores, axis=-1), jnp.asarray(perms)[best]


def si_snr_improvement(estimates, references, mixture):
    """SI-SNRi ``[b]`` in dB: PIT SI-SNR of ``estimates`` ``[b, S, T]`` minus the mean SI-SNR of ``mixture``
    ``[b, T]`` against each reference."""
    _check_sources(estimates, references)
    _checks.check_shape("mixture", mixture, (np.shape(references)[0], np.shape(references)[2]), "[batch, time]")
    best, _ = pit_si_snr(estimates, references)
    mix = jnp.broadcast_to(jnp.asarray(mixture)[:, None, :], np.shape(references))
    return best - si_snr(mix, references).mean(-1)
