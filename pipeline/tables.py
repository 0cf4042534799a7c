"""Markdown tables and the display names of reward models: the one home of how results are shown in
table.md, comparisons.md, summary.md and report.md (a leaf: imports nothing of the pipeline)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


# How the RMs the pipeline trains are named in tables, sentences and plots.
RM_LABELS = {"more": "MORE", "multitask": "MultiTask", "uniform": "Uniform", "averaging": "Averaging"}


def rm_label(name: str) -> str:
    """'MORE' for 'more', 'MultiTask/rjs' for 'multitask/rjs' (an aligned policy); other names unchanged."""
    head, sep, tail = str(name).partition("/")
    return RM_LABELS.get(head, head) + (f"/{tail}" if sep else "")


def _cell(value) -> str:
    """A table cell: None as '-', and '|' escaped so a value cannot split the row."""
    text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table_row(cells: Iterable) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown_table(header: Sequence, rows: Iterable[Sequence], *, subheader: Sequence | None = None) -> list[str]:
    """The lines of a markdown table: the header, the `---` rule, an optional second header row (e.g. which
    direction is better per column) and one line per row. Every row must have as many cells as the header."""
    lines = [table_row(header), "|" + "---|" * len(header)]
    for extra in ([subheader] if subheader is not None else []) + list(rows):
        if len(extra) != len(header):
            raise ValueError(f"markdown_table: a row has {len(extra)} cells for {len(header)} columns: {list(extra)}")
        lines.append(table_row(extra))
    return lines
