"""The format table: every file format's loader and the options it takes, and `option_keys` for `--show-keys`.

``LOADERS[format] = (loader, option names)``; a loader takes ``(records, ctx, **options)`` (records as
``(record, location)`` pairs in file order, ``ctx`` the shared :class:`pipeline.data.formats.base._Ctx`) and
yields rows of the common schema. ``synthetic`` is no file format: `pipeline.data.sources.load_source`
builds it in process. The layouts and their rules are documented in :mod:`pipeline.data.sources`.

Imports: the format modules beside this one (`base` for its constants).
"""

from __future__ import annotations

from .base import CONTEXT_MISMATCH
from .oasst1 import fmt_oasst1
from .simple import fmt_hh, fmt_jsonl, fmt_more_json, fmt_shp, fmt_summarize, fmt_webgpt
from .trl import fmt_trl


LOADERS = {
    "hh-rlhf": (fmt_hh, {"context_mismatch"}),
    "more-json": (fmt_more_json, {"context_mismatch", "with_margin"}),
    "webgpt": (fmt_webgpt, {"with_margin"}),
    "summarize": (fmt_summarize, {"record_splits"}),
    "shp": (fmt_shp, {"min_score_ratio"}),
    "oasst1": (fmt_oasst1, {"lang"}),
    "jsonl": (fmt_jsonl, set()),
    "trl": (fmt_trl, {"implicit"}),
}


def option_keys() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every `options` key of a source, for `--show-keys`."""
    return [
        (
            "group_by",
            "str",
            "null",
            "Column (dotted path) whose values split the dataset into sources <name>/<value>.",
        ),
        ("group_names", "dict", "{}", "group_by value -> source name (several values may share one name)."),
        ("keep_groups", "list", "null", "Keep only these group_by values (null: all)."),
        ("drop_groups", "list", "[]", "Drop these group_by values."),
        (
            "split_by",
            "str",
            "prompt",
            "A source cut into train/validation/test by hash: prompt (the whole prompt, for a dialogue its whole "
            "context) or first_turn (its first user turn: dialogues opening with one question share a part).",
        ),
        ("data_dir", "str", "null", "Sub-directory of a hub-layout directory or hub dataset to read."),
        (
            "context_mismatch",
            "str",
            "drop",
            f"hh-rlhf, more-json: {' | '.join(CONTEXT_MISMATCH)} when the two transcripts' contexts differ.",
        ),
        ("with_margin", "bool", "false", "more-json, webgpt: keep the score difference as `margin`."),
        ("record_splits", "list|str", "null", "summarize: keep rows whose `split` field is one of these."),
        ("min_score_ratio", "float", "null", "shp: keep pairs whose score_ratio is at least this."),
        ("lang", "str", "null", "oasst1: keep one language (e.g. en)."),
        ("implicit", "bool", "false", "trl: ignore a `prompt` string beside whole conversations."),
    ]
