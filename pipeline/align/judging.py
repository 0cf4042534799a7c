"""The alignment stage's judging and results: every comparison of `align.comparisons` judged for every method
(gold reward or an LLM judge, `pipeline.align.judge`), per prompt set, and the files that report them:
DIR/align/judgements.json, judge_details.jsonl, metrics.json (per policy: gold reward, perplexity of the test
answers) and table.md.

May import: pipeline leaves, `pipeline.calibration.compare` (the '<a> vs <b>' parser) and
`pipeline.align.{context, candidates, judge}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.align import judge as J
from pipeline.align.candidates import read_jsonl, write_jsonl
from pipeline.align.config import comparison_policies
from pipeline.align.context import AlignContext
from pipeline.calibration.compare import p_text
from pipeline.errors import redact_credentials
from pipeline.io import atomic_write_json, atomic_write_text, read_json, safe_component
from pipeline.stats import t_test


def gold_summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"mean": None, "se": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def policy_label(who: str, method: str | None) -> str:
    """'base', or the policy `<rm>/<method>` a comparison side names (`who` may name it already: 'dpo/policy')."""
    return who if who == "base" or "/" in who else f"{who}/{method}"


def _policy_responses(ctx: AlignContext, who: str, method: str | None, base_eval: list[dict]) -> list[dict] | None:
    if who == "base":
        return base_eval
    rm, _, method = policy_label(who, method).partition("/")
    path = ctx.dir / safe_component(rm) / method / "eval.jsonl"
    if not path.exists():
        return None
    return read_jsonl(path)


def _openai_judge(ctx: AlignContext) -> J.OpenAIJudge:
    jc = ctx.cfg.judge
    return J.OpenAIJudge(
        jc.base_url,
        jc.model,
        api_key_env=jc.api_key_env or None,
        cache_path=ctx.dir / "judge_cache.jsonl",
        concurrency=jc.concurrency,
        max_requests=jc.max_requests,
        retries=jc.retries,
        backoff_s=jc.backoff_s,
        timeout_s=jc.timeout_s,
        max_tokens=jc.max_tokens,
        max_invalid=jc.max_invalid,
    )


class _GoldCache:
    """Gold rewards of each policy's held-out responses, computed once per policy label."""

    def __init__(self, gold_fn):
        self.gold_fn, self.values = gold_fn, {}

    def __call__(self, label: str, recs: list[dict]) -> np.ndarray:
        if label not in self.values:
            self.values[label] = np.asarray(
                self.gold_fn([r["prompt"] for r in recs], [r["response"] for r in recs]), dtype=np.float64
            )
        return self.values[label]


def _comparisons(ra: list[dict], rb: list[dict]) -> list[J.Comparison]:
    """The LLM judge's questions of policy a's held-out responses against policy b's, prompt by prompt."""
    return [
        J.Comparison(
            json.loads(x["conversation"])["prompt"] if x.get("conversation") else x["prompt"],
            x["response"],
            y["response"],
            "harmless" if "harmless" in x["set"] else "helpful",
        )
        for x, y in zip(ra, rb)
    ]


def _verdicts(
    ctx: AlignContext, method: str | None, a: str, b: str, ra, rb, gold_of, oa
) -> tuple[list[str], list[dict]]:
    """(verdict per held-out prompt, extra detail per prompt) of policy `a` against policy `b`."""
    if ctx.cfg.judge.kind == "gold":
        la, lb = policy_label(a, method), policy_label(b, method)
        verdicts = J.gold_verdicts(gold_of(la, ra), gold_of(lb, rb), ctx.cfg.judge.tolerance)
        extra = [{"gold_a": float(x), "gold_b": float(y)} for x, y in zip(gold_of(la, ra), gold_of(lb, rb))]
        return verdicts, extra
    res = oa.compare(_comparisons(ra, rb), progress=ctx.cfg.progress)
    return [r["verdict"] for r in res], [{"votes": r["votes"], "replies": r["replies"]} for r in res]


