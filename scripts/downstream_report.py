"""The downstream half of the study (issue 31): does a better-calibrated RM align a policy better?

    python scripts/downstream_report.py [--results docs/results]     (also run by scripts/study_report.py)

Reads the committed summaries of the downstream parts (docs/results/<part>/summary.json, written by
`python -m pipeline.sweep --export` from each run's align/metrics.json, judgements.json and calibration files)
and computes, with the project's one rule (a difference is significant only when its 95% interval excludes zero
AND p < 0.05):

* the gold reward r* of each RM's best-of-N (N in 4, 16, 64: nested prefixes of one 64-candidate draw) and RJS
  policy, and the seed-paired differences MORE - MultiTask, MORE - Uniform, Uniform - MultiTask;
* gold-judged comparisons between methods (RJS vs best-of-64 per RM): win rates and the seed-paired gold
  difference;
* calibration against downstream gain, per RM and seed: ECE10 (all-source average) and the fitted temperature
  against the gain of best-of-16 over the base policy (gold reward), Pearson's r with a 95% interval from a
  bootstrap over (part, grid point, seed) blocks (the RMs of one seed share the base policy and its candidates,
  so they are resampled together), and the same within blocks (each block's mean removed), which asks whether
  the better-calibrated RM of the SAME draw gains more;
* the two-source case: MORE under normalize l2 (= Uniform by construction) against normalize none;
* RLOO with the raw reward against the reward / T.

Nothing is typed in by hand: every number comes from the summaries.

Imports: pipeline.sweep's cell/verdict helpers, numpy, matplotlib (the scatter plot).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pipeline.calibration.compare import p_text
from pipeline.stats import is_significant as significance_rule
from pipeline.stats import paired_differences, t_test, t_test_p
from pipeline.sweep import VERDICTS, cell, is_significant, judge
from pipeline.tables import markdown_table, rm_label


DOWNSTREAM_PARTS = ("downstream", "downstream-overconfident", "two-source", "rloo-temperature", "dpo")
RMS = ("more", "multitask", "uniform", "dpo")
PAIRS = (("more", "multitask"), ("more", "uniform"), ("uniform", "multitask"), ("dpo", "more"), ("dpo", "multitask"))
SIZES = (4, 16, 64)
GAIN_N = 16  # the downstream gain: best-of-16 over the base policy
BOOTSTRAP = 4000


# ---------------------------------------------------------------------------------------------------
# reading a summary


def load(results: Path) -> dict:
    """{part: summary} of the downstream parts that have a committed summary."""
    out = {}
    for part in DOWNSTREAM_PARTS:
        path = Path(results) / part / "summary.json"
        if path.exists():
            out[part] = json.loads(path.read_text())
    return out


def metric(point: dict, section: str, name: str, scope: str, key: str) -> dict | None:
    for r in point["metrics"]:
        if (r["section"], r["rm"], r["scope"], r["metric"]) == (section, name, scope, key):
            return r
    return None


def difference(point: dict, a: str, b: str, scope: str, key: str) -> dict | None:
    for d in point["differences"]:
        if (d["a"], d["b"], d["scope"], d["metric"]) == (a, b, scope, key):
            return d
    return None


def per_seed(point: dict, section: str, name: str, scope: str, key: str) -> dict[str, float]:
    r = metric(point, section, name, scope, key)
    return dict(r["values"]) if r else {}


def verdict(d: dict | None) -> str:
    """'+0.0123 [+0.0040, +0.0206], p = 0.012: **better**' (a higher gold reward is better)."""
    return _diff_text(d, "higher")


def policies(rm: str, point: dict) -> dict[str, str]:
    """{label: policy name} of `rm`'s aligned policies present at `point`: best-of-N per size, RJS, RLOO, PPO
    and an implicit RM's own policy (the DPO policy)."""
    names = {r["rm"] for r in point["metrics"] if r["section"] == "align"}
    out = {f"best-of-{n}": f"{rm}/best_of_n@{n}" for n in SIZES if f"{rm}/best_of_n@{n}" in names}
    out |= {m.upper(): f"{rm}/{m}" for m in ("rjs", "rloo", "ppo") if f"{rm}/{m}" in names}
    if f"{rm}/policy" in names:
        out["its own policy"] = f"{rm}/policy"
    return out


