"""Flax NNX modules for the nonlinear RNN cells: they own the parameters and call :func:`seqjax.rnn.rnn`.

``RNN(kind, d_in, hidden, heads=G, impl=..., rngs=...)``; ``y, h_last = layer(x, h0=None)`` with ``x``
``[batch, time, d_in]``, ``y`` ``[batch, time, hidden]``, ``h0``/``h_last`` ``[batch, S, hidden]``.
Parameters are float32 ``nnx.Param`` with logical axis names (``seqjax.types.LOGICAL_AXES``).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqjax import sharding  # noqa: F401  (parameters carry logical names as metadata only)
from seqjax.rnn import cells as _cells
from seqjax.rnn.functional import rnn

__all__ = ["RNN", "AXES"]

#: Logical axis names of each parameter (head-wise cells; shPLRNN's latent is ``state``).
AXES = {
    "W": ("embed", "heads", None, "head_dim"),
    "b": ("heads", None, "head_dim"),
    "R": ("heads", "head_dim", None, None),
    "peep": ("heads", None, "head_dim"),
    "tau": ("heads", "head_dim"),
    "bhn": ("heads", "head_dim"),
    "A": ("state",),
    "W1": ("state", "mlp"),
    "W2": ("mlp", "state"),
    "h2": ("mlp",),
}
_PLRNN_AXES = {"W": ("embed", None, None, "state"), "b": (None, None, "state")}


class RNN(nnx.Module):
    """One recurrent layer of cell ``kind`` (see :mod:`seqjax.rnn.cells`).

    Args:
      kind: ``"rnn_tanh" | "rnn_relu" | "leaky" | "lstm" | "gru" | "slstm" | "shplrnn"``.
      d_in, hidden: input and hidden sizes (``hidden = heads * head_dim``).
      heads: number of head-wise blocks of the recurrent matrix (1 = dense).
      impl: ``"sequential" | "parallel" | "pallas"``; ``unroll`` for the sequential scan.
      parallel: options of ``impl="parallel"`` (``mode``, ``tol``, ``max_iters``, ``damping``).
      **cell_kw: ``peepholes``, ``forget_bias``, ``tau_init``, ``plrnn_hidden`` (see ``init_params``).
    """

    def __init__(self, kind: str, d_in: int, hidden: int, *, heads: int = 1, impl: str = "sequential",
                 unroll: int = 1, parallel: dict | None = None, rngs: nnx.Rngs, **cell_kw):
        p = _cells.init_params(kind, rngs.params(), d_in, hidden, heads=heads, **cell_kw)
        self.kind, self.hidden, self.impl, self.unroll = kind, hidden, impl, unroll
        self.parallel = dict(parallel or {})
        self.names = tuple(sorted(p))
        for name in self.names:
            axes = _PLRNN_AXES.get(name, AXES[name]) if kind == "shplrnn" else AXES[name]
            setattr(self, name, nnx.Param(p[name], out_sharding=axes))

    @property
    def num_states(self) -> int:
        return _cells.CELLS[self.kind].num_states

    def param_dict(self) -> dict:
        return {n: getattr(self, n)[...] for n in self.names}

    def init_state(self, batch: int):
        return jnp.zeros((batch, self.num_states, self.hidden), jnp.float32)

    def __call__(self, x, h0=None, *, reverse: bool = False):
        kw = self.parallel if self.impl == "parallel" else {}
        return rnn(self.kind, self.param_dict(), x, h0=h0, impl=self.impl, reverse=reverse,
                   unroll=self.unroll, **kw)
