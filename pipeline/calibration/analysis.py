"""What the calibration stage computes from the rewards: per RM and source, the metrics before and after
temperature scaling, their Helpful & Harmless and all-source averages, paired comparisons, the diversity matrix
of the single-source RMs, and the MORE weight trajectories its plots show.

Pure functions of numpy arrays and datasets (besides `more_trajectories`, which reads an RM's train_log.json);
imports the calibration package's `metrics`, `compare`, `temperature` and `config` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.calibration import metrics as M
from pipeline.calibration.compare import metric_keys, paired_bootstrap
from pipeline.calibration.config import CalibrationConfig
from pipeline.calibration.temperature import fit_temperature


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------
def check_finite_rewards(name: str, entry: dict, by_source: dict) -> None:
    """One clear error naming the RM when any of its rewards is NaN or inf (corrupt weights, a diverged run)."""
    bad = [
        (source, split, int((~(np.isfinite(rc) & np.isfinite(rr))).sum()), len(rc))
        for source, by_split in by_source.items()
        for split, (rc, rr) in by_split.items()
    ]
    n_bad, n = sum(b[2] for b in bad), sum(b[3] for b in bad)
    if n_bad:
        source, split = next((b[0], b[1]) for b in bad if b[2])
        raise ValueError(
            f"calibration: reward model {name!r} at {entry.get('path')} gives a non-finite reward (NaN or inf) for "
            f"{n_bad} of {n} pairs (first in source {source!r}, {split} split): its weights are corrupt or its "
            "training diverged. Fix: retrain it (pipeline.run ... --force reward), or leave it out with calibration.rms"
        )


def averaging_rewards(rewards: dict, members: list[str]) -> dict:
    """The Averaging RM: per pair, the mean reward of the member RMs (same sources and splits)."""
    out: dict = {}
    for source, by_split in rewards[members[0]].items():
        for split in by_split:
            rc = np.mean([rewards[m][source][split][0] for m in members], axis=0)
            rr = np.mean([rewards[m][source][split][1] for m in members], axis=0)
            out.setdefault(source, {})[split] = (rc, rr)
    return out


def fit_temperatures(rewards: dict, sources: list[str]) -> tuple[dict, dict]:
    """({rm: T}, {rm: fit details}): one temperature per RM, fitted on the validation pairs of all sources."""
    temperatures, fits = {}, {}
    for rm, by_source in rewards.items():
        rc = np.concatenate([by_source[s]["validation"][0] for s in sources])
        rr = np.concatenate([by_source[s]["validation"][1] for s in sources])
        fit = fit_temperature(rc, rr)
        temperatures[rm], fits[rm] = fit.temperature, fit.to_dict()
    return temperatures, fits


# --------------------------------------------------------------------------------------------------
# Metrics, comparisons, diversity
# --------------------------------------------------------------------------------------------------
def source_metrics(rc, rr, ds, cfg: CalibrationConfig, temperature: float | None, seed: int) -> dict:
    """all_metrics before (and after) temperature scaling, with truth metrics on synthetic data."""
    cols = set(ds.column_names)
    kw = dict(
        n_bins=cfg.n_bins,
        strategy=cfg.strategy,
        bootstrap_samples=cfg.bootstrap_samples,
        seed=seed,
        headline_bins=cfg.headline_bins,
    )
    true_prob = np.asarray(ds["true_prob"], dtype=np.float64) if "true_prob" in cols else None
    gold_prob = np.asarray(ds["gold_prob"], dtype=np.float64) if "gold_prob" in cols else None

    def block(t: float) -> dict:
        m = M.all_metrics(rc, rr, temperature=t, true_prob=true_prob, **kw)
        if gold_prob is not None:
            m["truth_gold"] = M.truth_metrics(rc, rr, gold_prob, cfg.headline_bins, cfg.strategy, t)
        return m

    out = block(1.0)
    if temperature is not None:
        out["temperature_scaled"] = block(temperature)
    return out


def rm_metrics(per_source: dict, hh: list[str]) -> dict:
    """{source: {...}, "hh_average": {...}, "all_average": {...}} for one RM."""
    out = dict(per_source)
    entries = list(per_source.values())
    if hh:
        out["hh_average"] = _average_with_ts([per_source[s] for s in hh])
        out["hh_average"]["sources"] = list(hh)
    out["all_average"] = _average_with_ts(entries)
    out["all_average"]["sources"] = list(per_source)
    return out


def _average_with_ts(entries: list[dict]) -> dict:
    avg = M.average_metrics(entries)
    if all("temperature_scaled" in e for e in entries):
        avg["temperature_scaled"] = M.average_metrics([e["temperature_scaled"] for e in entries])
    return avg


def compare_rms(
    a: dict,
    b: dict,
    data: dict,
    sources: list[str],
    hh: list[str],
    cfg: CalibrationConfig,
    seed: int,
    temperatures: tuple[float, float] | None,
) -> dict:
    """comparisons.json entry of one '<a> vs <b>': paired bootstrap over the same test pairs of every source."""

    def probs(col: str) -> dict | None:
        if not all(col in data[s]["test"].column_names for s in sources):
            return None
        return {s: np.asarray(data[s]["test"][col], dtype=np.float64) for s in sources}

    out = paired_bootstrap(
        {s: a[s]["test"] for s in sources},
        {s: b[s]["test"] for s in sources},
        sources=sources,
        hh=hh,
        headline_bins=cfg.headline_bins,
        strategy=cfg.strategy,
        temperatures=temperatures,
        true_prob=probs("true_prob"),
        gold_prob=probs("gold_prob"),
        n_samples=cfg.bootstrap_samples,
        seed=seed,
    )
    keys = metric_keys(cfg.headline_bins, temperatures is not None, True, True)
    return {group: {k: by_metric[k] for k in keys if k in by_metric} for group, by_metric in out.items()}


def diversity_analysis(index: dict, rewards: dict, sources: list[str], cfg: CalibrationConfig) -> dict | None:
    """Cross matrix of the single-source RMs: rows trained on source i, columns tested on source j."""
    singles = []
    for name, entry in index.items():
        if entry.get("method") == "single" and name in rewards:
            trained = entry["sources"][0] if entry.get("sources") else name.removeprefix("single-")
            singles.append((name, trained))
    if not singles:
        return None
    acc = [[M.accuracy(*rewards[n][s]["test"]) for s in sources] for n, _ in singles]
    ece = [
        [M.pairwise_ece(*rewards[n][s]["test"], cfg.headline_bins, cfg.strategy) for s in sources] for n, _ in singles
    ]
    return {
        "rms": [n for n, _ in singles],
        "trained_on": [t for _, t in singles],
        "tested_on": list(sources),
        "accuracy": acc,
        f"ece_{cfg.headline_bins}": ece,
    }


def more_trajectories(rm_path: str) -> dict:
    """{source: (steps, lambdas)} from <rm dir>/train_log.json entries with `more/lambda/<source>` keys."""
    log_path = Path(rm_path) / "train_log.json"
    if not log_path.is_file():
        return {}
    try:
        log = json.loads(log_path.read_text())
    except json.JSONDecodeError:
        return {}
    if isinstance(log, dict):
        log = log.get("log_history", [])
    out: dict = {}
    for i, entry in enumerate(log if isinstance(log, list) else []):
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if key.startswith("more/lambda/") and isinstance(value, (int, float)):
                steps, vals = out.setdefault(key[len("more/lambda/") :], ([], []))
                steps.append(entry.get("step", i))
                vals.append(float(value))
    return out
