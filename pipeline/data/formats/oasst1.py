"""The ``oasst1`` format: OpenAssistant export trees, or the hub's flat message table rebuilt into trees; every
prompter message's ranked assistant replies form all i<j pairs.

Imports: the standard library and `pipeline.data.formats.base` (the shared context and helpers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from .base import HH_ASSISTANT, HH_HUMAN, _Ctx, _err, _response


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
    for root in _trees_from_table(flat, ctx):
        yield root, root["_where"]


def _trees_from_table(flat: list[tuple[dict, str]], ctx) -> list[dict]:
    """The roots of the flat message table rebuilt into trees (children in record order). A repeated
    message_id keeps its first row; messages whose parent is missing and messages on a parent cycle (or below
    one) are counted and skipped."""
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
    in_cycles = _count_unreachable(nodes, roots + orphans)
    if in_cycles:
        ctx.stats["cycle_messages"] += in_cycles
    return roots


def _count_unreachable(nodes: dict, starts: list[dict]) -> int:
    """Messages reachable from neither a root nor an orphan lie on a parent cycle (a message that is its own
    parent, or A -> B -> A) or below one: they are counted and skipped, never walked."""
    seen: set[int] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(node["replies"])
    return sum(1 for node in nodes.values() if id(node) not in seen)


def _render_history(turns: list[tuple[str, str]]) -> str:
    out = []
    for role, text in turns:
        out.append(f"{HH_HUMAN if role == 'prompter' else HH_ASSISTANT} {text.strip()}")
    return "".join(out) + HH_ASSISTANT


def fmt_oasst1(records, ctx, lang=None):
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
