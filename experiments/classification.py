"""Sequence classification with SSMs: sequential / permuted 8×8 digits and MNIST-1D, no download.

    python experiments/classification.py --model=s4d --data=digits
    python experiments/classification.py --model=lstm --data=digits
    python experiments/classification.py --model=lssl --data=pdigits
    python experiments/classification.py --model=s4d --data=mnist1d
    python experiments/classification.py --model=s4d --data=smnist --preset=paper    # TFDS: downloads MNIST

Inputs are quantised pixel values read one per step (digits have 17 grey levels, so this is lossless;
MNIST-1D is quantised to 32 levels) and the class is predicted at the last step. Metric: test accuracy.
``--data=smnist|psmnist|scifar`` read MNIST / CIFAR-10 through TFDS (``tfds.data_source``, via
``seqjax.tasks.classification.tfds_sequences``; ``--data_dir`` for a prepared copy) on machines that can
download them: 784 (or 1024 grey-scale) steps of 256 levels.
"""

import dataclasses
import sys
from typing import Literal

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch, classification, masked_accuracy
from seqjax.tasks.runner import RunConfig, TaskSpec, cli


@dataclasses.dataclass
class Config(RunConfig):
    data: Literal["digits", "pdigits", "mnist1d", "smnist", "psmnist", "scifar"] = "digits"
    levels: int = 32  # MNIST-1D's quantisation (digits: 17 grey levels; the TFDS images: 256)
    data_dir: str = ""  # TFDS data_dir for smnist / psmnist / scifar


PRESETS = {
    "cpu": dict(steps=1500, batch_size=64, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, progress=False),
    "paper": dict(steps=20000, batch_size=128, d_model=128, num_layers=4, lr=2e-3, warmup=1000, eval_every=2000),
}


def _tokens(x, levels):
    lo, hi = x.min(), x.max()
    return np.clip(np.round((x[..., 0] - lo) / (hi - lo) * (levels - 1)), 0, levels - 1).astype(np.int32)


def _batch(tokens, labels, vocab):
    targets = np.full(tokens.shape, IGNORE, np.int32)
    targets[:, -1] = labels + (vocab - 10)  # class ids live in the last 10 vocabulary entries
    return TaskBatch(tokens, targets, num_classes=10, vocab_size=vocab)


TFDS = {"smnist": ("mnist", False), "psmnist": ("mnist", True), "scifar": ("cifar10", False)}


def make_task(cfg: Config) -> TaskSpec:
    if cfg.data in ("digits", "pdigits"):
        x, y, xt, yt = classification.digits(permuted=cfg.data == "pdigits", seed=cfg.seed)
        levels = 17
    elif cfg.data == "mnist1d":
        x, y, xt, yt = classification.mnist1d(seed=cfg.seed)
        levels = cfg.levels
    elif cfg.data in TFDS:
        name, permuted = TFDS[cfg.data]
        kw = dict(permuted=permuted, data_dir=cfg.data_dir or None)
        (x, y), (xt, yt) = (classification.tfds_sequences(name, split, **kw) for split in ("train", "test"))
        x, xt = (a.mean(axis=-1, keepdims=True) for a in (x, xt))  # grey scale (sCIFAR), one value per step
        levels = 256
    else:
        raise ValueError(f"--data must be digits, pdigits, mnist1d, smnist, psmnist or scifar, got {cfg.data!r}")
    vocab = levels + 10
    train_set = _batch(_tokens(x, levels), y, vocab)
    test_set = _batch(_tokens(xt, levels), yt, vocab)

    def train(step, bs, seed):
        return train_set[np.random.default_rng(seed * 1_000_003 + step).integers(0, len(train_set), bs)]

    return TaskSpec(cfg.data, vocab, train, lambda: {"test": test_set},
                    lambda preds, b: {"acc": masked_accuracy(preds, b.targets)})


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
