"""The report's sections besides the calibration one: the header (title, code, stage status), the synthetic
benchmark's ground truth, the reward models, the alignment verdicts and the paper's numbers side by side (with what
differs between this run and the paper's rows); `demote` nests a stage's own table file in the report.

Imports `pipeline.calibration.compare` (the win/lose rule), the leaves `pipeline.io` and `pipeline.tables`, and
the report's `config` and `facts`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.calibration.compare import bootstrap_win_lose, win_lose_sentence
from pipeline.io import read_json, safe_component
from pipeline.report.config import (
    PAPER_CITATION,
    PAPER_SOURCE_FORMATS,
    PAPER_TABLE1,
    PAPER_TABLE2,
    ReportConfig,
    paper_rows,
)
from pipeline.report.facts import format_count, stage_setting
from pipeline.tables import markdown_table


# The columns of the paper table, and its header with the empty corner cell written '| |'.
PAPER_COLUMNS = (
    "MultiTask acc (%)",
    "MultiTask ECE",
    "MORE acc (%)",
    "MORE ECE",
    "H&H ECE MultiTask -> MORE",
    "RJS MORE vs MultiTask win/tie/lose (%)",
)
PAPER_HEADER = "| | " + " | ".join(PAPER_COLUMNS) + " |"


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def demote(markdown: str) -> str:
    """Drop a table file's own H1 and push its headings one level down, to nest it in the report."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("# "):
            continue
        out.append("#" + line if line.startswith("#") else line)
    return "\n".join(out).strip()


def read_text_or_none(path: Path) -> str | None:
    """The file's text, or None when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _in_pipeline_order(stages: dict) -> list[tuple[str, dict]]:
    """The manifest's stages; the orchestrator writes them in pipeline order."""
    return list(stages.items())


# ---------------------------------------------------------------------------------------------------
# Sections


def header_section(recipe, cfg: ReportConfig, run_dir: Path, manifest: dict | None) -> list[str]:
    """The title, the run directory, the code's version and the table of the stages' status."""
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
        rows = []
        for name, e in _in_pipeline_order(stages):
            status = "writing this report" if name == "report" and e.get("status") == "running" else e.get("status")
            if e.get("stale"):
                status = f"{status}, **STALE** ({e['stale']}; rerun it with --stages {name})"
            rows.append([name, status, e.get("finished") or "-", e.get("reason", "")])
        lines += [*markdown_table(["stage", "status", "finished", "why it ran"], rows), ""]
    return lines


def synthetic_truth_paragraph(data_cfg) -> str | None:
    """What is true on the synthetic benchmark, from the run's own SyntheticConfig (None for real data)."""
    # the data section's class is the one the stage table names: a replaced table (the orchestrator tests') has
    # sources without a `format` and no `synthetic`
    sources = [s for s in data_cfg.sources if getattr(s, "format", None) == "synthetic"]
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
    ]
    rows = []
    for s in sources:
        name = s.path or s.name
        taste = ", ".join(f"{k} {v:+g}" for k, v in syn.drift.get(name, {}).items()) or "none"
        rows.append([s.name, taste, syn.beta.get(name, "-")])
    lines += markdown_table(["source", "taste (drift per unit of each feature)", "beta"], rows)
    return "\n".join(lines)


