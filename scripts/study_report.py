"""Write docs/results.md from the study's committed sweep summaries (issue 10, part 2).

    python scripts/study_report.py [--results docs/results] [--out docs/results.md]

Reads docs/results/<part>/summary.json (written by `python -m pipeline.sweep`, copied there by
scripts/run_study.sh with MACHINE.txt) and an optional hand-written docs/results/<part>/NOTE.md (context:
what was changed or left out, measured wall time). Every number and every verdict in the page is computed
here from those files, with the project's one rule (pipeline.sweep.is_significant): a seed-paired difference
is significant only when its 95% interval excludes zero AND p < 0.05; otherwise it is "no significant
difference"; "better" / "worse" only for a significant one. Nothing is typed in
by hand, so regenerating after a rerun can never leave a stale number behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.calibration.compare import p_text
from pipeline.sweep import PAIRS, PERCENT_METRICS, VERDICTS, cell, is_significant, judge, metric_label, seed_warning
from pipeline.sweep.summary import _index
from pipeline.sweep.summary import _rms as _rms_in
from pipeline.tables import rm_label


sys.path.insert(0, str(Path(__file__).resolve().parent))
import downstream_report  # noqa: E402  (scripts/downstream_report.py: the downstream half of the page)


# The parts run_study.sh knows, in page order, with what each one asks.
PARTS = {
    "synthetic": (
        "Synthetic benchmark, 5 sources that disagree",
        "The `tiny-cpu` recipe's synthetic benchmark (five sources whose labels follow a shared gold reward "
        "r* plus a per-source drift; `data.synthetic.drift_scale` scales the drift, 0 is the control where "
        "every source shares r*), reward + calibration stages, three RMs on the same data: MORE (balanced "
        "batches, min-norm source weights), MultiTask (the plain mixture: sources concatenated, random "
        "batches) and Uniform (balanced batches with fixed equal weights: MORE's batching without its "
        "reweighting).",
    ),
    "overconfident": (
        "Synthetic benchmark, over-confident regime",
        "The same grid, trained until the RMs are over-confident like the paper's large RMs (MultiTask's "
        "fitted temperature above 1): 400 training pairs per source for 10 epochs "
        "(`data.synthetic.n_train=400 reward.train.num_train_epochs=10`).",
    ),
    "real": (
        "Real data, over-confident regime",
        "The `minilm-real` recipe (all-MiniLM-L6-v2, 22.7M parameters) on local slices of Helpful, Harmless, "
        "OASST1, WebGPT and Summarize, trained into the regime the paper is about (MultiTask over-confident): "
        "128 left-truncated tokens, 150 training pairs per source, 5 epochs (`data.max_length=128 "
        "data.n_train_per_source=150 reward.train.num_train_epochs=5`: 190 optimizer steps per RM), MORE, "
        "MultiTask and Uniform, reward + calibration stages, calibration on the recipe's test sets. The settings "
        "were chosen before the study's MORE RMs were trained, from MultiTask's fitted temperature on seed 0 "
        "alone: the cheapest setting tried with T > 1.3 (150 pairs x 4 epochs gave T = 1.02, 150 x 5 gave 1.94; "
        "on the code before the reward head's initialisation was seeded, 150 x 4 had given 1.52 and 150 x 6 "
        "3.70: at this scale the head's initialisation alone moves T by about 0.5; scripts/run_study.sh "
        "records every setting tried).",
    ),
    "real-full": (
        "Real data at the recipe's full settings",
        "The `minilm-real` recipe as shipped (256 tokens, 600 pairs per source, 2 epochs; MORE vs MultiTask).",
    ),
    "real-reduced": (
        "Real data, reduced to fit one CPU session",
        "The `minilm-real` recipe cut down (`data.max_length=128 data.n_train_per_source=300 "
        "reward.train.num_train_epochs=1`: 75 optimizer steps per RM instead of 300, at 128 left-truncated "
        "tokens instead of 256), reward + calibration stages, calibration on the recipe's test sets (up to 400 "
        "pairs per source). A smaller scale than the full recipe: its verdicts apply to this scale only.",
    ),
    "downstream": (
        "Synthetic benchmark through alignment, default regime (calibration of its RMs)",
        "The downstream study's runs (issue 31; its alignment results are in the section on the downstream "
        "claim): the `tiny-cpu` recipe at drift_scale 0 and 2 with the policy, reward, calibration and align "
        "stages. Their calibration numbers replicate the synthetic part's at these two points with fresh RMs.",
    ),
    "downstream-overconfident": (
        "Synthetic benchmark through alignment, over-confident regime (calibration of its RMs)",
        "As `downstream`, trained as the overconfident part (`data.synthetic.n_train=400 "
        "reward.train.num_train_epochs=10`).",
    ),
    "two-source": (
        "Two sources (helpful + harmless), normalize l2 vs none (calibration of its RMs)",
        "The K = 2 point of the paper's Fig. 6: only the helpful and harmless synthetic sources, drift_scale 2, "
        "`reward.train.normalize` l2 (MORE = Uniform by construction) and none.",
    ),
    "dpo": (
        "The DPO policy beside MORE and MultiTask (calibration of its RMs)",
        "Default regime, drift_scale 2: MORE, MultiTask and a DPO policy (TRL's DPOTrainer on the same pairs) "
        "evaluated as an implicit RM.",
    ),
    "rloo-temperature": (
        "RLOO with raw and temperature-scaled rewards (calibration of its RMs)",
        "Over-confident regime, drift_scale 2, MORE and MultiTask, RLOO trained on the raw reward and on the "
        "reward / T (`align.use_calibrated_rewards` false / true).",
    ),
}
# Tables per part: (scope, metric, title). Rows are grid points, columns RMs then paired differences.
TABLES = [
    ("all_average", "ece_10", "ECE10, all-source average"),
    ("all_average", "ts_ece_10", "ECE10 after temperature scaling, all-source average"),
    ("hh_average", "ece_10", "ECE10, Helpful & Harmless average (the paper's Table 1 scope)"),
    ("all_average", "gold_mae", "MAE of the RM's probability vs the gold (shared r*) probability, all-source average"),
    ("all_average", "truth_mae", "MAE vs each source's true label probability, all-source average"),
    ("all_average", "accuracy", "Accuracy (%), all-source average"),
    ("all_average", "temperature", "Fitted temperature T (T > 1: over-confident)"),
]
# The comparisons that decide the claim: (scope, metric).
CLAIM = [
    ("all_average", "ece_10"),
    ("hh_average", "ece_10"),
    ("all_average", "ts_ece_10"),
    ("all_average", "gold_mae"),
    ("all_average", "accuracy"),
]


def _diff(point, a, b, scope, metric):
    for d in point["differences"]:
        if (d["section"], d["a"], d["b"], d["scope"], d["metric"]) == ("calibration", a, b, scope, metric):
            return d
    return None


def _rms(summary):
    """The calibrated RMs of every grid point, in sweep.py's order (MORE, MultiTask, Uniform, others)."""
    return _rms_in([m for p in summary["points"].values() for m in p["metrics"]], "calibration")


