"""Alignment stage: align a policy with each trained RM by each method, then judge and compare them.

    python -m pipeline.align --recipe tiny-cpu --output-dir runs/tiny align.methods=[best_of_n,rjs]

What it does, in order (DIR = the run directory):

1. Base policy: the policy stage's (DIR/policy/, `pipeline.policy.stage`): `align.model_name_or_path` (a
   save_pretrained directory or hub id, e.g. Alpaca-7B), or, when null, a tiny random causal LM
   warm-started on the synthetic benchmark's responses of mixed quality.
2. Prompts from the run's data splits: training prompts from the TRAIN split of `prompt_sources`
   (the paper: Helpful & Harmless), held-out prompt sets from the TEST split of `eval_sources` (one
   prompt set per source), formatted for the policy by `prompt_style` (raw HH layout or Alpaca).
3. Candidates: n samples per training prompt and per held-out prompt from the base policy (batched,
   `pipeline.align.generate.sample`), sampled ONCE and shared by every RM, so RMs differ only in what
   they pick. DIR/align/base/{train,eval}_candidates.jsonl.
4. For each RM (default: every RM in DIR/reward/index.json except single-source ones) and each method
   in `methods`: DIR/align/<rm>/<method>/ with samples.jsonl (best_of_n, rjs), policy/ (HF format;
   rjs, rloo, ppo), train_log.json, eval.jsonl (its response to every held-out prompt),
   perplexity.json, settings.json (ppo: reward_scale.json, the reward's temperature and KL weight). Each sub-directory is published atomically when finished and skipped
   on rerun while its settings (config, RM weights) are unchanged; training runs resume from
   DIR/align/.work/<rm>/<method>/.
5. Judging (`judge.kind`): gold (the synthetic benchmark's r*, or an RM directory as gold) or an
   OpenAI-compatible LLM judge (both orders, agreeing = win, see pipeline.align.judge; its request budget
   is checked against what the judging needs before the first request, and by `check` before any work),
   for each comparison (default: MORE vs MultiTask, each vs the base policy) and each method, per prompt set.
   DIR/align/judgements.json `{"<method>: <a> vs <b>": {prompt_set: {win, tie, lose, n, counts,
   interval}}}`, judge_details.jsonl, metrics.json (per policy: gold reward, perplexity of the test
   answers), table.md.

Under `accelerate launch` the main process samples, scores, judges and writes; every rank joins the
training of rjs / rloo / ppo (data-parallel).

Where the parts live: the section's dataclasses in `config`, prompts and RM selection in `prompts`, loading
and saving policies in `policy`, candidates / held-out responses / perplexities / the RM reward in `candidates`, the
method table and one (RM, method) alignment in `methods` (the trainers behind it in `trainers`), judging
and the result files in `judging`. This module keeps the stage's order of work (`run`) and what the
orchestrator asks before it runs (`inputs`, `check`, `estimate`; `pipeline.stages.STAGES`).

May import: pipeline leaves, `pipeline.policy.stage` (DIR/policy/), `pipeline.reward.index`, `pipeline.calibration.compare` and `pipeline.align.*`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipeline.align.candidates import candidates, perplexities, sample_kwargs, with_conv
from pipeline.align.config import comparison_policies
from pipeline.align.context import AlignContext, plain
from pipeline.align.judging import planned_requests, planned_requests_text, write_results
from pipeline.align.methods import AlignInputs, align_one, has_own_policy
from pipeline.align.prompts import (
    is_synthetic,
    load_splits,
    pick_sources,
    prompt_sets,
    select_rms,
    split_conversations,
)
from pipeline.align.rewards import RMReward, gold_reward_fn
from pipeline.data.render import check_template_setting
from pipeline.errors import RecipeError
from pipeline.io import atomic_write_json, content_sha256, read_json, remove_tree, safe_component, sha256_json
from pipeline.models import check_saved_templates, section_model_inputs
from pipeline.policy.stage import read_policy
from pipeline.reward.index import read_index


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Align, judge, tabulate. Returns the artifact paths (relative to run_dir)."""
    ctx = AlignContext(recipe, run_dir)
    cfg = ctx.cfg
    rm_dirs = _reward_models(ctx)
    splits = load_splits(recipe)
    train_sources = pick_sources(splits, cfg.prompt_sources, "prompt_sources")
    eval_sources = pick_sources(splits, cfg.eval_sources, "eval_sources")
    gold_fn = _gold_fn(cfg, is_synthetic(splits, eval_sources))
    if not cfg.model_name_or_path and not is_synthetic(splits, train_sources + eval_sources):
        ctx.log(
            "warning: the policy is the tiny demo policy, warm-started on the synthetic benchmark's text: on these "
            "real prompts its samples are not meaningful text, and the verdicts compare such samples (report.md "
            "says so). Fix: align a real policy (align.model_name_or_path)"
        )
    ctx.conversations.update(split_conversations(splits, train_sources + eval_sources))  # prompts keep messages
    if isinstance(gold_fn, RMReward):  # an RM as gold judge: its own template too
        gold_fn.conversations = ctx.conversations
    train_prompts, eval_prompts, ppl_data = prompt_sets(
        cfg, splits, train_sources, eval_sources, ctx.conversations, ctx.seed
    )
    base, base_stamp = _base(ctx, train_prompts, eval_prompts, ppl_data, gold_fn)
    base_eval = [
        with_conv({"prompt": r["prompt"], "set": r["set"], "response": r["candidates"][0], "ended": r["ended"][0]}, r)
        for r in base.eval_cands
    ]
    base_ppl_path = _base_perplexity(ctx, base, base_stamp)

    common = _common_settings(ctx, base)
    for rm, rm_dir in rm_dirs.items():
        for method in cfg.methods:
            settings = {"method": method, "rm": rm, "rm_stamp": _rm_stamp(rm_dir), **common}
            align_one(base, rm, rm_dir, method, sha256_json(plain(settings))[:16])

    artifacts = ["align/base"] + [  # method `policy`: only an implicit RM (dpo) has a policy of its own
        f"align/{safe_component(rm)}/{m}"
        for rm, d in rm_dirs.items()
        for m in cfg.methods
        if m != "policy" or has_own_policy(d)
    ]
    if ctx.main:
        write_results(ctx, list(rm_dirs), base_eval, base_ppl_path, gold_fn)
        remove_tree(ctx.dir / ".work", ctx.run_dir)
    ctx.barrier()
    artifacts += ["align/judgements.json", "align/judge_details.jsonl", "align/metrics.json", "align/table.md"]
    return artifacts


