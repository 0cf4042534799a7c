"""Export a run's reward models for the RL engines, each with its certificate.

`export_run(run_dir, out_dir, recipe=...)` exports every RM of DIR/reward/index.json (or those named) into
`out_dir/<rm>/` and writes `out_dir/export.json` (all RMs); `export_rm` exports one RM directory given its held-out
pairs. Each folder holds the model, its tokenizer and its own `export.json`: the source RM, its fingerprint, the
temperature (folded or not), what the export changed (`pipeline.export.folder`) and the certificate per engine
(`pipeline.export.certify`).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.export.certify import ENGINES, TOLERANCE, certify
from pipeline.export.folder import fix_pad, fold_temperature, save_folder, ship_chat_template
from pipeline.io import atomic_dir, atomic_write_json, read_json, safe_component
from pipeline.logs import say


def _load(path):
    import torch

    from pipeline.models import copy_pad_token_id, load_reward_model, load_tokenizer

    tok = load_tokenizer(str(path), key="export")
    model = load_reward_model(str(path), dtype=torch.float32).eval()
    copy_pad_token_id(model, tok, key=f"export: reward model {path}")
    return model, tok


def rm_temperature(run_dir: Path, name: str, rm_path: Path) -> float | None:
    """The RM's fitted temperature: DIR/calibration/temperatures.json, else `<rm dir>/temperature.json`."""
    value = (read_json(Path(run_dir) / "calibration" / "temperatures.json") or {}).get(name)
    if value is None:
        value = (read_json(Path(rm_path) / "temperature.json") or {}).get("temperature")
    return None if value is None else float(value)


def engine_line(name: str, entry: dict) -> str:
    """One log line per engine: certified or not, and the measured gap to the pipeline's own input."""
    if "error" in entry:
        return f"{name}: NOT certified: {entry['error']}"
    head = "certified" if entry["certified"] else "NOT certified"
    line = (
        f"{name}: {head} (read-out max |diff| {entry['readout_max_abs_diff']:.1e} on the engine's own input, "
        f"{entry['n_sides']} sides); "
    )
    if entry["identical_inputs"] == entry["n_sides"]:
        return line + "its input is the pipeline's own on every side"
    whys = "; ".join(f"{why}: {k}" for why, k in sorted(entry["differences"].items()))
    n = entry["n_sides"] - entry["identical_inputs"]
    return line + (
        f"input or read-out differs from the pipeline's on {n} sides ({whys}): "
        f"reward gap max {entry['gap_max_abs']:.3g}, mean {entry['gap_mean_abs']:.3g} (the pipeline's rewards: "
        f"std {entry['pipeline_reward_std']:.3g}); the same preference on {entry['same_preference']:.0%} of pairs"
    )


def export_rm(
    rm_path,
    out,
    *,
    pairs: list[dict],
    max_length: int | None,
    name: str | None = None,
    temperature: float | None = None,
    fold: bool = False,
    engines=tuple(ENGINES),
    verl_head: bool = True,
    fingerprint: str | None = None,
) -> dict:
    """Export the RM at `rm_path` into `out` (replaced atomically) and certify it on `pairs` (held-out pairs of the
    project schema; `max_length`: the pipeline's cut, as calibration scored them). `fold`: divide the head by
    `temperature`. Returns the folder's export.json record."""
    if fold and not (temperature is not None and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"export: reward model {name or rm_path}: cannot fold temperature {temperature!r}")
    import torch

    run_model, run_tok = _load(rm_path)
    run_model.to("cuda" if torch.cuda.is_available() else "cpu")  # the pipeline's reward; the engines pick alike
    model, tok = _load(rm_path)
    record = {
        "source": str(rm_path),
        "name": name,
        "fingerprint": fingerprint,
        "temperature": temperature,
        "temperature_folded": bool(fold),
        "reward": "r / T (the calibrated reward)" if fold else "r (the raw reward)",
        "pad": fix_pad(model, tok),
    }
    if fold:
        fold_temperature(model, temperature)
    record["tokenizer"] = ship_chat_template(tok)
    with atomic_dir(Path(out)) as tmp:
        record.update(save_folder(model, tok, tmp, verl_head=verl_head))
        del model
        record["certificate"] = {
            "tolerance": TOLERANCE,
            "pairs": len(pairs),
            "max_length": max_length,
            "dtype": "float32",
            "engines": certify(
                run_model,
                run_tok,
                tmp,
                pairs,
                max_length=max_length,
                temperature=temperature if fold else 1.0,
                engines=engines,
            ),
        }
        atomic_write_json(tmp / "export.json", record)
    return record


