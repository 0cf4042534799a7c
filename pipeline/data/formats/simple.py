"""The one-record formats: hh-rlhf, more-json (MORE/DSP), webgpt, summarize (TL;DR), shp and our own jsonl.

Each ``fmt_*(records, ctx, **options)`` takes ``(record, location)`` pairs in file order and yields rows of
the common schema; what it drops is counted in ``ctx.stats`` (see :mod:`pipeline.data.sources` for the
layouts and the rules).

Imports: the standard library and `pipeline.data.formats.base` (the shared context and helpers).
"""

from __future__ import annotations

import re

from .base import PreferenceDataError, _err, _pair_from_transcripts, _response, hh_prompt


def fmt_hh(records, ctx, context_mismatch="drop"):
    for rec, where in records:
        chosen = ctx.get(rec, "chosen", where, str)
        rejected = ctx.get(rec, "rejected", where, str)
        pair = _pair_from_transcripts(ctx, chosen, rejected, where, "chosen/rejected", context_mismatch)
        if pair:
            yield {"prompt": pair[0], "chosen": pair[1], "rejected": pair[2]}


def fmt_more_json(records, ctx, context_mismatch="drop", with_margin=False):
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


def fmt_webgpt(records, ctx, with_margin=False):
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


def fmt_summarize(records, ctx, record_splits=None):
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


def fmt_shp(records, ctx, min_score_ratio=None):
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


def fmt_jsonl(records, ctx):
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