def _blocks(ctx: AlignContext, rms: list[str], base_eval: list[dict]) -> list[tuple]:
    """(method, a, b, a's responses, b's responses) of every comparison to judge: a comparison of two RMs (or an
    RM and 'base') for every method, then each comparison of two named policies ('<rm>/<method>' or 'base',
    e.g. 'dpo/policy vs more/best_of_n') once, with method None."""
    out = []
    parsed = [(comp, *comparison_policies(comp)) for comp in ctx.cfg.comparisons]
    per_method = [(m, c, a, b) for m in ctx.cfg.methods for c, a, b, cross in parsed if not cross]
    for method, comp, a, b in per_method + [(None, c, a, b) for c, a, b, cross in parsed if cross]:
        skip = [x for x in (a, b) if not _aligned(ctx, x, rms)]
        if skip:
            ctx.log(f"comparison {comp!r}: {skip} not aligned in this run, skipped")
            continue
        ra, rb = _policy_responses(ctx, a, method, base_eval), _policy_responses(ctx, b, method, base_eval)
        if ra is None or rb is None:
            if method is None:
                ctx.log(f"comparison {comp!r}: no held-out responses of {a if ra is None else b}, skipped")
            continue
        if [r["prompt"] for r in ra] != [r["prompt"] for r in rb]:
            where = f" ({method})" if method else ""
            raise RuntimeError(
                f"{comp}{where}: the two policies answered different prompts; delete DIR/align and rerun"
            )
        out.append((method, a, b, ra, rb))
    return out


def _aligned(ctx: AlignContext, who: str, rms: list[str]) -> bool:
    """Whether a comparison side is a policy of this run: 'base', an aligned RM, or '<rm>/<method>' of both."""
    if who == "base":
        return True
    rm, sep, method = who.partition("/")
    return rm in rms and (not sep or method in ctx.cfg.methods)


def judgement_key(method: str | None, a: str, b: str) -> str:
    """'best_of_n: more vs multitask' (a comparison judged per method) or 'dpo/policy vs more/rjs'."""
    return f"{a} vs {b}" if method is None else f"{method}: {a} vs {b}"


def gold_difference(gold_a, gold_b) -> dict:
    """The mean gold reward of a's responses minus b's, paired by prompt, with its 95% t-interval and the
    paired t-test's p (prompts with a non-finite gold reward left out)."""
    return t_test([x - y for x, y in zip(gold_a, gold_b) if math.isfinite(x - y)])


def planned_requests(recipe, run_dir: Path) -> dict | None:
    """What the plan and --dry-run say about an LLM judge (None for another judge): at most every comparison of
    every method on every held-out prompt (`n_eval_prompts` per prompt set; fewer when a test split has fewer
    distinct prompts), x 2 orders, minus the answers DIR/align/judge_cache.jsonl holds for this judge model,
    plus the retry allowance."""
    cfg = recipe.align
    if cfg.judge.kind != "openai":
        return None
    cross = sum(comparison_policies(c)[2] for c in cfg.comparisons)
    judged = len(cfg.methods) * (len(cfg.comparisons) - cross) + cross
    comparisons = judged * len(cfg.eval_sources) * cfg.n_eval_prompts
    cache = Path(run_dir) / "align" / "judge_cache.jsonl"
    cached = min(J.cached_answers(cache, cfg.judge.model), 2 * comparisons)
    return {
        "comparisons": comparisons,
        "how": (
            f"({len(cfg.methods)} method(s) x {len(cfg.comparisons) - cross} comparison(s) + {cross} of named "
            "policies)"
            if cross
            else f"{len(cfg.methods)} method(s) x {len(cfg.comparisons)} comparison(s)"
        )
        + f" x {len(cfg.eval_sources)} prompt set(s) x up to {cfg.n_eval_prompts} held-out prompts",
        "requests": 2 * comparisons,
        "cached": cached,
        "needed": J.with_retry_allowance(2 * comparisons - cached),
        "budget": cfg.judge.max_requests,
    }


def planned_requests_text(plan: dict) -> str:
    """'judge: up to 1200 comparisons (...) x 2 orders = 2400 requests, 0 cached, + 10% retry allowance = 2640
    of align.judge.max_requests=6000'."""
    return (
        f"judge: up to {plan['comparisons']} comparisons ({plan['how']}) x 2 orders = {plan['requests']} requests, "
        f"minus {plan['cached']} cached answers, plus a {J.RETRY_ALLOWANCE:.0%} retry allowance = {plan['needed']} "
        f"of align.judge.max_requests={plan['budget']}"
    )


def check_judge_budget(ctx: AlignContext, oa: J.OpenAIJudge, blocks: list[tuple]) -> None:
    """Before the first request: the requests this run's judging needs (every comparison in both orders, the
    questions asked twice counted once, minus the cached answers, plus the retry allowance) against
    align.judge.max_requests; one JudgeBudgetExhausted naming the numbers when it cannot cover them."""
    comps = [c for _, _, _, ra, rb in blocks for c in _comparisons(ra, rb)]
    fresh, cached = oa.requests_needed(comps)
    needed = J.with_retry_allowance(fresh)
    ctx.log(
        f"judge: {len(comps)} comparisons x 2 orders; {fresh} requests to send ({cached} answers cached), with "
        f"the {J.RETRY_ALLOWANCE:.0%} retry allowance {needed} of align.judge.max_requests={oa.max_requests}"
    )
    if needed > oa.max_requests:
        raise J.JudgeBudgetExhausted(
            f"the judge request budget align.judge.max_requests={oa.max_requests} cannot cover this run's "
            f"judging: {len(comps)} comparisons x 2 orders need {fresh} requests ({cached} answers cached) plus "
            f"a {J.RETRY_ALLOWANCE:.0%} retry allowance = {needed}; nothing was sent. Fix: "
            f"align.judge.max_requests={needed} (or more), or judge less (align.n_eval_prompts, "
            "align.comparisons, align.methods)"
        )


