"""The contract every registered mixer keeps (see ``seqjax/mixers/registry.py``).

Parametrized over the registry: parallel forms equal the reference on values, final states and every
gradient; split-and-carry equals one run; step-by-step decoding equals the parallel form; causality;
``materialize`` equals the forward pass; packed documents equal separate runs; bf16 stays close to
float32; the layer's prefill and decode equal its forward pass. What a spec says it lacks (no functional
form for a composite layer, a state that grows with the length) is read from the spec, never from a name.
Per-mixer tests (decay extremes, special cases) live in each family's own test file.
"""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from seqjax import mixers
from seqjax import sharding as shd
from seqjax.nn import rms_rel_err

NAMES = mixers.names()
FUNCTIONAL = [n for n in NAMES if mixers.get(n).functional]
B = 2
# small values for the LM config fields a layer takes (``MixerSpec.lm_config``)
LM_FIELDS = dict(num_heads=2, num_kv_heads=1, rope_theta=10000.0, qk_norm=True, window=4)


def _spec(name):
    return mixers.get(name)


def _checked(f):
    """``f`` with its jaxtyping shape annotations checked at each call (beartype, a test extra)."""
    beartype = pytest.importorskip("beartype")
    return jaxtyping.jaxtyped(typechecker=beartype.beartype)(f)


def _time_slice(spec, inputs, sl):
    return {k: (v if k in spec.params else v[:, sl]) for k, v in inputs.items()}


def _at(spec, inputs, t):
    return {k: (v if k in spec.params else v[:, t]) for k, v in inputs.items()}


def _h0(spec, key):
    """A non-trivial initial state: the final state of a short reference run."""
    inputs = spec.make_inputs(key, B, 5)
    return spec.recurrent(**inputs, **spec.options)[1]


def _close(x, y, tol, what):
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(xs) == len(ys), what
    for a, b in zip(xs, ys):
        assert a.shape == b.shape, (what, a.shape, b.shape)
        assert np.all(np.isfinite(np.asarray(a, np.complex64 if np.iscomplexobj(a) else np.float32))), what
        err = rms_rel_err(a, b)
        assert err <= tol, f"{what}: rms-rel err {err:.2e} > {tol:.0e}"


def _float_leaves(tree):
    return jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.inexact), tree)


def _inexact(x):
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _loss_and_grads(f, inputs, h0, key):
    """Gradients of a random linear functional of (y, h_last) w.r.t. float inputs and the float leaves of
    h0 (a state may also hold integer or boolean leaves, e.g. which keys are still visible)."""
    diff = {k: v for k, v in inputs.items() if _inexact(v)}
    fixed = {k: v for k, v in inputs.items() if k not in diff}
    leaves, treedef = jax.tree.flatten(h0)
    pos = [i for i, x in enumerate(leaves) if _inexact(x)]
    y, hl = f(**inputs, h0=h0)
    ky, kh = jax.random.split(key)
    wy = jax.random.normal(ky, y.shape, jnp.float32)
    wh = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(jax.random.split(kh, 8), jax.tree.leaves(hl))]

    def loss(diff, h0_float):
        full = list(leaves)
        for i, x in zip(pos, h0_float):
            full[i] = x
        y, hl = f(**diff, **fixed, h0=jax.tree.unflatten(treedef, full))
        out = jnp.sum(jnp.real(y.astype(jnp.complex64 if jnp.iscomplexobj(y) else jnp.float32)) * wy)
        for w, x in zip(wh, jax.tree.leaves(hl)):
            if _inexact(x):
                out = out + jnp.sum(jnp.real(x) * w)
        return out

    return jax.grad(loss, argnums=(0, 1))(diff, [leaves[i] for i in pos])


@pytest.mark.parametrize("name", FUNCTIONAL)
@pytest.mark.parametrize("t", [1, 63, 257])
def test_parallel_equals_reference(name, t):
    spec = _spec(name)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(t), 3)
    inputs = spec.make_inputs(k1, B, t)
    h0 = _h0(spec, k2)
    ref = functools.partial(spec.recurrent, **spec.options)
    y_ref, h_ref = ref(**inputs, h0=h0)
    g_ref = _loss_and_grads(ref, inputs, h0, k3)
    for impl in spec.impls:
        f = functools.partial(spec.fn, impl=impl, **spec.options)
        y, h = f(**inputs, h0=h0)
        _close(y, y_ref, spec.tol, f"{name}/{impl} y")
        _close(h, h_ref, spec.tol, f"{name}/{impl} h_last")
        g = _loss_and_grads(f, inputs, h0, k3)
        _close(g, g_ref, 10 * spec.tol, f"{name}/{impl} grads")


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_forms_match_their_shape_annotations(name):
    """fn, recurrent, step and materialize carry jaxtyping shape annotations (``seqjax.types``' legend), and
    a call checked against them passes: a wrong annotation fails here. The check needs shapes and dtypes
    only, so the calls are traced (``jax.eval_shape``), never compiled."""
    spec = _spec(name)
    forms = [f for f in (spec.fn, spec.recurrent, spec.step, spec.materialize) if f is not None]
    for f in forms:
        assert "return" in f.__annotations__, f"{f.__name__} has no shape annotations"

    def traced(form, /, *args, **kw):  # positional-only: mLSTM and LightNet have an input named ``f``
        return jax.eval_shape(functools.partial(_checked(form), **spec.options), *args, **kw)

    t = 3
    inputs = spec.make_inputs(jax.random.PRNGKey(12), B, t)
    resets = jnp.zeros((B, t), bool).at[:, 1].set(True)
    _, h = traced(spec.recurrent, **inputs, resets=resets)
    traced(spec.fn, **inputs, h0=h, resets=resets)
    traced(spec.step, h, **_at(spec, inputs, 0))
    traced(spec.step, None, **_at(spec, inputs, 0))
    if spec.materialize is not None:
        traced(spec.materialize, **inputs)


