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
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import RecipeError
from pipeline.io import resolve_pkg_path


# The largest count, length, step or size a recipe may give: torch indexes with int32 in many kernels, and a value
# beyond this is a typo (1e25 tokens), not a setting.
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Range:
    """The values a numeric recipe field allows (its metadata "range", checked when the recipe is loaded, also
    by --dry-run): finite numbers with lo <= value <= hi (strict with lo_open / hi_open; None: unbounded), plus
    the single values in `also` (e.g. -1 for "not set"). `str()` is the allowed range as the error states it."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def __contains__(self, value) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        lo = "" if self.lo is None else f"{_num(self.lo)} {'<' if self.lo_open else '<='} "
        hi = "" if self.hi is None else f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        body = f"{lo}value{hi}" if lo or hi else "any finite number"
        if not lo and not hi:
            return body
        body = body if lo and hi else f"a finite number with {body}"
        return ", ".join(map(_num, self.also)) + f", or {body}" if self.also else body


def _num(x) -> str:
    return "2**31 - 1" if x == INT_MAX else repr(x)


# Common ranges of recipe fields
COUNT = Range(1, INT_MAX)  # a number of things that must be at least one (batch sizes, steps, samples)
COUNT0 = Range(0, INT_MAX)  # a number of things that may be zero (0 = none / off)
FRACTION = Range(0, 1)  # a probability or fraction, both ends included
POSITIVE = Range(0, None, lo_open=True)  # a finite number > 0
NON_NEGATIVE = Range(0, None)  # a finite number >= 0


# Ranges of the transformers.TrainingArguments fields a free-form section sets (`reward.train`, which sets
# MORERewardConfig; `align.rloo`, trl.RLOOConfig): the dict field's metadata "ranges" names this table. Learning
# rates, temperatures, max_*length and seeds are checked by name everywhere (`pipeline.config._check_values`).
STEPS = Range(0, INT_MAX, lo_open=True)  # logging/save/eval steps: a count, or a fraction of the run when < 1
TRAINING_ARGS_RANGES: dict[str, Range] = {
    "num_train_epochs": Range(0, INT_MAX, lo_open=True),
    "max_steps": Range(1, INT_MAX, also=(-1,)),
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "eval_accumulation_steps": COUNT,
    "warmup_steps": COUNT0,
    "warmup_ratio": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Range(0, 1, hi_open=True),
    "adam_beta2": Range(0, 1, hi_open=True),
    "adam_epsilon": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "label_smoothing_factor": FRACTION,
    "logging_steps": STEPS,
    "save_steps": STEPS,
    "eval_steps": STEPS,
    "save_total_limit": COUNT0,
    "dataloader_num_workers": Range(0, 1024),
    "dataloader_prefetch_factor": COUNT,
    "torch_empty_cache_steps": COUNT,
    "center_rewards_coefficient": NON_NEGATIVE,
    # trl.RLOOConfig
    "num_generations": Range(2, INT_MAX),
    "generation_batch_size": COUNT,
    "steps_per_generation": COUNT,
    "num_iterations": COUNT,
    "top_p": Range(0, 1, lo_open=True),
    "top_k": COUNT0,
    "beta": NON_NEGATIVE,
    "epsilon": NON_NEGATIVE,
    "repetition_penalty": POSITIVE,
}


def show_value(value) -> str:
    """A value for an error message, at most 40 characters (a 400-digit seed is cut)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def check_range(value, allowed: Range | None, path: str, ctx: Origin, choices=None) -> None:
    """One RecipeError naming the key, the value and the allowed range (or choices) when `value` (a number, or a
    list or mapping of numbers) is outside it; None and non-numbers are left to the type check."""
    if isinstance(value, dict):
        items = [(join(path, str(k)), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(path, v) for v in value]
    else:
        items = [(path, value)]
    for where, item in items:
        if choices is not None and item is not None and item not in choices:
            problem = "is not one of the choices; allowed: " + ", ".join(map(str, choices))
        elif allowed is not None and isinstance(item, (int, float)) and not isinstance(item, bool):
            if item in allowed:
                continue
            problem = f"is out of range; allowed: {allowed}"
        else:
            continue
        raise RecipeError(
            f"{where} = {show_value(item)} in {ctx.origin(dotted(where))} {problem}. Fix: set {where} to an allowed "
            "value"
        )


@dataclass
class Origin:
    """Where the values being converted came from, for error messages."""

    where: str  # the file (or "<dict>")
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key path -> original override text
    removed: dict[str, str] = field(default_factory=dict)  # dotted key -> why it is no longer read

    def origin(self, path: str) -> str:
        for key, text in self.overrides.items():
            if key == path or key.startswith(path + ".") or path.startswith(key + "."):
                shown = text if len(text) <= 100 else f"{text[:60]}...{text[-20:]}"
                return f"the command-line override {shown!r}"
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
        check_range(kwargs[key], f.metadata.get("range"), join(path, key), ctx, f.metadata.get("choices"))
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
