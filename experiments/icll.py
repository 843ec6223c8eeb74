"""In-context language learning on random DFAs, REGBENCH (Akyürek et al. 2024).

    python experiments/icll.py --model=attention
    python experiments/icll.py --model=mamba2
    python experiments/icll.py --model=mamba2+ngram2          # with a 2-gram head (the paper's fix)
    python experiments/icll.py --preset=paper --model=attention

Metric: DFA accuracy — the fraction of greedy next-token predictions that the sequence's own DFA
accepts. Training sees a fixed pool of ``num_train_dfas`` DFAs (the paper's data-size axis); the test
set uses fresh DFAs. The CPU preset uses small DFAs (4–8 states, alphabet 4–10, ≈200 tokens);
``papers.md`` P13 has the target: attention beats the recurrent models and n-gram heads narrow the gap.
"""

import dataclasses
import sys

import numpy as np

from seqjax.tasks import icll
from seqjax.tasks.runner import RunConfig, TaskSpec, cli


@dataclasses.dataclass
class Config(RunConfig):
    seq_len: int = 256
    num_train_dfas: int = 2000
    max_states: int = 8
    max_alphabet: int = 10
    min_strings: int = 6
    max_strings: int = 10
    max_string_len: int = 20
    eval_size: int = 200


PRESETS = {
    "cpu": dict(steps=1500, batch_size=32, d_model=64, num_layers=2, lr=1e-3, warmup=100, eval_every=500),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, eval_size=4, num_train_dfas=8, seq_len=64,
                 progress=False),
    "paper": dict(steps=60000, batch_size=32, d_model=128, num_layers=2, lr=5e-4, weight_decay=0.1, warmup=6000, eval_every=5000,
                  seq_len=1024, num_train_dfas=5000, max_states=12, max_alphabet=18, min_strings=10, max_strings=19,
                  max_string_len=49, eval_size=500),
}


def make_task(cfg: Config) -> TaskSpec:
    kw = dict(max_states=cfg.max_states, max_alphabet=cfg.max_alphabet, min_strings=cfg.min_strings,
              max_strings=cfg.max_strings, max_string_len=cfg.max_string_len)
    pool = icll.icll(cfg.num_train_dfas, cfg.seq_len, seed=cfg.seed, **kw)

    def train(step, bs, seed):
        idx = np.random.default_rng(seed * 1_000_003 + step).integers(0, len(pool), bs)
        return pool[idx]

    return TaskSpec(
        "icll",
        icll.VOCAB,
        train,
        lambda: {"test": icll.icll(cfg.eval_size, cfg.seq_len, seed=10_000 + cfg.seed, **kw)},
        lambda preds, b: {"dfa_acc": icll.dfa_accuracy(preds, b.inputs, b.meta)},
    )


if __name__ == "__main__":
    cli(Config, PRESETS, make_task, sys.argv[1:])