@pytest.mark.parametrize(
    "name, arg, wrong",
    [
        ("gla", "v", lambda v: v[:1]),  # batch 1 against q's 2
        ("mamba2", "A", lambda a: a[:-1]),  # a parameter: one head short
        ("lru", "x", lambda x: x[..., None]),  # an extra axis
    ],
)
def test_shape_annotations_reject_a_wrong_shape(name, arg, wrong):
    """The checked call of the previous test is not vacuous: a wrong shape fails the check before the body."""
    spec = _spec(name)
    inputs = spec.make_inputs(jax.random.PRNGKey(13), B, 3)
    inputs[arg] = wrong(inputs[arg])
    with pytest.raises(jaxtyping.TypeCheckError):
        jax.eval_shape(functools.partial(_checked(spec.fn), **spec.options), **inputs)


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_split_and_carry(name):
    spec = _spec(name)
    t, cut = 70, 33
    inputs = spec.make_inputs(jax.random.PRNGKey(1), B, t)
    for impl in spec.impls:
        f = functools.partial(spec.fn, impl=impl, **spec.options)
        y, h = f(**inputs)
        y1, h1 = f(**_time_slice(spec, inputs, slice(0, cut)))
        y2, h2 = f(**_time_slice(spec, inputs, slice(cut, None)), h0=h1)
        _close(jnp.concatenate([y1, y2], axis=1), y, spec.tol, f"{name}/{impl} split y")
        _close(h2, h, spec.tol, f"{name}/{impl} split h_last")


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_step_decoding_equals_parallel(name):
    spec = _spec(name)
    t = 17
    inputs = spec.make_inputs(jax.random.PRNGKey(2), B, t)
    h0 = _h0(spec, jax.random.PRNGKey(3))
    y_par, h_par = spec.fn(**inputs, h0=h0, **spec.options)
    step = jax.jit(functools.partial(spec.step, **spec.options))
    h, ys = h0, []
    for i in range(t):
        y_t, h = step(h, **_at(spec, inputs, i))
        ys.append(y_t)
    _close(jnp.stack(ys, axis=1), y_par, spec.tol, f"{name} step y")
    _close(h, h_par, spec.tol, f"{name} step h_last")


@pytest.mark.parametrize("name", [n for n in FUNCTIONAL if _spec(n).causal])
def test_causal(name):
    spec = _spec(name)
    t, p = 24, 11
    inputs = spec.make_inputs(jax.random.PRNGKey(4), B, t)
    pert = spec.make_inputs(jax.random.PRNGKey(5), B, t)
    mixed = {
        k: v if k in spec.params else v.at[:, p:].set(pert[k][:, p:]) for k, v in inputs.items()
    }
    y, _ = spec.fn(**inputs, **spec.options)
    y2, _ = spec.fn(**mixed, **spec.options)
    np.testing.assert_allclose(np.asarray(y2[:, :p], np.float32), np.asarray(y[:, :p], np.float32), rtol=0, atol=0)
    assert float(jnp.max(jnp.abs(y2[:, p:] - y[:, p:]))) > 0  # and the change does reach the future


