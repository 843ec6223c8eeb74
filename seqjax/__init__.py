"""seqjax: sequence models in JAX / Flax NNX.

Public surface:

- :func:`seqjax.linear_scan` — the diagonal linear-recurrence engine (``seqjax.scan``);
- :mod:`seqjax.mixers` — the registry of sequence mixers (``seqjax.mixers.get(name)``);
- :mod:`seqjax.nn` — shared layers (projections with logical axes, norms, short conv);
- :mod:`seqjax.types` — the axis legend and jaxtyping aliases.
"""

from seqjax import sharding  # noqa: I001  (first: parameters carry logical names as metadata only)
from seqjax import mixers, nn, types
from seqjax.scan import linear_scan

__version__ = "0.1.0"

__all__ = ["linear_scan", "mixers", "nn", "types", "__version__"]
