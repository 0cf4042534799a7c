"""The ``trl`` format: every preference layout TRL documents (explicit or implicit prompt, standard strings or
conversational message lists); conversational rows keep their messages in the ``conversation`` column.

Imports: the standard library, `pipeline.data.formats.base` (the shared context and helpers) and
`pipeline.data.render` (roles, the plain rendering and the conversation encoding).
"""

from __future__ import annotations

import json

from ..render import ROLES, encode_conversation, plain_prompt, plain_response
from .base import _err


def _messages(ctx, value, where: str, field: str) -> list[dict]:
    """A validated message list. Each message keeps every key it has (`tool_calls`, `name`, ... go to the chat
    template as TRL passes them); `content` is text, or absent/None in an assistant turn that makes tool calls."""
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


def fmt_trl(records, ctx, implicit=False):
    """TRL's preference layouts: explicit (`prompt`, `chosen`, `rejected`) or implicit (`chosen`, `rejected`
    holding the whole conversation) x standard (strings) or conversational (message lists); `margin` kept.
    Option `implicit`: ignore a `prompt` column and extract the prompt from chosen/rejected (datasets whose
    chosen/rejected hold the whole conversation next to a prompt string)."""
    for rec, where in records:
        prompt, chosen, rejected = _trl_fields(ctx, rec, where, implicit)
        if isinstance(chosen, str):
            row = _standard_row(ctx, where, prompt, chosen, rejected)
        else:
            row = _conversational_row(ctx, rec, where, prompt, chosen, rejected)
            if row is None:  # the same messages on both sides
                ctx.stats["identical"] += 1
                continue
        if row["chosen"] == row["rejected"]:
            ctx.stats["identical"] += 1
            continue
        if rec.get("margin") is not None:
            row["margin"] = float(ctx.get(rec, "margin", where, (int, float)))
        yield row


def _trl_fields(ctx, rec, where: str, implicit: bool):
    """`(prompt, chosen, rejected)` of a row, all strings or all message lists; `prompt` is None in the
    implicit layout (no `prompt` column, or option `implicit`)."""
    chosen, rejected = ctx.get(rec, "chosen", where, (str, list)), ctx.get(rec, "rejected", where, (str, list))
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _err(
            ctx.source,
            where,
            f"chosen is {type(chosen).__name__} but rejected is {type(rejected).__name__}",
            "give both as strings or both as message lists",
            field="chosen/rejected",
        )
    if rec.get("prompt") is None or implicit:
        return None, chosen, rejected
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
    return prompt, chosen, rejected


def _standard_row(ctx, where: str, prompt: str | None, chosen: str, rejected: str) -> dict:
    """A row of strings, kept as they are; an implicit prompt is the longest common prefix."""
    if prompt is None:
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
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversational_row(ctx, rec, where: str, prompt: list | None, chosen: list, rejected: list) -> dict | None:
    """A row of message lists: the plain HH rendering plus the messages as JSON in `conversation`; None when
    both sides hold the same messages."""
    chosen, rejected = _messages(ctx, chosen, where, "chosen"), _messages(ctx, rejected, where, "rejected")
    if prompt is not None:
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
        return None
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs:
            raise _err(
                ctx.source,
                where,
                f"the {side} side has no response after the shared prompt",
                "give both sides an assistant reply",
                field=side,
            )
    return {
        "prompt": plain_prompt(prompt),
        "chosen": plain_response(chosen),
        "rejected": plain_response(rejected),
        "conversation": encode_conversation(prompt, chosen, rejected, *_template_extras(ctx, rec, where)),
    }
