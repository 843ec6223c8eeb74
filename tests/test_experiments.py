"""Every experiment script runs two training steps at toy size and writes what it promises."""

import importlib
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

TOKEN_SCRIPTS = [
    ("state_tracking", ["--task=parity"]),
    ("state_tracking", ["--task=s3", "--model=mamba"]),
    ("mqar", []),
    ("icll", ["--model=gla+ngram2"]),
    ("classification", ["--data=digits", "--model=lstm"]),
    ("recall", ["--task=copy"]),
    ("recall", ["--task=ar"]),
    ("recall", ["--task=ar_h3", "--vocab_size=20"]),
    ("set_disjointness", ["--jrt=true"]),
    ("set_disjointness", ["--model=jrt"]),
]


@pytest.mark.parametrize("script,args", TOKEN_SCRIPTS, ids=[f"{s}{''.join(a)}" for s, a in TOKEN_SCRIPTS])
def test_token_experiment_two_steps(script, args, tmp_path):
    mod = importlib.import_module(script)
    out = tmp_path / "r.jsonl"
    argv = ["--preset=tiny", "--model=attention", f"--out={out}"] + args
    records = mod.cli(mod.Config, mod.PRESETS, mod.make_task, argv)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == records and len(lines) >= 1
    for r in lines:
        assert r["step"] == 2
        assert all(0.0 <= v <= 1.0 for k, v in r.items() if k in ("acc", "dfa_acc", "seq_acc"))
        assert r.get("scaled_acc", 0.0) <= 1.0


def test_timescales_two_steps(tmp_path):
    import timescales

    out = timescales.main(["--preset=tiny", f"--out={tmp_path / 't.jsonl'}"])
    assert out["records"][-1]["step"] == 2 and out["records"][-1]["mean_tau"] >= 1.0
    table = timescales.main(["plot", str(tmp_path / "t.jsonl"), f"--png={tmp_path / 't.png'}"])
    assert (tmp_path / "t.png").exists() and f"| parity | multi | 2 | {out['largest_N']} |" in table


def test_passkey_two_steps(tmp_path):
    import passkey

    rows = passkey.main(["--preset=tiny", "--model=mamba2", "--mitigation=forget", "--warm_len=30", "--warm_steps=1",
                         f"--out={tmp_path / 'p.jsonl'}"])
    # one step at the warm-up length, then the preset's two at the training length (evaluated after each phase)
    assert [(r["step"], r["length"]) for r in rows if r["kind"] == "train"] == [(1, 30), (2, 32), (3, 32)]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"train", "passkey", "state_norm", "horizon"}
    assert (tmp_path / "p.png").exists()
    # the same trained weights are evaluated as they are and with the mitigation (dt_bias shifted up)
    for m in ("none", "forget"):
        assert {r["length"] for r in rows if r["kind"] == "passkey" and r["mitigation"] == m} == {32, 64}
    norms = {m: [r["norm"] for r in rows if r["kind"] == "state_norm" and r["mitigation"] == m] for m in ("none", "forget")}
    assert all(len(v) == 2 and all(n > 0 for n in v) for v in norms.values())
    assert norms["none"] != norms["forget"]


def test_set_disjointness_prefix_covers_the_context():
    """``--model=jrt`` reads every token before the answer non-causally (twice the context with JRT-Prompt)."""
    import set_disjointness as sd

    for jrt in (False, True):
        cfg = sd.Config(model="jrt", jrt=jrt)
        task = sd.make_task(cfg)
        b = task.train(0, 2, 0)
        answer = int(np.flatnonzero(b.targets[0] != -1)[0])
        assert answer == b.inputs.shape[1] - 1 and cfg.prefix_len == answer


def test_sweep_labels_rows_by_task_when_a_grid_mixes_tasks():
    import sweep

    recs = [{"task": t, "model": "gla", "seed": 0, "step": 10, "split": "test", "acc": a}
            for t, a in (("sets_long_first", 0.5), ("sets_short_first", 0.9))]
    md, table = sweep.summarize(recs, "acc")
    assert table[("sets_long_first gla", "test")] == (0.5, 0.0) and table[("sets_short_first gla", "test")] == (0.9, 0.0)
    md, table = sweep.summarize(recs[:1], "acc")
    assert table == {("gla", "test"): (0.5, 0.0)}


def test_sweep_writes_table_and_plot(tmp_path):
    import sweep

    sweep.main(["--grid=parity", "--models=attention", "--preset=tiny", f"--out={tmp_path}"])
    table = (tmp_path / "parity" / "table.md").read_text()
    assert "| attention |" in table and (tmp_path / "parity" / "plot.png").exists()


def test_classification_reads_tfds_sequences_without_downloading(monkeypatch):
    """``--data=smnist|psmnist|scifar`` go through ``tfds_sequences`` (patched here: tests never download)."""
    import classification as C

    calls = []

    def fake(name, split, *, permuted, data_dir):
        calls.append((name, split, permuted, data_dir))
        n = 6 if split == "train" else 4
        x = np.linspace(0.0, 1.0, n * 12 * 3, dtype=np.float32).reshape(n, 12, 3)
        return x, np.arange(n, dtype=np.int32) % 10

    monkeypatch.setattr(C.classification, "tfds_sequences", fake)
    task = C.make_task(C.Config(data="psmnist", data_dir="/data"))
    assert calls == [("mnist", "train", True, "/data"), ("mnist", "test", True, "/data")]
    test = task.evals()["test"]
    assert test.inputs.shape == (4, 12) and test.inputs.max() <= 255 and test.vocab_size == 266
    assert list(test.targets[:, -1]) == [256 + c for c in range(4)]
    with pytest.raises(ValueError, match="--data must be"):
        C.make_task(C.Config(data="cifar"))


def test_task_options_start_from_the_preset_and_override_it():
    import mqar

    from seqjax.tasks.runner import parse

    cfg = parse(mqar.Config, mqar.PRESETS, ["--seq_len=32", "--preset=tiny", "--progress=true", "--model=gla"])
    assert (cfg.preset, cfg.steps, cfg.d_model, cfg.seq_len, cfg.progress, cfg.model) == ("tiny", 2, 16, 32, True, "gla")
    assert parse(mqar.Config, mqar.PRESETS, []).steps == mqar.PRESETS["cpu"]["steps"]


@pytest.mark.parametrize("argv,named", [
    (["--progress=flase"], "--progress"),  # a bad bool is an error, never False
    (["--seq_lenn=32"], "--seq_lenn"),
    (["--steps=2.5"], "--steps"),
    (["--preset=huge"], "--preset"),
    (["--task=parity"], "--task"),  # recall's tasks are ar, ar_h3 and copy
])
def test_task_options_reject_what_they_cannot_read(argv, named, capsys):
    import recall

    from seqjax.tasks.runner import parse

    with pytest.raises(SystemExit) as e:
        parse(recall.Config, recall.PRESETS, argv)
    assert e.value.code == 2 and named in capsys.readouterr().err
