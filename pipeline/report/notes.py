"""The report's notes on what a run's numbers do NOT show, each beside the section it qualifies: a MORE RM that is
the Uniform baseline (two sources under l2 normalisation), trained RMs not significantly better than their own
untrained starting point (step 0), a tiny demo policy whose samples on real prompts are not meaningful text, and
the recipe shown without the sections the run did not use.

Imports `pipeline.reward.more` and `pipeline.calibration.compare` (the rules they state) and the leaves.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import read_json
from pipeline.reward.more import two_source_note


LAMBDA_TOLERANCE = 1e-6  # |lambda - 0.5| of a two-source MORE RM in float32 (the midpoint up to rounding)


def _rm_dir(run_dir: Path, entry: dict, name: str) -> Path:
    return Path(run_dir) / entry.get("path", f"reward/{name}")


def _normalize_of(rm_dir: Path) -> str | None:
    """The `normalize` an RM was trained with, from its fingerprint.json (None when not recorded)."""
    inputs = (read_json(rm_dir / "fingerprint.json") or {}).get("inputs") or {}
    value = (inputs.get("train_args") or {}).get("normalize")
    return value if isinstance(value, str) else None


def _lambdas_all_half(rm_dir: Path) -> bool:
    """Every `more/lambda/*` of the RM's train_log.json is 0.5 (up to float32 rounding), and there is one."""
    try:
        log = json.loads((rm_dir / "train_log.json").read_text())
    except (OSError, ValueError):
        return False
    values = [
        v
        for entry in (log if isinstance(log, list) else [])
        if isinstance(entry, dict)
        for k, v in entry.items()
        if k.startswith("more/lambda/") and isinstance(v, (int, float))
    ]
    return bool(values) and all(abs(v - 0.5) <= LAMBDA_TOLERANCE for v in values)


def more_two_source_lines(run_dir: Path) -> list[str]:
    """One line per MORE RM of reward/index.json trained on two sources under l2 normalisation (read from its
    fingerprint, else seen in its logged weights): it is the Uniform baseline, so MORE vs Uniform compares an
    RM with itself up to training noise."""
    lines = []
    for name, e in (read_json(Path(run_dir) / "reward" / "index.json") or {}).items():
        if not isinstance(e, dict) or e.get("method") != "more" or len(e.get("sources") or []) != 2:
            continue
        rm_dir = _rm_dir(run_dir, e, name)
        normalize = _normalize_of(rm_dir)
        if normalize is None and _lambdas_all_half(rm_dir):
            normalize = "l2"
        if note := two_source_note(2, normalize or "", key="reward.train.normalize"):
            lines += [f"**{name} is the Uniform baseline here.** {note}.", ""]
    return lines
