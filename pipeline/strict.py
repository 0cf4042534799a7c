"""Strict conversion of parsed YAML (nested dicts and lists) into dataclasses (a leaf: imports only
`pipeline.errors` and `pipeline.io`).

TRL's `TrlParser` / transformers' `HfArgumentParser` map a flat namespace onto one or more dataclasses and
cannot express nested sections, so the conversion here is our own, and strict: nested dicts become nested
dataclasses recursively, lists of dataclasses become lists of instances, values are checked against the
annotations (numbers written as strings such as `1e-6`, which YAML 1.1 reads as a string, are converted),
and an unknown key fails with ONE `RecipeError` naming the key path, where it came from (`Origin`: the file,
or the command-line override that set it), the valid keys and the closest match. A dataclass's own
`__post_init__` validation errors are reported with the section path. A string `pkg:<package>/<path>` is
replaced by a path inside an installed package (`pipeline.io.resolve_pkg_path`).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import RecipeError
from pipeline.io import resolve_pkg_path


@dataclass
class Origin:
    """Where the values being converted came from, for error messages."""

    where: str  # the file (or "<dict>")
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key path -> original override text
    removed: dict[str, str] = field(default_factory=dict)  # dotted key -> why it is no longer read

    def origin(self, path: str) -> str:
        for key, text in self.overrides.items():
            if key == path or key.startswith(path + ".") or path.startswith(key + "."):
                return f"the command-line override {text!r}"
        return self.where


def dotted(path: str) -> str:
    """'data.sources[1].name' -> 'data.sources.1.name' (the form overrides use)."""
    return path.replace("[", ".").replace("]", "")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass; a field whose annotation cannot be resolved is `Any`."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolved forward references: fall back field by field
        out = {}
        namespace = vars(sys.modules[cls.__module__])
        for f in dataclasses.fields(cls):
            tp = f.type
            if isinstance(tp, str):
                try:
                    tp = eval(tp, namespace)  # noqa: S307 - the annotation of a trusted dataclass
                except Exception:
                    tp = Any
            out[f.name] = tp
        return out


def field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def strip_optional(tp):
    """`X | None` -> X (other unions unchanged)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def check_keys(cls: type, raw: dict, path: str, ctx: Origin) -> dict[str, dataclasses.Field]:
    """The init fields of `cls`; raises for a key of `raw` that is not one (or that is no longer read)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        full = join(path, str(key))
        if full in ctx.removed:
            raise RecipeError(f"{full} in {ctx.origin(dotted(full))} is no longer read: {ctx.removed[full]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {join(path, close[0])!r}?" if close else ""
            scope = f"under {path!r}" if path else "at the top level"
            raise RecipeError(
                f"unknown key {full!r} in {ctx.origin(dotted(full))}.{hint} Valid keys {scope}: {', '.join(fields)}"
            )
    return fields


def build_dataclass(cls: type, raw: Any, path: str = "", ctx: Origin | None = None, base: Any = None):
    """Convert a mapping into `cls` (a dataclass), recursively and strictly.

    `base`, when given, is an instance whose values stand for the keys missing from `raw` (used for a
    nested dataclass field whose default differs from the class defaults).
    """
    ctx = ctx or Origin("<dict>")
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path or 'the recipe'} in {ctx.origin(dotted(path))} must be a mapping of "
            f"{cls.__name__} fields, got {type(raw).__name__} {raw!r}"
        )
    fields = check_keys(cls, raw, path, ctx)
    hints = type_hints(cls)
    kwargs = {name: getattr(base, name) for name in fields if hasattr(base, name)} if base is not None else {}
    for key, value in raw.items():
        f = fields[key]
        tp = hints.get(key, Any)
        if tp is list or tp == list[Any]:
            tp = _list_type_from_default(f, tp)
        nested_base = None
        if dataclasses.is_dataclass(strip_optional(tp)) and isinstance(value, dict):
            default = getattr(base, key) if base is not None else field_default(f)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                nested_base = default
        kwargs[key] = convert(tp, value, join(path, key), ctx, nested_base)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        where = ctx.origin(dotted(path)) if path else ctx.where
        raise RecipeError(f"invalid {path or 'recipe'} ({cls.__name__}) in {where}: {e}") from e


def _list_type_from_default(f: dataclasses.Field, tp):
    """A bare `list` field whose default holds dataclass instances is read as a list of that dataclass
    (e.g. `DataConfig.sources`), so its items are checked as strictly as annotated fields."""
    default = field_default(f)
    if isinstance(default, list) and default:
        kinds = {type(x) for x in default}
        if len(kinds) == 1:
            kind = kinds.pop()
            if dataclasses.is_dataclass(kind):
                return list[kind]
    return tp


class _Fail:
    """Builds the one error of a value that does not fit its annotation."""

    def __init__(self, value: Any, path: str, ctx: Origin):
        self.value, self.path, self.ctx = value, path, ctx

    def __call__(self, expected: str) -> RecipeError:
        v = self.value
        return RecipeError(
            f"{self.path} in {self.ctx.origin(dotted(self.path))}: expected {expected}, got {type(v).__name__} {v!r}"
        )


def convert(tp: Any, value: Any, path: str, ctx: Origin, base: Any = None) -> Any:
    """`value` checked against (and, for numbers written as strings, converted to) the annotation `tp`."""
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return value
    if isinstance(value, str) and value.startswith("pkg:"):
        value = resolve_pkg_path(value, path)
    fail = _Fail(value, path, ctx)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, path, ctx, base, fail)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise fail("one of " + ", ".join(repr(a) for a in typing.get_args(tp)))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_dataclass(tp, value, path, ctx, base)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        return _convert_sequence(tp, value, path, ctx, fail)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: convert(vt, v, join(path, str(k)), ctx) for k, v in value.items()}
    scalar = _SCALARS.get(tp)
    return scalar(value, fail) if scalar is not None else value


def _convert_union(tp, value, path: str, ctx: Origin, base, fail: _Fail):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    errors = []
    for option in options:
        try:
            return convert(option, value, path, ctx, base)
        except RecipeError as e:
            errors.append(e)
    if len(options) == 1:
        raise errors[0]
    raise fail(" or ".join(getattr(o, "__name__", str(o)) for o in options))


def _convert_sequence(tp, value, path: str, ctx: Origin, fail: _Fail):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise fail(f"a list (write it as a YAML list, e.g. {path.split('.')[-1]}=[a,b])")
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            raise fail(f"a list of {len(args)} items")
        return tuple(convert(a, v, f"{path}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [convert(item, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        return tuple(items)
    if origin in (set, frozenset):
        return origin(items)
    return items


def _to_bool(value, fail: _Fail) -> bool:
    if isinstance(value, bool):
        return value
    raise fail("true or false")


def _to_int(value, fail: _Fail) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = number_of(value)
    if number is not None and float(number).is_integer():
        return int(number)
    raise fail("an integer")


def _to_float(value, fail: _Fail) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    number = number_of(value)
    if number is not None:
        return float(number)
    raise fail("a number")


def _to_str(value, fail: _Fail) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise fail("a string")


def _to_path(value, fail: _Fail) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise fail("a path")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, Path: _to_path}


def number_of(value: Any) -> float | None:
    """A float read from a float or a numeric string ('1e-6', '1_000'); None otherwise."""
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None
