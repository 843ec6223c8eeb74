"""seqjax: sequence models in JAX / Flax NNX.

Public surface:

- :func:`seqjax.linear_scan` — the diagonal linear-recurrence engine (``seqjax.scan``);
- :mod:`seqjax.mixers` — the registry of sequence mixers (``seqjax.mixers.get(name)``);
- :mod:`seqjax.nn` — shared layers (projections with logical axes, norms, short conv);
- :mod:`seqjax.types` — the axis legend and jaxtyping aliases.

``mixers`` and ``linear_scan`` load on first access, so that a low module (``seqjax.sharding``, which the
kernels in ``pallas_kernels`` import) never pulls the layers above it in.
"""

import importlib

# sharding sets, on import, that parameters carry logical axis names as metadata only (before any is made)
from seqjax import nn, sharding, types

__version__ = "0.1.0"

__all__ = ["linear_scan", "mixers", "nn", "sharding", "types", "__version__"]


def __getattr__(name):
    if name == "mixers":
        return importlib.import_module("seqjax.mixers")
    if name == "linear_scan":
        return importlib.import_module("seqjax.scan").linear_scan
    raise AttributeError(f"module 'seqjax' has no attribute {name!r}")