def seed_paired(a: dict, b: dict) -> dict | None:
    """The seed-paired difference a - b of two {seed: value} maps: t-interval over seeds and p (None: no seed)."""
    d = paired_differences(a, b)
    return t_test(list(d.values())) if d else None


def paired(point: dict, a: str, b: str) -> dict | None:
    """The seed-paired difference of two policies' gold reward (a - b): t-interval over seeds, p, direction."""
    d = seed_paired(
        per_seed(point, "align", a, "all", "gold_reward"), per_seed(point, "align", b, "all", "gold_reward")
    )
    return d and d | {"better": "higher"}


# ---------------------------------------------------------------------------------------------------
# tables of one part


def gold_tables(summary: dict) -> list[str]:
    """Per grid point: the gold reward of each RM's policies (mean [95% t-interval] over seeds), then the
    seed-paired differences between RMs with their verdicts."""
    out = []
    for name, point in summary["points"].items():
        pols = {rm: policies(rm, point) for rm in RMS if policies(rm, point)}
        if not pols:
            continue
        labels = list(dict.fromkeys(label for p in pols.values() for label in p))
        base = metric(point, "align", "base", "all", "gold_reward")
        rows = [["base policy (no RM)"] + [cell(base)] * len(labels)]
        rows += [
            [rm_label(rm)]
            + [cell(metric(point, "align", p[x], "all", "gold_reward")) if x in p else "-" for x in labels]
            for rm, p in pols.items()
        ]
        out += [
            f"**Gold reward r\\* of the aligned policies at {name}** (mean [95% t-interval] over "
            f"{point['n_runs']} seeds; higher is better; the base policy's held-out responses for reference)",
            "",
        ]
        out += markdown_table(["RM", *labels], rows) + [""]
        diff_rows = []
        for a, b in PAIRS:
            if a in pols and b in pols:
                cells = [
                    verdict(paired(point, pols[a][x], pols[b][x])) if x in pols[a] and x in pols[b] else "-"
                    for x in labels
                ]
                diff_rows.append([f"{rm_label(a)} - {rm_label(b)}", *cells])
        if diff_rows:
            out += [f"Seed-paired differences of the gold reward at {name} (a - b, mean [95% CI], p, verdict):", ""]
            out += markdown_table(["difference", *labels], diff_rows) + [""]
        over = [
            [rm_label(rm), verdict(paired(point, p[f"best-of-{SIZES[-1]}"], p[f"best-of-{SIZES[0]}"]))]
            for rm, p in pols.items()
            if f"best-of-{SIZES[0]}" in p and f"best-of-{SIZES[-1]}" in p
        ]
        if over:
            out += [
                f"More samples, same RM, at {name}: best-of-{SIZES[-1]} minus best-of-{SIZES[0]} (seed-paired; "
                "'worse' means the RM's extra picks lowered the gold reward: over-optimisation of the RM):",
                "",
            ]
            out += markdown_table(["RM", f"best-of-{SIZES[-1]} - best-of-{SIZES[0]}"], over) + [""]
    return out


def chance_line(summary: dict) -> str:
    """How many of the part's seed-paired gold differences between RMs pass the rule, against chance."""
    tests = []
    for point in summary["points"].values():
        pols = {rm: policies(rm, point) for rm in RMS if policies(rm, point)}
        for a, b in PAIRS:
            if a in pols and b in pols:
                tests += [paired(point, pols[a][x], pols[b][x]) for x in pols[a] if x in pols[b]]
    tests = [t for t in tests if t]
    k = sum(bool(is_significant(t)) for t in tests)
    return (
        f"Of the {len(tests)} seed-paired gold-reward differences between RMs tested in this part (every pair, "
        f"policy and grid point), {k} pass the rule; about {0.05 * len(tests):.1f} would by chance alone, so an "
        "isolated one is read with care."
    )


