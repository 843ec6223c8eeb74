"""Metrics: bits per byte, MFU arithmetic, and the analytic FLOP count checked against XLA."""

import math

import jax
import pytest
from flax import nnx

from seqjax import sharding as shd
from seqjax.models.lm import LM, LMConfig
from seqjax.train import metrics as M
from seqjax.train.config import OptimConfig
from seqjax.train.step import Trainer


def test_bits_per_byte_and_mfu():
    assert M.bits_per_byte(math.log(2.0)) == pytest.approx(1.0)
    assert M.bits_per_byte(math.log(256.0)) == pytest.approx(8.0)  # uniform over bytes
    assert M.mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.125)
    assert M.peak_flops(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})()) == 989e12


def test_analytic_flops_match_xla_cost_analysis():
    """6N + attention + recurrence terms vs XLA's count of the compiled train step (unscanned layers:
    XLA counts a while-loop body once)."""
    cfg = LMConfig(pattern=("mamba2", "attention"), d_model=64, num_layers=2, num_heads=4, mlp_ratio=4.0, scan_layers=False)
    make = lambda: LM(cfg, rngs=nnx.Rngs(0))
    b, t = 4, 64
    tr = Trainer(make, shd.make_mesh((1, 1, 1, 1), jax.devices()[:1]), OptimConfig(), total_steps=10)
    _, _, info = tr.compile(b, t, with_eval=False)
    f = M.flops_per_token(nnx.eval_shape(make), tr.abstract_params, t)
    assert f["mixing"] > 0.1 * f["total"]  # both the attention and the SSD terms are counted
    ratio = f["total"] * b * t / info["flops"]
    assert 0.85 < ratio < 1.1, ratio


def test_throughput_skips_the_dispatch_only_first_tick():
    """The first tick after a (re)start only starts the clock: an async dispatch returns at once, and
    averaging that interval reported several hundred percent MFU early in the default run."""
    ticks = iter([0.001, 1.001, 2.001, 10.0, 11.0, 12.0])  # the ticks' times (reset_clock reads no clock)
    thr = M.Throughput(tokens_per_step=1000, flops_per_step=1e9, num_devices=1, peak=1e10, clock=lambda: next(ticks))
    thr.reset_clock()
    for _ in range(3):  # step 1 dispatched right after the (re)start, then two 1 s steps
        thr.tick()
    assert thr.avg == pytest.approx(1.0) and thr.tokens_per_s == pytest.approx(1000.0)
    assert thr.mfu == pytest.approx(0.1)
    thr.reset_clock()  # e.g. after an evaluation: the 8 s gap is not a step
    for _ in range(3):
        thr.tick()
    assert thr.avg == pytest.approx(1.0)
