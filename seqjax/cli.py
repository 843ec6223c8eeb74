"""Command lines from dataclasses, parsed by tyro: one parser for pretraining, the task experiments and the
benchmarks.

``parse(Config, argv, presets=PRESETS)`` reads ``--preset=<name>`` first, takes that preset's config as the
defaults and lets every other option override it. Options are ``--key=value`` (or ``--key value``), nested
fields dotted (``--model.d_model=256``); tyro gives ``--help``, the types, and the errors: an unknown or
malformed option exits with status 2 and a message that names it. Value forms beyond tyro's own:

- ``bool``: ``--key=true|false`` (also ``yes|no``, ``on|off``, ``1|0``); a bare ``--key`` is true;
- ``tuple[int | float | str | Literal[...], ...]``: comma-separated, ``--mesh=1,-1,1,1``,
  ``--model.pattern=mamba2,attention`` (space-separated, ``--mesh 1 -1 1 1``, works too);
- ``dict[str, dict[str, ...]]`` (an LM's ``mixer_kwargs``): one option per entry,
  ``--model.mixer_kwargs.gla.chunk_size=128``, or ``NAME.KEY=VALUE`` items,
  ``--model.mixer_kwargs gla.chunk_size=128 gla.impl=chunked``; the entries of all such options are merged.
  A value reads as an int, else a float, else ``true``/``false``, else a string.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

__all__ = ["parse", "REGISTRY"]

T = TypeVar("T")

REGISTRY = ConstructorRegistry()
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _to_bool(tokens: list[str]) -> bool:
    if not tokens:
        return True
    v = tokens[0].lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise ValueError(f"expected true or false, got {tokens[0]!r}")


def _to_scalar(s: str) -> int | float | bool | str:
    for tp in (int, float):
        try:
            return tp(s)
        except ValueError:
            pass
    return s.lower() == "true" if s.lower() in ("true", "false") else s


def _to_nested_dict(tokens: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        name, dot, sub = key.partition(".")
        if not (eq and dot and name and sub):
            raise ValueError(f"expected NAME.KEY=VALUE, got {tok!r}")
        out.setdefault(name, {})[sub] = _to_scalar(value)
    return out


@REGISTRY.primitive_rule
def _bool_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type is not bool:
        return None
    return PrimitiveConstructorSpec(nargs=(0, 1), metavar="{true,false}", instance_from_str=_to_bool,
                                    is_instance=lambda x: isinstance(x, bool),
                                    str_from_instance=lambda b: [str(b).lower()])


def _element(tp) -> Callable[[str], Any] | None:
    """``str -> tp`` for a tuple's element type: int, float, str or a ``Literal`` of strings."""
    if tp in (int, float, str):
        return tp
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
    if not choices or not all(isinstance(c, str) for c in choices):
        return None

    def read(s: str) -> str:
        if s not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}")
        return s

    return read


@REGISTRY.primitive_rule
def _tuple_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    args = typing.get_args(info.type)
    if typing.get_origin(info.type) is not tuple or len(args) != 2 or args[1] is not Ellipsis:
        return None
    read = _element(args[0])
    if read is None:
        return None
    name = args[0].__name__.upper() if isinstance(args[0], type) else "{" + ",".join(typing.get_args(args[0])) + "}"
    return PrimitiveConstructorSpec(
        nargs="*", metavar=f"{name},...",
        instance_from_str=lambda toks: tuple(read(p.strip()) for t in toks for p in t.split(",") if p.strip()),
        is_instance=lambda x: isinstance(x, tuple), str_from_instance=lambda t: [",".join(map(str, t))])


@REGISTRY.primitive_rule
def _nested_dict_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    args = typing.get_args(info.type)
    if typing.get_origin(info.type) is not dict or len(args) != 2 or typing.get_origin(args[1]) is not dict:
        return None
    return PrimitiveConstructorSpec(
        nargs="*", metavar="NAME.KEY=VALUE", instance_from_str=_to_nested_dict,
        is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda d: [f"{n}.{k}={v}" for n, kv in d.items() for k, v in kv.items()])


def _preset_name(args: Sequence[str]) -> str | None:
    name = None
    for i, a in enumerate(args):
        if a.startswith("--preset="):
            name = a.split("=", 1)[1]
        elif a == "--preset" and i + 1 < len(args):
            name = args[i + 1]
    return name


def _nested_dict_fields(cls, prefix: str = "") -> list[str]:
    """The dotted option names of ``cls``'s ``dict[str, dict[str, ...]]`` fields, nested dataclasses included."""
    out = []
    for fl in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[fl.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += _nested_dict_fields(tp, f"{prefix}{fl.name}.")
        elif typing.get_origin(tp) is dict and len(args) == 2 and typing.get_origin(args[1]) is dict:
            out.append(f"{prefix}{fl.name}")
    return out


def _gather_entries(cls, args: list[str]) -> list[str]:
    """``--F.NAME.KEY=VALUE`` (one entry of a nested-dict field ``F``) -> ``--F NAME.KEY=VALUE ...``, so an
    option per entry and the item form give the same dict; tyro parses (and checks) the merged items."""
    fields = _nested_dict_fields(cls)
    items = {f: [] for f in fields}
    rest = []
    for a in args:
        field = next((f for f in fields if a.startswith(f"--{f}.")), None)
        if field is None:
            rest.append(a)
        else:
            items[field].append(a[len(field) + 3:])
    return rest + [tok for f, its in items.items() if its for tok in (f"--{f}", *its)]


def parse(cls: type[T], args: Sequence[str] | None = None, *, presets: Mapping[str, Callable[[], T]] | None = None,
          default: T | None = None, description: str | None = None) -> T:
    """The dataclass ``cls`` from ``args`` (``sys.argv[1:]`` when None); ``description`` heads ``--help``.

    ``presets`` maps a name to a function that returns the defaults; ``--preset=<name>`` picks one (else the
    default of ``cls``'s ``preset`` field). ``default`` is the starting config when there are no presets.
    A config's own check (a ``ValueError`` from ``__post_init__``) exits with its message, as a parse error.
    """
    args = list(sys.argv[1:] if args is None else args)
    if presets is not None:
        name = _preset_name(args) or next(fl.default for fl in dataclasses.fields(cls) if fl.name == "preset")
        if name not in presets:
            print(f"error: --preset={name} is not a preset; choose from {', '.join(presets)}", file=sys.stderr)
            sys.exit(2)
        default = presets[name]()
    args = _gather_entries(cls, args)
    kw = dict(args=args, description=description, use_underscores=True, config=(tyro.conf.FlagConversionOff,),
              registry=REGISTRY)
    if default is not None:
        kw["default"] = default
    try:
        return tyro.cli(cls, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
