"""MQAR against model width (zoology's Fig. 2): the Based composition, the state sizes the table reports, and the
``mqar_width`` sweep task at tiny size."""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax.attention.attention import SlidingWindowAttention
from seqjax.mixers.jrt import JRT
from seqjax.models.lm import LM
from seqjax.tasks.runner import RunConfig, build_model, lm_config, state_size

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import sweep  # noqa: E402


def test_based_alternates_a_three_token_window_and_taylor_linear_attention():
    cfg = lm_config(RunConfig(model="based", d_model=16, num_layers=4), 32)
    assert cfg.layer_names == ("swa", "jrt", "swa", "jrt")
    lm = LM(cfg, rngs=nnx.Rngs(0))
    mixers = [layer.mixer for layer in lm.tail]
    assert [type(m) for m in mixers] == [SlidingWindowAttention, JRT] * 2
    assert all(m.window == 3 for m in mixers[::2])
    assert all((m.prefix_len, m.feature_dim, m.num_heads, m.head_dim) == (0, 16, 1, 16) for m in mixers[1::2])


def test_based_runs_and_is_causal():
    model = build_model(RunConfig(model="based", d_model=16, num_layers=2), 32, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 12)), jnp.int32)
    y = model(x)
    assert y.shape == (2, 12, 32) and bool(jnp.all(jnp.isfinite(y)))
    # with no prefix the linear attention is causal: changing token 7 leaves the logits before it unchanged
    y2 = model(x.at[:, 7].set((x[:, 7] + 1) % 32))
    np.testing.assert_allclose(y2[:, :7], y[:, :7], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(y2[:, 7:] - y[:, 7:]))) > 1e-4


def test_state_sizes_have_their_closed_forms():
    d, t = 32, 64
    kv = lambda slots: 2 * d * slots + 2 * slots + 3  # K and V, each slot's position and segment id, 3 counters
    assert state_size(RunConfig(model="attention", d_model=d), 256, t) == 2 * kv(t)  # 2 layers
    # the 3-token ring buffer, then Based's state: (1 + f + f^2) features x (d values + the normaliser), a counter
    assert state_size(RunConfig(model="based", d_model=d), 256, t) == kv(3) + (1 + 16 + 16**2) * (d + 1) + 1
    # GLA: 2 heads of (d/2 * 0.5) keys x d/2 values per layer
    assert state_size(RunConfig(model="gla", d_model=d), 256, t) == 2 * 2 * (d // 4) * (d // 2)
    assert state_size(RunConfig(model="lstm", d_model=d), 256, t) is None


def test_mqar_width_rows_per_preset():
    s = sweep.SWEEPS["mqar_width"]
    assert s.axis == "d_model"
    cpu = [r for r in s.rows if r.label in s.preset_rows["cpu"]]
    assert sorted({dict(r.options)["d_model"] for r in cpu}) == [32, 64, 128]
    assert {r.model for r in cpu} == {"attention", "based", "mamba2", "gla", "gated_deltanet"} and len(cpu) == 15
    assert sorted({dict(r.options)["d_model"] for r in s.rows if r.label in s.preset_rows["paper"]}) == [64, 128, 256, 512]


def test_mqar_width_two_steps_at_tiny_size(tmp_path):
    recs = sweep.run_sweep("mqar_width", "tiny", only=("attention",), out=str(tmp_path))
    folder = tmp_path / "mqar_width"
    assert {p.name for p in folder.iterdir()} == {"records.jsonl", "table.md", "plot.png"}
    lines = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
    assert len(lines) == len(recs)
    assert {r["row"] for r in lines} == {"attention d=32", "chance", "majority", "copy_last", "bigram"}
    trained = [r for r in lines if r["model"] == "attention"]
    assert trained[-1]["steps"] == 2 and trained[-1]["state_size"] == 2 * 32 * 64 + 2 * 64 + 3  # tiny: one layer
    md = (folder / "table.md").read_text()
    assert "| row | d_model | state size | test | seeds | paper | verdict |" in md
    assert "| attention d=32 | 32 | 4227 |" in md
    assert md.strip() == sweep.table("mqar_width", recs)
