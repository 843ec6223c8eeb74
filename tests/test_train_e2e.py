"""The README's first command, short: ``experiments/pretrain.py --steps=3 --preset=tiny`` end to end;
its command line (``seqjax.train.config.parse``); and (slow) an AOT compile of the ~1B preset on 8 fake
devices that fits an 80 GB accelerator."""

import importlib.util
import json
import math
import os

import jax
import pytest

from seqjax.models.lm import LMConfig
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
        "--steps=3", "--preset=tiny", "--data.max_files=12", "--data.seq_len=32", "--data.global_batch=8",
        "--model.d_model=32", f"--data.data_dir={tmp_path / 'data'}", f"--run_dir={run_dir}", "--sample_len=8",
        "--eval_every=3", "--data.eval_batches=1", "--log_every=1",
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
    cfg = C.parse(["--preset=125m", "--model.d_model=256", "--optim.lr=1e-3", "--mesh=2,-1,1,1",
                   "--model.pattern=attention,mamba2", "--model.tie_embeddings=false"])
    assert (cfg.model.d_model, cfg.optim.lr, cfg.mesh, cfg.model.pattern) == (256, 1e-3, (2, -1, 1, 1), ("attention", "mamba2"))
    assert cfg.model.tie_embeddings is False and cfg.data.seq_len == 2048 and cfg.preset == "125m"
    assert isinstance(cfg.model, LMConfig) and cfg.model.num_kv_heads == 4  # the rest of the preset stays


def test_config_preset_is_parsed_first_and_the_default_is_tiny():
    assert C.parse([]) == C.preset("tiny")
    assert C.parse(["--optim.lr=1e-3", "--preset=1b"]).model.d_model == 2048  # wherever --preset stands
    assert C.parse(["--preset", "125m"]).model.d_model == 768
    with pytest.raises(ValueError, match="unknown preset"):
        C.preset("7b")


def test_config_mixer_kwargs_from_the_command_line():
    cfg = C.parse(["--model.pattern=gla,attention", "--model.mixer_kwargs", "gla.chunk_size=128", "gla.impl=chunked",
                   "attention.qk_norm=true", "gla.eps=1e-5"])
    assert cfg.model.mixer_kwargs == {"gla": {"chunk_size": 128, "impl": "chunked", "eps": 1e-5},
                                      "attention": {"qk_norm": True}}
    assert C.parse(["--model.mixer_kwargs=gla.chunk_size=32"]).model.mixer_kwargs == {"gla": {"chunk_size": 32}}
    one_per_entry = C.parse(["--model.mixer_kwargs.gla.chunk_size=128", "--steps=3", "--model.mixer_kwargs.gla.impl=chunked",
                             "--model.mixer_kwargs.attention.qk_norm=true"])
    assert one_per_entry.model.mixer_kwargs == {"gla": {"chunk_size": 128, "impl": "chunked"}, "attention": {"qk_norm": True}}
    assert one_per_entry.steps == 3


def test_config_bools_take_true_false_and_bare_flags():
    assert C.parse(["--resume=false"]).resume is False
    assert C.parse(["--resume=FALSE", "--resume=yes"]).resume is True  # the last one wins
    assert C.parse(["--model.tie_embeddings=0"]).model.tie_embeddings is False
    assert C.parse(["--model.qk_norm"]).model.qk_norm is True


@pytest.mark.parametrize("argv,named", [
    (["--nope=1"], "--nope"),
    (["--model.d_modl=256"], "--model.d_modl"),
    (["--d_model=256"], "--d_model"),  # sections are explicit: --model.d_model
    (["--resume=maybe"], "--resume"),
    (["--model.tie_embeddings=nein"], "--model.tie_embeddings"),
    (["--steps=ten"], "--steps"),
    (["--mesh=1,x,1,1"], "--mesh"),
    (["--model.mixer_kwargs=gla.chunk_size"], "--model.mixer_kwargs"),
    (["--model.mixer_kwargs.gla=128"], "--model.mixer_kwargs"),
    (["--nan_policy=ignore"], "--nan_policy"),
    (["--model.remat=sometimes"], "remat"),  # LMConfig's own check
    (["--preset=7b"], "--preset"),
])
def test_config_errors_exit_with_a_message_that_names_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


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
