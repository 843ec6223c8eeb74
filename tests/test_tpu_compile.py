"""The Mosaic TPU kernels compile for a TPU — on a machine without one.

libtpu (``pip install 'jax[tpu]'``; in the test extras on Linux x86-64) compiles for a TPU *topology* with no
TPU attached (``jax.experimental.topologies.get_topology_desc``, as MaxText's ``train_compile`` does). Then
``.compile()`` runs libtpu's own Mosaic compiler on every ``pallas_call``: layouts, alignment, the ops that
generation supports, and whether each kernel's VMEM fits. That is the step ``tests/test_pallas_lowering.py``'s
``jax.export`` stops short of. Nothing runs; each kernel's test file checks the values in interpret mode.
``python benchmarks/tpu_compile.py`` does the same for TPU v4, v5e, v5p and v6e and more shapes.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu: pip install 'jax[tpu]' (Linux x86-64)")

from jax.experimental import topologies

from pallas_kernels.delta_chunk import delta_chunk
from pallas_kernels.gla_chunk import gla_chunk_pallas
from pallas_kernels.linear_scan.kernel import linear_scan_pallas
from pallas_kernels.mlstm_chunk import mlstm_chunk
from seqjax import rnn as R
from seqjax import sharding as shd
from tests.test_pallas_lowering import _grad

TOPOLOGY = "v5e:2x2"  # TPU v5 lite, 2x2 chips: 16 MiB of scoped VMEM per kernel by default
MOSAIC = 'custom_call_target="tpu_custom_call"'


@pytest.fixture(scope="module")
def tpus():
    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices


def _kernels_compiled(f, *args) -> int:
    """Compile ``f`` for the devices ``args`` carry; the number of Mosaic kernels in the compiled program."""
    return jax.jit(f).lower(*args).compile().as_text().count(MOSAIC)


KW = dict(chunk_size=64, interpret=False, backend="mosaic_tpu")
CHUNKED = {  # kernel: (forward and gradient, number of pallas_calls)
    "gla": (lambda q, v, g: gla_chunk_pallas(q, q, v, g, **KW), 4),  # forward, states, state grads, chunk grads
    "gla_channel": (lambda q, v, g: gla_chunk_pallas(q, q, v, jnp.zeros(q.shape, jnp.float32) + g[..., None], **KW),
                    8),  # forward (3), then intra, states, state grads, chunk grads, dv
    "delta": (lambda q, v, g: delta_chunk(q, q, v, g + 1.0, g, **KW), 8),  # forward (3), WY + X, states, grads (3)
    "mlstm": (lambda q, v, g: mlstm_chunk(q, q, v, g, g, **KW), 6),  # forward (2), states, rows, grads (2)
}


@pytest.mark.parametrize("kernel", sorted(CHUNKED))
@pytest.mark.parametrize("dk,dv,t,dtype", [(128, 128, 256, jnp.bfloat16), (20, 9, 257, jnp.float32)],
                         ids=["bf16-d128", "f32-odd"])
def test_chunked_kernels_compile_for_tpu(tpus, kernel, dk, dv, t, dtype):
    """Forward and every gradient kernel, at the benchmark head dims (bf16) and at odd ones with a ragged
    last chunk (float32, padded inside)."""
    sh = SingleDeviceSharding(tpus[0])
    q = jax.ShapeDtypeStruct((2, t, 2, dk), dtype, sharding=sh)
    v = jax.ShapeDtypeStruct((2, t, 2, dv), dtype, sharding=sh)
    g = jax.ShapeDtypeStruct((2, t, 2), jnp.float32, sharding=sh)
    f, n = CHUNKED[kernel]
    assert _kernels_compiled(_grad(f), q, v, g) == n


def test_linear_scan_and_fused_rnn_compile_for_tpu(tpus):
    sh = SingleDeviceSharding(tpus[0])
    a = jax.ShapeDtypeStruct((2, 257, 300), jnp.float32, sharding=sh)
    h0 = jax.ShapeDtypeStruct((2, 300), jnp.float32, sharding=sh)
    scan = lambda a, b, h0: jnp.sum(linear_scan_pallas(a, b, h0, interpret=False)[0] ** 2)
    assert _kernels_compiled(jax.grad(scan, argnums=(0, 1, 2)), a, a, h0) == 2  # forward, transposed scan
    # the fused cells under a TPU mesh: the kernels take the mesh's platform (pallas_kernels._util.platform)
    x = jax.ShapeDtypeStruct((2, 9, 3), jnp.float32, sharding=sh)
    for kind in ("lstm", "gru", "slstm", "rnn_tanh"):  # peephole rows, reset gate, stabiliser, one gate
        p = jax.eval_shape(lambda kind=kind: R.init_params(kind, jax.random.PRNGKey(0), 3, 12, heads=2))
        p = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), p)
        loss = lambda p, x, kind=kind: jnp.sum(R.rnn(kind, p, x, impl="pallas")[0] ** 2)
        with shd.use_rules(shd.make_mesh((1, 1, 1, 1), devices=tpus[:1])):
            assert _kernels_compiled(jax.grad(loss, argnums=(0, 1)), p, x) == 2, kind  # forward, reverse time


def test_lm_train_step_with_kernels_compiles_for_a_tpu_slice():
    """``experiments/pretrain.py --compile_topology=v5e:2x2`` (``seqjax.train.run.compile_for_topology``) with a
    hybrid LM whose mixers all take ``impl="pallas"``: the whole train step (forward, backward, AdamW) and the
    eval step compiled for four TPU v5e chips as data 2 x tensor 2. The kernels run inside ``shard_map``
    (``seqjax._platform.kernel_call``) and take their Mosaic TPU bodies from the mesh's platform."""
    from seqjax.models.lm import LM, LMConfig
    from seqjax.train import config, run

    pattern = ("gla", "gated_deltanet", "mlstm", "mamba2", "attention")
    # pallas_calls of forward and backward, as above; GLA's layer has per-channel decays, and XLA shares the
    # backward's recomputed intra-chunk matrices and states with the forward's: 8 - 2
    kernels = {"gla": 6, "gated_deltanet": 8, "mlstm": 6, "mamba2": 4}

    def make():
        cfg = LMConfig(pattern=pattern, d_model=64, num_layers=len(pattern), num_heads=2, num_kv_heads=2,
                       mlp_ratio=2.0, mixer_kwargs={n: {"impl": "pallas"} for n in kernels})
        return LM(cfg, rngs=nnx.Rngs(0))

    cfg = config.TrainConfig(compile_topology=TOPOLOGY, mesh=(2, 1, 1, 2), steps=10)
    cfg.data.global_batch, cfg.data.seq_len = 4, 128
    info = run.compile_for_topology(cfg, make)
    assert (info["fits"], info["chips"], info["device_kind"], info["mesh"]["tensor"]) == (True, 4, "TPU v5 lite", 2)
    assert info["pallas_kernels"] == sum(kernels.values())
    assert 0 < info["total_bytes"] < 64 * 2**20  # per chip, of 16 GiB


