"""Sequence classification data that needs no download.

- :func:`digits`: scikit-learn's bundled 8×8 digits (1,797 images) read pixel by pixel as a length-64
  sequence of floats in [0, 1] (sequential), or in a fixed random pixel order (permuted); a
  deterministic 80/20 split by seed.
- :func:`mnist1d`: MNIST-1D generated procedurally by the ``mnist1d`` package (``make_dataset``; never
  its download path), length-40 sequences, 10 classes.

Both return ``(x_train [n, T, 1] float32, y_train [n] int32, x_test, y_test)``. sMNIST / psMNIST / sCIFAR
go through TFDS (``tfds.data_source``) on machines that can download: :func:`tfds_sequences`.
"""

from __future__ import annotations

import numpy as np


def digits(*, permuted: bool = False, seed: int = 0, test_fraction: float = 0.2):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.reshape(len(d.images), 64) / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
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