def _reward_models(ctx: AlignContext) -> dict[str, Path]:
    """{RM name: its directory} for the RMs to align with (`align.rms`; DIR/reward/index.json)."""
    index = read_index(ctx.run_dir, key="align.rms")
    rm_dirs = {}
    for name in select_rms(index, ctx.cfg.rms):
        p = Path(index[name]["path"])
        if not p.is_dir():
            raise FileNotFoundError(
                f"reward model {name!r}: directory {p} (from {ctx.run_dir / 'reward' / 'index.json'}) does not exist"
            )
        rm_dirs[name] = p
    return rm_dirs


def _gold_fn(cfg, synthetic: bool):
    """The gold reward: the gold judge's, else the synthetic benchmark's r* on its data (still logged as a
    measurement), else None."""
    if cfg.judge.kind == "gold":
        if cfg.judge.gold == "synthetic" and not synthetic:
            raise ValueError(
                "align.judge.gold=synthetic needs the synthetic benchmark's data; for real data set "
                "align.judge.gold=<reward-model dir> or align.judge.kind=openai"
            )
        return gold_reward_fn(cfg.judge.gold)
    if synthetic:
        return gold_reward_fn("synthetic")  # still logged as a measurement
    return None


def _base(ctx: AlignContext, train_prompts, eval_prompts, ppl_data: dict, gold_fn) -> tuple[AlignInputs, str]:
    """The base policy and its candidates for the training and held-out prompts, sampled once and shared by
    every RM (what every alignment starts from), and the stamp of what built the policy."""
    cfg = ctx.cfg
    base_path, tok, base_stamp = read_policy(ctx.run_dir, trust_remote_code=cfg.trust_remote_code)
    base_settings = {
        "policy": [base_path, base_stamp],
        "style": cfg.prompt_style,
        "seed": ctx.seed,
        "sampling": sample_kwargs(cfg, temperature=cfg.temperature, n=cfg.n) | {"progress": None},
    }
    train_cands = candidates(
        ctx,
        "train_candidates",
        base_path,
        tok,
        train_prompts,
        temperature=cfg.temperature,
        settings=plain(base_settings | {"prompts": sha256_json(train_prompts)[:16]}),
    )
    eval_cands = candidates(
        ctx,
        "eval_candidates",
        base_path,
        tok,
        eval_prompts,
        temperature=cfg.eval_temperature,
        settings=plain(
            base_settings | {"temperature": cfg.eval_temperature, "prompts": sha256_json(eval_prompts)[:16]}
        ),
    )
    return AlignInputs(ctx, base_path, tok, train_cands, eval_cands, ppl_data, gold_fn), base_stamp