def _pairs(rms):
    return [(a, b) for a, b in PAIRS if a in rms and b in rms]


def _verdict(d, metric: str = "") -> str:
    if d is None:
        return "-"
    j = judge(d)
    if j is None:
        return f"{cell(d, metric)} {VERDICTS[is_significant(d)]}"
    side, judgement = j
    return f"{cell(d, metric)} **{judgement or side}**"


def table(summary, scope, metric, title) -> list[str]:
    rms, points = _rms(summary), summary["points"]
    pairs = _pairs(rms)
    indexes = {name: _index(p["metrics"]) for name, p in points.items()}
    if not any(("calibration", r, scope, metric) in idx for idx in indexes.values() for r in rms):
        return []
    out = [
        f"**{title}** (mean [95% t-interval] over seeds; differences seed-paired)",
        "",
        "| point | n | "
        + " | ".join(rm_label(r) for r in rms)
        + "".join(f" | {rm_label(a)} - {rm_label(b)}" for a, b in pairs)
        + " |",
        "|---" * (2 + len(rms) + len(pairs)) + "|",
    ]
    for name, p in points.items():
        idx = indexes[name]
        cells = [cell(idx.get(("calibration", r, scope, metric)), metric) for r in rms]
        diffs = [_verdict(_diff(p, a, b, scope, metric), metric) for a, b in pairs]
        out.append(f"| {name} | {p['n_runs']} | " + " | ".join(cells + diffs) + " |")
    return out + [""]