def check_out_dir(run_dir: Path, out_dir: Path, index: dict) -> None:
    """Refuse an --out whose folders would replace the run's RMs (or hold them): the export replaces OUT/<rm>."""
    out = out_dir.resolve()
    for name, entry in index.items():
        src, target = Path(entry["path"]).resolve(), (out_dir / safe_component(name)).resolve()
        if src == target or src.is_relative_to(target) or out.is_relative_to(src):
            raise ValueError(
                f"--out {out_dir}: exporting {name!r} there would overwrite the run's RM ({entry['path']}). "
                "Fix: choose a folder outside the run's reward/ directory"
            )
    if out == Path(run_dir).resolve():
        raise ValueError(f"--out {out_dir} is the run directory itself. Fix: choose another folder")


def held_out_pairs(recipe, n_pairs: int) -> list[dict]:
    """Up to `n_pairs` test pairs of the run's sources (the calibration test split, `build_splits`), the first
    rows of each source in turn."""
    from pipeline.data import build_splits

    splits = build_splits(recipe.data)
    per_source = max(1, math.ceil(n_pairs / max(1, len(splits))))
    out = []
    for source, dd in splits.items():
        test = dd.get("test") if hasattr(dd, "get") else dd["test"]
        if test is None or len(test) == 0:
            continue
        rows = test.select(range(min(per_source, len(test))))
        convs = rows["conversation"] if "conversation" in rows.column_names else [""] * len(rows)
        for p, c, r, v in zip(rows["prompt"], rows["chosen"], rows["rejected"], convs):
            out.append({"source": source, "prompt": p, "chosen": c, "rejected": r, "conversation": v})
    if not out:
        raise ValueError("export: the run's sources have no test pairs to certify the export on")
    return out[:n_pairs]


def export_run(
    run_dir,
    out_dir,
    *,
    recipe,
    rms: list[str] | None = None,
    fold: bool = False,
    n_pairs: int = 64,
    engines=tuple(ENGINES),
    verl_head: bool = True,
) -> dict:
    """Export the RMs of a run directory (see the module docstring); returns out_dir/export.json's content."""
    from pipeline.reward.index import read_index

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    index = read_index(run_dir, rms, key="--rm")
    implicit = [n for n, e in index.items() if e.get("kind") == "implicit"]
    if implicit and rms is not None:
        raise ValueError(
            f"--rm {', '.join(implicit)}: an implicit RM (a DPO policy, read through its reference) has no scalar head "
            "to export for an RL engine. Fix: name classic RMs only"
        )
    for n in implicit:
        say("export", f"{n}: an implicit RM (a DPO policy), not a scalar-head RM: not exported")
        index.pop(n)
    check_out_dir(run_dir, out_dir, index)
    temps = {name: rm_temperature(run_dir, name, entry["path"]) for name, entry in index.items()}
    if fold:
        missing = [n for n, t in temps.items() if t is None]
        if missing:
            raise ValueError(
                f"--fold-temperature: no fitted temperature for {missing} (neither {run_dir}/calibration/"
                "temperatures.json nor the RM directory has one). Fix: run the calibration stage first "
                "(python -m pipeline.run --stages calibration) or export without --fold-temperature"
            )
    cal = getattr(recipe, "calibration", None)
    max_length = getattr(cal, "max_length", None) or recipe.data.max_length
    pairs = held_out_pairs(recipe, n_pairs)
    say("export", f"{len(index)} RM(s) from {run_dir}; certificate on {len(pairs)} held-out pairs")
    summary = {}
    for name, entry in index.items():
        fp = (read_json(Path(entry["path"]) / "fingerprint.json") or {}).get("fingerprint")
        target = out_dir / safe_component(name)
        say(
            "export",
            f"{name} -> {target}" + (f" (temperature {temps[name]:.4g} folded into the head)" if fold else ""),
        )
        record = export_rm(
            entry["path"],
            target,
            pairs=pairs,
            max_length=max_length,
            name=name,
            temperature=temps[name],
            fold=fold,
            engines=engines,
            verl_head=verl_head,
            fingerprint=fp,
        )
        for engine, result in record["certificate"]["engines"].items():
            say("export", f"{name} {engine_line(engine, result)}")
        summary[name] = {"folder": str(target), **record}
    atomic_write_json(out_dir / "export.json", summary)
    return summary
