"""Recipes: one YAML file = one whole pipeline run, parsed strictly into dataclasses.

A recipe file has a few top-level keys (`name`, `description`, `seed`, `output_dir`, `stages`) and one
section per recipe section of `pipeline.stages`: `data` (`pipeline.data.DataConfig`) and one per stage, each
the dataclass the stage package defines next to its code, in TRL's style (`field(default=..., metadata=
{"help": ...})`): `reward` (RewardStageConfig), `calibration` (CalibrationConfig), `align` (AlignConfig),
`report` (ReportConfig). The conversion is strict (`pipeline.strict`): an unknown key fails with ONE error
naming the key path, the file or override it came from, the valid keys and the closest match.

Overrides `key.sub=value` (command line) apply to the raw YAML before conversion, so they are validated
exactly like the file; values are parsed as YAML (numbers, booleans, `null`, `[a, b]` lists, `{k: v}`
maps; `1e-6` is a float, as in YAML 1.2, also inside free-form dict fields such as `reward.train`). A
numeric path segment indexes a list: `data.sources.0.path=...`. A string value `pkg:<package>[/<sub/path>]`
is a path inside an installed Python package (`pipeline.io.resolve_pkg_path`; nothing is imported).

Values are checked at load time: learning rates, temperatures and max lengths (`_check_values`), every seed
(0 <= seed < 2**32, also inside free-form dicts), and the values of a free-form dict field whose metadata
names the dataclass its keys set (`reward.train` -> MORERewardConfig, `align.ppo` -> PPOConfig) against
that dataclass's field types (`reward.train.learning_rate=fast` fails here, not in torch.optim). Checks
across sections are the stages' own (`check_recipe` calls each selected stage's `check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import stages
from pipeline.errors import RecipeError, redact_credentials
from pipeline.io import to_plain
from pipeline.strict import (
    INT_MAX,
    Origin,
    build_dataclass,
    check_keys,
    check_range,
    convert,
    dotted,
    join,
    show_value,
    strip_optional,
    type_hints,
)


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
    """A whole pipeline run. The sections are instances of the dataclasses `pipeline.stages.section_classes()`
    names (typed `Any` here because the table is read at load time)."""

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
    reward: Any = field(default=None, metadata={"help": "pipeline.reward.config.RewardStageConfig", "section": True})
    calibration: Any = field(
        default=None, metadata={"help": "pipeline.calibration.config.CalibrationConfig", "section": True}
    )
    align: Any = field(default=None, metadata={"help": "pipeline.align.config.AlignConfig", "section": True})
    report: Any = field(default=None, metadata={"help": "pipeline.report.config.ReportConfig", "section": True})

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


# Keys that recipes used to accept but no code reads: refused with the reason (a key that does nothing must not
# look like a setting, nor change a stage's hash).
REMOVED_KEYS: dict[str, str] = {
    "data.mixing": "each RM's method decides how its sources are mixed (more and uniform: per-source-balanced "
    "batches of data.per_source_batch pairs per source; multitask and single: a shuffled concatenation), so "
    "it never changed an RM. Fix: delete the key (choose mixing with reward.methods)",
}


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
    ctx = Origin(where, applied, REMOVED_KEYS)
    _substitute_data_root(raw, ctx)
    check_keys(Recipe, raw, "", ctx)
    for section, cls in stages.section_classes().items():  # every section exists, possibly with its defaults
        raw[section] = build_dataclass(cls, raw.get(section), section, ctx)
    recipe = build_dataclass(Recipe, raw, "", ctx)
    if recipe.stages is not None:
        valid = stages.stage_names()
        bad = [s for s in recipe.stages if s not in valid]
        if bad:
            raise RecipeError(f"stages in {ctx.origin('stages')}: unknown stage(s) {bad}; valid: {valid}")
    for section in stages.section_classes():
        _check_typed_dicts(getattr(recipe, section), section, ctx)
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


def _check_values(node: Any, path: str, ctx: Origin) -> None:
    """Every learning rate (also inside free-form dicts such as reward.train) must be finite and >= 0, every
    temperature finite and > 0, every max_*length a positive integer (or null), every seed an integer in
    [0, 2**32) (or null)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_values(v, join(path, str(k)), ctx)
        return
    if isinstance(node, list):
        for i, v in enumerate(node):
            _check_values(v, f"{path}[{i}]", ctx)
        return
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return
    name = path.rsplit(".", 1)[-1]
    finite = isinstance(node, int) or math.isfinite(node)  # a 400-digit int is finite (float() would overflow)
    problem = None
    if _LR.fullmatch(name) and not (finite and node >= 0):
        problem, fix = "a learning rate must be a finite number >= 0", "e.g. 1e-5"
    elif _TEMPERATURE.fullmatch(name) and not (finite and node > 0):
        problem, fix = "a temperature must be a finite number > 0", "e.g. 1.0 (use greedy decoding instead of 0)"
    elif _MAX_LENGTH.fullmatch(name) and not (finite and 1 <= node <= INT_MAX):
        problem, fix = "a maximum length must be between 1 and 2**31 - 1 tokens", "e.g. 512, or null where allowed"
    elif _SEED.fullmatch(name) and not (_integral(node) and 0 <= node < SEED_LIMIT):
        problem, fix = "a seed must be an integer with 0 <= seed < 2**32", "e.g. 0"
    if problem:
        raise RecipeError(
            f"{path} = {show_value(node)} in {ctx.origin(dotted(path))}: {problem}. Fix: set {path} to a valid "
            f"value ({fix})"
        )


