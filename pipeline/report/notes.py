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


# --------------------------------------------------------------------------------------------------
# The policy


def _first_lines(path: Path, n: int = 2000) -> list[dict]:
    """The first `n` JSON rows of a .jsonl file ([] when it cannot be read)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if len(rows) >= n:
                    break
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        return []
    return rows


def _short(text: str, n: int, tail: bool = False) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    if len(text) <= n:
        return text
    return "..." + text[-n:] if tail else text[:n] + "..."


def demo_policy_lines(run_dir: Path, facts: dict) -> list[str]:
    """When the base policy is the tiny demo policy (built in-process, warm-started on the synthetic benchmark's
    text; DIR/align/base/policy.settings.json): say so, with its perplexity on the judged sources' test answers
    and one of its samples; and when those prompts are real data, that its samples are not meaningful text, so
    the verdicts below compare noise."""
    base = Path(run_dir) / "align" / "base"
    if not (base / "policy.settings.json").is_file() or not (base / "policy").is_dir():
        return []
    formats = {s["name"]: s["format"] for s in facts.get("sources") or []}
    rows = _first_lines(base / "eval_candidates.jsonl")
    sets = list(dict.fromkeys(str(r.get("set")) for r in rows if r.get("set") is not None))
    real = [s for s in sets if formats.get(s, "?") != "synthetic"]
    ppl = (read_json(base / "perplexity.json") or {}).get("perplexity") or {}
    ppl_text = ", ".join(f"{v:.1f} ({s})" for s, v in ppl.items() if isinstance(v, (int, float)))
    params = (facts.get("policy") or {}).get("params")
    size = f", {params / 1e3:.0f}k parameters" if isinstance(params, int) and params < 10**6 else ""
    head = (
        f"The policy is the tiny demo policy (built in this run{size}, warm-started on the synthetic benchmark's "
        "text; `align.model_name_or_path` names a real one)."
    )
    sample = next((r for r in rows if str(r.get("set")) in (real or sets) and r.get("candidates")), None)
    sample_text = (
        f"A sample ({sample.get('set')} prompt `{_short(sample.get('prompt', ''), 120, tail=True)}`): "
        f"`{_short(sample['candidates'][0], 200)}`."
        if sample
        else ""
    )
    if not real:
        ppl_part = f" Its perplexity on the judged sources' test answers: {ppl_text}." if ppl_text else ""
        return [f"{head}{ppl_part} {sample_text}".rstrip(), ""]
    return [
        f"**{head} Its samples on this run's real prompts ({', '.join(real)}) are not meaningful text**"
        + (f": its perplexity on those sources' test answers is {ppl_text}" if ppl_text else "")
        + f". {sample_text} The verdicts below compare such samples, so they say nothing about how these reward "
        "models would align a real policy. Fix: align a real policy (`align.model_name_or_path`).",
        "",
    ]


# --------------------------------------------------------------------------------------------------
# The configuration shown


def used_recipe_text(recipe_text: str, manifest: dict | None) -> tuple[str, list[str]]:
    """The resolved recipe without what the run did not use, and the keys left out: a stage's section when the
    manifest has no entry for that stage (it never ran here; `report` is this stage), and `data.synthetic` when
    no source is synthetic. The text is returned as is when it does not parse as a YAML mapping."""
    import yaml

    try:
        d = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return recipe_text, []
    stages = (manifest or {}).get("stages")
    if not isinstance(d, dict) or not isinstance(stages, dict):
        return recipe_text, []
    dropped = [k for k in ("reward", "calibration", "align") if k in d and k not in stages]
    data = d.get("data")
    sources = (data or {}).get("sources") if isinstance(data, dict) else None
    if isinstance(sources, list) and "synthetic" in data:
        if not any(isinstance(s, dict) and s.get("format", "synthetic") == "synthetic" for s in sources):
            dropped.append("data.synthetic")
    if not dropped:
        return recipe_text, []
    for key in dropped:
        if key == "data.synthetic":
            del d["data"]["synthetic"]
        else:
            del d[key]
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True), dropped


# --------------------------------------------------------------------------------------------------
# Did the RMs learn anything? (each trained RM vs its step 0)


def _learned_line(rm: str, e: dict, n_samples: int | None) -> str:
    """One bullet: the RM's all-source accuracy against its step 0's, and whether it learned (the project's rule)."""
    from pipeline.calibration.compare import p_text, rule_failure, significant

    a, b, d = 100 * e["a"], 100 * e["b"], 100 * e["diff"]
    head = f"accuracy {a:.2f}% vs {b:.2f}% at step 0"
    if not e.get("ci95"):
        return f"- {rm}: {head} (difference {d:+.2f} points; no bootstrap interval, so no verdict)."
    lo, hi = (100 * v for v in e["ci95"])
    p = e.get("p_value")
    iv = f"95% CI {lo:+.2f} to {hi:+.2f}" + ("" if p is None else f"; {p_text(p, n_samples, resolution=True)}")
    if significant(e) and d > 0:
        return f"- {rm}: {head}, higher by {d:.2f} points ({iv}): it learned something measurable."
    worse = " It is significantly LESS accurate than before its training." if significant(e) else ""
    failed = rule_failure(e)
    return (
        f"- **{rm} is not significantly more accurate than its untrained starting point**: {head} (difference "
        f"{d:+.2f} points, {iv}{f'; {failed}' if failed else ''}).{worse} Its training did not measurably change "
        "which response it prefers, so its other numbers here (calibration included) describe a model that learned "
        "nothing this test can see."
    )


def step0_lines(
    run_dir: Path, comparisons: dict, n_samples: int | None, rule_stated: bool = False
) -> tuple[list[str], dict]:
    """The report's 'did the RMs learn anything?' lines, from comparisons.json's '<rm> vs <rm>@step0' entries and
    calibration/step0.json (the RMs without a reference, and why), and {rm: learned (bool) or None}. The
    significance rule is stated unless `rule_stated` (the lines above state it)."""
    from pipeline.calibration.compare import is_step0_comparison, parse_comparison, rule_text, significant

    info = read_json(Path(run_dir) / "calibration" / "step0.json") or {}
    bullets, verdicts = [], {}
    for label, groups in comparisons.items():
        if not is_step0_comparison(label):
            continue
        rm = parse_comparison(label)[0]
        e = (groups.get("all_average") or {}).get("accuracy")
        if not isinstance(e, dict):
            continue
        bullets.append(_learned_line(rm, e, n_samples))
        verdicts[rm] = bool(e.get("ci95")) and significant(e) and e["diff"] > 0
    for rm, why in (info.get("no_reference") or {}).items():
        bullets.append(f"- {rm}: no step-0 reference ({why}).")
        verdicts[rm] = None
    if not bullets:
        return [], verdicts
    lines = [
        "**Did the RMs learn anything?** Each trained RM against its own untrained starting point (step 0: its base "
        "model with the reward head initialised as its training began, same seed), scored on the same test pairs; "
        "an RM learned something measurable when its all-source accuracy is significantly higher ("
        + ("the rule above" if rule_stated else rule_text(n_samples))
        + "; every metric is in the step-0 tables of the comparisons below):",
        "",
        *bullets,
        "",
    ]
    return lines, verdicts