def claim_lines(summary, pairs=None, claim=CLAIM) -> list[str]:
    """Per comparison and key metric: at which grid points the difference is better / worse / not
    significant, all read off the intervals."""
    rms, points = _rms(summary), summary["points"]
    out = []
    for a, b in pairs or _pairs(rms):
        for scope, metric in claim:
            groups: dict[str, list[str]] = {}
            for name, p in points.items():
                d = _diff(p, a, b, scope, metric)
                if d is None:
                    continue
                sig, j = is_significant(d), judge(d)
                if sig is None:
                    key = "too few seeds for an interval"
                elif j is None:
                    key = "no significant difference"
                else:
                    key = f"{j[0]} ({j[1]})" if j[1] else j[0]
                value = f"{100 * d['mean']:+.2f} points" if metric in PERCENT_METRICS else f"{d['mean']:+.4f}"
                groups.setdefault(key, []).append(f"{name} ({value})")
            if not groups:
                continue
            what = f"{metric_label(metric)}, {scope.replace('_', ' ')}"
            body = "; ".join(f"{k} at {', '.join(v)}" for k, v in groups.items())
            out.append(f"- {rm_label(a)} - {rm_label(b)}, {what}: {body}.")
    return out


def per_source_lines(summary) -> list[str]:
    """ECE10 before and after temperature scaling, source by source (every comparison): what the averages
    hide. Shown for the real-data parts."""
    scopes = sorted(
        {
            d["scope"]
            for p in summary["points"].values()
            for d in p["differences"]
            if d["section"] == "calibration" and not d["scope"].endswith("_average")
        }
    )
    if not scopes:
        return []
    claim = [(s, m) for s in scopes for m in ("ece_10", "ts_ece_10")]
    return ["Source by source (ECE10 before / after temperature scaling):", "", *claim_lines(summary, claim=claim), ""]


def part_section(name: str, part_dir: Path) -> list[str]:
    title, what = PARTS.get(name, (name, ""))
    out = [f"## {title}", "", what, ""]
    note = part_dir / "NOTE.md"
    summary_path = part_dir / "summary.json"
    if note.exists():
        out += [note.read_text().strip(), ""]
    if not summary_path.exists():
        out += ["Not run: no summary was committed for this part.", ""]
        return out
    summary = json.loads(summary_path.read_text())
    sweep = summary["sweep"]
    ns = [p["n_runs"] for p in summary["points"].values() if p["n_runs"] >= 2]
    machine = part_dir / "MACHINE.txt"
    if machine.exists():
        out += ["Run record (`MACHINE.txt`):", "", "```", machine.read_text().strip(), "```", ""]
    grid = "; ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in sweep.get("grid", [])) or "none"
    out += [
        f"Seeds {', '.join(map(str, sweep['seeds']))}; grid: {grid}; overrides: "
        + (" ".join(f"`{o}`" for o in sweep.get("overrides", [])) or "none")
        + ".",
        "",
        *([f"**{seed_warning(min(ns))}**", ""] if ns and seed_warning(min(ns)) else []),
        "What the intervals say:",
        "",
        *claim_lines(summary),
        "",
        *(per_source_lines(summary) if name.startswith("real") else []),
    ]
    for scope, metric, t in TABLES:
        out += table(summary, scope, metric, t)
    plots = sorted(p.name for p in part_dir.glob("plot_*.png"))
    out += [
        f"Every source and metric: [{name}/summary.md](results/{name}/summary.md), "
        f"[summary.json](results/{name}/summary.json)"
        + ("; plots: " + ", ".join(f"[{p}](results/{name}/{p})" for p in plots) if plots else "")
        + ".",
        "",
    ]
    return out


# The README's summary of findings: per part, these comparisons of MORE - MultiTask and MORE - Uniform.
README_CLAIM = [*CLAIM[:3], ("all_average", "accuracy"), ("all_average", "temperature")]
README_BEGIN = "<!-- study:begin (generated by python scripts/study_report.py --readme README.md; do not edit) -->"
README_END = "<!-- study:end -->"


def chance_line(summary) -> str:
    """How many of the part's seed-paired calibration differences pass the rule, and how many would by chance."""
    rows = [d for p in summary["points"].values() for d in p["differences"] if d["section"] == "calibration"]
    n, k = len(rows), sum(bool(is_significant(d)) for d in rows)
    return (
        f"Of the {n} seed-paired differences tested in this part (every pair of RMs, source, metric and point), "
        f"{k} pass the rule; about {0.05 * n:.0f} would by chance alone, so isolated ones are read with care "
        f"(each is named in [its summary](docs/results/{{part}}/summary.md))."
    )


