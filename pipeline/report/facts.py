"""What ran, as the report states it: the sources (format, path, pairs per split), the reward models (trained
or external, parameter counts read from the safetensors headers) and the policy, from the manifest, the stages'
outputs and the run's data section (`run_facts`), and the report's "What ran" section (`what_ran_section`).

Imports the leaves `pipeline.io` and `pipeline.tables` only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pipeline.io import read_json, to_plain
from pipeline.tables import markdown_table


def stage_setting(recipe, section: str, key: str):
    """`recipe.<section>.<key>`, or None. The report reads other stages' sections, whose classes are whatever the
    stage table names (a replaced table, as the orchestrator tests install, has sections without these keys),
    hence getattr."""
    return getattr(getattr(recipe, section, None), key, None)


def safetensors_param_count(path: str | os.PathLike) -> int | None:
    """Number of parameters stored in the *.safetensors files of a model directory (or one file), read from
    the files' headers (no weights loaded); None when there are none (a hub id, a .bin checkpoint)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    files = [f for f in files if f.name not in ("value_model.safetensors", "more_state.safetensors")]
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t["shape"])
    return total


def format_count(n: int | None) -> str:
    """1234567 -> '1.23M'; None -> 'unknown'."""
    if n is None:
        return "unknown"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def run_data_config(recipe, manifest: dict | None) -> dict:
    """The `data` section the run's results were computed from: the one recorded in the manifest by the
    calibration (else reward) stage when it ran, else the recipe's (`to_plain`)."""
    for stage in ("calibration", "reward"):
        entry = (manifest or {}).get("stages", {}).get(stage) or {}
        data = (entry.get("inputs") or {}).get("data")
        if entry.get("status") == "done" and isinstance(data, dict):
            return data
    return to_plain(recipe.data) or {}


def _source_names(run_dir: Path, sizes: dict, metrics: dict, specs: list) -> list[str]:
    """The run's sources: reward/data.json's, else calibration/config.json's, else the per-source entries of
    metrics.json (an RM's entry holds other keys too, e.g. `train_overlap`: only dicts with `n_pairs` are
    sources), else the data section's names."""
    if sizes:
        return list(sizes)
    listed = (read_json(run_dir / "calibration" / "config.json") or {}).get("sources")
    if isinstance(listed, list) and listed:
        return [str(s) for s in listed]
    first = next(iter(metrics.values()), {}) or {}
    names = [
        s
        for s, v in first.items()
        if s not in ("all_average", "hh_average") and isinstance(v, dict) and "n_pairs" in v
    ]
    return names or [s.get("name") for s in specs]


def _spec_of(name: str, specs: list) -> dict:
    """The data.sources entry a source comes from: the one of that name, else the `group_by` source it was made
    from (named `<spec>/<value>`, or one of its `group_names`)."""
    for s in specs:
        if s.get("name") == name:
            return s
    for s in specs:
        opts = s.get("options") or {}
        if opts.get("group_by") and (
            str(name).startswith(f"{s.get('name')}/")
            or name in {str(v) for v in (opts.get("group_names") or {}).values()}
        ):
            return s
    return {}


def _loaded(name: str, stats: dict) -> dict:
    """What the data layer recorded loading for a source (format, path), from the stages' data_stats."""
    loads = ((stats or {}).get(name) or {}).get("loaded") or []
    return loads[0] if loads and isinstance(loads[0], dict) else {}


