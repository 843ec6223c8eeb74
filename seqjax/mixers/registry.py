"""The mixer registry and the contract every sequence mixer keeps.

A mixer family lives in one file ``seqjax/mixers/<family>.py`` and calls :func:`register` once per
mixer at import time. Every module in this package is imported by :func:`load_all` (so a new mixer is
one file plus one test; nothing else to edit).

The contract (what :class:`MixerSpec` holds, and what ``tests/test_mixer_contract.py`` checks for every
registered mixer):

``fn(**inputs, h0=None, impl="auto", resets=None, **options) -> (y, h_last)``
    the functional parallel form, callable without Flax. ``inputs`` are arrays with time on axis 1
    (``[b, t, h, d]`` activations, ``[b, t, h]`` scalar gates ...). ``h0``/``h_last`` is the state
    pytree (``[b, h, k, v]`` for matrix states). ``resets`` ``[b, t]`` bool zeroes the carry into
    each document's first token.
``recurrent(**inputs, h0=None, resets=None, **options) -> (y, h_last)``
    the reference: a float32 ``lax.scan`` over time that reads like the paper's equation.
``step(h, **inputs_t, **options) -> (y_t, h)``
    one token: ``inputs_t`` are the inputs at one time step (time axis removed); ``h=None`` means
    the zero state.
``materialize(**inputs, **options) -> M``
    the mixer as a per-head ``[b, heads, T, T]`` linear operator on input ``value_arg`` (reshaped to
    ``[b, T, heads, -1]``): ``y = einsum("bhts,bshv->bthv", M, x)`` with ``h0 = 0`` (the Dynamical
    Systems Framework view, Sieber et al. 2024). ``None`` where no such operator exists.
``make_inputs(key, batch, time, **kw) -> dict``
    random well-scaled test inputs for the functional forms (used by the shared tests).
``layer``
    the Flax NNX module: ``layer(d_model, *, rngs, **hparams)``, owning projections, short convs,
    gates and norms, and calling ``fn``. Its contract::

        y, cache = layer(x, *, segment_ids=None, cache=None)   # x, y: [b, t, d_model]
        cache = layer.init_cache(batch_size, max_len)          # decode cache pytree

    With ``cache=None`` the returned cache is ``None``; with a cache, the layer continues from it
    (prefill with ``t > 1``, decode with ``t == 1``) and returns the updated one.
``params``
    names of inputs that have no batch/time axes (e.g. Mamba's ``A`` ``[d, n]``): the shared tests
    slice every other input along time (axis 1).
``impls``
    the parallel impls ``fn`` accepts besides ``"auto"`` (``"sequential"`` always means the reference
    path), e.g. ``("sequential", "chunked")``.
``options``
    keyword options the shared tests pass (e.g. ``{"negative_eigen": True}`` for a variant).
``negative_eigen``
    whether the mixer supports the ``negative_eigen`` flag (Grazzi et al. 2025); mixers that do not
    raise ``ValueError`` if it is set.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any, Callable

__all__ = ["MixerSpec", "register", "get", "names", "load_all"]


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    fn: Callable[..., Any]
    recurrent: Callable[..., Any]
    step: Callable[..., Any]
    make_inputs: Callable[..., dict]
    layer: type | None = None
    materialize: Callable[..., Any] | None = None
    value_arg: str | None = None
    params: tuple[str, ...] = ()
    impls: tuple[str, ...] = ("sequential",)
    options: dict = dataclasses.field(default_factory=dict)
    negative_eigen: bool = False
    #: False for mixers that look ahead on purpose (JRT's non-causal prefix); the shared causality and
    #: materialize-triangle checks then skip them, and the family's own tests check their structure.
    causal: bool = True
    doc: str = ""
    #: RMS-relative tolerance of the parallel forms against the reference in float32.
    tol: float = 1e-4


_REGISTRY: dict[str, MixerSpec] = {}
_LOADED = False


def register(spec: MixerSpec) -> MixerSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"mixer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def load_all() -> None:
    """Import every module of ``seqjax.mixers`` so that each registers its mixers."""
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if not mod.name.startswith("_") and mod.name != "registry":
            importlib.import_module(f"seqjax.mixers.{mod.name}")
    _LOADED = True


def get(name: str) -> MixerSpec:
    load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    load_all()
    return sorted(_REGISTRY)