def judged_tables(summary: dict) -> list[str]:
    """Gold-judged comparisons of named policies (methods against each other): win / lose rates over seeds and
    the seed-paired gold difference."""
    out = []
    for name, point in summary["points"].items():
        judged = sorted({r["rm"] for r in point["metrics"] if r["section"] == "judge" and ":" not in r["rm"]})
        if not judged:
            continue
        rows = []
        for j in judged:
            g = metric(point, "judge", j, "all", "gold_diff")
            rows.append(
                [
                    j,
                    cell(metric(point, "judge", j, "all", "win_rate"), "win_rate"),
                    cell(metric(point, "judge", j, "all", "lose_rate"), "lose_rate"),
                    _gold_diff(g),
                ]
            )
        out += [
            f"**Methods against each other at {name}** (gold judge; per seed each comparison is judged on the "
            "same held-out prompts, so the gold difference is prompt- and seed-paired; `<rm>/best_of_n` is best-of-n with all "
            "n = 64 candidates, `dpo/policy` the DPO policy itself):",
            "",
        ]
        out += markdown_table(["a vs b", "win rate of a (%)", "lose rate of a (%)", "gold a - b over seeds"], rows)
        out.append("")
    return out


def _gold_diff(stats: dict | None) -> str:
    """A judged comparison's gold difference over seeds (its metric row: mean, sd, n, t-interval) with p and
    the verdict for a or b."""
    if not stats or stats.get("mean") is None:
        return "-"
    d = dict(stats, p_value=t_test_p(stats["mean"], stats.get("sd"), stats.get("n", 0)))
    return _diff_text(d, "higher", words=("a better", "b better"))


# ---------------------------------------------------------------------------------------------------
# calibration against downstream gain


def observations(summaries: dict) -> list[dict]:
    """One row per (part, grid point, seed, RM) with ECE10 (all-source average), the fitted temperature and the
    gold-reward gain of best-of-GAIN_N over the base policy, from the calibration parts' downstream runs."""
    rows = []
    for part in ("downstream", "downstream-overconfident"):
        for name, point in (summaries.get(part) or {}).get("points", {}).items():
            base = per_seed(point, "align", "base", "all", "gold_reward")
            for rm in RMS:
                ece = per_seed(point, "calibration", rm, "all_average", "ece_10")
                temp = per_seed(point, "calibration", rm, "all_average", "temperature")
                gold = per_seed(point, "align", f"{rm}/best_of_n@{GAIN_N}", "all", "gold_reward")
                for seed in sorted(set(ece) & set(gold) & set(base)):
                    rows.append(
                        {
                            "part": part,
                            "point": name,
                            "seed": seed,
                            "rm": rm,
                            "ece_10": ece[seed],
                            "temperature": temp.get(seed),
                            "gain": gold[seed] - base[seed],
                            "abs_log_t": abs(math.log(temp[seed])) if temp.get(seed) else None,
                        }
                    )
    return rows


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def block_bootstrap_r(rows: list[dict], xkey: str, ykey: str, within: bool, seed: int = 0) -> dict:
    """Pearson's r of rows[xkey] against rows[ykey] (each block's mean removed first when `within`), with a 95%
    percentile interval from resampling whole (part, point, seed) blocks (BOOTSTRAP resamples, fixed seed)."""
    rows = [r for r in rows if r.get(xkey) is not None and r.get(ykey) is not None]
    blocks: dict[tuple, list[dict]] = {}
    for r in rows:
        blocks.setdefault((r["part"], r["point"], r["seed"]), []).append(r)
    keys = list(blocks)

    def xy(chosen):
        xs, ys = [], []
        for k in chosen:
            bx = np.array([r[xkey] for r in blocks[k]], dtype=np.float64)
            by = np.array([r[ykey] for r in blocks[k]], dtype=np.float64)
            if within:
                bx, by = bx - bx.mean(), by - by.mean()
            xs.append(bx)
            ys.append(by)
        return (np.concatenate(xs), np.concatenate(ys)) if xs else (np.array([]), np.array([]))

    r = pearson(*xy(keys))
    out = {"r": r, "n": len(rows), "blocks": len(keys), "low": None, "high": None, "resamples": BOOTSTRAP}
    if r is None or len(keys) < 3:
        return out
    rng = np.random.default_rng(seed)
    boots = [pearson(*xy([keys[i] for i in rng.integers(0, len(keys), len(keys))])) for _ in range(BOOTSTRAP)]
    boots = np.array([b for b in boots if b is not None])
    out["low"], out["high"] = (float(v) for v in np.quantile(boots, [0.025, 0.975]))
    return out


