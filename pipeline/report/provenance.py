"""Where the report's numbers come from, said beside them: each RM's real training settings, read from its own
files (`pipeline.reward.recorded`: fingerprint.json's inputs, reward_info.json, train_log.json), never from the
recipe of the command that wrote the report; and the banners beside a section whose numbers are STALE (an
upstream stage reran since they were computed) or were computed with --allow-stale-upstream on results made
with other settings than that stage's recipe (the manifest entry's `stale` and `upstream_mismatch`).

Imports `pipeline.reward.recorded` and the leaf `pipeline.tables`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.reward.recorded import training_settings
from pipeline.tables import markdown_table


ALLOW_FLAG = "--allow-stale-upstream"  # pipeline.plan.ALLOW_STALE_UPSTREAM (the report does not import the plan)


def rm_training_lines(run_dir: Path, manifest: dict | None = None) -> list[str]:
    """'How each RM was trained': a table of every trained RM's learning rate, length, batch, method options,
    data and truncation from its own files; with the report's own --allow-stale-upstream warning first."""
    settings = training_settings(run_dir)
    if not settings:
        return []
    lines = ["How each RM was trained, read from its own `reward/<rm>/fingerprint.json` (not from the recipe):", ""]
    own = ((manifest or {}).get("stages", {}).get("report") or {}).get("upstream_mismatch")
    if isinstance(own, dict):
        lines += [
            f"> **Warning** ({ALLOW_FLAG}): the recipe of the command that wrote this report disagrees with these "
            f"{own.get('results')}: {own.get('keys')}. The table shows how they were really trained.",
            "",
        ]
    rows = []
    for name, s in settings.items():
        if not s.get("recorded"):
            rows.append([name, "not recorded (no readable fingerprint.json)"] + ["-"] * 6)
            continue
        rows.append(
            [name, f"{s['method']}: {s['options']}", f"{s['learning_rate']} ({s['schedule']})", s["length"]]
            + [s["batch"], s["data"], s["truncation"], s["seed"]]
        )
    header = ["RM", "method and options", "learning rate (schedule)", "length", "batch", "training data"]
    lines += [*markdown_table([*header, "max_length, over-length pairs", "seed"], rows), ""]
    return lines


def stage_banner(manifest: dict | None, stage: str, run_dir: Path) -> list[str]:
    """The banner beside a stage's numbers: STALE (with which upstream reran and the command that refreshes them)
    and the --allow-stale-upstream warning; [] when neither applies."""
    entry = ((manifest or {}).get("stages") or {}).get(stage) or {}
    if entry.get("status") != "done":
        return []
    out = []
    if entry.get("stale"):
        out.append(
            f"> **STALE** ({entry['stale']}): the {stage} numbers in this section were computed before that, from "
            f"results that are no longer the current ones. Refresh them: `python -m pipeline.run --recipe "
            f"{run_dir}/recipe.yaml --output-dir {run_dir} --stages {stage}`."
        )
    if isinstance(m := entry.get("upstream_mismatch"), dict):
        out.append(
            f"> **Warning** ({ALLOW_FLAG}): the {stage} stage ran on the {m.get('results')} in {m.get('stage')}/, "
            f"which were produced with other settings than its recipe: {m.get('keys')}. These numbers are those "
            f"{m.get('results')}' as they were produced (What ran shows how each RM was really trained)."
        )
    return [line for text in out for line in (text, "")]


def with_banner(lines: list[str], banner: list[str], subheadings: tuple[str, ...] = ()) -> list[str]:
    """`lines` (a section starting with its heading and a blank line) with `banner` after the heading and after
    each of `subheadings` (e.g. '### Plots'), so it stands beside every part that shows the numbers."""
    if not banner or not lines:
        return lines
    out = [*lines[:2], *banner, *lines[2:]]
    for sub in subheadings:
        if sub in out:
            i = out.index(sub) + 1
            out[i:i] = ["", *banner[:-1]]
    return out
