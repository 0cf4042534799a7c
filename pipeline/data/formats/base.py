"""What every loader shares: the error type (`PreferenceDataError`), the per-source context `_Ctx` (field access
with clear errors, drop counters), the dialogue markers and helpers that turn transcripts into prompt/response
pairs (`split_dialogue`, `hh_prompt`, the context-mismatch rule).

Imports: the standard library only (the reader, the formats and `pipeline.data.sources` import this module).
"""

from __future__ import annotations

import math
from collections import Counter


HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
MORE_ASSISTANT = "## Assistant:"
CONTEXT_MISMATCH = ("drop", "common", "error")


class PreferenceDataError(ValueError):
    """A user-fixable problem with preference data (bad file, record, field, format, or empty result)."""


def _err(source: str, where: str, problem: str, fix: str, field: str | None = None) -> PreferenceDataError:
    f = f", field {field!r}" if field else ""
    return PreferenceDataError(f"[source {source!r}] {where}{f}: {problem}. Fix: {fix}")


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
