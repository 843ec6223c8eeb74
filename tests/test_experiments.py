"""Every experiment script runs two training steps at toy size and writes what it promises."""

import importlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

TOKEN_SCRIPTS = [
    ("state_tracking", ["--task=parity"]),
    ("state_tracking", ["--task=s3", "--model=mamba"]),
    ("mqar", []),
    ("icll", ["--model=gla+ngram2"]),
    ("classification", ["--data=digits", "--model=lstm"]),
    ("recall", ["--task=copy"]),
    ("set_disjointness", ["--jrt=true"]),
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


def test_passkey_two_steps(tmp_path):
    import passkey

    rows = passkey.main(["--preset=tiny", "--model=mamba2", f"--out={tmp_path / 'p.jsonl'}"])
    kinds = {r["kind"] for r in rows}
    assert kinds == {"train", "passkey", "state_norm"}
    assert (tmp_path / "p.png").exists()
    norms = [r["norm"] for r in rows if r["kind"] == "state_norm"]
    assert len(norms) == 2 and all(n > 0 for n in norms)


def test_sweep_writes_table_and_plot(tmp_path):
    import sweep

    sweep.main(["--grid=parity", "--models=attention", "--preset=tiny", f"--out={tmp_path}"])
    table = (tmp_path / "parity" / "table.md").read_text()
    assert "| attention |" in table and (tmp_path / "parity" / "plot.png").exists()
