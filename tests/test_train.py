"""The sharded train step: 1 device vs 8 fake devices, gradient accumulation, resume on another mesh,
the NaN guard."""

import jax
import numpy as np
import pytest
from _train_utils import STEPS, batches, compiled, host, put, run

from seqjax.train.checkpoint import Checkpointer
from seqjax.train.step import NonFiniteError, check_finite

REF = (1, 1, 1, 1)


@pytest.fixture(scope="module")
def reference():
    losses, state = run(REF, 1, None, range(3))
    return losses, host(state)


@pytest.mark.parametrize("shape,accum", [((2, 2, 1, 2), 1), ((1, 4, 2, 1), 2)])
def test_eight_devices_match_one(reference, shape, accum):
    """Same losses and params after 3 AdamW steps on 1 device and on 8 (data/fsdp/context/tensor),
    with and without gradient accumulation (token-weighted loss)."""
    ref_losses, ref_state = reference
    losses, state = run(shape, accum, None, range(3))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(host(state["params"])), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert int(state["step"]) == 3


def test_resume_on_another_mesh_equals_straight_run(tmp_path):
    """N steps straight == N/2 steps, checkpoint, drop everything, restore on another mesh, N/2 steps."""
    n = STEPS
    straight, s_state = run(REF, 1, None, range(n))
    first, state = run(REF, 1, None, range(n // 2))
    ck = Checkpointer(str(tmp_path / "ck"), every=1, keep=2)
    ck.save(n // 2, state, {"note": "half"})
    ck.close()
    saved = host(state)
    del state

    other = (2, 2, 1, 2)
    tr, _ = compiled(other)
    ck = Checkpointer(str(tmp_path / "ck"), every=1, keep=2)
    state, meta = ck.restore(tr.abstract_state())
    assert meta == {"note": "half"} and ck.latest() == n // 2
    for a, b in zip(jax.tree.leaves(host(state)), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)  # restore is exact
    second, state = run(other, 1, state, range(n // 2, n))
    np.testing.assert_allclose(first + second, straight, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(host(state)), jax.tree.leaves(host(s_state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_nan_guard_leaves_state_unchanged():
    tr, step = compiled(REF)
    state = tr.init_state()
    before = host(state)
    bad = dict(batches()[0])
    bad["weights"] = bad["weights"].copy()
    bad["weights"][0, 0] = np.nan
    state, m = step(state, put(tr, bad))
    assert int(m["finite"]) == 0
    for a, b in zip(jax.tree.leaves(host(state["params"])), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(host(state["opt"])), jax.tree.leaves(before["opt"])):
        np.testing.assert_array_equal(a, b)
    m = host(m)
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 1"):
        check_finite(m, 1, "raise")
    assert check_finite(m, 1, "skip") is False
    # the next good step trains normally
    state, m = step(state, put(tr, batches()[1]))
    assert int(m["finite"]) == 1 and np.isfinite(float(m["loss"]))


def test_compile_topology_without_libtpu_says_what_to_install(monkeypatch):
    """``--compile_topology`` (``tests/test_tpu_compile.py`` compiles with it) names the missing package."""
    import importlib.util

    from seqjax.train import config, run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"compile_topology='v5e:2x2' needs libtpu: pip install 'jax\[tpu\]'"):
        run.compile_for_topology(config.TrainConfig(compile_topology="v5e:2x2"))
