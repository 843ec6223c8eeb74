"""Flash attention everywhere: the blocked plain-JAX form, the splash kernel, the backend choice, context
parallelism, and no ``[b, h, T, T]`` float32 buffer in a training step at T = 2048 on the CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from seqjax import sharding as shd
from seqjax.attention.attention import Attention
from seqjax.models.lm import LM, LMConfig
from seqjax.ops.attention import attention, attention_reference, choose_impl, make_mask
from seqjax.ops.context_parallel import attention_context_parallel
from seqjax.ops.flash import flash_attention
from seqjax.ops.splash import splash_attention
from seqjax.train.config import OptimConfig
from seqjax.train.run import score_buffers, step_score_buffers
from seqjax.train.step import Trainer


def _qkv(key, b, t, s, h, kvh, d, dtype=jnp.float32):
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (b, t, h, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d)).astype(dtype)
    return q, k, v


def _segments(b, s, seed=0):
    """Packed documents: sorted ids, with a document starting at several block edges."""
    return jnp.asarray(np.sort(np.random.RandomState(seed).randint(0, 4, (b, s)), axis=1), jnp.int32)


def _reference(q, k, v, *, causal=True, window=None, seg=None, kseg=None, offset=0):
    t, s = q.shape[1], k.shape[1]
    mask = make_mask((offset + jnp.arange(t))[None], jnp.arange(s)[None], q_seg=seg,
                     k_seg=seg if kseg is None else kseg, window=window, causal=causal)
    return attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)


def _values_and_grads(f, g, args, tol):
    np.testing.assert_allclose(jax.jit(f)(*args), g(*args), rtol=tol, atol=tol)
    loss = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), argnums=(0, 1, 2))
    for a, b in zip(jax.jit(loss(f))(*args), loss(g)(*args)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


BLOCKED_CASES = {  # b, t, s, h, kvh, d, causal, window, packed, offset, block
    "T1": (2, 1, 1, 2, 1, 8, True, None, False, 0, None),
    "T63-gqa-odd-d": (2, 63, 63, 4, 2, 5, True, None, False, 0, 16),
    "T257-window-packed": (2, 257, 257, 3, 1, 7, True, 20, True, 0, 32),
    "T257-one-block": (1, 257, 257, 2, 2, 8, True, None, False, 0, None),
    "offset-keys-longer": (2, 40, 100, 2, 2, 8, True, None, True, 60, 16),
    "offset-window": (1, 24, 96, 4, 1, 6, True, 30, False, 72, 8),
    "noncausal-packed": (1, 33, 33, 2, 2, 4, False, None, True, 0, 8),
}


@pytest.mark.parametrize("case", sorted(BLOCKED_CASES))
def test_blocked_attention_matches_reference_values_and_grads(case):
    b, t, s, h, kvh, d, causal, window, packed, offset, block = BLOCKED_CASES[case]
    q, k, v = _qkv(jax.random.PRNGKey(len(case)), b, t, s, h, kvh, d)
    kseg = _segments(b, s) if packed else None
    seg = None if kseg is None else kseg[:, offset : offset + t]
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window, segment_ids=seg, kv_segment_ids=kseg,
                                        q_offset=offset, block_q=block, block_k=block)
    g = lambda q, k, v: _reference(q, k, v, causal=causal, window=window, seg=seg, kseg=kseg, offset=offset)
    _values_and_grads(f, g, (q, k, v), 2e-5)


def test_blocked_attention_takes_a_traced_offset():
    """Context parallelism passes ``axis_index * t_local``: the offset is a traced scalar there."""
    q, k, v = _qkv(jax.random.PRNGKey(3), 1, 16, 64, 2, 1, 8)
    f = jax.jit(lambda q, k, v, off: flash_attention(q, k, v, q_offset=off, block_q=8, block_k=8))
    for off in (0, 21, 48):
        np.testing.assert_allclose(f(q, k, v, off), _reference(q, k, v, offset=off), rtol=2e-5, atol=2e-5)


def test_blocked_attention_bf16_accumulates_in_float32():
    """bf16 in, bf16 out; against the float32 reference on the same (rounded) inputs the error is bf16's
    rounding of P and of the output, not an accumulation error that grows with T."""
    q, k, v = _qkv(jax.random.PRNGKey(4), 2, 257, 257, 4, 2, 16, jnp.bfloat16)
    seg = _segments(2, 257, seed=1)
    f = lambda q, k, v: flash_attention(q, k, v, window=100, segment_ids=seg, block_q=32, block_k=32)
    out = jax.jit(f)(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = _reference(q, k, v, window=100, seg=seg)
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
    dq = jax.grad(lambda q: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2))(q)
    dq_ref = jax.grad(lambda q: jnp.sum(_reference(q, k, v, window=100, seg=seg) ** 2))(q.astype(jnp.float32))
    assert dq.dtype == jnp.bfloat16
    np.testing.assert_allclose(dq.astype(jnp.float32), dq_ref, rtol=5e-2, atol=5e-2)


def test_attention_entry_point_runs_each_backend_on_the_same_mask():
    q, k, v = _qkv(jax.random.PRNGKey(5), 2, 40, 40, 4, 2, 8)
    seg = _segments(2, 40)
    want = attention(q, k, v, segment_ids=seg, window=9, impl="reference")
    for impl in ("xla", "blocked", None):
        np.testing.assert_allclose(attention(q, k, v, segment_ids=seg, window=9, impl=impl), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="not an explicit mask"):
        attention(q, k, v, mask=jnp.ones((1, 1, 40, 40), bool), impl="blocked")


@pytest.mark.parametrize("window", [None, 5])
def test_attention_entry_point_puts_fewer_queries_at_the_end_of_the_keys(window):
    """t < s without segment ids: query i is key position s - t + i in every backend (not top-left aligned)."""
    q, k, v = _qkv(jax.random.PRNGKey(6), 1, 4, 12, 2, 2, 8)
    want = _reference(q, k, v, window=window, offset=8)
    for impl in ("reference", "xla", "blocked", None):
        np.testing.assert_allclose(attention(q, k, v, window=window, impl=impl), want, rtol=2e-5, atol=2e-5)


def test_attention_entry_points_reject_bad_window_shapes_and_lone_kv_segments():
    """The functions' own checks (the tests' beartype hook would catch bad shapes first: unwrap it, as on an
    install without the test extras)."""
    q, k, v = _qkv(jax.random.PRNGKey(7), 1, 8, 8, 2, 1, 8)
    seg = jnp.zeros((1, 8), jnp.int32)
    for f in (attention, getattr(splash_attention, "__wrapped__", splash_attention),
              getattr(flash_attention, "__wrapped__", flash_attention)):
        with pytest.raises(ValueError, match="window"):
            f(q, k, v, window=0)
        with pytest.raises(ValueError, match="kv_segment_ids needs segment_ids"):
            f(q, k, v, kv_segment_ids=seg)
        with pytest.raises(ValueError, match=re.escape("q must have 4 dims")):
            f(q[0], k, v)
    for f in (attention, getattr(splash_attention, "__wrapped__", splash_attention)):
        with pytest.raises(ValueError, match=re.escape("v must have the same shape as k")):
            f(q, k, v[:, :4])
        with pytest.raises(ValueError, match="must be a multiple of kv heads"):
            f(q[:, :, :1], k[:, :, :1].repeat(2, axis=2), v[:, :, :1].repeat(2, axis=2))
        with pytest.raises(ValueError, match=re.escape("segment_ids must have shape [1, 8]")):
            f(q, k, v, segment_ids=seg[:, :5])


BF16, F32 = jnp.bfloat16, jnp.float32
DISPATCH = [  # platform, dtype, t, s, head_dim, flags, expected
    ("gpu", BF16, 4096, 4096, 128, {}, "cudnn"),
    ("gpu", BF16, 4096, 4096, 64, {"window": True}, "cudnn"),
    ("gpu", BF16, 64, 64, 64, {}, "cudnn"),
    ("gpu", F32, 4096, 4096, 128, {}, "blocked"),  # cuDNN takes bf16 / fp16 only
    ("gpu", BF16, 4096, 4096, 256, {}, "blocked"),  # head dim > 128
    ("gpu", BF16, 4096, 4096, 100, {}, "blocked"),  # head dim not a multiple of 8
    ("gpu", BF16, 4096, 4096, 128, {"segments": True}, "blocked"),
    ("gpu", BF16, 256, 256, 128, {"segments": True}, "xla"),
    ("gpu", BF16, 1, 4096, 128, {}, "blocked"),  # queries at an offset: no cuDNN
    ("gpu", BF16, 4096, 4096, 128, {"explicit_mask": True}, "xla"),
    ("tpu", BF16, 4096, 4096, 128, {"segments": True, "window": True}, "splash"),
    ("tpu", F32, 512, 512, 64, {}, "splash"),
    ("tpu", BF16, 511, 511, 128, {}, "xla"),
    ("tpu", BF16, 1, 4096, 128, {}, "blocked"),
    ("tpu", BF16, 4096, 4096, 128, {"explicit_mask": True}, "xla"),
    ("cpu", F32, 2048, 2048, 64, {"segments": True}, "blocked"),
    ("cpu", F32, 512, 512, 64, {}, "blocked"),
    ("cpu", F32, 511, 511, 64, {}, "xla"),
    ("cpu", BF16, 8192, 8192, 64, {"explicit_mask": True}, "xla"),
]


@pytest.mark.parametrize("platform,dtype,t,s,d,flags,expected", DISPATCH)
def test_choose_impl_picks_the_flash_backend_of_each_platform(platform, dtype, t, s, d, flags, expected):
    assert choose_impl(platform, dtype, (2, t, 8, d), (2, s, 8, d), **flags) == expected


def _jaxpr_has_custom_vjp(f, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(f)(*args))


def test_attention_impl_none_on_cpu_is_blocked_from_the_threshold_on():
    short = _qkv(jax.random.PRNGKey(0), 1, 64, 64, 2, 2, 8)
    long = _qkv(jax.random.PRNGKey(0), 1, 512, 512, 2, 2, 8)
    assert not _jaxpr_has_custom_vjp(lambda *a: attention(*a), *short)
    assert _jaxpr_has_custom_vjp(lambda *a: attention(*a), *long)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_attention_matches_reference_on_a_gpu(window):
    """bf16, head dim 128, GQA: ``impl=None`` takes cuDNN on a GPU; values and gradients against the
    float32 reference on the same inputs (bf16 tolerances)."""
    q, k, v = _qkv(jax.random.PRNGKey(11), 2, 512, 512, 4, 2, 128, jnp.bfloat16)
    assert choose_impl("gpu", q.dtype, q.shape, k.shape, window=window is not None) == "cudnn"
    f = lambda q, k, v: attention(q, k, v, window=window).astype(jnp.float32)
    _values_and_grads(f, lambda q, k, v: _reference(q, k, v, window=window), (q, k, v), 3e-2)


# ------------------------------------------------------------------------------------------- splash
SPLASH_CASES = {  # b, t, h, kvh, d, window, packed
    "causal-gqa-padded": (2, 200, 4, 2, 64, None, False),
    "window-packed": (1, 256, 2, 1, 32, 50, True),
}


@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_splash_attention_matches_reference_in_interpret_mode(case):
    b, t, h, kvh, d, window, packed = SPLASH_CASES[case]
    q, k, v = _qkv(jax.random.PRNGKey(6), b, t, t, h, kvh, d)
    seg = _segments(b, t, seed=2) if packed else None
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, window=window, segment_ids=seg, interpret=True))(q, k, v)
    np.testing.assert_allclose(out, _reference(q, k, v, window=window, seg=seg), rtol=2e-5, atol=2e-5)


def test_splash_attention_gradients_in_interpret_mode():
    q, k, v = _qkv(jax.random.PRNGKey(7), 1, 128, 128, 2, 1, 16)
    seg = _segments(1, 128, seed=3)
    f = lambda q, k, v: splash_attention(q, k, v, segment_ids=seg, interpret=True)
    _values_and_grads(f, lambda q, k, v: _reference(q, k, v, seg=seg), (q, k, v), 2e-5)


# ---------------------------------------------------------------------------------- context parallel
@pytest.mark.parametrize("impl", ["blocked", None])
def test_context_parallel_blocked_matches_unsharded(impl):
    """Four context shards x two tensor shards; the blocked form gets each shard's query offset. At T = 32,
    ``impl=None`` keeps XLA on the CPU; at T = 1024 (:func:`test_context_parallel_auto_is_blocked_at_long_t`)
    it takes the blocked form."""
    mesh = shd.make_mesh((1, 1, 4, 2))
    q, k, v = _qkv(jax.random.PRNGKey(8), 2, 32, 32, 4, 2, 8)
    seg = jnp.asarray(1 + (np.arange(32)[None] >= np.array([[7], [16]])), jnp.int32)  # a document starts at a shard edge
    cp = lambda q, k, v: attention_context_parallel(q, k, v, mesh=mesh, segment_ids=seg, impl=impl)
    _values_and_grads(cp, lambda q, k, v: _reference(q, k, v, seg=seg), (q, k, v), 2e-5)


def test_context_parallel_auto_is_blocked_at_long_t():
    mesh = shd.make_mesh((1, 1, 4, 2))
    q, k, v = _qkv(jax.random.PRNGKey(9), 1, 1024, 1024, 2, 2, 8)
    cp = lambda q, k, v: attention_context_parallel(q, k, v, mesh=mesh)
    assert _jaxpr_has_custom_vjp(cp, q, k, v)
    np.testing.assert_allclose(jax.jit(cp)(q, k, v), _reference(q, k, v), rtol=2e-5, atol=2e-5)


def test_context_parallel_splash_matches_unsharded_in_interpret_mode():
    """The splash kernel built for the whole ``[T, T]`` mask, its query blocks split over four ``context``
    devices (interpret mode on the CPU devices)."""
    mesh = shd.make_mesh((1, 1, 4, 1), devices=jax.devices()[:4])
    q, k, v = _qkv(jax.random.PRNGKey(10), 1, 512, 512, 2, 1, 16)
    seg = _segments(1, 512, seed=4)
    out = jax.jit(lambda q, k, v: attention_context_parallel(q, k, v, mesh=mesh, segment_ids=seg, impl="splash"))(q, k, v)
    np.testing.assert_allclose(out, _reference(q, k, v, seg=seg), rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------- no [b, h, T, T] float32 buffer
_f32_square_buffers = score_buffers  # every float32 [.., T, T] shape in compiled HLO


def _layer_grad_hlo(t: int, impl) -> str:
    layer = Attention(32, num_heads=2, num_kv_heads=1, impl=impl, rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)

    def loss(params, x, seg):
        y, _ = nnx.merge(graph, params)(x, segment_ids=seg)
        return jnp.mean(y**2)

    x = jax.ShapeDtypeStruct((1, t, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, seg).compile().as_text()


def test_training_step_at_2k_has_no_float32_score_matrix():
    """The gradient of a packed attention layer at T = 2048 with the CPU's automatic backend (blocked): no
    float32 array with two dims of 2048 anywhere in the compiled program. The XLA path has them (the check
    can fail)."""
    assert _f32_square_buffers(_layer_grad_hlo(2048, None), 2048) == []
    assert _f32_square_buffers(_layer_grad_hlo(2048, "xla"), 2048)


def _lm_trainer(pattern, attention_impl=None) -> Trainer:
    cfg = LMConfig(pattern=pattern, d_model=64, num_layers=len(pattern), num_heads=2, num_kv_heads=2, mlp_ratio=2.0,
                   mixer_kwargs={"attention": {"impl": attention_impl}} if attention_impl else {})
    return Trainer(lambda: LM(cfg, rngs=nnx.Rngs(0)), shd.make_mesh((1, 1, 1, 1), jax.devices()[:1]), OptimConfig(), 10)


def test_an_activation_as_wide_as_T_is_not_a_score_buffer():
    """Mamba-2's ``d_inner = 2 d_model`` = 128 = T (as 8192 in the 8b preset at T = 8192): its ``[b, T, d_inner]``
    activations have a score matrix's shape in the compiled step (``hlo`` stands for that). The step traced at
    3T = 384 (2T = 256 is the vocabulary, a parameter dim) computes no float32 array with two dims of 384, so
    none is a score buffer; with an XLA attention layer it does, and they stay listed."""
    hlo = "%convert = f32[2,128,128]{2,1,0} convert(bf16[2,128,128]{2,1,0} %slice)"
    assert score_buffers(hlo, 128) == ["2,128,128"]
    found = step_score_buffers(_lm_trainer(("mamba2",)), hlo, 2, 128)
    assert found == {"f32_score_buffers": [], "f32_square_shapes": ["2,128,128"], "score_check_len": 384}
    found = step_score_buffers(_lm_trainer(("mamba2", "attention"), "xla"), hlo, 2, 128)
    assert found["f32_score_buffers"] == ["2,128,128"]
    assert step_score_buffers(_lm_trainer(("mamba2",)), hlo, 2, 256) == {"f32_score_buffers": []}  # not a width


# -------------------------------------------------------------------------- compiled for a TPU (libtpu)
TOPOLOGY = "v5e:2x2"
MOSAIC = 'custom_call_target="tpu_custom_call"'


@pytest.fixture(scope="module")
def tpus():
    pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu: pip install 'jax[tpu]' (Linux x86-64)")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices


@pytest.mark.parametrize("d,window,packed", [(128, None, False), (64, 256, True)], ids=["d128-causal", "d64-window-packed"])
def test_splash_forward_and_backward_compile_for_tpu(tpus, d, window, packed):
    """Forward and the fused backward (dq, dk, dv in one kernel) compiled by libtpu's Mosaic compiler for a
    TPU v5e, bf16, GQA 4:2, a length that is padded (1000 -> 1024)."""
    sh = SingleDeviceSharding(tpus[0])
    q = jax.ShapeDtypeStruct((2, 1000, 4, d), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, d), jnp.bfloat16, sharding=sh)
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32, sharding=sh)

    def loss(q, k, v, seg):
        o = splash_attention(q, k, v, window=window, segment_ids=seg if packed else None, interpret=False)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile().as_text()
    assert hlo.count(MOSAIC) == 2  # forward, fused backward


def test_attention_layer_under_a_tpu_mesh_takes_splash_with_context_parallelism(tpus):
    """The attention layer's gradient under ``use_rules`` on a TPU v5e 2x2 mesh with time split 4 ways over
    ``context``: ``impl=None`` takes the splash kernel per shard (query blocks split over ``context``)."""
    mesh = shd.make_mesh((1, 1, 4, 1), devices=tpus)
    layer = Attention(256, num_heads=4, num_kv_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=rep), params)
    x = jax.ShapeDtypeStruct((2, 2048, 256), jnp.bfloat16, sharding=rep)
    seg = jax.ShapeDtypeStruct((2, 2048), jnp.int32, sharding=rep)

    def loss(params, x, seg):
        y, _ = nnx.merge(graph, params)(x, segment_ids=seg)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    with shd.use_rules(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(params, x, seg).compile().as_text()
    assert hlo.count(MOSAIC) == 2
    assert _f32_square_buffers(hlo, 2048) == []


def test_attention_layer_under_a_data_tensor_tpu_mesh_runs_splash_per_device(tpus):
    """Without context parallelism (data 2 x tensor 2 on a TPU v5e 2x2) the splash kernel runs inside
    ``shard_map``, one batch row and one kv head per device (libtpu refuses to partition a Mosaic kernel
    under a plain multi-device ``jit``)."""
    mesh = shd.make_mesh((2, 1, 1, 2), devices=tpus)
    layer = Attention(256, num_heads=4, num_kv_heads=2, window=128, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=rep), params)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((2, 1024, 256), jnp.bfloat16, sharding=rows)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32, sharding=rows)

    def loss(params, x, seg):
        y, _ = nnx.merge(graph, params)(x, segment_ids=seg)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    with shd.use_rules(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(params, x, seg).compile().as_text()
    assert hlo.count(MOSAIC) == 2
