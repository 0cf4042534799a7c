"""Loaders: every preference source, in its original layout, into one schema.

Schema (every format): string columns ``prompt``, ``chosen``, ``rejected``, ``source``; optional float
``margin``. ``prompt`` is the dialogue up to and including the final assistant marker, so ``prompt +
chosen`` is the full chosen transcript. Sources that are not dialogues (WebGPT, TL;DR, SHP, OASST1) are
rendered in Anthropic's HH layout ``"\\n\\nHuman: {text}\\n\\nAssistant:"`` and their responses get one
leading space (``" " + text.strip()``), as HH responses have.

``load_source(format, path, *, split=None, name=None, **options)``. ``path`` is one of

* a single local file: ``.json`` (a JSON array, OR JSON lines whatever the extension says), ``.jsonl``,
  ``.json.gz``/``.jsonl.gz``, ``.parquet``;
* a local directory in the hub's layout: the data files under it (recursively, sorted by path) named
  after ``split`` (``test.jsonl.gz``, ``train-00000-of-00001.parquet``, MORE's ``helpful.test.json``); ``name`` (the hub
  config) and the option ``data_dir`` select a sub-directory (``hh-rlhf`` dir + ``data_dir="harmless-base"``);
  with ``split=None`` every data file is read, unless the files are named after splits (then choose one);
* a hub dataset id (``owner/name``, not an existing path): ``datasets.load_dataset(path, name,
  split=split or "train", data_dir=...)``.
Records are read in file order and never shuffled.

Formats and the pairs they form (counts of everything dropped are logged and stored, see below):

* ``hh-rlhf``: ``{"chosen", "rejected"}`` full transcripts, split at the last ``"\\n\\nAssistant:"``.
  Identical pairs are dropped (``identical``). Pairs whose two contexts differ (the response of one side
  contains further turns; 5 of 2312 in harmless-base test) follow the option ``context_mismatch``:
  ``"drop"`` (default, counted as ``context_mismatch``), ``"common"`` (split both sides at the last
  assistant marker inside their common prefix, so the extra turns become part of the responses) or
  ``"error"``.
* ``more-json``: the MORE/DSP layout ``{"text": [full_a, full_b, ...], "score": [s_a, s_b, ...]}``; every
  i<j pair of texts with different scores becomes a pair, the higher score chosen (never assumed to be
  the first); equal scores are ties (dropped, ``ties``). Each text is split at its LAST assistant marker,
  HH ``"\\n\\nAssistant:"`` or MORE's ``"## Assistant:"`` (+ its newline), whichever comes last; the
  context rule is the one of hh-rlhf. Option ``with_margin`` stores the score gap as ``margin``.
* ``webgpt``: ``openai/webgpt_comparisons``: ``question.full_text``, ``answer_0/1``, ``score_0/1``;
  ties dropped (``ties``); the quotes are not used (as in MORE). Option ``with_margin``.
* ``summarize``: ``openai/summarize_from_feedback`` comparisons: the prompt is built from
  ``info.subreddit`` (an ``r/`` prefix is tolerated), ``info.title`` and ``info.post`` (or
  ``info.article`` for the CNN/DM rows); ``summaries[choice]`` is chosen. ``info.id`` is not needed.
  Option ``record_splits`` (e.g. ``["valid1", "valid2"]``, or one name) keeps rows whose ``split`` field matches.
* ``shp``: Stanford SHP: ``history``, ``human_ref_A/B``, ``labels`` (1 = A preferred). Option
  ``min_score_ratio`` keeps pairs with ``score_ratio`` at least that.
* ``oasst1``: OpenAssistant, either export trees (one tree per record, ``{"prompt": {...,"replies":
  [...]}}`` or a bare root message with ``replies``) or the hub's flat message table (``message_id``,
  ``parent_id``, ...; rebuilt into trees, children in record order; a repeated ``message_id`` keeps its first
  row (``duplicate_message_ids``), messages on a parent cycle or below one are skipped
  (``cycle_messages``), as are those whose parent is missing (``orphan_messages``, counted once per
  subtree)). For every prompter message, its
  assistant replies that have a ``rank`` (0 = best) form ALL i<j pairs, the lower rank chosen (a group of
  n ranked replies gives n(n-1)/2 pairs); the prompt is the whole conversation from the root to that
  prompter message. Deleted and synthetic messages are skipped together with their subtrees; unranked
  replies are skipped; equal ranks are ties (dropped); a rank that is not a whole number >= 0 is an
  error. Option ``lang`` keeps one language.
* ``trl``: every preference layout TRL documents: explicit prompt (``prompt``, ``chosen``, ``rejected``) or
  implicit prompt (``chosen``/``rejected`` hold the whole conversation; the prompt is their longest common
  prefix, as TRL's ``extract_prompt`` takes it: characters for strings, messages for conversations, cut back
  to the last non-assistant message), each standard (strings, kept as they are) or conversational (lists
  of ``{"role", "content"}``). Conversational rows keep their messages in the string column
  ``conversation`` (JSON, see :mod:`pipeline.data.render`) and hold the plain HH rendering in
  prompt/chosen/rejected. Messages keep their other keys (``tool_calls``, ``name``; an assistant turn that calls
  tools may have no content), and a conversational row's ``tools`` (a list or TRL's JSON string of one) and
  ``chat_template_kwargs`` go to ``apply_chat_template`` as TRL passes them. ``margin`` is kept; other
  columns are ignored. Identical pairs are dropped
  (``identical``). Option ``implicit`` ignores a ``prompt`` column (chosen/rejected hold the conversation).
  A ``save_to_disk`` directory is read too.
* ``jsonl``: our own schema (``prompt``, ``chosen``, ``rejected``; optional ``source``, ``margin``).
* ``synthetic``: the in-process benchmark of :mod:`pipeline.data.synthetic`; ``path`` is the source name
  (``helpful`` ...), options are :class:`SyntheticConfig` fields, ``split`` one of train/validation/test.

Every format (but ``synthetic``) accepts ``group_by``: the (dotted) field whose value splits ONE dataset into
several sources named ``<source>/<value>`` (UltraFeedback's ``source``, RewardBench's ``subset``), with
``group_names`` (value -> source name; several values may share one), ``keep_groups`` / ``drop_groups``
(values; dropped pairs counted as ``other_group`` and, per dropped value with the option that dropped it,
under ``dropped_groups``); per-group counts are stored under ``groups``.
`pipeline.data.build_splits` turns each group into its own source.

Every format accepts the option ``source`` (the value of the ``source`` column; default: the format
name, or the synthetic source name). Counts (records read, pairs kept, and each reason for dropping)
are logged at INFO level and stored as JSON in ``ds.info.description``; :func:`load_stats` reads them back.

Files are UTF-8 (a leading BOM is accepted). Numbers that decide a pair or its label (scores, margins)
must be finite: NaN or infinity is an error, as is a boolean where a number is expected. Bad input
(also a truncated .gz file or a non-UTF-8 byte) raises one :class:`PreferenceDataError` naming the
source, file, line and field, and the fix.

Where the code lives: this module holds :func:`load_source` with the grouping and :func:`load_stats`;
:mod:`pipeline.data.read` reads files, directories and hub ids; :mod:`pipeline.data.formats` holds the format
table and one module per family of formats, and :mod:`pipeline.data.formats.base` the pieces they share
(:class:`PreferenceDataError`, the per-source context with its counters and field access, the dialogue helpers).

Imports: the standard library, `pipeline.data.read` and `pipeline.data.formats`; `pipeline.data.synthetic` inside
`load_source` and `datasets` where a dataset is built.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from .formats import LOADERS
from .formats.base import CONTEXT_MISMATCH, PreferenceDataError, _Ctx, _err
from .read import read_records


logger = logging.getLogger(__name__)

FORMATS = ("hh-rlhf", "oasst1", "webgpt", "summarize", "shp", "more-json", "jsonl", "trl", "synthetic")
GROUP_OPTIONS = ("group_by", "group_names", "keep_groups", "drop_groups")
STATS_PREFIX = "pipeline.data stats: "


def _check_options(fmt: str, options: dict, allowed: set):
    bad = set(options) - allowed
    if bad:
        raise PreferenceDataError(
            f"[format {fmt!r}] unknown option(s) {sorted(bad)}. Fix: use only {sorted(allowed) or 'no options'}"
        )
    mismatch = options.get("context_mismatch", "drop")
    if mismatch not in CONTEXT_MISMATCH:
        raise PreferenceDataError(
            f"[format {fmt!r}] option context_mismatch={mismatch!r} is not one of "
            f"{', '.join(CONTEXT_MISMATCH)}. Fix: use one of them"
        )


# ---------------------------------------------------------------------------------------------------
# Public API


def _to_dataset(rows: list[dict], source: str, stats: dict):
    import datasets

    has_margin = any("margin" in r for r in rows)
    cols = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    cols["source"] = [r.get("source", source) for r in rows]
    feats = {k: datasets.Value("string") for k in ("prompt", "chosen", "rejected", "source")}
    if any("conversation" in r for r in rows):
        cols["conversation"] = [r.get("conversation", "") for r in rows]
        feats["conversation"] = datasets.Value("string")
    if has_margin:
        cols["margin"] = [float(r.get("margin", 0.0)) for r in rows]
        feats["margin"] = datasets.Value("float64")
    feats = datasets.Features(feats)
    info = datasets.DatasetInfo(description=STATS_PREFIX + json.dumps(stats, sort_keys=True), features=feats)
    return datasets.Dataset.from_dict(cols, features=feats, info=info)


def load_source(format: str, path: str, *, split: str | None = None, name: str | None = None, **options):
    """Load one preference source into the common schema (see the module docstring).

    Returns a `datasets.Dataset` whose `info.description` holds the counts (`load_stats(ds)`).
    """
    source = options.pop("source", None)
    if format not in FORMATS:
        raise PreferenceDataError(
            f"unknown data format {format!r} (source {source or path!r}). Fix: use one of {', '.join(FORMATS)}"
        )
    if format == "synthetic":
        from .synthetic import SyntheticConfig, synthetic_split

        if set(options) & set(GROUP_OPTIONS):
            raise PreferenceDataError(
                "[format 'synthetic'] group_by does not apply to synthetic sources. Fix: "
                "declare each synthetic source separately"
            )

        try:
            cfg = SyntheticConfig(**options)
        except TypeError as e:
            raise PreferenceDataError(
                f"[format 'synthetic'] bad option: {e}. Fix: use SyntheticConfig fields"
            ) from None
        name_ = path or name
        if name_ not in cfg.sources:
            raise PreferenceDataError(
                f"[format 'synthetic'] unknown synthetic source {name_!r}. Fix: use one of {list(cfg.sources)}"
            )
        ds = synthetic_split(cfg, name_, split or "train")
        if source and source != name_:
            ds = ds.map(lambda _: {"source": source})
        return ds
    source = source or format
    data_dir = options.pop("data_dir", None)
    grouping = {k: options.pop(k) for k in GROUP_OPTIONS if k in options}
    fn, allowed = LOADERS[format]
    _check_options(format, options, allowed)
    ctx = _Ctx(source)
    ctx.group_by = grouping.get("group_by")
    counted = Counter()
    current = {"path": f"{path}" + (f" (split {split!r})" if split else "")}

    def records():
        for rec, where in read_records(str(path), split, name, data_dir, source):
            counted["records"] += 1
            if not isinstance(rec, dict):
                raise _err(
                    source,
                    where,
                    f"expected a JSON object, got {type(rec).__name__}",
                    f"check that the file is in the {format} layout",
                )
            if ctx.group_by:
                current["group"] = ctx.get(rec, ctx.group_by, where, (str, int, float, bool))
            yield rec, where

    rows = fn(records(), ctx, **options)
    rows = list(_grouped(rows, current, ctx, source, **grouping) if grouping else rows)
    stats = {
        "format": format,
        "path": str(path),
        "split": split,
        "records": counted["records"],
        "pairs": len(rows),
        **dict(sorted(ctx.stats.items())),
    }
    dropped = {k: v for k, v in ctx.stats.items() if v and k not in ("trees", "groups", "dropped_groups")}
    logger.info(
        "[%s] %s: %d records -> %d pairs%s",
        source,
        path,
        counted["records"],
        len(rows),
        f" (dropped/skipped: {dropped})" if dropped else "",
    )
    if not rows:
        raise PreferenceDataError(
            f"[source {source!r}] {path}: no preference pairs left after filtering ({stats}). Fix: check the "
            f"format ({format!r}), the split and the filtering options"
        )
    return _to_dataset(rows, source, stats)


def _grouped(
    rows, current: dict, ctx, source: str, group_by=None, group_names=None, keep_groups=None, drop_groups=None
):
    """Rows with `source` set from their record's `group_by` value: ``<source>/<value>``, or
    ``group_names[value]`` (several values may map to one name); `keep_groups`/`drop_groups` filter by value
    (dropped rows counted as ``other_group``, and by value with the option that dropped them as
    ``dropped_groups``). Per-group pair counts go to the stats (``groups``)."""
    if not group_by:
        raise PreferenceDataError(
            f"[source {source!r}] group_names/keep_groups/drop_groups need group_by. "
            "Fix: set group_by to the column whose value splits the dataset"
        )
    if group_names is not None and not isinstance(group_names, dict):
        raise PreferenceDataError(f"[source {source!r}] group_names must map column values to source names")
    keep = None if keep_groups is None else {str(v) for v in keep_groups}
    drop = {str(v) for v in drop_groups or ()}
    names = {str(k): str(v) for k, v in (group_names or {}).items()}
    counts, seen, dropped = Counter(), Counter(), {}
    for row in rows:
        value = str(current["group"])
        seen[value] += 1
        if (keep is not None and value not in keep) or value in drop:
            ctx.stats["other_group"] += 1
            why = "drop_groups" if value in drop else "not in keep_groups"
            dropped.setdefault(value, {"pairs": 0, "why": why})["pairs"] += 1
            continue
        row["source"] = names.get(value, f"{source}/{value}")
        counts[row["source"]] += 1
        yield row
    for option, values in (("keep_groups", keep or set()), ("drop_groups", drop)):
        if absent := sorted(values - set(seen)):
            present = sorted(seen)
            shown = ", ".join(repr(v) for v in present[:20]) + (
                f" ... (+{len(present) - 20} more)" if len(present) > 20 else ""
            )
            raise PreferenceDataError(
                f"[source {source!r}] {option} names {absent[:10]}, which no pair's {group_by!r} has in "
                f"{current.get('path', 'the data')}; the values present are: {shown or 'none'}. Fix: use values "
                "from that list"
            )
    ctx.stats["groups"] = dict(sorted(counts.items()))
    if dropped:
        ctx.stats["dropped_groups"] = dict(sorted(dropped.items()))


def load_stats(ds) -> dict:
    """The counts `load_source` stored in `ds.info.description` ({} if none)."""
    desc = (ds.info.description or "") if ds.info else ""
    if desc.startswith(STATS_PREFIX):
        return json.loads(desc[len(STATS_PREFIX) :])
    return {}
