"""Pretraining configuration: dataclasses, named presets and ``--key=value`` overrides.

``TrainConfig`` holds everything a run needs; ``from_args(argv)`` starts from a preset
(``--preset=tiny|125m|1b``, default ``tiny``) and applies overrides. A key is either dotted
(``--model.d_model=256``, ``--optim.lr=1e-3``) or a field name that is unique across the sections
(``--d_model=256``, ``--steps=10``). Values are parsed from the field's type (``--mesh=1,-1,1,1``,
``--pattern=mamba2,attention``, ``--tie_embeddings=false``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "PRESETS", "preset", "from_args", "to_dict"]


@dataclass
class ModelConfig:
    """Arguments of ``seqjax.models.lm.LMConfig`` (fields it lacks are ignored, with a warning)."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    pattern: tuple[str, ...] = ("mamba2", "mamba2", "mamba2", "attention")
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: float = 2.0
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"
    scan_layers: bool = True  # scan over repeated super-blocks (compile time independent of depth)
    window: int = 0  # sliding attention window (0: full)


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
    preset: str = "tiny"
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
    nan_policy: str = "raise"  # "raise" | "skip": what a non-finite loss or gradient does
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
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch * self.data.seq_len


def _tiny() -> TrainConfig:
    # about five minutes on a 2-core CPU: ~1 min to prepare the corpus once, ~1 min to compile, then
    # at most 300 steps or 4 minutes of training (rerunning the command resumes from the checkpoint)
    return TrainConfig(max_seconds=240.0)


def _125m() -> TrainConfig:
    return TrainConfig(
        preset="125m",
        steps=20_000,
        ckpt_every=1000,
        eval_every=1000,
        model=ModelConfig(d_model=768, num_layers=24, num_heads=12, num_kv_heads=4, mlp_ratio=4.0, dtype="bfloat16", remat="full"),
        data=DataConfig(seq_len=2048, global_batch=256, eval_batches=16),
        optim=OptimConfig(lr=1.5e-3, warmup=1000),
    )


def _1b() -> TrainConfig:
    return TrainConfig(
        preset="1b",
        steps=50_000,
        ckpt_every=1000,
        eval_every=1000,
        model=ModelConfig(d_model=2048, num_layers=24, num_heads=16, num_kv_heads=8, mlp_ratio=4.0, dtype="bfloat16", remat="full"),
        data=DataConfig(seq_len=4096, global_batch=256, eval_batches=16),
        optim=OptimConfig(lr=6e-4, warmup=2000),
    )


PRESETS = {"tiny": _tiny, "125m": _125m, "1b": _1b}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def _parse(value: str, tp):
    origin = typing.get_origin(tp)
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
        return tuple(_parse(p.strip(), inner) for p in parts)
    if tp is int:
        return int(float(value)) if "e" in value.lower() else int(value)
    if tp is float:
        return float(value)
    return value


def _sections(cfg: TrainConfig) -> dict:
    return {"": cfg, "model": cfg.model, "data": cfg.data, "optim": cfg.optim}


def _field_types(obj) -> dict:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(getattr(obj, f.name))}


def override(cfg: TrainConfig, key: str, value: str) -> None:
    """Set ``key`` (dotted or unique field name) to ``value`` parsed by the field's type, in place."""
    secs = _sections(cfg)
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in secs or name not in _field_types(secs[sec]):
            raise ValueError(f"unknown config key --{key}")
        owners = [secs[sec]]
    else:
        name = key
        owners = [obj for obj in secs.values() if name in _field_types(obj)]
        if not owners:
            valid = sorted({n for o in secs.values() for n in _field_types(o)})
            raise ValueError(f"unknown config key --{key}; valid keys: {valid}")
        if len(owners) > 1:
            raise ValueError(f"ambiguous config key --{key}; use a dotted name")
    obj = owners[0]
    setattr(obj, name, _parse(value, _field_types(obj)[name]))


def from_args(argv) -> TrainConfig:
    """Parse ``--preset=...`` first, then apply every ``--key=value`` in order."""
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments are --key=value, got {arg!r}")
        k, v = arg[2:].split("=", 1)
        pairs.append((k.replace("-", "_"), v))
    name = dict(pairs).get("preset", "tiny")
    cfg = preset(name)
    for k, v in pairs:
        if k != "preset":
            override(cfg, k, v)
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)