def correlation_lines(rows: list[dict]) -> tuple[list[str], dict]:
    if not rows:
        return ["Not run yet: no downstream part has a summary.", ""], {}
    res = {}
    lines = [
        f"{len(rows)} (RM, seed) observations from {len({(r['part'], r['point'], r['seed']) for r in rows})} "
        f"(part, grid point, seed) blocks; gain = gold reward of best-of-{GAIN_N} minus the base policy's, on the "
        "same held-out prompts. Pearson's r with a 95% interval from a bootstrap over blocks "
        f"({BOOTSTRAP} resamples); 'within blocks' removes each block's mean first, so it asks whether the RM that "
        "is better calibrated than the other RMs of the SAME draw (same data, base policy and candidates) also "
        "gains more. A negative r for ECE or |log T| means: better calibrated, larger gain.",
        "",
    ]
    table = []
    for xkey, label in (
        ("ece_10", "ECE10 (all-source average)"),
        ("temperature", "fitted temperature T"),
        ("abs_log_t", "|log T| (distance from calibrated)"),
    ):
        for within in (False, True):
            r = block_bootstrap_r(rows, xkey, "gain", within)
            res[f"{xkey}{'_within' if within else ''}"] = r
            excl = r["low"] is not None and (r["low"] > 0 or r["high"] < 0)
            table.append(
                [
                    label,
                    "within blocks" if within else "pooled",
                    "-" if r["r"] is None else f"{r['r']:+.3f}",
                    "-" if r["low"] is None else f"[{r['low']:+.3f}, {r['high']:+.3f}]",
                    str(r["n"]),
                    "-" if r["low"] is None else "interval excludes 0" if excl else "interval includes 0",
                ]
            )
    lines += markdown_table(["calibration", "how", "r", "95% interval", "n", "reading"], table) + [""]
    pooled, within = res.get("ece_10", {}), res.get("ece_10_within", {})

    def excludes(r):
        return r.get("low") is not None and (r["low"] > 0 or r["high"] < 0)

    if pooled.get("r") is not None and within.get("r") is not None:
        if excludes(within):
            what = "better-calibrated" if within["r"] < 0 else "worse-calibrated"
            lines.append(f"Within draws the {what} RM gains more (ECE10 r = {within['r']:+.2f}, interval excludes 0).")
        else:
            lines.append(
                "Within draws, an RM's ECE10 says nothing measurable about its best-of-16 gain (the interval "
                "includes 0)"
                + (
                    f"; the pooled r = {pooled['r']:+.2f} (interval excludes 0) reflects differences between "
                    "draws (regime, drift, seed) rather than between the RMs of one draw."
                    if excludes(pooled)
                    else "; pooled over draws neither."
                )
            )
        lines.append("")
    return lines, res


