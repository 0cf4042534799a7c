"""The report stage: DIR/report.md, a readable summary of one run next to the paper's numbers.

    python -m pipeline.report --recipe tiny-cpu --output-dir runs/tiny-cpu

It only reads what the other stages wrote (every part is optional, so a run that stopped after the
reward stage still gets a report saying what is missing):

* DIR/manifest.json            stage status, versions, git commit
* DIR/reward/index.json        the trained RMs (+ <rm>/reward_info.json)
* DIR/calibration/metrics.json the numbers compared here (MORE vs MultiTask, single-source, Averaging),
  DIR/calibration/table.md     included as is, and DIR/calibration/*.png linked
* DIR/align/judgements.json    win/tie/lose of the aligned policies, DIR/align/table.md included

The comparison sentences are computed from DIR/calibration/comparisons.json, never written in advance: a
difference is called real ("MORE's ECE ... is lower than MultiTask's by 0.018 (95% CI ...)") only when its
paired 95% bootstrap interval excludes 0, else "no significant difference ..."; the same rule applies to
alignment win rates (the interval of win - lose). Without intervals the numbers are shown with no verdict.
The paper's numbers (Zeng et al., "On Diversified Preferences of Large Language Model Alignment", arXiv
2312.07401, Tables 1 and 2) are constants below, for comparison only. Written atomically (DIR/report.md and DIR/report.json) by the main
process.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import atomic_write_json, atomic_write_text, get_path, read_json, safe_component
from pipeline.tables import RM_LABELS


PAPER_CITATION = (
    'Zeng et al., "On Diversified Preferences of Large Language Model Alignment", '
    "arXiv 2312.07401 (EMNLP Findings 2024)"
)

# Table 2: 5-source mixture, test accuracy (%) averaged over the 5 sources, and ECE (M=10) over the 5
# sources. "top" = the best single-source RM.
PAPER_TABLE2 = {
    "pythia-1.4b": {"multitask": (62.38, 0.0541), "more": (63.34, 0.0364), "top": (65.51, 0.0362)},
    "pythia-2.8b": {"multitask": (64.00, 0.0456), "more": (64.01, 0.0366), "top": (66.13, 0.0342)},
    "llama2-7b": {"multitask": (70.13, 0.0570), "more": (70.32, 0.0458), "top": (69.27, 0.0334)},
}
# Table 1: Helpful & Harmless average ECE, MultiTask -> MORE (accuracy within 1 point), and the
# GPT-4-judged rejection-sampling alignment of Alpaca-7B, MORE RM vs MultiTask RM: win/tie/lose (%).
PAPER_TABLE1 = {
    "pythia-1.4b": {"hh_ece": (0.0177, 0.0109), "rjs_win_tie_lose": (44, 22, 34)},
    "pythia-2.8b": {"hh_ece": (0.0145, 0.0078), "rjs_win_tie_lose": (45, 21, 34)},
    "llama2-7b": {"hh_ece": (0.0284, 0.0143), "rjs_win_tie_lose": (45, 23, 32)},
}
PAPER_MODELS = tuple(PAPER_TABLE2)


@dataclass
class ReportConfig:
    """The `report:` section of a recipe."""

    title: str | None = field(
        default=None, metadata={"help": "Report title; null = 'MORE pipeline report: <recipe name>'."}
    )
    paper_model: str = field(
        default="auto",
        metadata={
            "help": "Paper rows shown side by side: auto (from reward.model_name_or_path, else all), "
            "pythia-1.4b, pythia-2.8b, llama2-7b, all, or none."
        },
    )
    baseline: str = field(default="multitask", metadata={"help": "RM that MORE is compared with in the sentences."})
    include_recipe: bool = field(default=True, metadata={"help": "Append the resolved recipe (YAML)."})

    def __post_init__(self):
        valid = ("auto", "all", "none", *PAPER_MODELS)
        if self.paper_model not in valid:
            raise ValueError(f"report.paper_model must be one of {', '.join(valid)}, got {self.paper_model!r}")


# ---------------------------------------------------------------------------------------------------
# Pure helpers (tested directly)


def paper_rows(cfg: ReportConfig, model_name_or_path: str | None) -> list[str]:
    """Which paper base models to show for this run."""
    if cfg.paper_model == "none":
        return []
    if cfg.paper_model in PAPER_MODELS:
        return [cfg.paper_model]
    if cfg.paper_model == "auto" and model_name_or_path:
        key = model_name_or_path.lower().replace("_", "-")
        for m, needles in (
            ("pythia-1.4b", ("pythia-1.4b", "pythia-1b4")),
            ("pythia-2.8b", ("pythia-2.8b",)),
            ("llama2-7b", ("llama-2-7b", "llama2-7b")),
        ):
            if any(n in key for n in needles):
                return [m]
    return list(PAPER_MODELS)


def compare_sentence(
    what: str,
    more: float | None,
    base: float | None,
    *,
    lower_is_better: bool,
    base_name: str = "MultiTask",
    unit: str = "",
) -> str:
    """The two values side by side WITHOUT a verdict: used only when no paired interval exists
    (calibration/comparisons.json missing), since a difference without an interval may be noise."""
    if more is None or base is None or not (math.isfinite(more) and math.isfinite(base)):
        return f"{what}: not available for both MORE and {base_name}."
    fmt = (lambda v: f"{v:.2f}{unit}") if unit else (lambda v: f"{v:.4f}")
    if more == base:
        return f"{what}: MORE and {base_name} are equal ({fmt(more)})."
    sign = "+" if more > base else "-"
    return (
        f"{what}: MORE {fmt(more)} vs {base_name} {fmt(base)} (difference {sign}{fmt(abs(more - base))}; "
        f"{'lower' if lower_is_better else 'higher'} is better, but no paired interval was computed, so this is "
        "no verdict)."
    )


def win_tie_lose_sentence(label: str, entry: dict, *, n_samples: int = 2000, seed: int = 0) -> str:
    """'rjs, helpful prompts: win 40% / tie 20% / lose 40% of 200 prompts; ...': a win (or loss) only when
    the bootstrap 95% interval of win - lose excludes 0 (see compare.win_lose_sentence)."""
    from pipeline.calibration.compare import bootstrap_win_lose, win_lose_sentence

    return win_lose_sentence(label, entry, bootstrap_win_lose(_counts(entry), n_samples=n_samples, seed=seed))


def _counts(entry: dict) -> dict:
    """Win/tie/lose counts of a judgements.json entry: its `counts`, else fractions (or %) times `n` (0 without n)."""
    if isinstance(entry.get("counts"), dict):
        return entry["counts"]
    vals = [entry.get(k) for k in ("win", "tie", "lose")]
    n = entry.get("n") or 0
    if None in vals:
        return {}
    scale = 1.0 if max(vals) <= 1.0 else 0.01
    return {k: int(round(v * scale * n)) for k, v in zip(("win", "tie", "lose"), vals)}


def _demote(markdown: str) -> str:
    """Drop a table file's own H1 and push its headings one level down, to nest it in the report."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("# "):
            continue
        out.append("#" + line if line.startswith("#") else line)
    return "\n".join(out).strip()


