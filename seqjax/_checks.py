"""Input validation shared by every public function.

Checks run in Python on static shapes and dtypes, before anything is traced into XLA, and raise a
``ValueError`` (shapes, options) or ``TypeError`` (dtypes) that names the argument and what was
expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
COMPLEX_DTYPES = (jnp.complex64, jnp.complex128)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def concrete_or_none(x) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known in Python, ``None`` when it is traced (inside ``jit``,
    ``grad``, ``vmap``): value checks (ranges, ids) run on the first and are the caller's job on the second."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_ndim(name: str, x, ndim: int | Sequence[int], legend: str = "") -> None:
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if np.ndim(x) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        extra = f" {legend}" if legend else ""
        raise ValueError(f"{name} must have {want} dims{extra}, got shape {_fmt(np.shape(x))}")


def check_shape(name: str, x, shape: Sequence, legend: str = "") -> None:
    """``shape`` may contain ``None`` for "any size"."""
    got = tuple(np.shape(x))
    ok = len(got) == len(shape) and all(w is None or w == g for w, g in zip(shape, got))
    if not ok:
        want = _fmt("*" if s is None else s for s in shape)
        extra = f" {legend}" if legend else ""
        raise ValueError(f"{name} must have shape {want}{extra}, got {_fmt(got)}")


def check_dtype(name: str, x, kinds: str = "float") -> None:
    """kinds: 'float', 'complex', 'inexact' (float or complex), 'int', 'bool', 'int_or_bool'."""
    dt = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    ok = {
        "float": jnp.issubdtype(dt, jnp.floating),
        "complex": jnp.issubdtype(dt, jnp.complexfloating),
        "inexact": jnp.issubdtype(dt, jnp.inexact),
        "int": jnp.issubdtype(dt, jnp.integer),
        "bool": dt == jnp.bool_,
        "int_or_bool": jnp.issubdtype(dt, jnp.integer) or dt == jnp.bool_,
    }[kinds]
    if not ok:
        raise TypeError(f"{name} must have a {kinds.replace('_', ' ')} dtype, got {dt}")


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} {_fmt(np.shape(a))}, "
            f"got {_fmt(np.shape(b))}"
        )


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if by <= 0 or value % by:
        raise ValueError(f"{name}={value} must be divisible by {by_name}={by}")


def check_no_negative_eigen(name: str, negative_eigen) -> None:
    """The one message of every mixer without the ``negative_eigen`` flag (Grazzi et al. 2025)."""
    if negative_eigen:
        raise ValueError(
            f"{name} does not support negative_eigen=True (the mixers registered with negative_eigen "
            "support it: mamba, mamba2 and the delta-rule family)"
        )


def check_qkv(q, k, v) -> None:
    """Attention's layout: ``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]``, ``heads % kv_heads == 0``."""
    check_ndim("q", q, 4, "[batch, time, heads, head_dim]")
    check_ndim("k", k, 4, "[batch, time, kv_heads, head_dim]")
    check_same_shape("k", k, "v", v)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")


def check_segment_ids(segment_ids, kv_segment_ids, batch: int, t: int, s: int) -> None:
    """``segment_ids [batch, t]``; ``kv_segment_ids [batch, s]`` only with ``segment_ids`` (default: the
    queries', which needs ``s == t``)."""
    if segment_ids is None:
        if kv_segment_ids is not None:
            raise ValueError("kv_segment_ids needs segment_ids (the queries' documents)")
        return
    check_shape("segment_ids", segment_ids, (batch, t), "[batch, time]")
    if kv_segment_ids is None and s != t:
        raise ValueError(f"segment_ids with {s} keys and {t} queries needs kv_segment_ids [batch, {s}]")
    if kv_segment_ids is not None:
        check_shape("kv_segment_ids", kv_segment_ids, (batch, s), "[batch, keys]")