def scatter(rows: list[dict], path: Path) -> None:
    """ECE10 against the best-of-16 gain, one point per RM and seed; colour = RM, marker = part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"more": "#1f77b4", "multitask": "#d62728", "uniform": "#2ca02c"}
    markers = {"downstream": "o", "downstream-overconfident": "^"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for part, marker in markers.items():
        for rm, colour in colours.items():
            pts = [(r["ece_10"], r["gain"]) for r in rows if r["part"] == part and r["rm"] == rm]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(
                    xs,
                    ys,
                    c=colour,
                    marker=marker,
                    s=36,
                    alpha=0.8,
                    label=f"{rm_label(rm)}, {'over-confident' if 'over' in part else 'default'} regime",
                )
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("ECE10, all-source average (lower = better calibrated)")
    ax.set_ylabel(f"gold reward gain of best-of-{GAIN_N} over the base policy")
    ax.set_title("Calibration against downstream gain (one point per RM and seed)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


def gold_vs_n_plot(summary: dict, path: Path, title: str) -> bool:
    """One panel per grid point: each RM's best-of-N gold reward against N (mean and 95% t-interval over seeds),
    with the base policy's as a dashed line. False when the part has no best-of-N results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(n, p) for n, p in summary["points"].items() if any(policies(rm, p) for rm in RMS)]
    if not points:
        return False
    colours = {"more": "#1f77b4", "multitask": "#d62728", "uniform": "#2ca02c", "dpo": "#9467bd"}
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points) + 1.8, 3.8), sharey=True, squeeze=False)
    for ax, (name, point) in zip(axes[0], points):
        base = metric(point, "align", "base", "all", "gold_reward")
        if base and base.get("mean") is not None:
            ax.axhline(base["mean"], color="grey", ls="--", lw=1, label="base policy")
        for k, rm in enumerate(rm for rm in RMS if policies(rm, point)):
            rows = [(n, metric(point, "align", f"{rm}/best_of_n@{n}", "all", "gold_reward")) for n in SIZES]
            rows = [(n, r) for n, r in rows if r and r.get("mean") is not None]
            if not rows:
                continue
            xs = np.array([n for n, _ in rows], dtype=float) * (1 + 0.04 * (k - 1))  # side by side
            ys = np.array([r["mean"] for _, r in rows])
            lo = np.array([r["mean"] - r["low"] if r.get("low") is not None else 0 for _, r in rows])
            hi = np.array([r["high"] - r["mean"] if r.get("high") is not None else 0 for _, r in rows])
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colours[rm], label=rm_label(rm))
        ax.set_xscale("log", base=2)
        ax.set_xticks(SIZES, [str(n) for n in SIZES])
        ax.set_xlabel("N (best of the first N of 64 samples)")
        ax.set_title(name, fontsize=10)
    axes[0][0].set_ylabel("gold reward r* (mean, 95% CI over seeds)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return True


# ---------------------------------------------------------------------------------------------------
# the two-source case and RLOO with T


def across_points(summary: dict, a_point: str, b_point: str, key: tuple) -> dict | None:
    """The seed-paired difference of one metric between two grid points (same seed = same data)."""
    pts = summary["points"]
    if a_point not in pts or b_point not in pts:
        return None
    return seed_paired(per_seed(pts[a_point], *key), per_seed(pts[b_point], *key))


def _point(summary: dict, key: str, value: str) -> str | None:
    for name, p in summary["points"].items():
        if (
            any(k.endswith(key) and str(v) == value for k, v in (p.get("grid") or {}).items())
            or name == f"{key}={value}"
        ):
            return name
    return None


def two_source_lines(summary: dict | None, part_dir: Path = Path(".")) -> list[str]:
    if not summary:
        return ["Not run yet (`scripts/run_study.sh two-source`).", ""]
    l2, none = _point(summary, "normalize", "l2"), _point(summary, "normalize", "none")
    rows = []
    checks = [
        ("ECE10, helpful + harmless average", ("calibration", "more", "all_average", "ece_10"), "lower"),
        ("fitted temperature T", ("calibration", "more", "all_average", "temperature"), None),
        *[
            (f"gold reward, best-of-{n}", ("align", f"more/best_of_n@{n}", "all", "gold_reward"), "higher")
            for n in SIZES
        ],
        ("gold reward, RJS", ("align", "more/rjs", "all", "gold_reward"), "higher"),
    ]
    for label, key, better in checks:
        d = across_points(summary, none, l2, key) if l2 and none else None
        rows.append([label, _diff_text(d, better)])
    out = [
        "MORE trained with `normalize: none` minus MORE with `normalize: l2` (same seeds, same data; under l2 "
        "MORE is the Uniform baseline by construction):",
        "",
    ]
    out += markdown_table(["metric", "MORE(none) - MORE(l2), mean [95% CI], p"], rows) + [""]
    if l2:
        d = difference(summary["points"][l2], "more", "uniform", "all_average", "ece_10")
        dev = {p: weight_deviation(part_dir / p) for p in (l2, none) if p}
        if d:
            out += [
                f"The identity at l2: MORE's logged source weights stay within {dev[l2]:.1e} of 0.5 at every "
                f"logged step of every seed (at none they move up to {dev.get(none, float('nan')):.2f} away), "
                "so MORE(l2) trains as Uniform up to float32 rounding of its min-norm solve; that rounding, "
                f"compounded over training, leaves MORE - Uniform ECE10 = {_diff_text(d, 'lower')}.",
                "",
            ]
    for name in (none, l2):
        if name:
            out += [
                f"At {name}, MORE - MultiTask: ECE10 {verdict(difference(summary['points'][name], 'more', 'multitask', 'all_average', 'ece_10'))}; "
                f"best-of-{GAIN_N} gold {verdict(difference(summary['points'][name], f'more/best_of_n@{GAIN_N}', f'multitask/best_of_n@{GAIN_N}', 'all', 'gold_reward'))}.",
                "",
            ]
    return out


def weight_deviation(point_dir: Path) -> float:
    """The largest |lambda - 0.5| MORE logged (`more/lambda/<source>`) in the exported train logs of a grid
    point's runs (nan without logs)."""
    devs = [
        abs(v - 0.5)
        for f in sorted(Path(point_dir).glob("seed-*/reward/more/train_log.json"))
        for row in json.loads(f.read_text())
        for k, v in row.items()
        if k.startswith("more/lambda/") and isinstance(v, (int, float))
    ]
    return max(devs) if devs else float("nan")


def _diff_text(d: dict | None, better: str | None, words: tuple[str, str] = ("better", "worse")) -> str:
    """'+0.0123 [+0.0040, +0.0206], p = 0.012: **better**' by the project's rule; `better` is the good
    direction of a - b ('higher', 'lower', or None: the word says the side), `words` what a significant good /
    bad difference is called."""
    if not d or d.get("mean") is None:
        return "-"
    if d.get("low") is None:
        return f"{d['mean']:+.4f} (n={d['n']})"
    sig = significance_rule(d["low"], d["high"], d["p_value"])
    if not sig:
        word = VERDICTS[sig]
    elif better is None:
        word = "**higher**" if d["mean"] > 0 else "**lower**"
    else:
        good = (d["mean"] > 0) == (better == "higher")
        word = f"**{words[0] if good else words[1]}**"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], {p_text(d['p_value'])}: {word}"


