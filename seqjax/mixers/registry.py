"""The mixer registry and the contract every sequence mixer keeps.

A mixer family lives in one file ``seqjax/mixers/<family>.py`` and registers each of its mixers once at
import time with ``register(MixerSpec(name=..., ...))``. Every module in this package is imported by
:func:`load_all` (so a new mixer is one file plus one test; nothing else to edit).

A functional form ``<fn>`` comes with ``<fn>_recurrent``, ``<fn>_step``, ``<fn>_materialize``,
``<fn>_make_inputs`` (``gla``, ``gla_recurrent``, ...); its input checks are its engine's
``check_<engine>_inputs`` (``seqjax.ops``) or a private ``_check_<fn>_inputs``; a variant
(``mamba_negeig``, ``swa``) shares its family's functions through ``options``, and its layer is a plain
subclass whose ``__init__`` states the changed defaults. What :class:`MixerSpec` holds, and what
``tests/test_mixer_contract.py`` checks for every registered mixer:

``fn(**inputs, h0=None, impl="auto", resets=None, **options) -> (y, h_last)``
    the functional parallel form, callable without Flax. ``inputs`` are arrays with time on axis 1
    (``[b, t, h, d]`` activations, ``[b, t, h]`` scalar gates ...). ``h0``/``h_last`` is the state
    pytree (``[b, h, k, v]`` for matrix states). ``resets`` ``[b, t]`` bool zeroes the carry into
    each document's first token.
``recurrent(**inputs, h0=None, resets=None, **options) -> (y, h_last)``
    the reference: a float32 ``lax.scan`` over time that reads like the paper's equation (softmax
    attention: the plain float32 softmax).
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
    the Flax NNX module: ``layer(d_model, *, rngs, dtype, **hparams)``, owning projections, short convs,
    gates and norms, and calling ``fn``. It keeps the protocol of ``seqjax.layer``::

        y, cache = layer(x, *, segment_ids=None, cache=None)   # x, y: [b, t, d_model]
        cache = layer.init_cache(batch_size, max_len)          # a NamedTuple (a pytree)

    With ``cache=None`` the returned cache is ``None``; with a cache, the layer continues from it
    (prefill with ``t > 1``, decode with ``t == 1``) and returns the updated one. A composite layer
    (Titans' MAG / MAL / MAC: attention and the neural memory) registers only ``layer``: its
    functional parts are registered mixers of their own, and the shared functional tests skip it.
``lm_config``
    fields of the language model's config (``seqjax.models.lm.LMConfig``) the layer takes as keyword
    arguments, e.g. ``("num_heads", "num_kv_heads", "rope_theta", "qk_norm", "window")``; the LM passes
    those that are not ``None``.
``takes_positions``
    whether the layer also takes ``positions=`` ``[b, t]`` (RoPE positions inside each document).
``params``
    names of inputs that have no batch/time axes (e.g. Mamba's ``A`` ``[d, n]``): the shared tests
    slice every other input along time (axis 1).
``impls``
    the parallel impls ``fn`` accepts besides ``"auto"`` that the shared tests compare with the reference
    (``"sequential"`` always means the reference path), e.g. ``("sequential", "chunked")``.
``pallas``
    the platforms (``"gpu"``, ``"tpu"``) on which a Pallas kernel (``pallas_kernels/``) can run the
    recurrence (``impl="pallas"``, or ``"auto"`` where the platform's dispatch takes it).
``context_parallel``
    whether the layer has a context-parallel form (``seqjax.ops.context_parallel``), which it takes when
    the time axis is split over the mesh's ``context`` axis (``seqjax.layer.plan``).
``options``
    keyword options the shared tests pass (e.g. ``{"negative_eigen": True}`` for a variant).
``negative_eigen``
    whether the mixer supports the ``negative_eigen`` flag (Grazzi et al. 2025); mixers that do not
    raise ``ValueError`` if it is set.
``growing_state``
    ``True`` where the state grows with the length (softmax attention keeps every key and value): the
    packed-documents test then compares outputs only (the state also holds the earlier documents).
``quadratic``
    ``True`` where the parallel form holds a ``[T, T]`` score matrix (softmax attention): the
    long-sequence test runs a shorter sequence.

:func:`feature_matrix` renders what the specs say as a markdown table (the README's feature matrix).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import Any

__all__ = ["MixerSpec", "register", "get", "names", "load_all", "feature_matrix"]


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    fn: Callable[..., Any] | None = None
    recurrent: Callable[..., Any] | None = None
    step: Callable[..., Any] | None = None
    make_inputs: Callable[..., dict] | None = None
    layer: type | None = None
    materialize: Callable[..., Any] | None = None
    value_arg: str | None = None
    params: tuple[str, ...] = ()
    impls: tuple[str, ...] = ("sequential",)
    pallas: tuple[str, ...] = ()
    context_parallel: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    negative_eigen: bool = False
    #: False for mixers that look ahead on purpose (JRT's non-causal prefix); the shared causality and
    #: materialize-triangle checks then skip them, and the family's own tests check their structure.
    causal: bool = True
    growing_state: bool = False
    quadratic: bool = False
    lm_config: tuple[str, ...] = ()
    takes_positions: bool = False
    doc: str = ""
    #: the paper's address (the feature matrix links the name to it)
    paper: str = ""
    #: RMS-relative tolerance of the parallel forms against the reference in float32.
    tol: float = 1e-4

    def __post_init__(self):
        functional = (self.fn, self.recurrent, self.step, self.make_inputs)
        if any(f is None for f in functional) and any(f is not None for f in functional):
            raise ValueError(f"mixer {self.name!r}: give all of fn, recurrent, step, make_inputs, or none (a composite layer)")
        if self.fn is None and self.layer is None:
            raise ValueError(f"mixer {self.name!r} has neither a functional form nor a layer")
        unknown = set(self.pallas) - {"gpu", "tpu"}
        if unknown:
            raise ValueError(f"mixer {self.name!r}: pallas platforms must be 'gpu' or 'tpu', got {sorted(unknown)}")

    @property
    def functional(self) -> bool:
        """Whether the mixer has the functional forms (fn, recurrent, step, make_inputs)."""
        return self.fn is not None


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


_COLUMNS = (
    ("reference", lambda s: s.recurrent is not None),
    ("chunked", lambda s: "chunked" in s.impls),
    ("associative", lambda s: "associative" in s.impls),
    ("Pallas GPU", lambda s: "gpu" in s.pallas),
    ("Pallas TPU", lambda s: "tpu" in s.pallas),
    ("decode step", lambda s: s.step is not None),
    ("context parallel", lambda s: s.context_parallel),
    ("negative eigenvalues", lambda s: s.negative_eigen),
    ("materialize", lambda s: s.materialize is not None),
)


def feature_matrix() -> str:
    """A markdown table of every registered mixer x what its spec says it has: a float32 reference,
    chunked and associative parallel forms, Pallas kernels on GPU / TPU, a one-token decode step, a
    context-parallel form, negative eigenvalues, a materialized operator. The README shows it."""
    head = "| mixer | " + " | ".join(c for c, _ in _COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(_COLUMNS) + 1)]
    for n in names():
        spec = get(n)
        name = f"[`{n}`]({spec.paper})" if spec.paper else f"`{n}`"
        if not spec.functional:
            name += " (composite layer)"
        rows.append(f"| {name} | " + " | ".join("✓" if has(spec) else "" for _, has in _COLUMNS) + " |")
    return "\n".join(rows) + "\n"
