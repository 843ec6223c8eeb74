"""Checkpoints: exact restore onto another mesh and one device, partial checkpoints ignored, and
(slow, subprocesses) SIGTERM -> final save, SIGKILL -> resume from the last complete checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from _train_utils import host, make_model, mesh_for, restore_on_one_device

from seqjax.train.checkpoint import Checkpointer
from seqjax.train.config import OptimConfig
from seqjax.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(shape):
    return Trainer(make_model, mesh_for(shape), OptimConfig(grad_noise=0.01), total_steps=10)


def test_restore_exact_on_other_meshes(tmp_path):
    src = _trainer((1, 8, 1, 1))
    state = src.init_state()
    ck = Checkpointer(str(tmp_path), every=5, keep=2)
    assert ck.save(5, state, {"mesh": "fsdp8"})
    assert not ck.save(6, state)  # off the interval
    ck.wait()
    saved = host(state)
    for shape in [(2, 1, 1, 4), (1, 1, 1, 1)]:
        dst = _trainer(shape)
        restored, meta = Checkpointer(str(tmp_path), every=5, keep=2).restore(dst.abstract_state())
        assert meta == {"mesh": "fsdp8"}
        chex.assert_trees_all_equal(host(restored), saved)  # the same tree, bit for bit
        for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(dst.state_shardings)):
            assert a.sharding == s
    ck.close()


def test_partial_checkpoints_are_ignored(tmp_path):
    tr = _trainer((1, 1, 1, 1))
    state = tr.init_state()
    ck = Checkpointer(str(tmp_path), every=1, keep=5)
    ck.save(2, state)
    ck.close()
    os.makedirs(tmp_path / "4.orbax-checkpoint-tmp-1234" / "state")  # a save in flight when killed
    os.makedirs(tmp_path / "6" / "state")  # a step directory without its commit marker
    ck = Checkpointer(str(tmp_path), every=1, keep=5)
    assert ck.latest() == 2 and ck.all_steps() == [2]
    assert not (tmp_path / "6").exists()
    restored, _ = ck.restore(tr.abstract_state())
    assert int(restored["step"]) == 0
    ck.save(6, state)  # the step can be written again
    ck.close()
    assert Checkpointer(str(tmp_path), every=1, keep=5).latest() == 6


def _cmd(run_dir, data_dir, steps):
    return [
        sys.executable, os.path.join(ROOT, "experiments", "pretrain.py"),
        f"--steps={steps}", "--preset=tiny", "--model.pattern=attention", "--model.num_layers=1", "--model.d_model=16",
        "--model.num_heads=2", "--model.num_kv_heads=1", "--data.seq_len=16", "--data.global_batch=4",
        "--data.max_files=12", f"--data.data_dir={data_dir}", f"--run_dir={run_dir}", "--ckpt_every=20",
        "--eval_every=1000", "--keep=2",
        "--sample_len=0", "--log_every=1",
    ]


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1")
    return env


def _wait_for_checkpoint(run_dir, at_least, proc, timeout=600):
    ck_dir = os.path.join(run_dir, "checkpoints")
    for _ in range(int(timeout / 0.05)):  # a bounded number of polls (a liveness limit, not a timing check)
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        if os.path.isdir(ck_dir):
            done = [int(n) for n in os.listdir(ck_dir) if n.isdigit() and os.path.exists(os.path.join(ck_dir, n, "commit_success.txt"))]
            if done and max(done) >= at_least:
                return max(done)
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def _params(run_dir, step):
    return restore_on_one_device(os.path.join(run_dir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_sigterm_saves_and_sigkill_resumes_from_last_complete_checkpoint(tmp_path):
    data_dir, steps = str(tmp_path / "data"), 400
    straight = str(tmp_path / "straight")
    out = subprocess.run(_cmd(straight, data_dir, steps), env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    run = str(tmp_path / "run")
    # 1) SIGTERM mid-run: a final checkpoint at the step it stopped, exit code 0
    p = subprocess.Popen(_cmd(run, data_dir, steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, 40, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])
    assert summary["stopped"] == "preempted" and summary["steps"] < steps
    assert summary["checkpoints"][-1] == summary["steps"]

    # 2) resume, then SIGKILL mid-run: only complete checkpoints survive
    p = subprocess.Popen(_cmd(run, data_dir, steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = _wait_for_checkpoint(run, summary["steps"] + 40, p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)

    # 3) resume to the end: identical to the straight run
    out = subprocess.run(_cmd(run, data_dir, steps), env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step" in out.stderr
    resumed_from = int(out.stderr.split("resumed from step ")[1].split()[0])
    assert resumed_from >= last
    a, b = _params(run, steps), _params(straight, steps)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    losses = lambda d: [json.loads(r)["loss"] for r in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in r]
    assert losses(run)[-20:] == losses(straight)[-20:]