@pytest.mark.slow
def test_compile_topology_tells_an_activation_as_wide_as_T_from_a_score_buffer():
    """A one-layer Mamba-2 LM at d_model 64 and T = 128 compiled for the slice: its ``d_inner = 128`` equals T (as
    8192 does in the 8b preset), so the step holds float32 ``[b, T, d_inner]`` arrays with two dims of T. They are
    listed as ``f32_square_shapes``, not as ``f32_score_buffers``: the step traced at 3T computes no float32
    ``[.., 3T, 3T]`` array."""
    from seqjax.models.lm import LM, LMConfig
    from seqjax.train import config, run

    make = lambda: LM(LMConfig(pattern=("mamba2",), d_model=64, num_layers=1, num_heads=2, num_kv_heads=2), rngs=nnx.Rngs(0))
    cfg = config.TrainConfig(compile_topology=TOPOLOGY, mesh=(4, 1, 1, 1), steps=10)
    cfg.data.global_batch, cfg.data.seq_len = 4, 128
    info = run.compile_for_topology(cfg, make)
    assert info["f32_square_shapes"] and info["f32_score_buffers"] == []
    assert info["score_check_len"] == 384  # 2T = 256 is the vocabulary


def test_compile_topology_names_a_bad_topology():
    from seqjax.train import config, run

    with pytest.raises(ValueError, match="compile_topology='v9:2x2' is not a TPU topology"):
        run.compile_for_topology(config.TrainConfig(compile_topology="v9:2x2"))