def synthetic_truth_paragraph(data_cfg) -> str | None:
    """What is true on the synthetic benchmark, from the run's own SyntheticConfig (None for real data)."""
    sources = [s for s in getattr(data_cfg, "sources", []) if getattr(s, "format", None) == "synthetic"]
    syn = getattr(data_cfg, "synthetic", None)
    if not sources or syn is None:
        return None
    lines = [
        "Every pair of the synthetic benchmark (`pipeline.data.synthetic`) comes with the probability its label "
        "was drawn from, so calibration is measured against the truth, not only against sampled labels. "
        "All sources share a gold reward r* (helpful AND harmless: answer benign questions correctly, refuse "
        "harmful requests; verbosity, citations and sign-offs are neutral to it). Each source labels with its "
        f"own utility u_s = r* + drift_scale x (its taste), drift_scale = {syn.drift_scale}, and draws the label "
        f"from the Bradley-Terry probability sigmoid(beta_s x beta_scale x (u_s(a) - u_s(b))), beta_scale = "
        f"{syn.beta_scale}. `true_prob` is that probability (source's own utility); `gold_prob` the same under "
        "r* alone. A reward model that learns the sources' tastes along with r* is mis-calibrated on the shared "
        "preference: the mechanism MORE targets.",
        "",
        "| source | taste (drift per unit of each feature) | beta |",
        "|---|---|---|",
    ]
    for s in sources:
        name = s.path or s.name
        drift = getattr(syn, "drift", {}).get(name, {})
        taste = ", ".join(f"{k} {v:+g}" for k, v in drift.items()) or "none"
        lines.append(f"| {s.name} | {taste} | {getattr(syn, 'beta', {}).get(name, '-')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Sections


def _header(recipe, cfg: ReportConfig, run_dir: Path, manifest: dict | None) -> list[str]:
    title = cfg.title or f"MORE pipeline report: {recipe.name}"
    # The recipe's `description` is NOT repeated: it says what the recipe was written for, not what ran (a
    # recipe reused on other data kept claiming "the synthetic benchmark"); "What ran" below is computed.
    lines = [f"# {title}", ""]
    lines.append(f"Run directory: `{run_dir}`  ")
    if manifest:
        v = manifest.get("versions", {})
        lines.append(
            f"Code: git {manifest.get('git_commit') or 'unknown'}; "
            + ", ".join(f"{k} {val}" for k, val in v.items() if val)
            + "  "
        )
    lines.append("")
    stages = (manifest or {}).get("stages", {})
    if stages:
        lines += ["| stage | status | finished | why it ran |", "|---|---|---|---|"]
        for name, e in _in_pipeline_order(stages):
            status = "writing this report" if name == "report" and e.get("status") == "running" else e.get("status")
            if e.get("stale"):
                status = f"{status}, **STALE** ({e['stale']}; rerun it with --stages {name})"
            lines.append(f"| {name} | {status} | {e.get('finished') or '-'} | {e.get('reason', '')} |")
        lines.append("")
    return lines


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
    from pipeline.io import to_plain

    return to_plain(getattr(recipe, "data", None)) or {}


PAPER_SOURCE_FORMATS = {"hh-rlhf", "oasst1", "webgpt", "summarize", "more-json"}


def run_facts(recipe, run_dir: Path, manifest: dict | None) -> dict:
    """What ran, from the manifest, the stages' outputs and the run's data section: the sources (format, path,
    pairs per split), the reward models (trained or external, parameter counts) and the policy."""
    run_dir = Path(run_dir)
    data = run_data_config(recipe, manifest)
    specs = data.get("sources") or []
    sizes = read_json(run_dir / "reward" / "data.json") or {}
    metrics = read_json(run_dir / "calibration" / "metrics.json") or {}
    sources = []
    names = list(sizes) or [
        s for s in (next(iter(metrics.values()), {}) or {}) if s not in ("all_average", "hh_average")
    ]
    names = names or [s.get("name") for s in specs]
    for name in names:
        spec = next((s for s in specs if s.get("name") == name or str(name).startswith(f"{s.get('name')}/")), {})
        n = dict(sizes.get(name) or {})
        if "test" not in n:
            tests = [
                m[name]["n_pairs"] for m in metrics.values() if isinstance(m.get(name), dict) and "n_pairs" in m[name]
            ]
            if tests:
                n["test"] = tests[0]
        fmt = spec.get("format", "?")
        path = spec.get("path") or (spec.get("name") if fmt != "synthetic" else None)
        group_by = (spec.get("options") or {}).get("group_by")
        sources.append({"name": name, "format": fmt, "path": path, "group_by": group_by, "pairs": n})
    rms = {}
    for name, e in (read_json(run_dir / "reward" / "index.json") or {}).items():
        rm_path = run_dir / e.get("path", f"reward/{name}")  # a name unsafe as a path has a slug directory
        info = read_json(rm_path / "reward_info.json") or {}
        params = info.get("n_params") or safetensors_param_count(rm_path)
        rms[name] = {"trained": True, "method": e.get("method"), "sources": e.get("sources", []), "params": params}
    for name, path in ((read_json(run_dir / "calibration" / "config.json") or {}).get("external") or {}).items():
        rms[name] = {"trained": False, "path": path, "params": safetensors_param_count(path)}
    reward = getattr(recipe, "reward", None)
    base = getattr(reward, "model_name_or_path", None)
    policy = None
    if (run_dir / "align").is_dir():
        align = getattr(recipe, "align", None)
        ppath = getattr(align, "model_name_or_path", None) or str(run_dir / "align" / "base" / "policy")
        policy = {"path": ppath, "params": safetensors_param_count(ppath)}
    return {"sources": sources, "rms": rms, "reward_base": base, "policy": policy}


def _what_ran_section(facts: dict) -> list[str]:
    lines = [
        "## What ran",
        "",
        "Computed from the run's manifest and outputs (not from the recipe's description).",
        "",
    ]
    if facts["sources"]:
        lines += ["| source | format | path | group_by | train pairs | validation pairs | test pairs |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for s in facts["sources"]:
            n = s["pairs"]
            path = f"`{s['path']}`" if s["path"] else ("synthetic benchmark" if s["format"] == "synthetic" else "-")
            lines.append(
                f"| {s['name']} | {s['format']} | {path} | {s['group_by'] or '-'} | {n.get('train', '-')} | "
                f"{n.get('validation', '-')} | {n.get('test', '-')} |"
            )
        lines.append("")
    if facts["rms"]:
        base = facts["reward_base"] or "tiny model built in-process (random init)"
        lines += ["| reward model | trained here | base / path | parameters |", "|---|---|---|---|"]
        for name, r in facts["rms"].items():
            where = f"`{base}`" if r["trained"] else f"`{r['path']}`"
            lines.append(
                f"| {name} | {'yes, ' + str(r['method']) if r['trained'] else 'no (external)'} | {where} | "
                f"{format_count(r['params'])} |"
            )
        lines.append("")
    if facts["policy"]:
        lines += [f"Policy: `{facts['policy']['path']}`, {format_count(facts['policy']['params'])} parameters.", ""]
    return lines


def paper_differences(facts: dict, paper_models: list[str]) -> list[str]:
    """What differs between this run and the paper's rows (empty when sources and model size match)."""
    out = []
    fmts = [s["format"] for s in facts["sources"]]
    if not fmts:
        out.append("this run's data sources are unknown (no reward or calibration output)")
    elif "synthetic" in fmts:
        out.append(f"data: this run used the synthetic benchmark ({len(fmts)} sources), not the paper's real datasets")
    elif len(fmts) != 5 or not set(fmts) <= PAPER_SOURCE_FORMATS:
        used = ", ".join(f"{s['name']} [{s['format']}]" for s in facts["sources"])
        out.append(
            f"data: this run used {len(fmts)} source(s) ({used}); "
            "the paper used 5 (Anthropic HH helpful and harmless, OASST1, WebGPT, OpenAI summarize)"
        )
    train = [s["pairs"].get("train") for s in facts["sources"] if s["pairs"].get("train")]
    if train and max(train) < 40000:
        out.append(
            f"data size: at most {max(train)} training pairs per source here; the paper resampled 40k per source"
        )
    sizes = {"pythia-1.4b": 1.4e9, "pythia-2.8b": 2.8e9, "llama2-7b": 6.7e9}
    params = [r["params"] for r in facts["rms"].values() if r.get("params")]
    if not params:
        out.append("model size: this run's reward models' parameter counts are unknown")
    elif paper_models and any(abs(p - sizes[m]) / sizes[m] > 0.2 for p in params for m in paper_models):
        got = ", ".join(sorted({format_count(p) for p in params}))
        want = ", ".join(f"{m} ({format_count(int(sizes[m]))})" for m in paper_models)
        out.append(f"model size: this run's reward models have {got} parameters; the paper's rows are {want}")
    return out


def read_text_or_none(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _in_pipeline_order(stages: dict) -> list[tuple[str, dict]]:
    """The manifest's stages; the orchestrator writes them in pipeline order."""
    return list(stages.items())


def _reward_section(run_dir: Path) -> list[str]:
    index = read_json(run_dir / "reward" / "index.json")
    lines = ["## Reward models", ""]
    external = (read_json(run_dir / "calibration" / "config.json") or {}).get("external") or {}
    if external:
        lines += [
            "Evaluated, not trained here (`calibration.external_rms`): "
            + ", ".join(f"{n} (`{p}`)" for n, p in external.items())
            + ".",
            "",
        ]
    if not index:
        return lines + ["The reward stage has not run in this directory (no reward/index.json).", ""]
    lines += ["| RM | method | sources | training pairs |", "|---|---|---|---|"]
    for name, e in index.items():
        info = read_json(run_dir / "reward" / safe_component(name) / "reward_info.json") or {}
        lines.append(
            f"| {name} | {e.get('method')} | {', '.join(e.get('sources', []))} | {info.get('n_train_pairs', '-')} |"
        )
    return lines + [""]


def calibration_summary(metrics: dict, headline_bins: int, baseline: str = "multitask") -> dict:
    """The numbers the report compares, pulled out of calibration/metrics.json."""
    ece = f"ece_{headline_bins}"
    out: dict = {"headline_bins": headline_bins, "rms": {}}
    for rm, m in metrics.items():
        row = {}
        for avg in ("all_average", "hh_average"):
            row[avg] = {
                "accuracy": get_path(m, avg, "accuracy"),
                "ece": get_path(m, avg, ece),
                "ece_temperature_scaled": get_path(m, avg, "temperature_scaled", ece),
                "truth_mae": get_path(m, avg, "truth", "prob_mae"),
                "truth_ece": get_path(m, avg, "truth", f"ece_vs_truth_{headline_bins}"),
                "gold_mae": get_path(m, avg, "truth_gold", "prob_mae"),
            }
        out["rms"][rm] = row
    out["baseline"] = baseline
    return out


def comparison_sentences(comparisons: dict, headline_bins: int) -> list[str]:
    """Sentences from calibration/comparisons.json: a difference is called real only when its paired 95%
    bootstrap interval excludes 0 (compare.difference_sentence)."""
    from pipeline.calibration.compare import difference_sentence, parse_comparison

    ece = f"ece_{headline_bins}"
    rows = [
        (ece, f"ECE (M={headline_bins})", True, 1.0, 4, ""),
        ("accuracy", "Accuracy", False, 100.0, 2, " points"),
        (f"temperature_scaled/{ece}", f"ECE (M={headline_bins}) after temperature scaling", True, 1.0, 4, ""),
        ("truth/prob_mae", "Error against the true preference probabilities (mean |p_RM - p_true|)", True, 1.0, 4, ""),
        ("truth_gold/prob_mae", "Error against the shared gold preference (mean |p_RM - p_gold|)", True, 1.0, 4, ""),
    ]
    out = []
    for label, groups in comparisons.items():
        a, b = (RM_LABELS.get(n, n) for n in parse_comparison(label))
        for group, scope in (("all_average", "all sources"), ("hh_average", "Helpful & Harmless")):
            for key, what, lower, scale, digits, unit in rows:
                entry = get_path(groups, group, key)
                if entry is None or (key.startswith("truth") and group != "all_average"):
                    continue
                out.append(
                    difference_sentence(
                        a, b, f"{what}, {scope}", entry, lower_is_better=lower, scale=scale, digits=digits, unit=unit
                    )
                )
    return out


def calibration_sentences(summary: dict) -> list[str]:
    """MORE vs the baseline, side by side without verdicts: the fallback when comparisons.json is missing."""
    rms, base = summary["rms"], summary["baseline"]
    if "more" not in rms or base not in rms:
        return [f"(MORE and {base} were not both evaluated, so there is no head-to-head comparison.)"]
    base_name = "MultiTask" if base == "multitask" else base
    h = summary["headline_bins"]
    m, b = rms["more"], rms[base]
    out = []
    for avg, label in (("all_average", "all sources"), ("hh_average", "Helpful & Harmless")):
        if m[avg]["ece"] is None:
            continue
        out.append(
            compare_sentence(
                f"ECE (M={h}), {label}", m[avg]["ece"], b[avg]["ece"], lower_is_better=True, base_name=base_name
            )
        )
        acc_m, acc_b = m[avg]["accuracy"], b[avg]["accuracy"]
        out.append(
            compare_sentence(
                f"Accuracy, {label}",
                None if acc_m is None else 100 * acc_m,
                None if acc_b is None else 100 * acc_b,
                lower_is_better=False,
                base_name=base_name,
                unit="%",
            )
        )
    if m["all_average"]["truth_mae"] is not None:
        out.append(
            compare_sentence(
                "Error against the true preference probabilities (mean |p_RM - p_true|)",
                m["all_average"]["truth_mae"],
                b["all_average"]["truth_mae"],
                lower_is_better=True,
                base_name=base_name,
            )
        )
    if m["all_average"]["gold_mae"] is not None:
        out.append(
            compare_sentence(
                "Error against the shared gold preference (mean |p_RM - p_gold|)",
                m["all_average"]["gold_mae"],
                b["all_average"]["gold_mae"],
                lower_is_better=True,
                base_name=base_name,
            )
        )
    return out


def train_overlap_line(metrics: dict) -> str | None:
    """One sentence on the evaluation pairs whose prompt the RM was trained on (metrics.json's train_overlap)."""
    parts, excluded = [], None
    for rm, m in metrics.items():
        o = m.get("train_overlap") if isinstance(m, dict) else None
        if not isinstance(o, dict):
            continue
        excluded = o.get("excluded")
        if not o.get("checked"):
            parts.append(f"{rm}: not checked (no train_prompts.json beside it)")
            continue
        kept_sources = set(o.get("kept_sources") or [])
        n = {True: 0, False: 0}
        for sp in ("test", "validation"):
            for source, v in (o.get(sp) or {}).items():
                n[source in kept_sources] += v or 0
        text = f"{rm}: {n[False]} left out" if excluded else f"{rm}: {n[True]} kept"
        if excluded and n[True]:
            text += f", {n[True]} kept on synthetic sources (their test pairs reuse the training prompts by design)"
        parts.append(text)
    if not parts:
        return None
    how = (
        "calibration.exclude_train_overlap is on"
        if excluded
        else "calibration.exclude_train_overlap=false, so scores on them are inflated"
    )
    return f"Evaluation pairs whose prompt the RM was trained on ({how}): " + "; ".join(parts) + "."


def _calibration_section(run_dir: Path, cfg: ReportConfig, headline_bins: int) -> tuple[list[str], dict | None]:
    cal = run_dir / "calibration"
    lines = ["## Calibration", ""]
    metrics = read_json(cal / "metrics.json")
    if not metrics:
        return lines + ["The calibration stage has not run in this directory (no calibration/metrics.json).", ""], None
    summary = calibration_summary(metrics, headline_bins, cfg.baseline)
    comparisons = read_json(cal / "comparisons.json")
    if comparisons:
        summary["sentences"] = comparison_sentences(comparisons, headline_bins)
        lines += [
            "What this run measured, as paired differences with 95% bootstrap intervals over the same test "
            "pairs (a difference counts only when its interval excludes 0; lower ECE and error and higher "
            "accuracy are better):",
            "",
        ]
    else:
        summary["sentences"] = calibration_sentences(summary)
        lines += ["What this run measured (no paired comparisons were computed, so no differences are judged):", ""]
    lines += [f"- {s}" for s in summary["sentences"]]
    lines.append("")
    if overlap := train_overlap_line(metrics):
        lines += [overlap, ""]
    others = [rm for rm in metrics if rm not in ("more", cfg.baseline)]
    if others:
        ece = f"ece_{headline_bins}"
        lines += [
            "Other RMs (all-source average): "
            + "; ".join(
                f"{rm} acc {100 * get_path(metrics, rm, 'all_average', 'accuracy'):.2f}% / ECE "
                f"{get_path(metrics, rm, 'all_average', ece):.4f}"
                for rm in others
                if get_path(metrics, rm, "all_average", ece) is not None
            )
            + ".",
            "",
        ]
    for name in ("table.md", "comparisons.md"):
        if (cal / name).exists():
            lines += [_demote((cal / name).read_text(encoding="utf-8")), ""]
    pngs = sorted(cal.glob("*.png"))
    if pngs:
        lines += ["### Plots", ""]
        lines += [f"![{p.stem}](calibration/{p.name})" for p in pngs]
        lines.append("")
    return lines, summary


def _align_section(run_dir: Path) -> tuple[list[str], dict | None]:
    al = run_dir / "align"
    lines = ["## Alignment", ""]
    judgements = read_json(al / "judgements.json")
    if not judgements:
        return lines + ["The alignment stage has not run in this directory (no align/judgements.json).", ""], None
    lines += ["Pairwise verdicts, first policy vs second (per-prompt-set numbers in the table below):", ""]
    for label, by_set in judgements.items():
        if not isinstance(by_set, dict):
            continue
        sets = {"all": by_set["all"]} if isinstance(by_set.get("all"), dict) else by_set
        for prompt_set, entry in sets.items():
            if isinstance(entry, dict):
                lines.append(f"- {win_tie_lose_sentence(f'{label}, {prompt_set} prompts', entry)}")
    lines.append("")
    table = al / "table.md"
    if table.exists():
        lines += [_demote(table.read_text(encoding="utf-8")), ""]
    pngs = sorted(al.glob("*.png"))
    lines += [f"![{p.stem}](align/{p.name})" for p in pngs] + ([""] if pngs else [])
    return lines, judgements


def _rjs_more_vs_base(judgements: dict | None, baseline: str) -> dict | None:
    if not judgements:
        return None
    for label, by_set in judgements.items():
        if label.replace(" ", "") in (f"rjs:morevs{baseline}",):
            if isinstance(by_set.get("all"), dict) and "win" in by_set["all"]:
                entries = [by_set["all"]]  # every prompt set together
            else:
                entries = [e for e in by_set.values() if isinstance(e, dict) and "win" in e]
            if entries:
                scale = 100.0 if max(max(e["win"], e["tie"], e["lose"]) for e in entries) <= 1.0 else 1.0
                return {k: scale * sum(e[k] for e in entries) / len(entries) for k in ("win", "tie", "lose")}
    return None


def _paper_section(
    cfg: ReportConfig, recipe, summary: dict | None, judgements: dict | None, facts: dict | None = None
) -> list[str]:
    rows = paper_rows(cfg, getattr(getattr(recipe, "reward", None), "model_name_or_path", None))
    if not rows:
        return []
    differences = paper_differences(facts or {"sources": [], "rms": {}}, rows)
    if differences:
        note = [
            "**Not comparable as is.** What differs between this run and the paper's rows:",
            "",
            *[f"- {d}" for d in differences],
            "",
            "The paper's rows are there for orientation (what the method did at the paper's scale), not as a target "
            "this run should reproduce.",
        ]
    else:
        note = ["Same five sources and a base model of the paper's size; steps, batch and hardware may still differ."]
    lines = [
        "## The paper's numbers side by side",
        "",
        f"Source: {PAPER_CITATION}, Tables 1 and 2 (5 sources; ECE with M=10 bins).",
        "",
        *note,
        "",
        "| | MultiTask acc (%) | MultiTask ECE | MORE acc (%) | MORE ECE | H&H ECE MultiTask -> MORE | "
        "RJS MORE vs MultiTask win/tie/lose (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        t2, t1 = PAPER_TABLE2[m], PAPER_TABLE1[m]
        wtl = "/".join(str(x) for x in t1["rjs_win_tie_lose"])
        lines.append(
            f"| paper, {m} | {t2['multitask'][0]:.2f} | {t2['multitask'][1]:.4f} | {t2['more'][0]:.2f} | "
            f"{t2['more'][1]:.4f} | {t1['hh_ece'][0]:.4f} -> {t1['hh_ece'][1]:.4f} | {wtl} |"
        )
    rjs = _rjs_more_vs_base(judgements, cfg.baseline)
    wtl = "/".join(f"{rjs[k]:.0f}" for k in ("win", "tie", "lose")) if rjs else "-"
    if summary and "more" in summary["rms"] and summary["baseline"] in summary["rms"]:
        b, mo = summary["rms"][summary["baseline"]], summary["rms"]["more"]

        def f(x, pct=False):
            return "-" if x is None else (f"{100 * x:.2f}" if pct else f"{x:.4f}")

        hh = (
            f"{f(b['hh_average']['ece'])} -> {f(mo['hh_average']['ece'])}"
            if b["hh_average"]["ece"] is not None
            else "-"
        )
        lines.append(
            f"| **this run** | {f(b['all_average']['accuracy'], True)} | {f(b['all_average']['ece'])} | "
            f"{f(mo['all_average']['accuracy'], True)} | {f(mo['all_average']['ece'])} | {hh} | {wtl} |"
        )
    else:
        lines.append(f"| **this run** | - | - | - | - | - | {wtl} |")
    lines.append("")
    if summary and summary.get("headline_bins") != 10:
        lines += [f"(This run's ECE uses M={summary['headline_bins']} bins.)", ""]
    return lines


# ---------------------------------------------------------------------------------------------------
# The stage


def render_report(recipe, run_dir: Path) -> tuple[str, dict]:
    """The report's markdown and the numbers behind its sentences (report.json)."""
    run_dir = Path(run_dir)
    cfg = getattr(recipe, "report", None) or ReportConfig()
    manifest = read_json(run_dir / "manifest.json")
    headline = getattr(getattr(recipe, "calibration", None), "headline_bins", None)
    cal_cfg = read_json(run_dir / "calibration" / "config.json") or {}
    headline = int(cal_cfg.get("headline_bins", headline or 10))

    lines = _header(recipe, cfg, run_dir, manifest)
    facts = run_facts(recipe, run_dir, manifest)
    lines += _what_ran_section(facts)
    truth = synthetic_truth_paragraph(getattr(recipe, "data", None))
    if truth:
        lines += ["## The synthetic benchmark: what is true here", "", truth, ""]
    lines += _reward_section(run_dir)
    cal_lines, summary = _calibration_section(run_dir, cfg, headline)
    lines += cal_lines
    align_lines, judgements = _align_section(run_dir)
    lines += align_lines
    lines += _paper_section(cfg, recipe, summary, judgements, facts)
    recipe_text = read_text_or_none(run_dir / "recipe.yaml") if cfg.include_recipe else None
    if recipe_text:  # the resolved recipe the orchestrator wrote for this run
        lines += [
            "## Configuration (the resolved recipe)",
            "",
            "Rerun exactly: `python -m pipeline.run --recipe <run dir>/recipe.yaml`.",
            "",
            "```yaml",
            recipe_text.rstrip(),
            "```",
            "",
        ]
    data = {
        "run": facts,
        "calibration": summary,
        "rjs_more_vs_baseline": _rjs_more_vs_base(judgements, cfg.baseline),
        "sentences": summary.get("sentences", []) if summary else [],
    }
    return "\n".join(lines), data


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Write DIR/report.md and DIR/report.json (main process only)."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") == "0":
        text, data = render_report(recipe, run_dir)
        atomic_write_text(run_dir / "report.md", text)
        atomic_write_json(run_dir / "report.json", data)
        print(f"[report] wrote {run_dir / 'report.md'}")
    return ["report.md", "report.json"]


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    return "report: no optimizer steps", None
