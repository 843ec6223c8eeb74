"""Pretraining configuration: dataclasses and named presets.

``TrainConfig`` holds everything a run needs; its ``model`` is the LM's own ``LMConfig``. Presets
(``tiny``, ``125m``, ``1b``, ``8b``) are functions that return a full ``TrainConfig``. ``experiments/pretrain.py``
parses its command line with ``parse(argv)`` (``seqjax.cli``, tyro): ``--preset=<name>`` picks the defaults,
then dotted keys override them (``--model.d_model=256``, ``--optim.lr=1e-3``, ``--data.seq_len=512``,
``--mesh=1,-1,1,1``, ``--model.pattern=mamba2,attention``, ``--model.tie_embeddings=false``,
``--model.mixer_kwargs=gla.chunk_size=128``, ``--model.embedding=lexinvariant`` for a lexinvariant LM whose
embedding is a fresh Gaussian table per sequence, Huang et al. 2023); ``--help`` lists them all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from seqjax import cli
from seqjax.models.lm import LMConfig

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "PRESETS", "preset", "parse", "to_dict", "to_json"]


def tiny_model() -> LMConfig:
    """The ``tiny`` preset's model: a 4-layer hybrid (3 Mamba-2, 1 attention), width 128, GQA 4:2, MLP x2."""
    return LMConfig(d_model=128, num_layers=4, pattern=("mamba2", "mamba2", "mamba2", "attention"), num_heads=4,
                    num_kv_heads=2, mlp_ratio=2.0)


@dataclass
class DataConfig:
    data: str = "stdlib"  # "stdlib" (embedded corpus) or "tfds:<name>[:<text feature>]"
    data_dir: str = ""  # default ~/.cache/seqjax
    seq_len: int = 256
    global_batch: int = 8  # rows per optimizer step (all microbatches, all processes)
    eval_batches: int = 4
    seed: int = 0
    max_files: int = 0  # stdlib corpus: use only the first N files (0 = all; for quick tests)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    grad_noise: float = 0.0  # eta of Neelakantan et al. (2015): variance eta / (1 + t) ** gamma; 0 = off
    grad_noise_gamma: float = 0.55


@dataclass
class TrainConfig:
    preset: str = "tiny"  # tiny | 125m | 1b | 8b: the defaults that the other options override
    steps: int = 300
    accum: int = 1  # microbatches per step (gradient accumulation)
    mesh: tuple[int, ...] = (1, -1, 1, 1)  # data, fsdp, context, tensor
    run_dir: str = "runs/pretrain"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 50
    keep: int = 3
    resume: bool = True
    nan_policy: Literal["raise", "skip"] = "raise"  # what a non-finite loss or gradient does
    sample_len: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.8  # 0 = greedy
    sample_top_p: float = 0.95
    peak_flops: float = 0.0  # per device, for MFU; 0 = guess from the device kind
    max_seconds: float = 0.0  # stop (and checkpoint) after this much training wall time; 0 = no limit
    compile_topology: str = ""  # e.g. "v5e:4x4": only compile the step for that TPU slice (libtpu), report, exit
    coordinator: str = ""  # "host:port": multi-process run via jax.distributed.initialize
    num_processes: int = 1
    process_id: int = 0
    model: LMConfig = field(default_factory=tiny_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch * self.data.seq_len


def _tiny() -> TrainConfig:
    # about five minutes on a 2-core CPU: ~1 min to prepare the corpus once, ~1 min to compile, then
    # at most 300 steps or 4 minutes of training (rerunning the command resumes from the checkpoint)
    return TrainConfig(max_seconds=240.0, model=tiny_model())


def _125m() -> TrainConfig:
    return TrainConfig(
        preset="125m",
        steps=20_000,
        ckpt_every=1000,
        eval_every=1000,
        model=LMConfig(d_model=768, num_layers=24, num_heads=12, num_kv_heads=4, mlp_ratio=4.0, dtype="bfloat16", remat="full"),
        data=DataConfig(seq_len=2048, global_batch=256, eval_batches=16),
        optim=OptimConfig(lr=1.5e-3, warmup=1000),
    )


def _1b() -> TrainConfig:
    # accum=8: 32-row microbatches, two rows per chip on a v5e-16 (--mesh=1,16,1,1); per-chip memory of the
    # compiled step in benchmarks/results/tpu_compile.md
    return TrainConfig(
        preset="1b",
        steps=50_000,
        accum=8,
        ckpt_every=1000,
        eval_every=1000,
        model=LMConfig(d_model=2048, num_layers=24, num_heads=16, num_kv_heads=8, mlp_ratio=4.0, dtype="bfloat16", remat="full"),
        data=DataConfig(seq_len=4096, global_batch=256, eval_batches=16),
        optim=OptimConfig(lr=6e-4, warmup=2000),
    )


def _8b() -> TrainConfig:
    # a 3:1 Mamba-2 / attention hybrid of ~8B parameters for a v5p-64 under FSDP (--mesh=1,64,1,1):
    # accum=4 gives one 8k-token row per chip per microbatch
    return TrainConfig(
        preset="8b",
        steps=100_000,
        ckpt_every=1000,
        eval_every=1000,
        accum=4,
        model=LMConfig(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_ratio=4.0, dtype="bfloat16",
                       remat="full"),
        data=DataConfig(seq_len=8192, global_batch=256, eval_batches=16),
        optim=OptimConfig(lr=3e-4, warmup=2000),
    )


PRESETS = {"tiny": _tiny, "125m": _125m, "1b": _1b, "8b": _8b}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def parse(argv: Sequence[str] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a command line (``sys.argv[1:]`` when None): a preset, then overrides."""
    return cli.parse(TrainConfig, argv, presets=PRESETS)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)