def rloo_lines(summary: dict | None) -> list[str]:
    if not summary:
        return ["Not run yet (`scripts/run_study.sh rloo-temperature`).", ""]
    raw, scaled = _point(summary, "use_calibrated_rewards", "false"), _point(summary, "use_calibrated_rewards", "true")
    rows = []
    for rm in ("more", "multitask"):
        d = (
            across_points(summary, scaled, raw, ("align", f"{rm}/rloo", "all", "gold_reward"))
            if raw and scaled
            else None
        )
        pts = summary["points"]
        temp = metric(pts[raw], "calibration", rm, "all_average", "temperature") if raw else None
        gold = [metric(pts[p], "align", f"{rm}/rloo", "all", "gold_reward") if p else None for p in (raw, scaled)]
        rows.append([rm_label(rm), cell(temp), *[cell(g) for g in gold], _diff_text(d, "higher")])
    base = metric(summary["points"][raw], "align", "base", "all", "gold_reward") if raw else None
    out = [
        "RLOO policy trained on the reward / T minus the one trained on the raw reward (same seeds, same RM; "
        f"the base policy's gold reward {cell(base)}):",
        "",
    ]
    header = ["RM", "fitted T", "gold, raw reward", "gold, reward / T", "scaled - raw, mean [95% CI], p"]
    return out + markdown_table(header, rows) + [""]