def per_source_count_line(summary, a: str = "more", b: str = "multitask") -> str:
    """'Source by source, K of the N MORE - MultiTask differences pass the rule: ...' (every one named)."""
    rows = [
        (name, d)
        for name, p in summary["points"].items()
        for d in p["differences"]
        if d["section"] == "calibration" and (d["a"], d["b"]) == (a, b) and not d["scope"].endswith("_average")
    ]
    if not rows:
        return ""
    hits = [
        f"{metric_label(d['metric'])}, {d['scope']}"
        + (f" at {name}" if len(summary["points"]) > 1 else "")
        + f" ({_verdict(d, d['metric']).replace('**', '')}, {p_text(d.get('p_value'))})"
        for name, d in rows
        if is_significant(d)
    ]
    head = f"Source by source, {len(hits)} of the {len(rows)} {rm_label(a)} - {rm_label(b)} differences pass the rule"
    return head + (": " + "; ".join(hits) + "." if hits else ".")


def readme_block(results: Path) -> str:
    """The README's findings, every verdict computed from the committed summaries (as docs/results.md)."""
    out = [README_BEGIN]
    for name, (title, _) in PARTS.items():
        path = results / name / "summary.json"
        if not path.exists():
            out.append(f"- **{title}**: not run; `scripts/run_study.sh {name}` produces it (see docs/results.md).")
            continue
        summary = json.loads(path.read_text())
        ns = sorted({p["n_runs"] for p in summary["points"].values()})
        seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        out.append(f"- **{title}** ({seeds} seeds per point; [details](docs/results.md)):")
        for pair in [("more", "multitask"), ("more", "uniform")]:
            if pair in _pairs(_rms(summary)):
                out += [f"  {ln}" for ln in claim_lines(summary, [pair], README_CLAIM)]
        if name.startswith("real") and (line := per_source_count_line(summary)):
            out.append(f"  {line}")
        out.append("  " + chance_line(summary).replace("{part}", name))
    out += downstream_report.readme_lines(results)
    return "\n".join(out + [README_END])


def write_readme(readme: Path, results: Path) -> None:
    """Replace the generated block of `readme` (between README_BEGIN and README_END) by `readme_block`."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"study_report: {readme} has no block {README_BEGIN!r} ... {README_END!r}")
    text = text[:start] + readme_block(results) + text[end + len(README_END) :]
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(readme)


def render(results: Path) -> str:
    names = [n for n in PARTS if (results / n).is_dir()] + sorted(
        p.name for p in results.iterdir() if p.is_dir() and p.name not in PARTS
    )
    out = [
        "# Results: when does MORE make reward models better calibrated, and does it align better?",
        "",
        "Generated by `python scripts/study_report.py` from the committed sweep summaries under "
        "[docs/results/](results/) (regenerate, do not edit). Each part was produced by "
        "`scripts/run_study.sh <part>`, which runs one `python -m pipeline.sweep` command (recorded with the "
        "date, machine and commit in the part's `MACHINE.txt`) and copies its summary here.",
        "",
        "How to read it: cells are the mean over seeds with its 95% t-interval. Differences (a - b) are "
        "seed-paired: the same seed's RMs share their data draw. A difference is significant only when its "
        'interval excludes zero AND its paired t-test gives p < 0.05; otherwise it is "no significant '
        'difference"; only a significant one is called better or worse. Lower is better for ECE and MAE, '
        "higher for accuracy (in %, as in report.md); a temperature closer to 1 is better (T > 1 means "
        "over-confident, T < 1 under-confident), so a temperature difference gets a verdict only when both "
        "temperatures lie on the same side of 1. An interval that reached outside a metric's range is clipped "
        "to it (†); intervals from fewer than 3 seeds are very wide and come with a warning.",
        "",
    ]
    out += ["## The claim's status at each scale measured", ""]
    out += ["MORE - MultiTask, the paper's comparison (details and the Uniform baseline in each part below):", ""]
    for name in names:
        path = results / name / "summary.json"
        title = PARTS.get(name, (name,))[0]
        if not path.exists():
            out += [f"- {title}: not run (see its section)."]
            continue
        lines = claim_lines(json.loads(path.read_text()), [("more", "multitask")], CLAIM[:3])
        out += [f"- {title}:"] + [f"  {ln}" for ln in lines]
    out += [f"- {PARTS[n][0]}: not run (see its section)." for n in PARTS if n not in names]
    out.append("")
    out += downstream_report.render(results)[0]
    for name in names:
        out += part_section(name, results / name)
    for name in PARTS:
        if name not in names:
            out += part_section(name, results / name)
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="docs/results", help="folder with one sub-folder per study part")
    ap.add_argument("--out", default="docs/results.md", help="the page to write")
    ap.add_argument("--readme", default=None, help="also rewrite this README's generated findings block")
    args = ap.parse_args(argv)
    if args.readme:
        write_readme(Path(args.readme), Path(args.results))
        print(f"wrote the findings block of {args.readme}")
    text = render(Path(args.results))
    out = Path(args.out)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
