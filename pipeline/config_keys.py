"""`--show-keys`: every recipe key with its type, default and help text, read from the section dataclasses
(`pipeline.stages.section_classes()`) and the dataclasses their free-form dict fields set."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from pipeline import stages
from pipeline.config import Recipe
from pipeline.io import to_plain
from pipeline.strict import field_default, join, strip_optional, type_hints


def describe_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every settable key path with its type, default and help text (for `--show-keys`).

    Nested dataclasses are expanded; so is a list whose default holds dataclasses (`data.sources[].format`)
    and a dict field whose metadata names its keys with `keys` (the dataclass they set, e.g. `reward.train` ->
    MORERewardConfig, or a function returning such rows, e.g. a source's `options`).
    A dataclass from `transformers` shows only its fields listed in the metadata's `key_fields`."""
    rows = []
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or not _shown_field(cls, f):
            continue
        key = join(prefix, f.name)
        tp = hints.get(f.name, Any)
        if f.metadata.get("section") and cls is Recipe:
            tp = stages.section_classes()[f.name]
        inner = strip_optional(tp)
        default = field_default(f)
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            rows.extend(describe_keys(inner, key))
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            rows.append((key, "list", f"{len(default)} items", _help(f.metadata)))
            rows.extend(describe_keys(type(default[0]), key + "[]"))
        else:
            rows.append((key, _type_name(tp), _default_text(default, f), _help(f.metadata)))
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
    """The rows of a free-form dict field's keys: its metadata's `keys` is the dataclass they set, or a
    function returning such rows."""
    target = f.metadata["keys"]
    if not (dataclasses.is_dataclass(target) and isinstance(target, type)):
        return [(join(key, k), t, d, h) for k, t, d, h in target()]
    shown = type(target.__name__, (target,), {"_show_key_fields": frozenset(f.metadata.get("key_fields", ()))})
    ranges = f.metadata.get("ranges") or {}
    return [
        (join(key, k), t, d, _help({"help": h, "range": ranges[k]}) if k in ranges else h)
        for k, t, d, h in describe_keys(shown)
    ]


def _help(metadata) -> str:
    """A field's help text, with the values it allows (its metadata's "range" or "choices", checked at load)."""
    text = metadata.get("help", "")
    if metadata.get("range") is not None:
        return f"{text} Allowed: {metadata['range']}."
    if metadata.get("choices") is not None:
        return f"{text} Allowed: {', '.join(map(str, metadata['choices']))}."
    return text


def _type_name(tp) -> str:
    """'SchedulerType | str' for 'transformers.trainer_utils.SchedulerType | str'."""
    return tp.__name__ if isinstance(tp, type) else re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(tp))


def _default_text(default: Any, f: dataclasses.Field, width: int = 24) -> str:
    if default is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return "required"
    text = json.dumps(to_plain(default), default=str) if not isinstance(default, str) else default
    text = text if default != "" else '""'
    return text if len(text) <= width else text[: width - 3] + "..."