# ---------------------------------------------------------------------------------------------------
# the page section and the README lines


def render(results: Path, plot: bool = True) -> tuple[list[str], dict]:
    """The downstream section of docs/results.md and the numbers behind it (written to downstream.json)."""
    summaries = load(results)
    rows = observations(summaries)
    corr_lines, corr = correlation_lines(rows)
    if plot and rows:
        scatter(rows, Path(results) / "downstream" / "plot_ece_vs_gain.png")
    out = ["## Does a better-calibrated RM align better? (the downstream claim)", ""]
    out += [
        "The paper's second claim, measured with ground truth: on the synthetic benchmark the gold reward r* "
        "judges every aligned policy. Best-of-N at N = 4, 16 and 64 takes the best of the first N of one "
        "64-candidate draw per held-out prompt (nested, so the RMs and N compare on identical candidates); RJS "
        "fine-tunes the base policy on the RM's best of 4 samples per training prompt (the paper's RJS). The "
        "settings rule (fixed before any downstream number of MORE was seen) is recorded in "
        "scripts/run_study.sh.",
        "",
    ]
    for part in ("downstream", "downstream-overconfident"):
        title = {"downstream": "Default regime", "downstream-overconfident": "Over-confident regime"}[part]
        out += [f"### {title} (`{part}`)", ""]
        if part not in summaries:
            out += [f"Not run yet: `scripts/run_study.sh {part}` runs it (cost in the script).", ""]
            continue
        out += _machine(results / part)
        out += [chance_line(summaries[part]), ""]
        out += gold_tables(summaries[part])
        png = Path(results) / part / "plot_gold_vs_n.png"
        if plot and gold_vs_n_plot(summaries[part], png, f"Best-of-N against N, {title.lower()}"):
            out += [f"![gold reward against N](results/{part}/plot_gold_vs_n.png)", ""]
        out += judged_tables(summaries[part])
    out += ["### Calibration against downstream gain", ""] + corr_lines
    if rows:
        out += ["![ECE against gain](results/downstream/plot_ece_vs_gain.png)", ""]
    out += ["### Two sources: MORE with and without l2 normalisation (`two-source`)", ""]
    out += _machine(results / "two-source") if "two-source" in summaries else []
    out += two_source_lines(summaries.get("two-source"), Path(results) / "two-source")
    if "two-source" in summaries:
        out += gold_tables(summaries["two-source"])
    out += ["### The DPO policy as one more row (`dpo`)", ""]
    out += [
        "TRL's DPOTrainer on the same multi-source pairs, from and against the same base policy (issue 30): its "
        "own policy is judged against the RM-aligned ones, and its implicit reward beta log(pi/pi_ref) picks "
        "best-of-N and RJS samples like an RM.",
        "",
    ]
    if "dpo" in summaries:
        out += _machine(results / "dpo") + gold_tables(summaries["dpo"]) + judged_tables(summaries["dpo"])
    else:
        out += ["Not run yet: `scripts/run_study.sh dpo` runs it (cost in the script).", ""]
    out += ["### Temperature-scaled rewards in RL (`rloo-temperature`)", ""]
    out += [
        "Best-of-N and RJS pick the top-scoring sample, and dividing every score by the same T > 0 cannot change "
        "the pick, so calibration by temperature cannot change them; RLOO's advantages scale with 1/T, which it "
        "can.",
        "",
    ]
    out += _machine(results / "rloo-temperature") if "rloo-temperature" in summaries else []
    out += rloo_lines(summaries.get("rloo-temperature"))
    return out, {"correlation": corr, "observations": rows}


def _machine(part_dir: Path) -> list[str]:
    m = part_dir / "MACHINE.txt"
    return ["Run record:", "", "```", m.read_text().strip(), "```", ""] if m.exists() else []


