"""Print the first fenced code block under a heading of a markdown file (standard library only).

    python3 scripts/readme_block.py README.md "Quick start"

CI runs the README's Quick start block through this script, exactly as written: when the README's commands
change, CI runs the new ones. Exit 2 with one message when the heading or its code block is missing."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def code_block(text: str, heading: str) -> str:
    """The body of the first ``` block after the markdown heading `heading` (any level) and before the next
    heading of the same or a higher level."""
    lines = text.splitlines()
    start = next(
        (i for i, ln in enumerate(lines) if re.fullmatch(rf"(#+)\s+{re.escape(heading)}\s*", ln.rstrip())), None
    )
    if start is None:
        raise LookupError(f"no heading {heading!r}")
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    body: list[str] | None = None
    for ln in lines[start + 1 :]:
        m = re.match(r"(#+)\s", ln)
        if body is None and m and len(m.group(1)) <= level:
            break
        if ln.startswith("```"):
            if body is not None:
                return "\n".join(body) + "\n"
            body = []
        elif body is not None:
            body.append(ln)
    raise LookupError(f"no complete code block under the heading {heading!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 scripts/readme_block.py FILE HEADING", file=sys.stderr)
        return 2
    path, heading = Path(argv[0]), argv[1]
    try:
        sys.stdout.write(code_block(path.read_text(encoding="utf-8"), heading))
    except (OSError, LookupError) as e:
        print(f"readme_block: {path}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
