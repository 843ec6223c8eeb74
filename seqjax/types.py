"""The axis legend used everywhere in seqjax, as jaxtyping aliases.

Letters (in shape strings and einsum subscripts):

- ``b`` batch, ``t``/``s`` time (always axis 1 of activations), ``h`` heads,
- ``k`` key / state-row dim, ``v`` value dim, ``d`` model or channel dim,
- ``n`` SSM state size, ``c`` chunk length, ``g`` B/C groups and ``p`` head dim (Mamba-2),
- ``j`` Householder steps per token (DeltaProduct), ``kvh`` key/value heads (GQA).

Signatures read like specs: inputs are ``Float[AnyArray, "b t h k"]`` (JAX or NumPy arrays), outputs
``Float[Array, "b t h v"]``. A single decode step drops ``t``; parameters without batch or time axes
(Mamba's ``A [d, n]``) carry only their own letters.

Layouts:

- activations ``[batch, time, heads, dim]`` (or ``[batch, time, dim]`` for per-channel mixers);
- matrix states ``[batch, heads, k, v]``; diagonal states ``[batch, *channels]``;
- scalar gates ``[b, t, h]``, per-channel gates ``[b, t, h, k]``; decays live in log space, float32;
- packed sequences carry ``segment_ids`` ``[b, t]`` (int, equal ids = same document) or
  ``resets`` ``[b, t]`` (bool, ``True`` at the first token of each document).

Logical axis names for parameters and activations (mapped to mesh axes by one rules table in
``seqjax.sharding``): see ``LOGICAL_AXES``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Bool, Complex, Float, Inexact, Int, Shaped

__all__ = [
    "Array",
    "Bool",
    "Complex",
    "Float",
    "Inexact",
    "Int",
    "Shaped",
    "AnyArray",
    "PyTree",
    "LOGICAL_AXES",
    "Activations",
    "MatrixState",
    "ScalarGate",
    "ChannelGate",
    "SegmentIds",
    "Resets",
    "ResetsLike",
    "Hidden",
    "Operator",
    "Cache",
]

PyTree = Any
#: what the engines take: JAX arrays (and tracers) or NumPy arrays, e.g. ``Float[AnyArray, "b t h k"]``
AnyArray = jax.Array | np.ndarray

Activations = Float[Array, "b t h d"]
MatrixState = Float[Array, "b h k v"]
ScalarGate = Float[Array, "b t h"]
ChannelGate = Float[Array, "b t h k"]
SegmentIds = Int[Array, "b t"]
Resets = Bool[Array, "b t"]
#: what the functional forms take as ``resets``: bool (or 0/1) ``[b, t]``, JAX or NumPy
ResetsLike = Shaped[AnyArray, "b t"]
#: a sequence layer's input and output ``[batch, time, d_model]``
Hidden = Float[Array, "b t d"]
#: a mixer's ``materialize``: the per-head ``[b, heads, T, T]`` linear operator on its value input
Operator = Float[Array, "b h t t"]
#: a layer's decode cache: a NamedTuple of arrays (a pytree), ``None`` without one
Cache = Any

#: Logical axis names. Layers annotate parameters with these (``nnx.with_partitioning``), and
#: ``seqjax.sharding`` maps each to a mesh axis (or to nothing).
LOGICAL_AXES = (
    "batch",  # activations: global batch
    "length",  # activations: time
    "embed",  # model width
    "heads",  # attention / mixer heads (query heads)
    "kv_heads",  # key/value heads (GQA)
    "head_dim",  # per-head feature dim
    "mlp",  # MLP hidden width
    "vocab",  # vocabulary
    "state",  # SSM state size n
    "conv",  # short-convolution taps
    "layers",  # stacked (scanned) layers
)


def is_complex(x: jax.Array) -> bool:
    return jax.numpy.iscomplexobj(x)
