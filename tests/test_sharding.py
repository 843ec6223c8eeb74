"""Sharding: mesh construction, the logical rules tables, validation and sharded initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from seqjax import mixers
from seqjax import sharding as shd
from seqjax.models.lm import LM, LMConfig

MESHES = [(8, 1, 1, 1), (2, 2, 1, 2), (1, 2, 2, 2), (1, 1, 8, 1)]


def _pattern():
    names = mixers.names()
    return ("mamba2", "attention") if "mamba2" in names else ("attention",)


def _make(d=32, layers=2, **kw):
    cfg = LMConfig(pattern=_pattern(), d_model=d, num_layers=layers, num_heads=4, num_kv_heads=2, mlp_ratio=2.0, **kw)
    return lambda: LM(cfg, rngs=nnx.Rngs(0))


def test_resolve_mesh_shape():
    assert shd.resolve_mesh_shape((1, -1, 1, 1), 8) == (1, 8, 1, 1)
    assert shd.resolve_mesh_shape((2, -1, 1, 2), 8) == (2, 2, 1, 2)
    with pytest.raises(ValueError, match="at most one"):
        shd.resolve_mesh_shape((-1, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        shd.resolve_mesh_shape((3, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="uses 4 devices"):
        shd.resolve_mesh_shape((2, 2, 1, 1), 8)
    with pytest.raises(ValueError, match="one size per axis"):
        shd.resolve_mesh_shape((8,), 8)


def test_logical_to_spec_rules():
    mesh = shd.make_mesh((2, 2, 1, 2))
    notes = []
    assert shd.logical_to_spec(("embed", "mlp"), shd.DEFAULT_RULES, (8, 6), mesh) == P("fsdp", "tensor")
    # kv_heads=3 is not divisible by tensor=2: dropped (replicated), with a note
    assert shd.logical_to_spec(("embed", "kv_heads", None), shd.DEFAULT_RULES, (8, 3, 4), mesh, notes=notes) == P("fsdp", None, None)
    assert notes and "kv_heads=3" in notes[0]
    # activations: batch over (data, fsdp); embed not sharded; size-1 context omitted
    assert shd.logical_to_spec(("batch", "length", "embed"), shd.DEFAULT_RULES, (4, 8, 8), mesh, kind="activations") == P(
        ("data", "fsdp"), None, None
    )
    with pytest.raises(ValueError, match="twice"):
        shd.logical_to_spec(("batch", "embed"), (("batch", ("data", "fsdp")), ("embed", "fsdp")))
    with pytest.raises(ValueError, match="no rule"):
        shd.logical_to_spec(("nonsense",), shd.DEFAULT_RULES)


@pytest.mark.parametrize("shape", MESHES)
def test_rules_complete_and_valid(shape):
    """Every parameter of the LM has logical names that resolve to a divisible, duplicate-free spec."""
    mesh = shd.make_mesh(shape)
    _, abs_params, _ = shd.abstract_params(_make())
    report = shd.validate(abs_params, mesh)
    assert report.unannotated == []
    sh = shd.param_shardings(abs_params, mesh)
    values = nnx.to_pure_dict(abs_params)
    for v, s in zip(jax.tree.leaves(values), jax.tree.leaves(sh)):
        axes = [a for e in s.spec for a in ((e,) if isinstance(e, str) else (e or ()))]
        assert len(axes) == len(set(axes))
        for dim, e in zip(v.shape, tuple(s.spec) + (None,) * (len(v.shape) - len(s.spec))):
            ax = (e,) if isinstance(e, str) else (e or ())
            assert dim % math.prod(mesh.shape[a] for a in ax) == 0
    model_axes = mesh.shape["fsdp"] * mesh.shape["context"] * mesh.shape["tensor"]
    if model_axes > 1:  # fsdp/context/tensor meshes shard (almost) everything
        assert report.replicated_fraction < 0.05
        assert report.max_shard_fraction < 0.6
    else:
        assert report.replicated_fraction == 1.0
    with pytest.raises(ValueError, match="unsharded"):
        shd.validate(abs_params, shd.make_mesh((1, 1, 1, 8)), tolerance=-1.0)


def test_sharded_init_matches_plain_init():
    mesh = shd.make_mesh((1, 4, 1, 2))
    make = _make()
    _, params, _, shardings = shd.sharded_init(make, mesh)
    ref = nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[1])  # eager: differs from jit by an ulp
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(ref), jax.tree.leaves(shardings)):
        assert a.sharding == s
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    emb = params["embed"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (256 // 2, 32 // 4)


def test_constrain_outside_and_inside_rules():
    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    assert shd.constrain(x, ("batch", "length", "embed")) is x
    mesh = shd.make_mesh((2, 4, 1, 1))

    @jax.jit
    def f(x):
        return shd.constrain(x * 2, ("batch", "length", "embed"))

    with shd.use_rules(mesh, shd.DEFAULT_RULES):
        y = f(x)
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    with shd.use_rules(mesh, shd.DEFAULT_RULES), pytest.raises(ValueError, match="do not match"):
        shd.constrain(x, ("batch", "length"))
