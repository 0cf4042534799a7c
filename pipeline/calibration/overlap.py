"""The evaluation data of the calibration stage and its overlap with what the RMs were trained on.

`eval_splits` builds each source's test and validation splits (`pipeline.data.build_splits`). Every RM's training
prompts are read from its `train_prompts.json` (written by the reward stage; for an external RM when one lies in
its directory): the evaluation pairs whose prompt an RM was trained on are counted per RM, source and split
(`overlap_counts`), printed (`report_overlap`) and, by default (`calibration.exclude_train_overlap`), every pair
whose prompt ANY evaluated RM was trained on is left out for all RMs (`exclude_train_overlap`), so the compared
RMs are scored on the same unseen pairs (synthetic sources are only counted: their test pairs reuse the training
prompt pool by design).

Imports `pipeline.data`, `pipeline.logs` and the calibration config only.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.calibration.config import AVERAGING, CalibrationConfig
from pipeline.logs import say


SCORED_SPLITS = ("test", "validation")


def eval_splits(recipe, cfg: CalibrationConfig, stats: dict | None = None) -> dict:
    """{source: {"test": Dataset, "validation": Dataset | None}} with one clear error per bad source; `stats`,
    when given, receives `pipeline.data.mixing.data_stats` of the built splits."""
    from pipeline.data import build_splits
    from pipeline.data.mixing import data_stats

    splits = build_splits(recipe.data)
    if stats is not None:  # pairs per split and dropped pairs per source, for the log and config.json
        stats.update(data_stats(splits))
    out = {}
    for source, dd in splits.items():
        names = list(dd.keys())
        if "test" not in names or len(dd["test"]) == 0:
            raise ValueError(
                f"calibration: source {source!r} has no test split (its splits: {names}, "
                f"test pairs: {len(dd['test']) if 'test' in names else 0}); give it test data in the "
                "recipe's data section (a test split/file, or a test fraction for sources that ship one split)"
            )
        val = dd["validation"] if "validation" in names and len(dd["validation"]) > 0 else None
        if cfg.temperature_scaling and val is None:
            raise ValueError(
                f"calibration: source {source!r} has no validation split to fit the temperature on; give it "
                "validation data in the recipe's data section, or set calibration.temperature_scaling=false"
            )
        picked = {"test": dd["test"], "validation": val}
        if cfg.max_pairs_per_split:
            picked = {
                k: (d.select(range(min(len(d), cfg.max_pairs_per_split))) if d is not None else None)
                for k, d in picked.items()
            }
        out[source] = picked
    if not out:
        raise ValueError("calibration: the data config yields no sources")
    return out


def train_prompt_records(entries: dict, singles: list[str], with_averaging: bool) -> dict:
    """{rm: set of prompt hashes it was trained on, or None when it has no train_prompts.json} for every RM
    (a hub id has none); the Averaging RM saw what its members saw (None if one of them has no record)."""
    from pipeline.data.mixing import read_train_prompts

    out = {n: read_train_prompts(e["path"]) if Path(e["path"]).is_dir() else None for n, e in entries.items()}
    if with_averaging:
        members = [out[n] for n in singles]
        out[AVERAGING] = None if any(m is None for m in members) else set().union(*members)
    return out


def prompt_hashes(data: dict) -> dict:
    from pipeline.data.mixing import prompt_hash

    return {
        s: {sp: [prompt_hash(p) for p in ds["prompt"]] for sp, ds in by_split.items() if ds is not None}
        for s, by_split in data.items()
    }


def overlap_counts(hashes: dict, seen: set | None) -> dict:
    """{"checked": bool, "test": {source: n}, "validation": {source: n}}: evaluation pairs whose prompt is in
    `seen` (an RM's training prompts); nothing is counted when the RM has no record."""
    out: dict = {"checked": seen is not None, "test": {}, "validation": {}}
    for s, by_split in hashes.items():
        for sp in SCORED_SPLITS:
            out[sp][s] = sum(h in seen for h in by_split.get(sp, [])) if seen is not None else None
    return out


def drop_seen_prompts(data: dict, hashes: dict, seen: set, keep_sources=()) -> tuple[dict, dict]:
    """`data` without the pairs whose prompt hash is in `seen` (sources in `keep_sources` untouched), and
    {source: {split: pairs removed}}."""
    out, removed = {}, {}
    for s, by_split in data.items():
        out[s] = dict(by_split)
        for sp, ds in by_split.items():
            if ds is None or s in keep_sources:
                continue
            keep = [i for i, h in enumerate(hashes[s][sp]) if h not in seen]
            if len(keep) < len(ds):
                out[s][sp] = ds.select(keep)
                removed.setdefault(s, {})[sp] = len(ds) - len(keep)
    return out, removed


def report_overlap(overlap: dict, data: dict, exclude: bool, synthetic: set) -> None:
    """Print, per RM, how many evaluation pairs have a prompt it was trained on, and what happens to them."""
    total = sum(len(d) for by_split in data.values() for d in by_split.values() if d is not None)
    for rm, o in overlap.items():
        if not o["checked"]:
            say(
                "calibration",
                f"{rm}: no train_prompts.json beside it; its overlap with the evaluation data is unknown",
            )
            continue
        per = {s: o["test"][s] + o["validation"][s] for s in o["test"]}
        if not any(per.values()):
            say("calibration", f"{rm}: none of the {total} evaluation pairs has a prompt it was trained on")
            continue
        shown = ", ".join(f"{s} {o['test'][s]}+{o['validation'][s]}" for s, n in per.items() if n)
        if not exclude:
            fate = "KEPT (calibration.exclude_train_overlap=false): its scores on them are inflated"
        else:
            gone = sum(n for s, n in per.items() if s not in synthetic)
            kept = sum(n for s, n in per.items() if s in synthetic)
            fate = f"{gone} excluded" + (f", {kept} kept on synthetic sources (by design)" if kept else "")
        say(
            "calibration",
            f"{rm}: {sum(per.values())} of {total} evaluation pairs have a prompt it was trained on "
            f"(test+validation per source: {shown}); {fate}",
        )


def exclude_train_overlap(
    data: dict, hashes: dict, records: dict, cfg: CalibrationConfig, synthetic: set
) -> tuple[dict, dict]:
    """`data` without every pair whose prompt ANY RM of `records` was trained on (sources in `synthetic` kept),
    and {source: {split: pairs removed}}. A validation split left empty is dropped when temperature scaling is
    off; any other split left empty fails with how to fix it."""
    seen_by_any = set().union(*(r for r in records.values() if r is not None))
    data, excluded = drop_seen_prompts(data, hashes, seen_by_any, keep_sources=synthetic)
    for s, by_split in data.items():
        for sp, ds in by_split.items():
            if ds is None or len(ds) > 0:
                continue
            if sp == "validation" and not cfg.temperature_scaling:
                by_split[sp] = None
                continue
            fix = "or set calibration.temperature_scaling=false, " if sp == "validation" else ""
            raise ValueError(
                f"calibration: every {sp} pair of source {s!r} has a prompt that an evaluated RM was trained on "
                "(its train_prompts.json), so none is left. Fix: evaluate on data the RMs never saw (for a "
                "file they were trained on: the training run's data.test_fraction and data.valid_fraction, "
                f"which select exactly its unseen test and validation prompts), {fix}or set "
                "calibration.exclude_train_overlap=false to score them anyway (inflated)"
            )
    return data, excluded
