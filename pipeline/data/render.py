"""How a preference pair or a prompt becomes text for one tokenizer (the only place that decides it).

Rows come in two kinds (see `pipeline.data.sources`):

* **text rows** (every paper layout, TRL's *standard* format): `prompt`, `chosen`, `rejected` are strings
  and are used as they are, whatever the tokenizer (TRL's rule: standard data is never templated). The
  paper's layouts are the HH layout already.
* **conversational rows** (TRL's *conversational* format): the row also carries its messages in the
  string column `conversation` (JSON ``{"prompt": [...], "chosen": [...], "rejected": [...]}``, each a
  list of ``{"role", "content"}``; ``""`` for text rows). Its `prompt`/`chosen`/`rejected` strings hold
  the PLAIN rendering below, so code that hashes, compares or slices `prompt` (splits, resampling,
  mixing, distinct prompts) works on both kinds alike, and sources of both kinds mix in one Dataset.

Rendering a conversational row for a tokenizer:

* with a chat template (the tokenizer's own, or the recipe's `chat_template`): TRL's rules. The prompt
  for generation is ``apply_chat_template(prompt, add_generation_prompt=True)``; a pair is
  ``apply_chat_template(prompt + chosen)`` / ``(prompt + rejected)``, its prompt text being the common
  prefix of those and the generation prompt (so ``prompt_text + chosen_text`` is exactly the templated
  conversation). Templated text carries its own special tokens: it is tokenized without adding any and
  without an appended EOS (TRL does the same for conversational data).
* without one (or with ``chat_template: none``): the PLAIN layout, the HH layout the paper's data uses:
  ``"\\n\\nSystem: s"`` (if any) ``"\\n\\nHuman: u1\\n\\nAssistant: a1\\n\\nHuman: u2\\n\\nAssistant:"`` for the
  prompt and ``" " + reply`` for the response (further turns continue in the same layout). Contents
  are stripped of surrounding whitespace, as the loaders of the paper's sources do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import RecipeError


PLAIN_MARKERS = {"user": "\n\nHuman:", "assistant": "\n\nAssistant:", "system": "\n\nSystem:", "tool": "\n\nTool:"}
ROLES = tuple(PLAIN_MARKERS)


# ---------------------------------------------------------------------------------------------------
# Messages and the plain layout (pure string functions)


def is_conversation(value) -> bool:
    """True for a list of message dicts (TRL's conversational format); False for a string."""
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def plain_content(message: dict) -> str:
    """A message's text in the plain layout: its content, then its tool calls (if any) as compact JSON."""
    text = (message.get("content") or "").strip()
    if message.get("tool_calls"):
        calls = json.dumps(message["tool_calls"], ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        text = f"{text} {calls}" if text else calls
    return text


def plain_prompt(messages: list[dict]) -> str:
    """The plain (HH) layout of a prompt: every turn with its marker, ending with the assistant marker."""
    return "".join(f"{PLAIN_MARKERS[m['role']]} {plain_content(m)}" for m in messages) + PLAIN_MARKERS["assistant"]


def plain_response(messages: list[dict]) -> str:
    """The plain layout of a response that follows `plain_prompt`: ``" " + first reply``, then any further
    turns with their markers."""
    if not messages:
        return ""
    head, rest = messages[0], messages[1:]
    return " " + plain_content(head) + "".join(f"{PLAIN_MARKERS[m['role']]} {plain_content(m)}" for m in rest)


def plain_to_messages(prompt: str) -> list[dict]:
    """The inverse of `plain_prompt`: an HH-layout prompt (ending with the assistant marker) as messages."""
    import re

    parts = re.split(r"(\n\n(?:Human|Assistant|System|Tool):)", prompt)
    roles = {v: k for k, v in PLAIN_MARKERS.items()}
    out = []
    for marker, text in zip(parts[1::2], parts[2::2]):
        if text.strip():
            out.append({"role": roles[marker], "content": text.strip()})
    return out


def encode_conversation(
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    tools: list | None = None,
    chat_template_kwargs: dict | None = None,
) -> str:
    """The `conversation` column's value (compact, key-sorted JSON: equal conversations, equal strings). A row's
    `tools` and `chat_template_kwargs` (TRL's columns) ride along, only when given."""
    value = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if tools:
        value["tools"] = tools
    if chat_template_kwargs:
        value["chat_template_kwargs"] = chat_template_kwargs
    return json.dumps(
        value,
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )


def decode_conversation(value: str | None) -> dict | None:
    """The messages of a row's `conversation` value, or None for a text row (``""`` or missing)."""
    return json.loads(value) if value else None


# ---------------------------------------------------------------------------------------------------
# Chat templates


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def set_chat_template(tokenizer, spec: str | None, *, where: str = "chat_template"):
    """Apply a recipe's `chat_template` choice to `tokenizer` (in place; returns it).

    `spec`: None keeps the tokenizer's own template (if any); ``"none"`` removes it (plain layout); a path
    to an existing file (``.jinja``, ``.j2``, ``.txt``) is read; any other string must be a Jinja template.
    """
    if spec is None:
        return tokenizer
    tokenizer.chat_template = chat_template_text(spec, where=where)
    return tokenizer


def chat_template_text(spec: str, *, where: str = "chat_template") -> str | None:
    """The template text a recipe's `chat_template` string sets, checked (`check_chat_template`): None for
    ``"none"`` (the plain layout), a file's text for a path, else the string itself. Raises one ValueError
    naming `where` for a path that does not exist or a template that does not parse or raises."""
    if spec.strip().lower() == "none":
        return None
    text = spec
    if "{" not in spec:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise ValueError(
                f"{where}: {spec!r} is neither a Jinja template (no '{{' in it) nor an existing file. "
                "Fix: give the template text, a path to a .jinja file, or 'none' for the plain layout"
            )
        text = p.read_text(encoding="utf-8")
    check_chat_template(text, where=where if text == spec else f"{where} ({spec})")
    return text


def check_template_setting(spec: str | None, key: str, origin) -> None:
    """A recipe's `<section>.chat_template` checked before any work (also under --dry-run): one RecipeError
    naming the key and where it was set (`origin(key)`: the file or the override) for a template that does not
    parse or raises, or a path that does not exist. None (keep the tokenizer's) and 'none' pass."""
    if spec is None:
        return
    try:
        chat_template_text(spec, where=key)
    except ValueError as e:
        raise RecipeError(f"{e} (in {origin(key)})") from None


# How long the check of a chat template may render its two-turn conversation (`check_chat_template`). A template
# written with nested huge loops would otherwise hang --dry-run and every stage that renders with it.
TEMPLATE_CHECK_SECONDS = 10.0


class TemplateTooSlow(BaseException):
    """A chat template's check rendering ran past `TEMPLATE_CHECK_SECONDS` (a BaseException, so no `except
    Exception` inside Jinja or transformers swallows it)."""


def _within(seconds: float, render):
    """`render()`, stopped with TemplateTooSlow once it has run `seconds`: a trace function on THIS thread
    (sys.settrace; no signal, so it works outside the main thread too) checks the clock every 256 Python
    events, which stops any loop a Jinja template runs (its compiled code is Python). The previous trace
    function (a debugger, coverage) is restored afterwards."""
    import sys
    import time

    deadline = time.monotonic() + seconds
    events = 0

    def local(frame, event, arg):
        nonlocal events
        events += 1
        if not events % 256 and time.monotonic() > deadline:
            raise TemplateTooSlow
        return local

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local)
    try:
        return render()
    finally:
        sys.settrace(previous)


def check_chat_template(text: str, *, where: str = "chat_template", fix: str | None = None) -> None:
    """Render `text` on a two-turn conversation (and a generation prompt), within `TEMPLATE_CHECK_SECONDS`: a
    template that does not parse, raises, or does not finish in time is ONE ValueError naming `where` (and
    `fix`, by default: set the key `where` starts with to none), before any work, instead of a Jinja traceback
    mid-stage or a hang."""
    from jinja2 import TemplateError, TemplateSyntaxError
    from transformers.utils.chat_template_utils import render_jinja_template

    fix = fix or f"correct the template, or set {where.split(' ')[0]}=none for the plain layout"
    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    def render():
        render_jinja_template(conversations=[sample], chat_template=text)
        render_jinja_template(conversations=[sample[:1]], chat_template=text, add_generation_prompt=True)

    try:
        _within(TEMPLATE_CHECK_SECONDS, render)
    except TemplateTooSlow:
        raise ValueError(
            f"{where}: the chat template did not finish rendering a two-turn check conversation within "
            f"{TEMPLATE_CHECK_SECONDS:g} s (a loop too large?). Fix: {fix}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any error of the user's template is reported the same way
        line = f" (template line {e.lineno})" if getattr(e, "lineno", None) else ""
        kind = "does not parse" if isinstance(e, TemplateSyntaxError) else "raises on a user/assistant turn"
        detail = str(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{where}: the chat template {kind}{line}: {detail}. Fix: {fix}") from None


def check_tokenizer_templates(templates: str | dict | None, source: str, key: str | None = None) -> None:
    """A tokenizer's OWN chat template(s) (its `chat_template`: a string or {name: template}), used because the
    recipe's `key` is null (or, without `key`, because the model ships it), checked like a recipe's
    (`check_chat_template`): one ValueError naming the template (shipped with `source`) and the error."""
    if not templates:
        return
    items = templates.items() if isinstance(templates, dict) else [("", templates)]
    for name, text in items:
        label = f" {name!r}" if name else ""
        used = f" (used because {key} is null)" if key else ""
        fix = (
            f"set {key} to a template of your own (a Jinja string or a .jinja file), or to none for the plain layout"
            if key
            else "correct the template in the model's tokenizer files (chat_template.jinja or tokenizer_config.json)"
        )
        check_chat_template(text, where=f"the chat template{label} shipped with {source}{used}", fix=fix)


def template_special_tokens(template: str | None) -> list[str]:
    """The ``<|...|>``-style marker strings a Jinja template writes literally (to add as special tokens to a
    tokenizer trained in-process, so each marker is ONE token)."""
    import re

    if not template:
        return []
    return list(dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>", template)))


def _common_prefix(*texts: str) -> str:
    n = min(len(t) for t in texts)
    for i in range(n):
        if len({t[i] for t in texts}) > 1:
            return texts[0][:i]
    return texts[0][:n]


def template_kwargs(conv: dict) -> dict:
    """The extra `apply_chat_template` arguments of a decoded conversation, as TRL builds them from a row:
    ``{"tools": tools, **chat_template_kwargs}``."""
    return {"tools": conv.get("tools"), **(conv.get("chat_template_kwargs") or {})}


def _apply(tokenizer, messages: list[dict], **kwargs) -> str:
    """`apply_chat_template(messages, tokenize=False, **kwargs)`; an error the template raises on the data is
    one ValueError naming the tokenizer's template, not a Jinja traceback."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        raise ValueError(
            f"the chat template of the tokenizer {getattr(tokenizer, 'name_or_path', '') or ''} raises on a "
            f"conversation of the data ({len(messages)} messages, roles {[m.get('role') for m in messages]}): {e}. "
            "Fix: correct the template (the recipe's chat_template key sets another one), or drop that row"
        ) from None


def templated_prompt(tokenizer, prompt: list[dict], **kwargs) -> str:
    """The generation prompt: ``apply_chat_template(prompt, add_generation_prompt=True, **kwargs)``."""
    return _apply(tokenizer, prompt, add_generation_prompt=True, **kwargs)


def templated_pair(
    tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], **kwargs
) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text) with prompt_text + chosen_text the templated prompt + chosen
    conversation (TRL's rule, including its common-prefix guard against templates whose generation prompt
    differs from the prompt part of the full conversation); `kwargs` (tools, template variables) go to every
    `apply_chat_template` call."""
    gen = templated_prompt(tokenizer, prompt, **kwargs)
    full_c = _apply(tokenizer, prompt + chosen, **kwargs)
    full_r = _apply(tokenizer, prompt + rejected, **kwargs)
    p = _common_prefix(gen, full_c, full_r)
    return p, full_c[len(p) :], full_r[len(p) :]


def end_of_turn_text(tokenizer) -> str | None:
    """The text a chat template writes right after an assistant message's content (e.g. ``<|im_end|>``),
    stripped of whitespace; None without a template or when it writes nothing there."""
    if not has_chat_template(tokenizer):
        return None
    probe = "PROBE_REPLY_7c1"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    i = text.rfind(probe)
    tail = text[i + len(probe) :].strip() if i >= 0 else ""
    return tail or None


# ---------------------------------------------------------------------------------------------------
# Rows -> text for a tokenizer


@dataclass(frozen=True)
class Rendered:
    """Text of one pair for one tokenizer; `templated` says it went through a chat template (tokenize it
    without adding special tokens or an EOS)."""

    prompt: str
    chosen: str
    rejected: str
    templated: bool


def render_pair(tokenizer, prompt: str, chosen: str, rejected: str, conversation: str | None = None) -> Rendered:
    """A row of the project schema rendered for `tokenizer` (see the module docstring)."""
    conv = decode_conversation(conversation)
    if conv is not None and has_chat_template(tokenizer):
        texts = templated_pair(tokenizer, conv["prompt"], conv["chosen"], conv["rejected"], **template_kwargs(conv))
        return Rendered(*texts, templated=True)
    return Rendered(prompt, chosen, rejected, templated=False)


def render_prompt(tokenizer, prompt: str, conversation: str | None = None) -> tuple[str, bool]:
    """(generation prompt text, templated) for a row's prompt."""
    conv = decode_conversation(conversation)
    if conv is not None and has_chat_template(tokenizer):
        return templated_prompt(tokenizer, conv["prompt"], **template_kwargs(conv)), True
    return prompt, False


def render_response(tokenizer, prompt: str, response: str, conversation: str | None = None) -> tuple[str, str, bool]:
    """(prompt_text, response_text, templated): a generated response (plain text, no template markers) put
    back as an assistant message after the row's prompt, rendered under `tokenizer`'s template, so an RM
    with another template than the policy's scores it in its own layout."""
    conv = decode_conversation(conversation)
    if conv is not None and has_chat_template(tokenizer):
        reply = [{"role": "assistant", "content": response.strip()}]
        p, c, _ = templated_pair(tokenizer, conv["prompt"], reply, reply, **template_kwargs(conv))
        return p, c, True
    return prompt, response, False
