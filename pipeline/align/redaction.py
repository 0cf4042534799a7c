"""Keeping secrets out of what the LLM judge stores and says: `redact_secret` masks the API key in any form an
endpoint may echo it in (as is, JSON-escaped, URL-encoded, split across lines, any 8 characters of it in a row),
`url_secrets` lists the credentials written inside a base_url (`user:pw@host`, `?key=...`) so they are masked
the same way (`pipeline.errors.redact_credentials` masks them inside URLs).

Imports: the standard library and the leaf pipeline.errors.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

from pipeline.errors import redact_url


_ESCAPE = re.compile(r"\\+(?:u([0-9a-fA-F]{4})|([nrt])|([/\\\"']))|%([0-9a-fA-F]{2})|(\s)")


def _decoded_chars(text: str) -> list[tuple[str | None, int, int]]:
    """`text` as (char, raw start, raw end) tokens, JSON escapes (`\\/`, `\\u002f`, any number of backslashes)
    and URL escapes (`%2F`) decoded; whitespace and escaped line breaks are separators (char None)."""
    out: list[tuple[str | None, int, int]] = []
    i = 0
    for m in _ESCAPE.finditer(text):
        out.extend((c, j, j + 1) for j, c in enumerate(text[i : m.start()], i))
        u, _, esc, pct, _ = m.groups()
        char = chr(int(u, 16)) if u else esc if esc else chr(int(pct, 16)) if pct else None
        out.append((char, m.start(), m.end()))
        i = m.end()
    out.extend((c, j, j + 1) for j, c in enumerate(text[i:], i))
    return out


def redact_secret(text: str, secret: str | None, min_len: int = 8, mask: str = "***") -> str:
    """`text` with `secret` masked wherever it appears: as is, JSON-escaped (`\\/`, `\\uXXXX`), URL-encoded
    (`%2F`), split by whitespace or escaped line breaks, and every run of at least `min_len` consecutive
    characters of it (the prefix a cut leaves, a suffix, a piece of a split key). Call it on a whole body
    BEFORE any truncation: a cut can leave a piece shorter than `min_len`."""
    if not secret or not text:
        return text
    n = min(min_len, len(secret))
    grams = {secret[i : i + n] for i in range(len(secret) - n + 1)}
    tokens = [t for t in _decoded_chars(text) if t[0] is not None]  # separators dropped: a split key joins up
    decoded = "".join(t[0] for t in tokens)
    hit = [False] * len(tokens)
    for i in range(len(decoded) - n + 1):
        if decoded[i : i + n] in grams:
            hit[i : i + n] = [True] * n
    spans: list[list[int]] = []  # raw [start, end) of each run of consecutive masked tokens
    for k, (_, start, end) in enumerate(tokens):
        if hit[k]:
            if k > 0 and hit[k - 1]:
                spans[-1][1] = end
            else:
                spans.append([start, end])
    if not spans:
        return text
    parts, last = [], 0
    for start, end in spans:
        parts += [text[last:start], mask]
        last = end
    return "".join(parts) + text[last:]


def url_secrets(url: str) -> list[str]:
    """The credentials written inside a URL (the user information, its password, a credential-like query value;
    as written and decoded) of at least 8 characters, so an endpoint echoing them is redacted like the API key
    (a shorter one is masked inside URLs only: masking every 'pw' of a reply would garble it)."""
    masked = redact_url(url)
    if masked == url:
        return []
    parts = urlsplit(url)
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, *userinfo.split(":", 1)[1:]]
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and redact_url(f"http://h/?{name}=x") != f"http://h/?{name}=x":
            found.append(value)
    return sorted({s for x in found for s in (x, unquote(x)) if len(s) >= 8}, key=len, reverse=True)
