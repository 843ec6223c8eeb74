"""Selective copying and single-query associative recall (the H3 / Hyena / TCNCA setting).

    python experiments/recall.py --task=ar --model=attention
    python experiments/recall.py --task=ar_h3 --vocab_size=20 --model=attention
    python experiments/recall.py --task=copy --model=mamba

Metric: accuracy on the scored positions. ``--task=ar`` scores and trains on one query per sequence whose key
occurs once before it (``seqjax.tasks.recall.associative_recall``); ``--task=ar_h3`` is the form H3 and Hyena
train, keys repeating and every next token a training label, the test scoring the query alone
(``seqjax.tasks.recall.h3_associative_recall``).
"""

import dataclasses
import sys
from typing import Literal

from seqjax.tasks import masked_accuracy, recall
from seqjax.tasks.runner import RunConfig, TaskSpec, cli


@dataclasses.dataclass
class Config(RunConfig):
    task: Literal["ar", "ar_h3", "copy"] = "ar"
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
    elif cfg.task == "ar_h3":
        def gen(n, seed, train=True):
            return recall.h3_associative_recall(n, cfg.seq_len, cfg.vocab_size, seed=seed, train=train)
    elif cfg.task == "copy":
        def gen(n, seed):
            return recall.selective_copying(n, cfg.seq_len, cfg.num_tokens, cfg.vocab_size, seed=seed)
    else:
        raise ValueError(f"--task must be 'ar', 'ar_h3' or 'copy', got {cfg.task!r}")
    test_kw = {"train": False} if cfg.task == "ar_h3" else {}  # ar_h3 trains on every token, tests the query alone
    return TaskSpec(cfg.task, cfg.vocab_size, lambda step, bs, seed: gen(bs, seed * 1_000_003 + step),
                    lambda: {"test": gen(cfg.eval_size, 10_000 + cfg.seed, **test_kw)},
                    lambda preds, b: {"acc": masked_accuracy(preds, b.targets)})


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
