"""Multi-query associative recall (Arora et al. 2023, zoology).

    python experiments/mqar.py --model=attention
    python experiments/mqar.py --model=gated_deltanet --seq_len=128 --num_pairs=8
    python experiments/mqar.py --preset=paper --model=mamba2
    python experiments/mqar.py --model=based --d_model=128

Metric: accuracy on the value positions. The CPU preset has the shape of zoology's "basic CPU example" (vocab
256, (T, pairs) = (64, 4)) but not its budget: that example trains d_model 128 (one attention head, learned
positions, lr 1e-3, weight decay 0.1) for up to 100 epochs of 10k sequences at batch 32 (31k steps, stopping
at 0.99 accuracy), the CPU preset 1500 steps of 64 fresh sequences. The paper preset is Fig. 2's (vocab 8192,
100k examples × 64 epochs at batch 512 = 12.5k steps; zoology keeps the best of four learning rates in
1e-4..1e-2). ``--model=based`` is ``seqjax.tasks.runner.HYBRIDS["based"]``.
"""

import dataclasses
import sys

from seqjax.tasks import masked_accuracy, mqar
from seqjax.tasks.runner import RunConfig, TaskSpec, cli


@dataclasses.dataclass
class Config(RunConfig):
    seq_len: int = 64
    num_pairs: int = 4
    vocab_size: int = 256
    eval_size: int = 1000


PRESETS = {
    "cpu": dict(steps=1500, batch_size=64, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, eval_size=8, progress=False),
    "paper": dict(steps=12500, batch_size=512, d_model=128, num_layers=2, lr=1e-3, vocab_size=8192, eval_size=3000, eval_every=1000),
}


def make_task(cfg: Config) -> TaskSpec:
    def gen(n, seed):
        return mqar.mqar(n, cfg.seq_len, cfg.num_pairs, cfg.vocab_size, seed=seed)

    return TaskSpec(
        f"mqar_{cfg.seq_len}x{cfg.num_pairs}",
        cfg.vocab_size,
        lambda step, bs, seed: gen(bs, seed * 1_000_003 + step),
        lambda: {"test": gen(cfg.eval_size, 10_000 + cfg.seed)},
        lambda preds, b: {"acc": masked_accuracy(preds, b.targets)},
    )


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
