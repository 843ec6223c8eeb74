r"""Wrappers: bidirectional and stacked (deep) RNNs, functional and NNX.

Bidirectional (Schuster & Paliwal 1997): a forward and a backward run,
:math:`y_t = [\overrightarrow{h}_t ; \overleftarrow{h}_t]` (``merge="concat"``) or their sum. The backward
run is ``rnn(..., reverse=True)``, which equals flipping the input, running forward and flipping back.

Stacked (deep) RNN: layer ``l`` reads layer ``l-1``'s outputs; ``h0``/``h_last`` are per-layer lists (for a
bidirectional layer, a ``(forward, backward)`` pair).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqjax import _checks
from seqjax.rnn.functional import rnn
from seqjax.rnn.layers import RNN

__all__ = ["bidirectional", "stacked", "Bidirectional", "StackedRNN"]


def _merge(yf, yb, merge):
    _checks.check_choice("merge", merge, ("concat", "sum"))
    return jnp.concatenate([yf, yb], axis=-1) if merge == "concat" else yf + yb


def bidirectional(kind, params_fwd, params_bwd, x, *, h0=None, merge="concat", **kw):
    """``(y [b, t, 2H] (concat) or [b, t, H] (sum), (h_last_fwd, h_last_bwd))``;
    ``h0`` is ``None`` or a ``(fwd, bwd)`` pair of ``[b, S, H]`` carries."""
    h0f, h0b = (None, None) if h0 is None else h0
    yf, hf = rnn(kind, params_fwd, x, h0=h0f, **kw)
    yb, hb = rnn(kind, params_bwd, x, h0=h0b, reverse=True, **kw)
    return _merge(yf, yb, merge), (hf, hb)


def stacked(kind, params_list, x, *, h0=None, **kw):
    """Deep unidirectional RNN: ``(y of the last layer, [h_last per layer])``."""
    h0 = [None] * len(params_list) if h0 is None else list(h0)
    if len(h0) != len(params_list):
        raise ValueError(f"h0 must be a list of {len(params_list)} per-layer carries, got {len(h0)}")
    hs = []
    for p, h in zip(params_list, h0):
        x, h_last = rnn(kind, p, x, h0=h, **kw)
        hs.append(h_last)
    return x, hs


class Bidirectional(nnx.Module):
    """Forward and backward :class:`RNN` of the same shape; ``y, (h_fwd, h_bwd) = layer(x, h0=None)``."""

    def __init__(self, kind: str, d_in: int, hidden: int, *, merge: str = "concat", rngs: nnx.Rngs, **kw):
        _checks.check_choice("merge", merge, ("concat", "sum"))
        self.fwd = RNN(kind, d_in, hidden, rngs=rngs, **kw)
        self.bwd = RNN(kind, d_in, hidden, rngs=rngs, **kw)
        self.merge = merge
        self.out_features = 2 * hidden if merge == "concat" else hidden

    def __call__(self, x, h0=None):
        h0f, h0b = (None, None) if h0 is None else h0
        yf, hf = self.fwd(x, h0f)
        yb, hb = self.bwd(x, h0b, reverse=True)
        return _merge(yf, yb, self.merge), (hf, hb)


class StackedRNN(nnx.Module):
    """``num_layers`` RNN layers (optionally bidirectional, with dropout between layers).

    ``y, h_last = model(x, h0=None)``: ``h_last`` is a list with one carry per layer.
    """

    def __init__(self, kind: str, d_in: int, hidden: int, num_layers: int, *, bidirectional: bool = False,
                 dropout: float = 0.0, rngs: nnx.Rngs, **kw):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers = []
        for _ in range(num_layers):
            layer = (Bidirectional(kind, d_in, hidden, rngs=rngs, **kw) if bidirectional
                     else RNN(kind, d_in, hidden, rngs=rngs, **kw))
            layers.append(layer)
            d_in = 2 * hidden if bidirectional else hidden
        self.layers = nnx.List(layers) if hasattr(nnx, "List") else layers
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.out_features = d_in

    def __call__(self, x, h0=None):
        n = len(self.layers)
        h0 = [None] * n if h0 is None else list(h0)
        if len(h0) != n:
            raise ValueError(f"h0 must be a list of {n} per-layer carries, got {len(h0)}")
        hs = []
        for i, (layer, h) in enumerate(zip(self.layers, h0)):
            if i > 0 and self.dropout is not None:
                x = self.dropout(x)
            x, h_last = layer(x, h)
            hs.append(h_last)
        return x, hs
