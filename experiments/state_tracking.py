"""State tracking with negative eigenvalues (Grazzi et al. 2025): parity, modular arithmetic (with and
without brackets), S3/S5 word problems.

Train on short sequences, test on longer ones; metric: scaled accuracy (acc − 1/C)/(1 − 1/C) at the
answer position (sequence accuracy over all positions for word problems).

    python experiments/state_tracking.py --task=parity --model=deltanet_negeig
    python experiments/state_tracking.py --task=parity --model=mamba --steps=3000
    python experiments/state_tracking.py --preset=paper --task=modarith --model=deltanet_negeig

The CPU preset trains on lengths 3–20 and tests on 40–64 (``papers.md`` P12's small-scale target); the
paper preset is the authors' (lengths 3–40 → 40–256, d_model 128, batch 256, 20k steps).
"""

import dataclasses
import sys
from typing import Literal

from seqjax.tasks import masked_accuracy, scaled_accuracy, sequence_accuracy, state_tracking
from seqjax.tasks.runner import RunConfig, TaskSpec, cli

TASKS = {
    "parity": (state_tracking.parity, 3),
    "modarith": (state_tracking.modular_arithmetic, 10),
    "modarith_brackets": (state_tracking.modular_arithmetic_brackets, 12),
    "s3": (lambda n, lo, hi, **kw: state_tracking.word_problem(n, lo, hi, k=3, **kw), 7),
    "s5": (lambda n, lo, hi, **kw: state_tracking.word_problem(n, lo, hi, k=5, **kw), 121),
}


@dataclasses.dataclass
class Config(RunConfig):
    task: Literal["parity", "modarith", "modarith_brackets", "s3", "s5"] = "parity"
    train_min: int = 3
    train_max: int = 20
    test_min: int = 40
    test_max: int = 64
    eval_size: int = 512


PRESETS = {
    "cpu": dict(steps=1500, batch_size=64, d_model=64, num_layers=2, lr=1e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, eval_size=8, progress=False),
    "paper": dict(steps=20000, batch_size=256, d_model=128, num_layers=2, lr=1e-3, warmup=2000, eval_every=2000,
                  train_max=40, test_max=256, eval_size=8192),
}


def make_task(cfg: Config) -> TaskSpec:
    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {cfg.task!r}")
    gen, vocab = TASKS[cfg.task]
    word = cfg.task in ("s3", "s5")
    lo = max(cfg.train_min, 4 if cfg.task == "modarith_brackets" else 2)

    def train(step, batch_size, seed):
        return gen(batch_size, lo, cfg.train_max, seed=seed * 1_000_003 + step)

    def evals():
        return {
            "train_len": gen(cfg.eval_size, lo, cfg.train_max, seed=10_000 + cfg.seed),
            "test_len": gen(cfg.eval_size, cfg.test_min, cfg.test_max, seed=20_000 + cfg.seed),
        }

    def metric(preds, batch):
        acc = masked_accuracy(preds, batch.targets)
        out = {"acc": acc, "scaled_acc": scaled_accuracy(acc, batch.num_classes)}
        if word:
            out["seq_acc"] = sequence_accuracy(preds, batch.targets)
        return out

    return TaskSpec(cfg.task, vocab, train, evals, metric)


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