def readme_lines(results: Path) -> list[str]:
    """The README's downstream findings: MORE - MultiTask gold reward per part, point and N, and the correlation."""
    summaries = load(results)
    out = []
    for part in ("downstream", "downstream-overconfident", "two-source"):
        if part not in summaries:
            out.append(f"- **Downstream, `{part}`**: not run; `scripts/run_study.sh {part}` produces it.")
            continue
        items = []
        for name, point in summaries[part]["points"].items():
            for label, pa in policies("more", point).items():
                d = paired(point, pa, pa.replace("more/", "multitask/", 1))
                if d:
                    sig = is_significant(d)
                    word = VERDICTS[sig] if not sig else judge(d)[1]
                    items.append(f"{label} at {name} {d['mean']:+.3f} ({word})")
        out.append(f"- **Downstream, `{part}`**, MORE - MultiTask gold reward: " + "; ".join(items) + ".")
    out += _over_optimisation_line(summaries) + _dpo_line(summaries.get("dpo")) + _rloo_line(summaries)
    rows = observations(summaries)
    if rows:
        r = block_bootstrap_r(rows, "ece_10", "gain", within=True)
        if r["r"] is not None and r["low"] is not None:
            out.append(
                f"- **Calibration vs gain** (ECE10 vs best-of-{GAIN_N} gain, within draws, {r['n']} RM-seeds): "
                f"r = {r['r']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"
                + (" (interval excludes 0)." if (r["low"] > 0 or r["high"] < 0) else " (interval includes 0).")
            )
    return out


def _over_optimisation_line(summaries: dict) -> list[str]:
    """Best-of-64 minus best-of-4 per (RM, grid point): how many are significantly lower. The dpo part counts only
    its dpo RM (its MORE and MultiTask runs repeat the downstream part's drift-2 runs exactly)."""
    over = []
    for part, summary in summaries.items():
        for point in summary["points"].values():
            for rm in ("dpo",) if part == "dpo" else RMS:
                pols = policies(rm, point)
                if f"best-of-{SIZES[0]}" in pols and f"best-of-{SIZES[-1]}" in pols:
                    over.append(paired(point, pols[f"best-of-{SIZES[-1]}"], pols[f"best-of-{SIZES[0]}"]))
    over = [d for d in over if d and d.get("mean") is not None]
    if not over:
        return []
    lower = [d for d in over if is_significant(d) and d["mean"] < 0]
    return [
        f"- **Best-of-{SIZES[-1]} minus best-of-{SIZES[0]}, same RM** (over-optimisation): significantly lower gold "
        f"reward in {len(lower)} of {len(over)} (RM, grid point) cases, mean {float(np.mean([d['mean'] for d in over])):+.3f}."
    ]


def _dpo_line(summary: dict | None) -> list[str]:
    """The DPO policy's gold difference against each RM-aligned policy it was judged against."""
    items = []
    for point in (summary or {}).get("points", {}).values():
        judged = sorted({r["rm"] for r in point["metrics"] if r["section"] == "judge" and r["rm"].startswith("dpo/")})
        for j in judged:
            g = metric(point, "judge", j, "all", "gold_diff")
            if g and g.get("mean") is not None:
                items.append(f"{j} {_gold_diff(g).replace('**', '')}")
    return (
        ["- **The DPO policy against RM-aligned policies** (gold a - b over seeds): " + "; ".join(items) + "."]
        if items
        else []
    )


def _rloo_line(summaries: dict) -> list[str]:
    if "rloo-temperature" not in summaries:
        return []
    cells = [ln for ln in rloo_lines(summaries["rloo-temperature"]) if ln.startswith("| ") and "---" not in ln][1:]
    if not cells:
        return []
    text = "; ".join(f"{c.split(' | ')[0].strip('| ')} {c.rsplit(' | ', 1)[-1].strip('| ')}" for c in cells)
    text = text.replace("**", "")
    return [f"- **RLOO on the reward / T minus on the raw reward** (gold, seed-paired): {text}."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args(argv)
    lines, numbers = render(Path(args.results))
    out = Path(args.results) / "downstream.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(numbers, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    )
    tmp.replace(out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