def _integral(node: int | float) -> bool:
    return isinstance(node, int) or (math.isfinite(node) and float(node).is_integer())


DATA_ROOT = "${data_root}"


def _check_typed_dicts(section, path: str, ctx: Origin) -> None:
    """A free-form dict field whose metadata names the dataclass its keys set (`"keys": MORERewardConfig` on
    `reward.train`) has each value checked against that field's type now, so a wrong type fails at load (also
    under --dry-run), not deep inside a trainer. Values are kept as written (so stage hashes do not move),
    except numbers written as strings ("1e-5"), which become numbers as everywhere else in a recipe. Then each
    value is range-checked: by the target field's own "range" / "choices" metadata, else by the dict field's
    "ranges" table (the TrainingArguments fields, `pipeline.reward.config.TRAINING_ARGS_RANGES`)."""
    for f in dataclasses.fields(section):
        target, values = f.metadata.get("keys"), getattr(section, f.name)
        if not isinstance(values, dict) or not values:
            continue
        hints = type_hints(target) if dataclasses.is_dataclass(target) else {}
        metas = {g.name: g.metadata for g in dataclasses.fields(target)} if hints else {}
        ranges = f.metadata.get("ranges") or {}
        for key, value in values.items():
            where = f"{path}.{f.name}.{key}"
            if key in hints:
                values[key] = _typed_value(hints[key], value, where, ctx, target)
            meta = metas.get(key, {})
            check_range(values[key], meta.get("range") or ranges.get(key), where, ctx, meta.get("choices"))


def _typed_value(tp, value, where: str, ctx: Origin, target):
    try:
        converted = convert(tp, value, where, ctx)
    except RecipeError as e:
        tp = strip_optional(tp)
        tp = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        raise RecipeError(
            f"{e}. Fix: set {where} to a value of type {tp} (the {target.__name__} field it sets)"
        ) from None
    if isinstance(value, str) and isinstance(converted, (int, float)) and not isinstance(converted, bool):
        return converted
    return value


def check_recipe(recipe: Recipe, selected: typing.Sequence[str], running: typing.Sequence[str] = ()) -> None:
    """Checks that span sections, once the stages to run are known (`pipeline.run` calls it after planning,
    before any work; --dry-run too): each selected stage's `check` (`pipeline.stages`), told whether it will
    actually run (`running`) or only be skipped as up to date, so a recipe that never aligns is not held to
    align's defaults. Raises one RecipeError naming the key and the fix."""
    ctx = getattr(recipe, "_origin", None) or Origin("the recipe")
    for stage in stages.STAGES:
        if stage.name in selected:
            stage.check(recipe, runs=stage.name in running, origin=ctx.origin)


def _substitute_data_root(raw: dict, ctx: Origin) -> None:
    """Replace `${data_root}` in every string value by the absolute `data_root` directory."""
    root = raw.get("data_root")
    used: list[str] = []

    def walk(node, path):
        if isinstance(node, dict):
            return {k: walk(v, join(path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and DATA_ROOT in node:
            used.append((path, node))
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
    wanted = ", ".join(dict.fromkeys(node.split(DATA_ROOT, 1)[1].lstrip("/") or "." for _, node in used))
    holding = (
        f"a directory holding your local copies of the data in these layouts: {wanted} (this project's own "
        "checkouts have them in ../shared/data/real, which is not part of the repository)"
    )
    if root is None:
        raise RecipeError(
            f"{used[0][0]} in {ctx.where} uses {DATA_ROOT}, but data_root is not set. Fix: add the override "
            f"data_root=<{holding}>"
        )
    if not Path(root).is_dir():
        raise RecipeError(
            f"data_root {root} (from {ctx.origin('data_root')}) is not a directory. Fix: set data_root to {holding}"
        )
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


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (DIR/recipe.yaml, --print-recipe); a credential inside a URL (a judge
    base_url with `?key=` or `user:pw@`) is masked (`pipeline.errors.redact_credentials`), like the API key,
    which is never in a recipe."""
    return yaml.safe_dump(redact_credentials(recipe_to_dict(recipe)), sort_keys=False, allow_unicode=True)