def _base_perplexity(ctx: AlignContext, base: AlignInputs, base_stamp: str) -> Path:
    """DIR/align/base/perplexity.json: the base policy's perplexities (computed once per policy and data)."""
    cfg = ctx.cfg
    path = ctx.dir / "base" / "perplexity.json"
    stamp = sha256_json(
        [base.base_path, base_stamp, cfg.prompt_style, {k: v[0][:3] for k, v in base.ppl_data.items()}, cfg.n_ppl]
    )[:16]
    if ctx.main and (read_json(path) or {}).get("stamp") != stamp:
        atomic_write_json(
            path, {"stamp": stamp, "perplexity": perplexities(ctx, base.base_path, base.tok, base.ppl_data)}
        )
    ctx.barrier()
    return path


def _common_settings(ctx: AlignContext, base: AlignInputs) -> dict:
    """The settings every DIR/align/<rm>/<method>/ depends on besides its RM and method: the section (but
    what only judging or the loop reads), the seed, and the candidates."""
    config = dataclasses.asdict(ctx.cfg)
    for k in ("judge", "comparisons", "progress", "rms", "methods"):
        config.pop(k, None)
    return {
        "config": config,
        "seed": ctx.seed,
        "train": sha256_json(base.train_cands)[:16],
        "eval": sha256_json(base.eval_cands)[:16],
    }