def run_facts(recipe, run_dir: Path, manifest: dict | None) -> dict:
    """What ran, from the manifest, the stages' outputs and the run's data section: the sources (format, path,
    pairs per split), the reward models (trained or external, parameter counts) and the policy."""
    run_dir = Path(run_dir)
    data = run_data_config(recipe, manifest)
    specs = data.get("sources") or []
    sizes = read_json(run_dir / "reward" / "data.json") or {}
    metrics = read_json(run_dir / "calibration" / "metrics.json") or {}
    stats = (read_json(run_dir / "reward" / "data_stats.json") or {}).get("sources") or (
        read_json(run_dir / "calibration" / "config.json") or {}
    ).get("data_stats")
    sources = []
    for name in _source_names(run_dir, sizes, metrics, specs):
        spec, loaded = _spec_of(name, specs), _loaded(name, stats)
        n = dict(sizes.get(name) or {})
        if "test" not in n:
            tests = [
                m[name]["n_pairs"] for m in metrics.values() if isinstance(m.get(name), dict) and "n_pairs" in m[name]
            ]
            if tests:
                n["test"] = tests[0]
        fmt = spec.get("format") or loaded.get("format") or "?"
        path = spec.get("path") or loaded.get("path") or (spec.get("name") if fmt not in ("synthetic", "?") else None)
        group_by = (spec.get("options") or {}).get("group_by")
        sources.append({"name": name, "format": fmt, "path": path, "group_by": group_by, "pairs": n})
    rms = {}
    for name, e in (read_json(run_dir / "reward" / "index.json") or {}).items():
        rm_path = run_dir / e.get("path", f"reward/{name}")  # a name unsafe as a path has a slug directory
        info = read_json(rm_path / "reward_info.json") or {}
        params = info.get("n_params") or safetensors_param_count(rm_path)
        rms[name] = {"trained": True, "method": e.get("method"), "sources": e.get("sources", []), "params": params}
        if e.get("kind") == "implicit":  # a DPO policy: trained from the policy stage's base policy
            rms[name]["base"] = "the policy stage's base policy (DPO; an implicit RM)"
    cal_config = read_json(run_dir / "calibration" / "config.json") or {}
    for name, path in (cal_config.get("external") or {}).items():
        rms[name] = {"trained": False, "path": path, "params": safetensors_param_count(path)}
    for name, e in (cal_config.get("implicit") or {}).items():
        if name in rms:  # the reward stage's dpo policy: listed above as trained here
            continue
        path = e.get("path")
        rms[name] = {"trained": False, "implicit": True, "path": path, "params": safetensors_param_count(path)}
    base = stage_setting(recipe, "reward", "model_name_or_path")
    policy = None
    if (run_dir / "align").is_dir():
        ppath = stage_setting(recipe, "align", "model_name_or_path") or str(run_dir / "policy")
        policy = {"path": ppath, "params": safetensors_param_count(ppath)}
    return {"sources": sources, "rms": rms, "reward_base": base, "policy": policy}


def what_ran_section(facts: dict) -> list[str]:
    """The report's "What ran": the sources table, the reward models table and the policy, from `run_facts`."""
    lines = [
        "## What ran",
        "",
        "Computed from the run's manifest and outputs (not from the recipe's description).",
        "",
    ]
    if facts["sources"]:
        rows = []
        for s in facts["sources"]:
            n = s["pairs"]
            path = f"`{s['path']}`" if s["path"] else ("synthetic benchmark" if s["format"] == "synthetic" else "-")
            rows.append(
                [s["name"], s["format"], path, s["group_by"] or "-"]
                + [n.get("train", "-"), n.get("validation", "-"), n.get("test", "-")]
            )
        header = ["source", "format", "path", "group_by", "train pairs", "validation pairs", "test pairs"]
        lines += [*markdown_table(header, rows), ""]
    if facts["rms"]:
        base = facts["reward_base"] or "tiny model built in-process (random init)"
        rows = [
            [
                name,
                "yes, " + str(r["method"])
                if r["trained"]
                else ("no (DPO policy)" if r.get("implicit") else "no (external)"),
            ]
            + [r.get("base") or f"`{base}`" if r["trained"] else f"`{r['path']}`", format_count(r["params"])]
            for name, r in facts["rms"].items()
        ]
        lines += [*markdown_table(["reward model", "trained here", "base / path", "parameters"], rows), ""]
    if facts["policy"]:
        lines += [f"Policy: `{facts['policy']['path']}`, {format_count(facts['policy']['params'])} parameters.", ""]
    return lines
