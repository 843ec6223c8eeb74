"""The README's first command, short: ``experiments/pretrain.py --steps=3 --preset=tiny`` end to end;
and (slow) an AOT compile of the ~1B preset on 8 fake devices that fits an 80 GB accelerator."""

import importlib.util
import json
import math
import os

import jax
import pytest

from seqjax.train import config as C
from seqjax.train.run import build_model_fn
from seqjax.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(ROOT, "experiments", "pretrain.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_command_short(tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        "--steps=3", "--preset=tiny", "--max_files=12", "--seq_len=32", "--global_batch=8", "--d_model=32",
        f"--data_dir={tmp_path / 'data'}", f"--run_dir={run_dir}", "--sample_len=8", "--eval_every=3",
        "--eval_batches=1", "--log_every=1",
    ]
    summary = _pretrain_module().main(argv)
    assert summary["steps"] == 3 and summary["stopped"] == "done" and summary["checkpoints"] == [3]
    assert 4.0 < summary["eval_bpb"] < 9.0  # about 8 bits per byte at initialisation
    assert math.isfinite(summary["tokens_per_s"])
    rows = [json.loads(r) for r in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tb"))
    cfg = json.load(open(run_dir / "config.json"))
    assert cfg["model"]["pattern"] == ["mamba2", "mamba2", "mamba2", "attention"]
    assert summary["sample"].startswith("def ") and len(summary["sample"]) > len("def ")  # 8 sampled bytes


def test_config_overrides_and_presets():
    cfg = C.from_args(["--preset=125m", "--d_model=256", "--optim.lr=1e-3", "--mesh=2,-1,1,1", "--model.pattern=attention,mamba2",
                       "--tie_embeddings=false"])
    assert (cfg.model.d_model, cfg.optim.lr, cfg.mesh, cfg.model.pattern) == (256, 1e-3, (2, -1, 1, 1), ("attention", "mamba2"))
    assert cfg.model.tie_embeddings is False and cfg.data.seq_len == 2048
    with pytest.raises(ValueError, match="unknown config key"):
        C.from_args(["--nope=1"])
    with pytest.raises(ValueError, match="ambiguous"):
        C.from_args(["--seed=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        C.from_args(["--preset=7b"])


@pytest.mark.slow
def test_1b_preset_aot_compile_fits_80gb():
    """Compile (never run, never materialise) the ~1B preset's train step on 8 fake devices."""
    cfg = C.preset("1b")
    cfg.accum = 16
    tr = Trainer(build_model_fn(cfg.model), __import__("seqjax.sharding").sharding.make_mesh((1, 8, 1, 1)), cfg.optim,
                 cfg.steps, accum=cfg.accum)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(tr.abstract_params))
    assert 0.8e9 < n < 2.0e9, n
    _, _, info = tr.compile(cfg.data.global_batch, cfg.data.seq_len, with_eval=False)
    print({k: v / 2**30 for k, v in info.items() if k.endswith("bytes")})
    assert info["argument_bytes"] < 16 * n / 8 * 1.1  # params + 2 Adam moments, float32, sharded 8 ways (+ noise)
    assert info["total_bytes"] < 80e9
