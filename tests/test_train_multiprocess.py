"""Two local processes (``jax.distributed.initialize`` on 127.0.0.1, gloo), 2 CPU devices each, train
the same as one process with 4 devices: each process reads only its rows; orbax saves from both."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from _train_utils import restore_on_one_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(run_dir, data_dir, *extra):
    return [
        sys.executable, os.path.join(ROOT, "experiments", "pretrain.py"),
        "--steps=4", "--preset=tiny", "--model.pattern=attention", "--model.num_layers=1", "--model.d_model=16",
        "--model.num_heads=2", "--model.num_kv_heads=1", "--data.seq_len=16", "--data.global_batch=8",
        "--data.max_files=12", f"--data.data_dir={data_dir}", f"--run_dir={run_dir}", "--ckpt_every=4",
        "--eval_every=4", "--data.eval_batches=1",
        "--sample_len=0", "--log_every=1", "--mesh=1,-1,1,1", *extra,
    ]


def _env(n):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", PYTHONUNBUFFERED="1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_like_one(tmp_path):
    data = str(tmp_path / "data")
    one = str(tmp_path / "one")
    out = subprocess.run(_cmd(one, data), env=_env(4), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    two = str(tmp_path / "two")
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(two, data, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]

    def losses(d):
        return [json.loads(r) for r in open(os.path.join(d, "metrics.jsonl"))]

    a, b = losses(one), losses(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "eval_bpb"):
            if k in x:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-5)
    pa = restore_on_one_device(os.path.join(one, "checkpoints", "4", "state"))
    pb = restore_on_one_device(os.path.join(two, "checkpoints", "4", "state"))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
