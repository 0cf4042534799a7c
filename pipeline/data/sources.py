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
(values; dropped pairs counted as ``other_group``); per-group counts are stored under ``groups``.
`pipeline.data.build_splits` turns each group into its own source.

Every format accepts the option ``source`` (the value of the ``source`` column; default: the format
name, or the synthetic source name). Counts (records read, pairs kept, and each reason for dropping)
are logged at INFO level and stored as JSON in ``ds.info.description``; :func:`load_stats` reads them back.

Files are UTF-8 (a leading BOM is accepted). Numbers that decide a pair or its label (scores, margins)
must be finite: NaN or infinity is an error, as is a boolean where a number is expected. Bad input
(also a truncated .gz file or a non-UTF-8 byte) raises one :class:`PreferenceDataError` naming the
source, file, line and field, and the fix.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.io import is_hub_id


logger = logging.getLogger(__name__)

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
MORE_ASSISTANT = "## Assistant:"
FORMATS = ("hh-rlhf", "oasst1", "webgpt", "summarize", "shp", "more-json", "jsonl", "trl", "synthetic")
GROUP_OPTIONS = ("group_by", "group_names", "keep_groups", "drop_groups")
DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")
STATS_PREFIX = "pipeline.data stats: "
CONTEXT_MISMATCH = ("drop", "common", "error")


class PreferenceDataError(ValueError):
    """A user-fixable problem with preference data (bad file, record, field, format, or empty result)."""


def _err(source: str, where: str, problem: str, fix: str, field: str | None = None) -> PreferenceDataError:
    f = f", field {field!r}" if field else ""
    return PreferenceDataError(f"[source {source!r}] {where}{f}: {problem}. Fix: {fix}")


# ---------------------------------------------------------------------------------------------------
# Reading records (in file order), each with a human-readable location "file, line N".


