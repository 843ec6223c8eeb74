"""Set disjointness with JRT (Arora et al. 2024): which token do the two sets share?

    python experiments/set_disjointness.py --model=gla --order=short_first
    python experiments/set_disjointness.py --model=gla --order=long_first
    python experiments/set_disjointness.py --model=gla --order=long_first --jrt=true     # JRT-Prompt: read twice
    python experiments/set_disjointness.py --model=jrt --order=long_first                  # prefix linear attention

A streaming (recurrent) model needs memory for the first set; long-first is the hard order. JRT-Prompt
repeats the context before the answer, which removes the order dependence. The prefix linear-attention
model (``--model=jrt``, JRT-RNN) reads the whole context non-causally: ``prefix_len`` defaults to the
context length (every token before the answer position). Metric: accuracy.
"""

import dataclasses
import sys
from typing import Literal

import numpy as np

from seqjax.data.transforms import jrt_prompt
from seqjax.tasks import IGNORE, TaskBatch, masked_accuracy, sets
from seqjax.tasks.runner import RunConfig, TaskSpec, cli


@dataclasses.dataclass
class Config(RunConfig):
    short_len: int = 4
    long_len: int = 16
    vocab_size: int = 128
    order: Literal["short_first", "long_first"] = "long_first"
    jrt: bool = False
    eval_size: int = 512


PRESETS = {
    "cpu": dict(steps=1500, batch_size=64, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, eval_size=8, progress=False),
    "paper": dict(steps=20000, batch_size=128, d_model=128, num_layers=2, vocab_size=2048, short_len=16, long_len=256, eval_every=2000),
}


def read_twice(b: TaskBatch) -> TaskBatch:
    """JRT-Prompt (``seqjax.data.transforms.jrt_prompt``): ``context [3]`` becomes
    ``context context [3]``; the label stays at the final ``[3]``."""
    tokens, _ = jrt_prompt(b.inputs[:, :-1], b.inputs[:, -1:], repeats=2)
    ctx = b.inputs.shape[1] - 1
    targets = np.concatenate([np.full((len(b), ctx), IGNORE, np.int32), b.targets], axis=1)
    return TaskBatch(np.asarray(tokens, np.int32), targets, b.num_classes, b.vocab_size)


def make_task(cfg: Config) -> TaskSpec:
    if cfg.order not in ("short_first", "long_first"):
        raise ValueError(f"--order must be short_first or long_first, got {cfg.order!r}")

    def gen(n, seed):
        b = sets.disjoint_sets(n, cfg.short_len, cfg.long_len, cfg.vocab_size, short_first=cfg.order == "short_first", seed=seed)
        return read_twice(b) if cfg.jrt else b

    if cfg.model == "jrt" and cfg.prefix_len == 0:  # the prefix model reads the context non-causally
        context = cfg.short_len + cfg.long_len + 2
        cfg.prefix_len = 2 * context if cfg.jrt else context
    name = f"sets_{cfg.order}" + ("_jrt" if cfg.jrt else "")
    return TaskSpec(name, cfg.vocab_size, lambda step, bs, seed: gen(bs, seed * 1_000_003 + step),
                    lambda: {"test": gen(cfg.eval_size, 10_000 + cfg.seed)},
                    lambda preds, b: {"acc": masked_accuracy(preds, b.targets)})


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
