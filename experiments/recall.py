"""Selective copying and single-query associative recall (the H3 / Hyena / TCNCA setting).

    python experiments/recall.py --task=ar --model=attention
    python experiments/recall.py --task=copy --model=mamba

Metric: accuracy on the scored positions.
"""

import dataclasses
import sys
from typing import Literal

from seqjax.tasks import masked_accuracy, recall
from seqjax.tasks.runner import RunConfig, TaskSpec, cli


@dataclasses.dataclass
class Config(RunConfig):
    task: Literal["ar", "copy"] = "ar"
    seq_len: int = 64
    vocab_size: int = 64  # AR needs vocab_size / 2 >= seq_len / 2 - 1 distinct keys
    num_tokens: int = 8
    eval_size: int = 512


PRESETS = {
    "cpu": dict(steps=1500, batch_size=64, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, eval_size=8, progress=False),
    "paper": dict(steps=20000, batch_size=128, d_model=128, num_layers=2, seq_len=1024, vocab_size=1024, num_tokens=16, eval_every=2000),
}


def make_task(cfg: Config) -> TaskSpec:
    if cfg.task == "ar":
        def gen(n, seed):
            return recall.associative_recall(n, cfg.seq_len, cfg.vocab_size, seed=seed)
    elif cfg.task == "copy":
        def gen(n, seed):
            return recall.selective_copying(n, cfg.seq_len, cfg.num_tokens, cfg.vocab_size, seed=seed)
    else:
        raise ValueError(f"--task must be 'ar' or 'copy', got {cfg.task!r}")
    return TaskSpec(cfg.task, cfg.vocab_size, lambda step, bs, seed: gen(bs, seed * 1_000_003 + step),
                    lambda: {"test": gen(cfg.eval_size, 10_000 + cfg.seed)},
                    lambda preds, b: {"acc": masked_accuracy(preds, b.targets)})


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