def reward_section(run_dir: Path) -> list[str]:
    """The external RMs evaluated here and the table of the RMs trained here (DIR/reward/index.json)."""
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
    implicit = (read_json(run_dir / "calibration" / "config.json") or {}).get("implicit") or {}
    if implicit:
        lines += [
            "Implicit reward models (DPO policies, `calibration.implicit_rms`; reward = beta * (log pi - log pi_ref) "
            "over the response tokens): "
            + "; ".join(
                f"{n} (policy `{e.get('path')}`, "
                + (f"reference `{e['reference']}`" if e.get("reference") else "REFERENCE-FREE: beta * log pi alone")
                + f", beta {e.get('beta')})"
                for n, e in implicit.items()
            )
            + ".",
            "",
        ]
    if not index:
        return lines + ["The reward stage has not run in this directory (no reward/index.json).", ""]
    rows = []
    for name, e in index.items():
        info = read_json(run_dir / "reward" / safe_component(name) / "reward_info.json") or {}
        rows.append(
            [name, e.get("method"), ", ".join(e.get("sources", [])), info.get("n_train_pairs", "-"), over_length(info)]
        )
    table = markdown_table(["RM", "method", "sources", "training pairs", "pairs over max_length"], rows)
    return lines + table + [""]


def over_length(info: dict) -> str:
    """What an RM's training did with pairs longer than max_length (reward_info.json), in words."""
    limit = info.get("max_length")
    if info.get("truncation") == "left":
        return f"{info.get('n_truncated_sequences', 0)} cut from the left to {limit} tokens"
    if info.get("truncation") == "drop":
        return f"{info.get('n_dropped_pairs', 0)} dropped (TRL's rule; limit {limit} tokens)"
    if "n_truncated_sequences" in info:  # an RM trained before the option existed: always cut from the left
        return f"{info['n_truncated_sequences']} cut from the left"
    return "-"


def win_tie_lose_sentence(label: str, entry: dict, *, n_samples: int = 2000, seed: int = 0) -> str:
    """'rjs, helpful prompts: win 40% / tie 20% / lose 40% of 200 prompts; ...': a win (or loss) only when
    the bootstrap 95% interval of win - lose excludes 0 (see compare.win_lose_sentence)."""
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


def align_section(run_dir: Path) -> tuple[list[str], dict | None]:
    """The verdicts of align/judgements.json in sentences, align/table.md nested, the plots; and the judgements."""
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
        lines += [demote(table.read_text(encoding="utf-8")), ""]
    pngs = sorted(al.glob("*.png"))
    lines += [f"![{p.stem}](align/{p.name})" for p in pngs] + ([""] if pngs else [])
    return lines, judgements


def rjs_more_vs_base(judgements: dict | None, baseline: str) -> dict | None:
    """Win/tie/lose (%) of rejection sampling with MORE's RM vs the baseline's, over the prompt sets (or "all")."""
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


def paper_section(
    cfg: ReportConfig, recipe, summary: dict | None, judgements: dict | None, facts: dict | None = None
) -> list[str]:
    """The paper's Table 1 and 2 numbers next to this run's, after what differs between the two."""
    rows = paper_rows(cfg, stage_setting(recipe, "reward", "model_name_or_path"))
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
    ]
    table = []
    for m in rows:
        t2, t1 = PAPER_TABLE2[m], PAPER_TABLE1[m]
        wtl = "/".join(str(x) for x in t1["rjs_win_tie_lose"])
        table.append(
            [f"paper, {m}", f"{t2['multitask'][0]:.2f}", f"{t2['multitask'][1]:.4f}", f"{t2['more'][0]:.2f}"]
            + [f"{t2['more'][1]:.4f}", f"{t1['hh_ece'][0]:.4f} -> {t1['hh_ece'][1]:.4f}", wtl]
        )
    rjs = rjs_more_vs_base(judgements, cfg.baseline)
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
        table.append(
            ["**this run**", f(b["all_average"]["accuracy"], True), f(b["all_average"]["ece"])]
            + [f(mo["all_average"]["accuracy"], True), f(mo["all_average"]["ece"]), hh, wtl]
        )
    else:
        table.append(["**this run**", "-", "-", "-", "-", "-", wtl])
    lines += [PAPER_HEADER, *markdown_table(["", *PAPER_COLUMNS], table)[1:], ""]
    if summary and summary.get("headline_bins") != 10:
        lines += [f"(This run's ECE uses M={summary['headline_bins']} bins.)", ""]
    return lines