def _rm_stamp(rm_dir: Path) -> list:
    """Identity of an RM's weights and temperature by content (a retrained RM, or one edited in place,
    invalidates the alignments made with it); content hashes are cached (`pipeline.io.content_sha256`)."""
    out = []
    for name in ("model.safetensors", "adapter_model.safetensors", "temperature.json"):
        p = rm_dir / name
        if p.exists():
            out.append([name, p.stat().st_size, content_sha256(p)])
    return out


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the align section names besides the data sources: the base policy and a chat-template file."""
    return section_model_inputs(section)


def check(recipe, *, runs: bool, origin) -> None:
    """The align section against the others, before any work (also under --dry-run): its chat template (or,
    when it is null and the stage runs, the template a local align.model_name_or_path ships);
    prompt/eval sources that `data.sources` has; RMs and comparisons that `reward.methods` trains; and, when the
    stage will run (`runs`), the OpenAI judge's API-key variable and request budget. One RecipeError naming the
    key and the fix."""
    check_template_setting(recipe.align.chat_template, "align.chat_template", origin)
    if runs:
        check_saved_templates(recipe.align, "align", origin)
    data, align = recipe.data, recipe.align
    grouped = [spec for spec in data.sources if isinstance(spec.options, dict) and spec.options.get("group_by")]
    # A `group_by` source becomes sources named <name>/<value> (or its group_names values) only once the data
    # is read: names of that shape pass here, and the data stage checks them against the groups it finds.
    group_names = {str(v) for spec in grouped for v in (spec.options.get("group_names") or {}).values()}
    sources = data.source_names

    def is_source(name: str) -> bool:
        return name in sources or name in group_names or any(str(name).startswith(f"{spec.name}/") for spec in grouped)

    for key, names in (("prompt_sources", align.prompt_sources), ("eval_sources", align.eval_sources)):
        unknown = [s for s in names or [] if not is_source(s)]
        if unknown:
            raise RecipeError(
                f"align.{key} in {origin('align.' + key)} names unknown source(s) {unknown}; "
                f"the data sources are {sources}. Fix: use names from data.sources"
            )
    _check_rms_and_comparisons(recipe.reward.methods, sources, align, is_source, origin)
    _check_judge_data(data, align, origin)
    env = align.judge.api_key_env
    if runs and align.judge.kind == "openai" and env and not os.environ.get(env):
        raise RecipeError(
            f"align.judge.kind=openai reads the API key from the environment variable {env}, which is not set, and "
            f"the align stage will run. Fix: export {env}=..., or set align.judge.api_key_env='' for an endpoint "
            "without a key, or align.judge.kind=gold"
        )
    if runs:
        _check_judge_budget(recipe, origin)


def _check_judge_budget(recipe, origin) -> None:
    """An LLM judge's request budget against what the run's judging needs (`planned_requests`, the cached
    answers of DIR/align/judge_cache.jsonl counted as free), before any work; the align stage checks the exact
    count again before its first request."""
    plan = planned_requests(recipe, Path(recipe.output_dir or "."))
    if plan and plan["needed"] > plan["budget"]:
        raise RecipeError(
            f"align.judge.max_requests={plan['budget']} in {origin('align.judge.max_requests')} cannot cover this "
            f"run's {planned_requests_text(plan)[len('judge: ') :]}. Fix: align.judge.max_requests={plan['needed']} "
            "(or more), or judge less (align.n_eval_prompts, align.comparisons, align.methods)"
        )


def _check_judge_data(data, align, origin) -> None:
    """align.judge.gold=synthetic judges with the synthetic benchmark's gold reward r*, which only its pairs have:
    eval sources that are not synthetic (a `group_by` source never is) fail here, before any work, not when the
    stage runs."""
    if align.judge.kind != "gold" or align.judge.gold != "synthetic":
        return
    formats = {spec.name: spec.format for spec in data.sources}
    real = [s for s in align.eval_sources or [] if formats.get(s, "a group_by source's format") != "synthetic"]
    if real:
        shown = ", ".join(f"{s} ({formats.get(s, 'a group_by source')})" for s in real)
        raise RecipeError(
            f"align.judge.gold=synthetic (from {origin('align.judge.gold')}) judges with the synthetic benchmark's "
            f"gold reward, which only synthetic pairs have, but align.eval_sources has real data: {shown}. Fix: set "
            "align.judge.gold=<a reward-model directory> (an RM as gold judge), align.judge.kind=openai, or "
            "align.judge.kind=none"
        )


def _check_rms_and_comparisons(methods: list[str], sources: list[str], align, is_source, origin) -> None:
    trained = [n for m in methods for n in ([f"single-{s}" for s in sources] if m == "single" else [m])]
    if align.rms is not None:
        unknown = [n for n in align.rms if n not in trained and not (n.startswith("single-") and is_source(n[7:]))]
        if unknown:
            raise RecipeError(
                f"align.rms in {origin('align.rms')} names RM(s) {unknown} that reward.methods "
                f"does not train (it trains {trained}). Fix: use some of those, or null for all"
            )
    aligned = list(align.rms) if align.rms is not None else [n for n in trained if not n.startswith("single-")]
    for comp in align.comparisons or []:
        a, b, _ = comparison_policies(comp)
        unknown = [p for p in (a, b) if p != "base" and p.partition("/")[0] not in aligned]
        if unknown:
            raise RecipeError(
                f"align.comparisons in {origin('align.comparisons')}: {comp!r} names {unknown}, not an RM "
                f"aligned in this run ({aligned + ['base']}). Fix: compare only those, or add the RM to "
                "reward.methods / align.rms"
            )
        methods = [p for p in (a, b) if "/" in p and p.partition("/")[2] not in align.methods]
        if methods:
            raise RecipeError(
                f"align.comparisons in {origin('align.comparisons')}: {comp!r} names {methods}, whose method is not in "
                f"align.methods {list(align.methods)}. Fix: add the method to align.methods, or compare other policies"
            )


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    """The align stage's counts from its settings: samples to generate, RMs and methods, and an LLM judge's
    requests against its budget (the warm start is the policy stage's)."""
    cfg = recipe.align
    parts = []
    rms = list(cfg.rms) if cfg.rms else [m for m in recipe.reward.methods if m != "single"]
    prompts = "all" if cfg.n_prompts is None else cfg.n_prompts
    parts.append(f"{len(rms)} RM(s) x methods {', '.join(cfg.methods)}")
    parts.append(f"sampling {prompts} training prompts x {cfg.n} responses")
    if "ppo" in cfg.methods:
        parts.append(f"ppo {cfg.ppo.get('num_steps', 100)} steps per RM")
    plan = planned_requests(recipe, run_dir)
    if plan:
        parts.append(planned_requests_text(plan))
    return "; ".join(parts), None