@pytest.mark.parametrize("name", [n for n in NAMES if _spec(n).materialize is not None])
def test_materialize_equals_forward(name):
    spec = _spec(name)
    t = 29
    inputs = spec.make_inputs(jax.random.PRNGKey(6), B, t)
    y, _ = spec.fn(**inputs, **spec.options)
    m = spec.materialize(**inputs, **spec.options)
    x = inputs[spec.value_arg]
    if x.ndim == 5:  # DeltaProduct: M [b, h, T, T, n_h] on each token's n_h values
        assert m.shape[:4] == (B, x.shape[2], t, t) and m.shape[4] == x.shape[3], m.shape
        y_m = jnp.einsum("bhtsj,bshjv->bthv", m, x.astype(m.dtype)).reshape(y.shape)
        upper = jnp.triu(jnp.moveaxis(m, 4, 2), k=1)
    elif m.ndim == 5:  # MIMO (LRU, S5): M [b, T, T, H_out, H_in], y_t = sum_s M[t, s] x_s
        assert m.shape[:3] == (B, t, t) and m.shape[3:] == (x.shape[-1],) * 2, m.shape
        y_m = jnp.einsum("btsoi,bsi->bto", m, x.astype(m.dtype))
        upper = m * jnp.triu(jnp.ones((t, t)), k=1)[None, :, :, None, None]
    else:
        assert m.shape[0] == B and m.shape[2:] == (t, t), m.shape
        xh = x.reshape(B, t, m.shape[1], -1)
        y_m = jnp.einsum("bhts,bshv->bthv", m, xh.astype(m.dtype)).reshape(y.shape)
        upper = jnp.triu(m, k=1)
    _close(y_m, y, spec.tol, f"{name} materialize")
    # causal operator: nothing from the future (strictly upper triangle in time) is read
    if spec.causal:
        assert float(jnp.max(jnp.abs(upper))) == 0.0


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_resets_equal_separate_documents(name):
    spec = _spec(name)
    ta, tb = 13, 20
    inputs = spec.make_inputs(jax.random.PRNGKey(7), B, ta + tb)
    resets = jnp.zeros((B, ta + tb), bool).at[:, 0].set(True).at[:, ta].set(True)
    h0 = _h0(spec, jax.random.PRNGKey(8))
    for impl in spec.impls:
        f = functools.partial(spec.fn, impl=impl, **spec.options)
        y, h = f(**inputs, h0=h0, resets=resets)
        ya, _ = f(**_time_slice(spec, inputs, slice(0, ta)))
        yb, hb = f(**_time_slice(spec, inputs, slice(ta, None)))
        _close(y, jnp.concatenate([ya, yb], axis=1), spec.tol, f"{name}/{impl} packed y")
        if not spec.growing_state:
            _close(h, hb, spec.tol, f"{name}/{impl} packed h_last")


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_bf16_close_to_float32(name):
    spec = _spec(name)
    inputs = spec.make_inputs(jax.random.PRNGKey(9), B, 40)
    low = {
        k: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 and k not in spec.params else v
        for k, v in inputs.items()
    }
    y, _ = spec.fn(**inputs, **spec.options)
    y16, _ = spec.fn(**low, **spec.options)
    assert y16.dtype == jnp.bfloat16 or jnp.iscomplexobj(y16) or y16.dtype == y.dtype
    _close(y16.astype(y.dtype), y, 5e-2, f"{name} bf16")


@pytest.mark.parametrize("name", NAMES)
def test_layer_runs_and_decodes(name):
    """The NNX layer: forward is finite; prefill + one-token decode equals the full forward."""
    from flax import nnx

    spec = _spec(name)
    if spec.layer is None:
        pytest.fail(f"{name} has no layer")
    layer = spec.layer(24, rngs=nnx.Rngs(0), **{f: LM_FIELDS[f] for f in spec.lm_config})
    x = jax.random.normal(jax.random.PRNGKey(10), (B, 9, 24))
    y, cache = _checked(type(layer).__call__)(layer, x)  # and its shape annotations hold
    assert cache is None and y.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(y)))
    cache = layer.init_cache(B, 16)
    y_pre, cache = layer(x[:, :6], cache=cache)
    outs = [y_pre]
    for i in range(6, 9):
        y_i, cache = layer(x[:, i : i + 1], cache=cache)
        outs.append(y_i)
    _close(jnp.concatenate(outs, axis=1), y, 1e-4, f"{name} layer decode")


@pytest.mark.parametrize("name", NAMES)
def test_context_parallel_flag_is_what_the_layer_does(name):
    """Under a mesh whose ``context`` axis splits time 4 ways, the layer takes its context-parallel form (the
    shards' summaries or keys all-gathered over ``context``) exactly where its spec says ``context_parallel``."""
    from flax import nnx

    spec = _spec(name)
    layer = spec.layer(16, rngs=nnx.Rngs(0), **{f: LM_FIELDS[f] for f in spec.lm_config})
    graphdef, state = nnx.split(layer)
    with shd.use_rules(shd.make_mesh((2, 1, 4, 1)), shd.DEFAULT_RULES):
        program = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x)[0])(state, jnp.zeros((B, 32, 16)))
    assert ("all_gather" in str(program)) == spec.context_parallel


@pytest.mark.slow
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_long_sequence_finite(name):
    spec = _spec(name)
    inputs = spec.make_inputs(jax.random.PRNGKey(11), 1, 4096 if spec.quadratic else 16384)
    y, h = jax.jit(functools.partial(spec.fn, **spec.options))(**inputs)
    assert bool(jnp.all(jnp.isfinite(jnp.abs(y))))
    assert all(bool(jnp.all(jnp.isfinite(jnp.abs(x)))) for x in jax.tree.leaves(h))


def test_readme_feature_matrix_is_the_registry_s():
    """The README's feature matrix is ``seqjax.mixers.feature_matrix()`` (regenerate it with
    ``python -c "from seqjax import mixers; print(mixers.feature_matrix())"``)."""
    import pathlib

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    begin, end = "<!-- feature-matrix -->\n", "<!-- /feature-matrix -->"
    assert begin in text and end in text, "README.md lacks the feature-matrix markers"
    block = text[text.index(begin) + len(begin) : text.index(end)]
    assert block.strip() == mixers.feature_matrix().strip()
