"""Test setup: 8 fake CPU devices (for sharding tests), strict rank promotion, float32 matmuls.

The device count must be fixed before JAX initialises its backend, hence at import time here. Eight
host devices cost nothing to computations that use one of them.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

# libtpu (tests/test_tpu_compile.py compiles for a TPU topology without one) takes a lockfile per host
# unless told otherwise; the pytest-xdist workers each load it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
# The suite is compile-bound (tiny shapes, many distinct programs): XLA's backend optimisation level 0 and
# no expensive LLVM passes cut compile time by about a third on the 2-core CI machine; the programs run
# a little slower, which tiny shapes never notice. Numerics are unchanged (no fast-math either way).
jax.config.update("jax_disable_most_optimizations", True)

# The engines' jaxtyping shape annotations (seqjax.ops) are checked at every call in the tests, by beartype
# (a test extra); this must run before anything imports seqjax.ops.
try:
    import beartype  # noqa: F401
except ImportError:  # a bare install without the test extras: no shape checks
    pass
else:
    from jaxtyping import install_import_hook

    install_import_hook("seqjax.ops", "beartype.beartype")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# Tests listed in tests/slow_tests.txt (node ids, measured over ~10 s each on a 2-core CPU) join the
# `slow` tier, so the default command stays within CI's budget; `pytest -m slow` runs them.
_SLOW_FILE = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    if not os.path.exists(_SLOW_FILE) or os.environ.get("SEQJAX_NO_SLOW_LIST"):
        return
    with open(_SLOW_FILE) as f:
        slow = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