def _read_text(path: Path, source: str) -> str:
    """The file's text (gunzipped for .gz); a UTF-8 BOM is accepted; a truncated gzip file or a byte that is
    not UTF-8 is one clear error naming the file (and the line)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _err(
            source,
            str(path),
            f"truncated or corrupt gzip file ({type(e).__name__}: {e})",
            "re-download or re-compress the file (gzip -t checks it)",
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise _err(
            source,
            f"{path}, line {line}",
            f"byte {data[e.start]:#04x} is not UTF-8 (the file is in another encoding, e.g. Latin-1)",
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def _read_json_file(path: Path, source: str) -> Iterator[tuple[dict, str]]:
    """A JSON array, a single JSON object, or JSON lines (decided from the content, not the extension)."""
    text = _read_text(path, source)
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _err(
                source,
                f"{path}, line {e.lineno}",
                f"malformed JSON array ({e.msg})",
                "repair the file or re-export it as JSON lines",
            ) from None
        for i, rec in enumerate(data):
            yield rec, f"{path}, record {i}"
        return
    lines = text.splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == 1 and stripped[0] == "{":  # maybe one pretty-printed object
                try:
                    yield json.loads(text), f"{path}, record 0"
                    return
                except json.JSONDecodeError:
                    pass
            raise _err(
                source,
                f"{path}, line {i}",
                f"malformed JSON line ({e.msg} at column {e.colno})",
                "fix or delete that line (each line must hold one complete JSON object)",
            ) from None
        yield rec, f"{path}, line {i}"


def _read_parquet(path: Path, source: str) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise _err(source, str(path), f"not a readable parquet file ({e})", "check the file") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield rec, f"{path}, row {i}"
            i += 1


def _read_file(path: Path, source: str) -> Iterator[tuple[dict, str]]:
    if path.name.endswith(".parquet"):
        yield from _read_parquet(path, source)
    elif path.name.endswith(DATA_SUFFIXES):
        yield from _read_json_file(path, source)
    else:
        raise _err(source, str(path), "unsupported file type", f"use one of {', '.join(DATA_SUFFIXES)}")


def _split_of(filename: str) -> str | None:
    """The split a data file is named after: its first token (`test.jsonl.gz`, `train-00000-of-00001.parquet`)
    or a dotted middle token (MORE/DSP's `helpful.test.json`)."""
    m = re.search(r"\.(train|test|validation|valid|dev|eval)\.", filename)
    if m:
        return m.group(1)
    m = re.match(r"([A-Za-z0-9]+)(?:[-_.])", filename)
    return m.group(1) if m else None


def _dir_files(root: Path, split: str | None, source: str) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise _err(
            source,
            str(root),
            "no data files in this directory",
            f"point path at a file or a directory holding {', '.join(DATA_SUFFIXES)} files",
        )
    split_names = {"train", "test", "validation", "valid", "dev", "eval"}
    named = {_split_of(p.name) for p in files} & split_names
    if split is None:
        if named:
            raise _err(
                source,
                str(root),
                f"the directory holds several splits ({sorted(named)})",
                "pass split=... (e.g. split='train')",
            )
        return files
    chosen = [p for p in files if _split_of(p.name) == split]
    if not chosen:  # split names with an underscore (UltraFeedback's train_prefs-00000-of-00001.parquet)
        chosen = [p for p in files if re.match(re.escape(split) + r"[-.]", p.name)]
    if not chosen:
        raise _err(
            source,
            str(root),
            f"no data file for split {split!r} (files: {[p.name for p in files][:10]})",
            f"use one of the splits present ({sorted(named) or 'none: pass split=None'})",
        )
    return chosen


def _is_saved_dataset(p: Path) -> bool:
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _read_saved(p: Path, split: str | None, source: str) -> Iterator[tuple[dict, str]]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise _err(
                source,
                str(p),
                f"a saved DatasetDict with splits {sorted(ds)}; split {split!r} is not one",
                f"pass split= one of {sorted(ds)}",
            )
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield rec, f"{p}, row {i}"


def _read_records(path: str, split, name, data_dir, source) -> Iterator[tuple[dict, str]]:
    p = Path(path).expanduser()
    if p.is_file():
        yield from _read_file(p, source)
        return
    if p.is_dir():
        for sub in (name, data_dir):
            if sub and (p / sub).is_dir():
                p = p / sub
        if _is_saved_dataset(p):
            yield from _read_saved(p, split, source)
            return
        for f in _dir_files(p, split, source):
            yield from _read_file(f, source)
        return
    if is_hub_id(path):
        import datasets

        logger.info("loading hub dataset %s (config %s, split %s)", path, name, split or "train")
        try:
            ds = datasets.load_dataset(path, name, split=split or "train", data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - the hub raises many types
            raise _err(
                source,
                str(path),
                f"not a local path, and loading it from the hub failed ({e})",
                "check the path (relative to the working directory) or the hub id, config and split",
            ) from e
        for i, rec in enumerate(ds):
            yield rec, f"{path}[{split or 'train'}], row {i}"
        return
    raise _err(
        source,
        str(path),
        "no such file or directory (and not a hub id owner/name)",
        "check the path, or give a hub dataset id",
    )


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the formats


class _Ctx:
    def __init__(self, source: str):
        self.source = source
        self.stats = Counter()

    def get(self, rec, dotted: str, where: str, types=None):
        """rec['a']['b'] for 'a.b', with a clear error when missing or of the wrong type."""
        cur = rec
        for part in dotted.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            else:
                raise _err(
                    self.source,
                    where,
                    "missing field",
                    "check that the file has this source's layout (or pick the right format)",
                    field=dotted,
                )
        if types is not None:
            allowed = (types,) if isinstance(types, type) else tuple(types)
            if not isinstance(cur, allowed) or (isinstance(cur, bool) and bool not in allowed):
                names = "/".join(t.__name__ for t in allowed)
                raise _err(
                    self.source,
                    where,
                    f"expected {names}, got {type(cur).__name__} {cur!r}"[:200],
                    "check the record",
                    field=dotted,
                )
        if isinstance(cur, float) and not math.isfinite(cur):
            raise _err(
                self.source,
                where,
                f"the number is {cur} (not finite)",
                "give a finite number, or drop the record",
                field=dotted,
            )
        return cur


def hh_prompt(human_text: str) -> str:
    """One-turn HH-layout prompt: "\\n\\nHuman: {text}\\n\\nAssistant:"."""
    return f"{HH_HUMAN} {human_text.strip()}{HH_ASSISTANT}"


def _response(text: str) -> str:
    return " " + text.strip()


def split_dialogue(text: str) -> tuple[str, str] | None:
    """Split a full dialogue at its LAST assistant marker (HH or MORE '## Assistant:' + newline).

    Returns (prompt ending with the marker, response) or None when there is no marker.
    """
    i_hh = text.rfind(HH_ASSISTANT)
    i_more = text.rfind(MORE_ASSISTANT)
    if i_hh < 0 and i_more < 0:
        return None
    if i_hh >= i_more:
        cut = i_hh + len(HH_ASSISTANT)
    else:
        cut = i_more + len(MORE_ASSISTANT)
        if text[cut : cut + 1] == "\n":
            cut += 1
    return text[:cut], text[cut:]


def _common_split(a: str, b: str) -> tuple[str, str, str] | None:
    """Split two transcripts at the last assistant marker that lies inside their common prefix."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    res = split_dialogue(a[:n])
    if res is None:
        return None
    prompt = res[0]
    return prompt, a[len(prompt) :], b[len(prompt) :]


def _pair_from_transcripts(ctx: _Ctx, chosen: str, rejected: str, where: str, field: str, mismatch: str):
    """(prompt, chosen_response, rejected_response) from two full transcripts, or None if dropped."""
    if chosen == rejected:
        ctx.stats["identical"] += 1
        return None
    c, r = split_dialogue(chosen), split_dialogue(rejected)
    if c is None or r is None:
        raise _err(
            ctx.source,
            where,
            "no assistant marker ('\\n\\nAssistant:' or '## Assistant:') in the text",
            "every text must be a full dialogue ending with the assistant's response",
            field=field,
        )
    if c[0] == r[0]:
        return c[0], c[1], r[1]
    if mismatch == "drop":
        ctx.stats["context_mismatch"] += 1
        return None
    if mismatch == "common":
        res = _common_split(chosen, rejected)
        if res is None:
            ctx.stats["context_mismatch"] += 1
            return None
        ctx.stats["context_mismatch_common"] += 1
        return res
    raise _err(
        ctx.source,
        where,
        "the two sides have different contexts before their last assistant turn",
        "pass context_mismatch='drop' or 'common'",
        field=field,
    )


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
# Formats. Each takes (records, ctx, **options) and yields row dicts.


def _fmt_hh(records, ctx, context_mismatch="drop"):
    for rec, where in records:
        chosen = ctx.get(rec, "chosen", where, str)
        rejected = ctx.get(rec, "rejected", where, str)
        pair = _pair_from_transcripts(ctx, chosen, rejected, where, "chosen/rejected", context_mismatch)
        if pair:
            yield {"prompt": pair[0], "chosen": pair[1], "rejected": pair[2]}


def _fmt_more_json(records, ctx, context_mismatch="drop", with_margin=False):
    for rec, where in records:
        texts = ctx.get(rec, "text", where, list)
        scores = ctx.get(rec, "score", where, list)
        if len(texts) != len(scores) or len(texts) < 2:
            raise _err(
                ctx.source,
                where,
                f"{len(texts)} texts but {len(scores)} scores",
                "give at least 2 texts and one score per text",
                field="text/score",
            )
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                si, sj = (
                    ctx.get(rec, f"score.{i}", where, (int, float)),
                    ctx.get(rec, f"score.{j}", where, (int, float)),
                )
                if si == sj:
                    ctx.stats["ties"] += 1
                    continue
                hi, lo = (i, j) if si > sj else (j, i)
                a, b = ctx.get(rec, f"text.{hi}", where, str), ctx.get(rec, f"text.{lo}", where, str)
                pair = _pair_from_transcripts(ctx, a, b, where, "text", context_mismatch)
                if pair:
                    row = {"prompt": pair[0], "chosen": pair[1], "rejected": pair[2]}
                    if with_margin:
                        row["margin"] = float(abs(si - sj))
                    yield row


def _fmt_webgpt(records, ctx, with_margin=False):
    for rec, where in records:
        q = ctx.get(rec, "question.full_text", where, str)
        a0, a1 = ctx.get(rec, "answer_0", where, str), ctx.get(rec, "answer_1", where, str)
        s0, s1 = ctx.get(rec, "score_0", where, (int, float)), ctx.get(rec, "score_1", where, (int, float))
        if s0 == s1:
            ctx.stats["ties"] += 1
            continue
        if a0.strip() == a1.strip():
            ctx.stats["identical"] += 1
            continue
        c, r = (a0, a1) if s0 > s1 else (a1, a0)
        row = {"prompt": hh_prompt(q), "chosen": _response(c), "rejected": _response(r)}
        if with_margin:
            row["margin"] = float(abs(s0 - s1))
        yield row


def summarize_prompt(subreddit: str | None, title: str | None, post: str) -> str:
    """The TL;DR prompt in HH layout, built from the Reddit post (or the CNN/DM article)."""
    head = "Summarize the following post in one or two sentences (TL;DR).\n\n"
    if subreddit:
        head += f"SUBREDDIT: r/{re.sub(r'^/?r/', '', subreddit.strip())}\n"
    if title:
        head += f"TITLE: {title.strip()}\n"
    return hh_prompt(head + f"POST: {post.strip()}")


def _fmt_summarize(records, ctx, record_splits=None):
    if isinstance(record_splits, str):  # one split name, not a sequence of characters
        record_splits = [record_splits]
    if record_splits is not None and not (
        isinstance(record_splits, (list, tuple, set)) and all(isinstance(x, str) for x in record_splits)
    ):
        raise PreferenceDataError(
            f"[source {ctx.source!r}] option record_splits={record_splits!r}: expected a split "
            "name or a list of them. Fix: e.g. record_splits: [valid1, valid2]"
        )
    keep = set(record_splits) if record_splits else None
    for rec, where in records:
        if keep is not None and rec.get("split") not in keep:
            ctx.stats["other_split"] += 1
            continue
        info = ctx.get(rec, "info", where, dict)
        post = info.get("post") or info.get("article")
        if not isinstance(post, str):
            raise _err(
                ctx.source,
                where,
                "missing post text",
                "each comparison needs info.post (or info.article for CNN/DM rows)",
                field="info.post",
            )
        summaries = ctx.get(rec, "summaries", where, list)
        choice = ctx.get(rec, "choice", where, int)
        if len(summaries) != 2 or choice not in (0, 1):
            raise _err(
                ctx.source,
                where,
                f"expected 2 summaries and choice 0/1, got {len(summaries)} and {choice}",
                "check the record",
                field="choice",
            )
        c = ctx.get(rec, f"summaries.{choice}.text", where, str)
        r = ctx.get(rec, f"summaries.{1 - choice}.text", where, str)
        if c.strip() == r.strip():
            ctx.stats["identical"] += 1
            continue
        yield {
            "prompt": summarize_prompt(info.get("subreddit"), info.get("title"), post),
            "chosen": _response(c),
            "rejected": _response(r),
        }


def _fmt_shp(records, ctx, min_score_ratio=None):
    for rec, where in records:
        h = ctx.get(rec, "history", where, str)
        a, b = ctx.get(rec, "human_ref_A", where, str), ctx.get(rec, "human_ref_B", where, str)
        label = ctx.get(rec, "labels", where, int)
        if label not in (0, 1):
            raise _err(ctx.source, where, f"labels must be 0 or 1, got {label}", "check the record", field="labels")
        if min_score_ratio is not None and ctx.get(rec, "score_ratio", where, (int, float)) < min_score_ratio:
            ctx.stats["below_min_score_ratio"] += 1
            continue
        if a.strip() == b.strip():
            ctx.stats["identical"] += 1
            continue
        c, r = (a, b) if label == 1 else (b, a)
        yield {"prompt": hh_prompt(h), "chosen": _response(c), "rejected": _response(r)}


def _fmt_jsonl(records, ctx):
    for rec, where in records:
        row = {k: ctx.get(rec, k, where, str) for k in ("prompt", "chosen", "rejected")}
        if "source" in rec and rec["source"] is not None:
            row["source"] = ctx.get(rec, "source", where, str)
        if "margin" in rec and rec["margin"] is not None:
            row["margin"] = float(ctx.get(rec, "margin", where, (int, float)))
        if row["chosen"] == row["rejected"]:
            ctx.stats["identical"] += 1
            continue
        yield row


# -- TRL preference formats -------------------------------------------------------------------------


def _messages(ctx, value, where: str, field: str) -> list[dict]:
    """A validated message list. Each message keeps every key it has (`tool_calls`, `name`, ... go to the chat
    template as TRL passes them); `content` is text, or absent/None in an assistant turn that makes tool calls."""
    from .render import ROLES

    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise _err(
                ctx.source,
                where,
                "a message without 'role' and 'content'",
                "every message must be {'role': ..., 'content': ...} (or an assistant turn with 'tool_calls')",
                field=f,
            )
        if m["role"] not in ROLES:
            raise _err(
                ctx.source, where, f"unknown role {m['role']!r}", f"use one of {list(ROLES)}", field=f + ".role"
            )
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise _err(
                ctx.source,
                where,
                f"content is {type(content).__name__}, not text",
                "only text messages are supported (flatten multimodal content parts to a string)",
                field=f + ".content",
            )
        try:
            json.dumps(m)
        except (TypeError, ValueError) as e:
            raise _err(
                ctx.source, where, f"the message is not JSON data ({e})", "keep messages to JSON values", field=f
            ) from None
        out.append(dict(m))
    return out


def _template_extras(ctx, rec, where: str) -> tuple[list | None, dict | None]:
    """A conversational row's `tools` (a list, or TRL's JSON string of one) and `chat_template_kwargs` (a dict),
    which TRL passes to `apply_chat_template`; None where absent."""
    tools = rec.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise _err(
                ctx.source,
                where,
                f"tools is a string but not JSON ({e})",
                "give a list of tool schemas",
                field="tools",
            ) from None
    if tools is not None and not isinstance(tools, list):
        raise _err(ctx.source, where, f"tools is {type(tools).__name__}", "give a list of tool schemas", field="tools")
    kwargs = rec.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _err(
            ctx.source,
            where,
            f"chat_template_kwargs is {type(kwargs).__name__}",
            "give a mapping of extra chat-template variables",
            field="chat_template_kwargs",
        )
    return tools or None, kwargs or None


def _trl_prompt_of_strings(chosen: str, rejected: str) -> str:
    """TRL's `extract_prompt` for strings: the longest common prefix, a space before the split point going
    to the responses."""
    n = 0
    for x, y in zip(chosen, rejected):
        if x != y:
            break
        n += 1
    if n and n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n]


def _fmt_trl(records, ctx, implicit=False):
    """TRL's preference layouts: explicit (`prompt`, `chosen`, `rejected`) or implicit (`chosen`, `rejected`
    holding the whole conversation) x standard (strings) or conversational (message lists); `margin` kept.
    Option `implicit`: ignore a `prompt` column and extract the prompt from chosen/rejected (datasets whose
    chosen/rejected hold the whole conversation next to a prompt string)."""
    from .render import encode_conversation, plain_prompt, plain_response

    for rec, where in records:
        chosen, rejected = ctx.get(rec, "chosen", where, (str, list)), ctx.get(rec, "rejected", where, (str, list))
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise _err(
                ctx.source,
                where,
                f"chosen is {type(chosen).__name__} but rejected is {type(rejected).__name__}",
                "give both as strings or both as message lists",
                field="chosen/rejected",
            )
        explicit = rec.get("prompt") is not None and not implicit
        if explicit:
            prompt = ctx.get(rec, "prompt", where, (str, list))
            if isinstance(prompt, str) != isinstance(chosen, str):
                raise _err(
                    ctx.source,
                    where,
                    f"prompt is {type(prompt).__name__} but chosen/rejected are {type(chosen).__name__}",
                    "give prompt, chosen and rejected of one kind (all strings "
                    "or all message lists), or pass implicit=true when chosen/rejected hold the whole "
                    "conversation",
                    field="prompt",
                )
        if isinstance(chosen, str):
            if not explicit:
                prompt = _trl_prompt_of_strings(chosen, rejected)
                if not prompt.strip() and chosen != rejected:
                    raise _err(
                        ctx.source,
                        where,
                        "implicit prompt: chosen and rejected share no common prefix, so the prompt would be empty",
                        "give a 'prompt' column (explicit layout), or start chosen and rejected with the same "
                        "conversation (the prompt is their longest common prefix)",
                        field="chosen/rejected",
                    )
                chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        else:
            chosen, rejected = _messages(ctx, chosen, where, "chosen"), _messages(ctx, rejected, where, "rejected")
            if explicit:
                prompt = _messages(ctx, prompt, where, "prompt")
                if prompt and prompt[-1]["role"] == "assistant":
                    raise _err(
                        ctx.source,
                        where,
                        "the prompt ends with an assistant turn",
                        "end the prompt with the user's turn; the assistant's reply goes in chosen/rejected",
                        field="prompt",
                    )
            else:  # the longest common message prefix, cut back to its last non-assistant turn
                n = 0
                while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                    n += 1
                while n and chosen[n - 1]["role"] == "assistant":
                    n -= 1
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise _err(
                    ctx.source,
                    where,
                    "empty prompt (no user turn before the responses)",
                    "start the conversation with the user's message",
                    field="prompt",
                )
            for side, msgs in (("chosen", chosen), ("rejected", rejected)):
                if msgs and msgs[0]["role"] != "assistant":
                    raise _err(
                        ctx.source,
                        where,
                        f"the {side} response starts with a {msgs[0]['role']!r} turn",
                        "responses must start with the assistant's turn",
                        field=side,
                    )
            if chosen == rejected:
                ctx.stats["identical"] += 1
                continue
            for side, msgs in (("chosen", chosen), ("rejected", rejected)):
                if not msgs:
                    raise _err(
                        ctx.source,
                        where,
                        f"the {side} side has no response after the shared prompt",
                        "give both sides an assistant reply",
                        field=side,
                    )
            row = {
                "prompt": plain_prompt(prompt),
                "chosen": plain_response(chosen),
                "rejected": plain_response(rejected),
                "conversation": encode_conversation(prompt, chosen, rejected, *_template_extras(ctx, rec, where)),
            }
        if row["chosen"] == row["rejected"]:
            ctx.stats["identical"] += 1
            continue
        if rec.get("margin") is not None:
            row["margin"] = float(ctx.get(rec, "margin", where, (int, float)))
        yield row


# -- OASST1 ------------------------------------------------------------------------------------------


def _oasst_roots(records, ctx) -> Iterator[tuple[dict, str]]:
    """Yield (root message with nested replies, location) for tree records or the flat message table."""
    flat: list[tuple[dict, str]] = []
    for rec, where in records:
        if isinstance(rec.get("prompt"), dict):
            yield rec["prompt"], where
        elif "replies" in rec and "text" in rec:
            yield rec, where
        elif "message_id" in rec:  # a row of the flat table (its text is checked when it is used)
            flat.append((rec, where))
        else:
            raise _err(
                ctx.source,
                where,
                "neither an export tree nor a message row",
                "give OASST export trees ({'prompt': {...,'replies': [...]}}) or the flat message table",
                field="prompt/message_id",
            )
    if not flat:
        return
    if getattr(ctx, "group_by", None):
        raise _err(
            ctx.source,
            flat[0][1],
            "group_by needs one record per conversation",
            "use the OASST export trees (one tree per record) with group_by, or drop group_by",
        )
    nodes = {}
    for rec, where in flat:
        mid = rec["message_id"]
        if mid in nodes:  # a repeated id: keep the first row (a later one could make its own parent a loop)
            ctx.stats["duplicate_message_ids"] += 1
            continue
        node = dict(rec)
        node["replies"] = []
        node["_where"] = where
        nodes[mid] = node
    roots, orphans = [], []
    for node in nodes.values():
        parent = node.get("parent_id")
        if parent is None:
            roots.append(node)
        elif parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            ctx.stats["orphan_messages"] += 1
            orphans.append(node)
    # Messages reachable from neither a root nor an orphan lie on a parent cycle (a message that is its own
    # parent, or A -> B -> A) or below one: they are counted and skipped, never walked.
    seen: set[int] = set()
    stack = roots + orphans
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(node["replies"])
    in_cycles = sum(1 for node in nodes.values() if id(node) not in seen)
    if in_cycles:
        ctx.stats["cycle_messages"] += in_cycles
    for root in roots:
        yield root, root["_where"]


def _render_history(turns: list[tuple[str, str]]) -> str:
    out = []
    for role, text in turns:
        out.append(f"{HH_HUMAN if role == 'prompter' else HH_ASSISTANT} {text.strip()}")
    return "".join(out) + HH_ASSISTANT


def _fmt_oasst1(records, ctx, lang=None):
    for root, where in _oasst_roots(records, ctx):
        ctx.stats["trees"] += 1
        stack = [(root, [])]
        while stack:  # depth-first, pre-order, children in file order
            msg, history = stack.pop()
            if msg.get("deleted") or msg.get("synthetic") or (lang and msg.get("lang") not in (None, lang)):
                ctx.stats["skipped_messages"] += 1 + _count_descendants(msg)
                continue
            role = ctx.get(msg, "role", _where(msg, where), str)
            text = ctx.get(msg, "text", _where(msg, where), str)
            turns = history + [(role, text)]
            replies = msg.get("replies") or []
            if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
                raise _err(
                    ctx.source,
                    _where(msg, where),
                    "replies must be a list of messages",
                    "check the record",
                    field="replies",
                )
            if role == "prompter":
                ranks = [_rank(ctx, r, _where(r, where)) for r in replies]
                ranked = [
                    r
                    for r, k in zip(replies, ranks)
                    if r.get("role") == "assistant"
                    and k is not None
                    and not r.get("deleted")
                    and not r.get("synthetic")
                    and not (lang and r.get("lang") not in (None, lang))
                ]
                for r in ranked:
                    ctx.get(r, "text", _where(r, where), str)
                ctx.stats["unranked_replies"] += sum(
                    1 for r, k in zip(replies, ranks) if r.get("role") == "assistant" and k is None
                )
                if len(ranked) >= 2:
                    prompt = _render_history(turns)
                    for i in range(len(ranked)):
                        for j in range(i + 1, len(ranked)):
                            a, b = ranked[i], ranked[j]
                            ka, kb = _rank(ctx, a, where), _rank(ctx, b, where)
                            if ka == kb:
                                ctx.stats["ties"] += 1
                                continue
                            c, r = (a, b) if ka < kb else (b, a)
                            if c["text"].strip() == r["text"].strip():
                                ctx.stats["identical"] += 1
                                continue
                            yield {"prompt": prompt, "chosen": _response(c["text"]), "rejected": _response(r["text"])}
            for child in reversed(replies):
                stack.append((child, turns))


def _where(msg: dict, where: str) -> str:
    """A message's location: its own row (flat table), else its tree's record and its message_id."""
    if "_where" in msg:
        return msg["_where"]
    return f"{where}, message {msg['message_id']!r}" if "message_id" in msg else where


def _rank(ctx: _Ctx, msg: dict, where: str):
    """The sibling rank (0 = best), None when unranked (missing, null, or NaN in the hub's float column)."""
    r = msg.get("rank")
    if r is None or (isinstance(r, float) and r != r):
        return None
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r != int(r) or r < 0:
        raise _err(
            ctx.source,
            where,
            f"rank must be a whole number >= 0 (0 = best) or null, got {r!r}"[:200],
            "fix the record (OASST ranks are 0, 1, 2, ...)",
            field="rank",
        )
    return int(r)


def _count_descendants(msg) -> int:
    return sum(1 + _count_descendants(r) for r in msg.get("replies") or [])


_FORMATS = {
    "hh-rlhf": (_fmt_hh, {"context_mismatch"}),
    "more-json": (_fmt_more_json, {"context_mismatch", "with_margin"}),
    "webgpt": (_fmt_webgpt, {"with_margin"}),
    "summarize": (_fmt_summarize, {"record_splits"}),
    "shp": (_fmt_shp, {"min_score_ratio"}),
    "oasst1": (_fmt_oasst1, {"lang"}),
    "jsonl": (_fmt_jsonl, set()),
    "trl": (_fmt_trl, {"implicit"}),
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
    fn, allowed = _FORMATS[format]
    _check_options(format, options, allowed)
    ctx = _Ctx(source)
    ctx.group_by = grouping.get("group_by")
    counted = Counter()
    current = {"path": f"{path}" + (f" (split {split!r})" if split else "")}

    def records():
        for rec, where in _read_records(str(path), split, name, data_dir, source):
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
    dropped = {k: v for k, v in ctx.stats.items() if v and k not in ("trees", "groups")}
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
    (dropped rows counted as ``other_group``). Per-group pair counts go to the stats (``groups``)."""
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
    counts, seen = Counter(), Counter()
    for row in rows:
        value = str(current["group"])
        seen[value] += 1
        if (keep is not None and value not in keep) or value in drop:
            ctx.stats["other_group"] += 1
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


def load_stats(ds) -> dict:
    """The counts `load_source` stored in `ds.info.description` ({} if none)."""
    desc = (ds.info.description or "") if ds.info else ""
    if desc.startswith(STATS_PREFIX):
        return json.loads(desc[len(STATS_PREFIX) :])
    return {}
