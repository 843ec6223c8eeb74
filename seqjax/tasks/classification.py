"""Sequence classification data that needs no download.

- :func:`digits`: scikit-learn's bundled 8×8 digits (1,797 images) read pixel by pixel as a length-64
  sequence of floats in [0, 1] (sequential), or in a fixed random pixel order (permuted); a
  deterministic 80/20 split by seed.
- :func:`digits_split`: the same images as ``[n, 8, 8]`` (or flat ``[n, 64]``), shuffled once by seed, the
  first ``n_train`` for training; :func:`digit_images` reads them (once per process).
- :func:`mnist1d`: MNIST-1D generated procedurally by the ``mnist1d`` package (``make_dataset``; never
  its download path), length-40 sequences, 10 classes.

:func:`digits` and :func:`mnist1d` return ``(x_train [n, T, 1] float32, y_train [n] int32, x_test, y_test)``. sMNIST / psMNIST / sCIFAR
go through TFDS (``tfds.data_source``) on machines that can download: :func:`tfds_sequences`.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def digit_images():
    """``(images [1797, 8, 8] float32 in [0, 1], targets [1797] int32)``: scikit-learn's digits (0–16 ink) over 16,
    read once per process; callers index them and never write to them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def digits_split(n_train: int = 1437, *, seed: int = 0, flat: bool = False):
    """The digits shuffled once by ``seed``, the first ``n_train`` for training and the rest (360 by default) for
    testing: ``(x_train [n_train, 8, 8] float32 in [0, 1], y_train [n_train] int32, x_test, y_test)``;
    ``flat=True``: x as ``[n, 64]``, the pixels row by row."""
    images, targets = digit_images()
    if not 0 < n_train < len(images):
        raise ValueError(f"n_train must be in [1, {len(images) - 1}] (the digits have {len(images)} images), got {n_train}")
    x = images.reshape(len(images), 64) if flat else images
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], targets[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def digits(*, permuted: bool = False, seed: int = 0, test_fraction: float = 0.2):
    images, y = digit_images()
    x = images.reshape(len(images), 64)
    rng = np.random.default_rng(seed)
    if permuted:
        x = x[:, np.random.default_rng(1234).permutation(64)]
    idx = rng.permutation(len(x))
    n_test = int(len(x) * test_fraction)
    te, tr = idx[:n_test], idx[n_test:]
    return x[tr, :, None], y[tr], x[te, :, None], y[te]


def mnist1d(*, seed: int = 0, num_samples: int = 5000):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    data = make_dataset(args)
    x_tr = np.asarray(data["x"], np.float32)[:, :, None]
    x_te = np.asarray(data["x_test"], np.float32)[:, :, None]
    return x_tr, np.asarray(data["y"], np.int32), x_te, np.asarray(data["y_test"], np.int32)


def tfds_sequences(name: str = "mnist", split: str = "train", *, permuted: bool = False, data_dir=None):
    """sMNIST / psMNIST / sCIFAR through ``tfds.data_source`` (downloads; not used in tests)."""
    import tensorflow_datasets as tfds

    src = tfds.data_source(name, split=split, data_dir=data_dir)
    xs = np.stack([np.asarray(ex["image"], np.float32).reshape(-1, np.asarray(ex["image"]).shape[-1]) / 255.0 for ex in src])
    ys = np.asarray([ex["label"] for ex in src], np.int32)
    if permuted:
        xs = xs[:, np.random.default_rng(1234).permutation(xs.shape[1])]
    return xs, ys