def judge_all(ctx: AlignContext, rms: list[str], base_eval: list[dict], gold_fn) -> tuple[dict, list[dict], dict]:
    """(judgements, per-comparison details, per-policy gold rewards per prompt set)."""
    jc = ctx.cfg.judge
    judgements, details, gold_means = {}, [], {}
    if jc.kind == "none":
        return judgements, details, gold_means
    gold_of = _GoldCache(gold_fn)
    oa = _openai_judge(ctx) if jc.kind == "openai" else None
    blocks = _blocks(ctx, rms, base_eval)
    if oa is not None:
        check_judge_budget(ctx, oa, blocks)
    for method, a, b, ra, rb in blocks:
        key = judgement_key(method, a, b)
        verdicts, extra = _verdicts(ctx, method, a, b, ra, rb, gold_of, oa)
        sets = sorted({r["set"] for r in ra})
        scopes = {s: [i for i, r in enumerate(ra) if r["set"] == s] for s in sets}
        if len(sets) > 1:
            scopes["all"] = list(range(len(ra)))
        judgements[key] = {}
        for s, rows in scopes.items():
            judgements[key][s] = J.summarize([verdicts[i] for i in rows])
            if jc.kind == "gold":
                judgements[key][s]["gold_difference"] = gold_difference(
                    [extra[i]["gold_a"] for i in rows], [extra[i]["gold_b"] for i in rows]
                )
        details += [
            {
                "comparison": key,
                "set": x["set"],
                "prompt": x["prompt"],
                "response_a": x["response"],
                "response_b": y["response"],
                "verdict": v,
                **e,
            }
            for v, x, y, e in zip(verdicts, ra, rb, extra)
        ]
    for label, values in gold_of.values.items():
        recs = base_eval  # every policy answered the same prompts in the same order
        gold_means[label] = {
            s: gold_summary([g for g, r in zip(values, recs) if r["set"] == s])
            for s in sorted({r["set"] for r in recs})
        }
        gold_means[label]["all"] = gold_summary(values)
    return judgements, details, gold_means


