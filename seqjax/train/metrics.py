"""Training metrics: bits per byte, tokens/s and MFU from an analytic FLOP count.

FLOPs per trained token (forward + backward = 3 x forward), counted per layer:

- every matrix parameter ``W`` (``ndim >= 2``, i.e. projections, MLP, the LM head; depthwise conv taps
  too, whose cost per token is also ``2 * size``) costs ``2 * |W|`` forward per token, hence the
  classic ``6 N`` (Kaplan et al. 2020). The embedding lookup is free, unless the table is tied and
  doubles as the head (then it is counted once).
- each softmax-attention layer adds the score and value products: ``2 * 2 * T * H * Dh`` forward per
  token with the full ``T x T`` product, as XLA computes it (``12 L T d`` in PaLM's form).
- each chunked linear-recurrence layer adds its intra-chunk and state products per head:
  ``2 C (Dk + Dv) + 4 Dk Dv`` forward per token (chunk ``C``), read from the layer's attributes where
  it has them (:func:`recurrence_flops`).

This is checked against XLA's ``cost_analysis()['flops']`` of the compiled train step on a tiny model
(``tests/test_train_metrics.py``), so the MFU printed by ``experiments/pretrain.py`` can be trusted
(the flame#7 trap: a transformer formula applied to a hybrid gives MFU > 100%).

MFU = analytic FLOPs per second / (devices x peak FLOP/s per device). The peak comes from the
device kind (H100/H200: 989e12 dense bf16) or, on CPU, from a measured float32 matmul
(:func:`measured_peak_flops`), so CPU "MFU" means "fraction of this machine's matmul throughput".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["bits_per_byte", "matmul_params", "flops_per_token", "peak_flops", "measured_peak_flops", "mfu", "Throughput"]

LN2 = math.log(2.0)

PEAK_FLOPS = {  # dense bf16 per chip
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v4": 275e12,
}


def bits_per_byte(loss_nats: float, bytes_per_token: float = 1.0) -> float:
    """Cross entropy in nats per token -> bits per byte (byte-level tokens: ``loss / ln 2``)."""
    return float(loss_nats) / LN2 / bytes_per_token


def matmul_params(params: dict, *, tied_embedding: bool = True, embedding_key: str = "embed") -> int:
    """Number of parameters that take part in a matmul (``ndim >= 2``), see the module docstring."""
    n = 0
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        if len(p.shape) < 2:
            continue
        top = getattr(path[0], "key", None)
        if top == embedding_key and not tied_embedding:
            continue  # a pure lookup
        n += math.prod(p.shape)
    return n


def _attention_dims(layer):
    return getattr(layer, "num_heads", None), getattr(layer, "head_dim", None)


def recurrence_flops(layer, seq_len: int) -> float:
    """Forward FLOPs per token of a layer's sequence-mixing core (beyond its projections)."""
    name = type(layer).__name__.lower()
    if "attention" in name:
        h, dh = _attention_dims(layer)
        if h and dh:
            # XLA computes the full T x T product even with a window or a causal mask
            return 4.0 * seq_len * h * dh
        return 0.0
    h = getattr(layer, "num_heads", None) or getattr(layer, "nheads", None)
    dk = (getattr(layer, "d_state", None) or getattr(layer, "state_size", None) or getattr(layer, "head_k_dim", None)
          or getattr(layer, "key_dim", None))
    dv = getattr(layer, "head_dim", None) or getattr(layer, "head_v_dim", None) or getattr(layer, "value_dim", None)
    c = getattr(layer, "chunk_size", 64)
    if h and dk and dv:
        return float(h) * (2.0 * c * (dk + dv) + 4.0 * dk * dv)
    return 0.0


def _mixers(model: nnx.Module):
    """Every sequence-mixer submodule (the ``mixer`` of each residual ``Layer``), with multiplicity."""
    out = []
    for path, node in nnx.iter_graph(model):
        if path and path[-1] == "mixer":
            reps = 1
            if "blocks" in path:  # stacked (scanned) super-blocks
                reps = getattr(model, "num_repeats", 1) or 1
            out.append((node, reps))
    return out


def flops_per_token(model: nnx.Module, params: dict, seq_len: int, *, tied_embedding: bool = True) -> dict:
    """Analytic training FLOPs per token: ``{"matmul", "mixing", "total"}`` (forward x 3)."""
    dense = 2.0 * matmul_params(params, tied_embedding=tied_embedding)
    mixing = sum(reps * recurrence_flops(m, seq_len) for m, reps in _mixers(model))
    return {"matmul": 3 * dense, "mixing": 3 * mixing, "total": 3 * (dense + mixing)}


def peak_flops(device=None) -> float | None:
    """Peak dense FLOP/s of one device from its kind, or ``None`` if unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for k, v in PEAK_FLOPS.items():
        if k in kind:
            return v
    return None


def measured_peak_flops(n: int = 512, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an ``n x n`` matmul on the default device (the CPU's practical peak)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2.0 * n**3 * repeats / (time.perf_counter() - t)


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, peak: float) -> float:
    return flops_per_step / max(seconds_per_step, 1e-12) / (num_devices * peak)


class Throughput:
    """Exponential moving average of step time -> tokens/s and MFU.

    Steps are dispatched asynchronously, so the first tick after a (re)start measures only a dispatch, not
    a step: it starts the clock and is not averaged (averaged, it would put the bar's MFU far above 100% for
    the first steps). ``clock``: seconds as a float (tests pass their own ticks).
    """

    def __init__(self, tokens_per_step: int, flops_per_step: float, num_devices: int, peak: float | None, decay=0.9,
                 clock: Callable[[], float] = time.perf_counter):
        self.tokens, self.flops, self.devices, self.peak, self.decay = tokens_per_step, flops_per_step, num_devices, peak, decay
        self.clock = clock
        self.avg = None
        self.last = None

    def tick(self, n_steps: int = 1):
        now = self.clock()
        if self.last is not None:
            dt = (now - self.last) / max(n_steps, 1)
            self.avg = dt if self.avg is None else self.decay * self.avg + (1 - self.decay) * dt
        self.last = now

    def reset_clock(self):
        self.last = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.avg if self.avg else float("nan")

    @property
    def mfu(self) -> float:
        return mfu(self.flops, self.avg, self.devices, self.peak) if (self.avg and self.peak) else float("nan")


def summarize(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