def render_table(judgements: dict, metrics: dict, judge_desc: str) -> str:
    lines = [
        f"## Alignment: win / tie / lose (judge: {judge_desc})",
        "",
        "| comparison | prompt set | win | tie | lose | n | win 95% CI | invalid | gold a - b [95% CI], p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for comp, per_set in judgements.items():
        for s, r in per_set.items():
            lo, hi = r["interval"]["win"]
            pct = {k: "-" if r[k] is None else f"{r[k]:.1%}" for k in ("win", "tie", "lose")}
            lines.append(
                f"| {comp} | {s} | {pct['win']} | {pct['tie']} | {pct['lose']} | {r['n']} | "
                f"[{lo:.1%}, {hi:.1%}] | {r['counts']['invalid']} | {_difference_cell(r.get('gold_difference'))} |"
            )
    if not judgements:
        lines.append("| (no comparison judged) | | | | | | | | |")
    ppl_sources = sorted({s for m in metrics.values() for s in (m.get("perplexity") or {})})
    header = ["policy", "gold reward (mean ± se)"] + [f"PPL {s}" for s in ppl_sources]
    lines += ["", "## Policies", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in metrics.items():
        g = (m.get("gold") or {}).get("all")
        gold = "-" if not (g and g["n"]) else f"{g['mean']:.3f}" + (f" ± {g['se']:.3f}" if g["se"] is not None else "")
        ppl = m.get("perplexity") or {}
        cells = [name, gold] + [f"{ppl[s]:.2f}" if ppl.get(s) is not None else "-" for s in ppl_sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + reward_scale_note(metrics)) + "\n"


def _difference_cell(d: dict | None) -> str:
    """'+0.012 [-0.003, +0.027], p = 0.12' (a gold-reward difference), '-' without one."""
    if not d or d.get("mean") is None:
        return "-"
    if d.get("low") is None:
        return f"{d['mean']:+.3f} (one prompt)"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {p_text(d['p_value'])}"


def reward_scale_note(metrics: dict) -> list[str]:
    """Beside PPO results: the reward each PPO policy optimised (its RM's reward / T) and the KL coefficient's
    weight against the RM's raw reward (kl_coef x T), and, when the T differ, that PPO policies of different RMs
    were trained at different effective KL strengths (part of any difference between them)."""
    scales = {name: m["reward_scale"] for name, m in metrics.items() if isinstance(m.get("reward_scale"), dict)}
    if not scales:
        return []
    parts = [
        f"{name}: T = {s['temperature']:.3f}, kl_coef {s['kl_coef']:g} = {s['kl_coef_vs_raw_reward']:.4g} against "
        "the raw reward"
        for name, s in scales.items()
    ]
    text = (
        "PPO optimised each RM's reward divided by its temperature T (1 for a raw reward; "
        "align.use_calibrated_rewards), so its KL coefficient weighs kl_coef x T against the RM's raw reward: "
        + "; ".join(parts)
        + "."
    )
    if len({round(s["temperature"], 6) for s in scales.values()}) > 1:
        text += (
            " The temperatures differ, so these PPO policies were trained at different effective KL strengths: "
            "a difference between them is partly this difference, not only the RMs' (the raw rewards' scales "
            "differ per RM too)."
        )
    return ["", f"**PPO reward scale.** {text}"]


def gold_at(records: list[dict], gold_fn) -> dict:
    """{N: gold summary of the best-of-N responses} from best-of-n eval records with `responses_at`."""
    sizes = sorted({int(k) for r in records for k in r.get("responses_at", {})})
    prompts = [r["prompt"] for r in records]
    return {str(k): gold_summary(gold_fn(prompts, [r["responses_at"][str(k)] for r in records])) for k in sizes}


def policy_metrics(ctx: AlignContext, rms: list[str], base_eval: list[dict], base_ppl: dict, gold_fn, gold_means):
    """{policy: {"perplexity", "gold"}} for the base policy and every aligned one; a gold reward the judging
    did not compute (a policy in no comparison, another judge) is computed here when there is a gold function."""

    def gold_of(recs: list[dict]) -> dict:
        return {"all": gold_summary(gold_fn([r["prompt"] for r in recs], [r["response"] for r in recs]))}

    metrics = {"base": {"perplexity": base_ppl, "gold": gold_means.get("base")}}
    for rm in rms:
        for m in ctx.cfg.methods:
            sub = ctx.dir / safe_component(rm) / m
            if not (sub / "eval.jsonl").exists():  # method `policy` with a classic RM: no policy of its own
                continue
            ppl = json.loads((sub / "perplexity.json").read_text()) if (sub / "perplexity.json").exists() else base_ppl
            gold = gold_means.get(f"{rm}/{m}")
            if gold is None and gold_fn is not None:
                gold = gold_of(read_jsonl(sub / "eval.jsonl"))
            metrics[f"{rm}/{m}"] = {"perplexity": ppl, "gold": gold}
            if m == "best_of_n" and ctx.cfg.best_of_n_sizes and gold_fn is not None:
                metrics[f"{rm}/{m}"]["gold_at"] = gold_at(read_jsonl(sub / "eval.jsonl"), gold_fn)
            scale = read_json(sub / "reward_scale.json")
            if isinstance(scale, dict):  # PPO: the reward's scale and the KL coefficient's weight against it
                metrics[f"{rm}/{m}"]["reward_scale"] = scale
    if "base" not in gold_means and gold_fn is not None:
        metrics["base"]["gold"] = gold_of(base_eval)
    return metrics


def write_results(ctx: AlignContext, rms: list[str], base_eval: list[dict], base_ppl_path: Path, gold_fn) -> None:
    """Judge every comparison and write judgements.json, judge_details.jsonl, metrics.json and table.md."""
    cfg = ctx.cfg
    judgements, details, gold_means = judge_all(ctx, rms, base_eval, gold_fn)
    base_ppl = json.loads(base_ppl_path.read_text())["perplexity"]
    metrics = policy_metrics(ctx, rms, base_eval, base_ppl, gold_fn, gold_means)
    judge_desc = {
        "gold": f"gold reward ({cfg.judge.gold}), tie tolerance {cfg.judge.tolerance}",
        "openai": f"{cfg.judge.model} via {redact_credentials(cfg.judge.base_url)}, both orders",
        "none": "none",
    }[cfg.judge.kind]
    atomic_write_json(ctx.dir / "judgements.json", judgements)
    write_jsonl(ctx.dir / "judge_details.jsonl", details)
    atomic_write_json(ctx.dir / "metrics.json", {"judge": judge_desc, "policies": metrics})
    atomic_write_text(ctx.dir / "table.md", render_table(judgements, metrics, judge_desc))
