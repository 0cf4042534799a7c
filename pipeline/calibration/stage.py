"""The calibration stage: score every trained RM on every source, measure accuracy and calibration.

Reads `DIR/reward/index.json` (the RMs trained in this run) and `calibration.external_rms` (RMs trained
elsewhere: a save_pretrained directory, a hub id or a SEQ_CLS PEFT adapter; with only those, no reward
stage is needed), builds each source's validation and test splits with
`pipeline.data.build_splits(recipe.data)` and scores every RM on them (batched, sorted by length, no
gradients, bf16 autocast where supported, left truncation to the data's `max_length` as in training).
Then, per RM:

* fits one temperature on the validation pairs of all sources (`temperature.fit_temperature`) and saves
  it as `DIR/calibration/temperatures.json` and `<rm dir>/temperature.json`;
* computes every metric of `metrics.all_metrics` on each source's test split, before and after
  temperature scaling (`"temperature_scaled"` inside each entry), plus the Helpful & Harmless average
  and the all-source average, and, on the synthetic benchmark, the error against the true and the gold
  preference probabilities.

Before scoring, every RM's training prompts are read from its `train_prompts.json` (written by the reward
stage; for an external RM when one lies in its directory): the evaluation pairs whose prompt an RM was trained
on are counted per RM, source and split, printed and written to metrics.json (`<rm>.train_overlap`), and, by
default (`calibration.exclude_train_overlap`), every pair whose prompt ANY evaluated RM was trained on is left
out for all RMs, so the compared RMs are scored on the same unseen pairs (synthetic sources are only counted:
their test pairs reuse the training prompt pool by design). config.json records what was excluded.

With single-source RMs (`method: single`, named `single-<source>`) it also runs the paper's diversity
analysis: the cross matrix (trained on i, tested on j) of accuracy and ECE, and the "Averaging" RM
(mean reward of the single-source RMs), scored like any other RM under the name `averaging`.

Paired comparisons (`calibration.compare`, "<a> vs <b>"): the difference a - b of every headline metric per
source and for the averages, with a 95% paired bootstrap interval and p-value (`compare.paired_bootstrap`),
in comparisons.json and comparisons.md. With `calibration.step0_reference` (the default) each trained RM is also
compared with its untrained starting point ('<rm> vs <rm>@step0', `step0`: scored once per distinct start, its
metrics and the scoring seconds in step0.json).

DPO policies named in `calibration.implicit_rms`, and the reward stage's `dpo` policies (index entries of kind
"implicit"), are implicit RMs (`implicit_rms.score_implicit`: beta * (log pi -
log pi_ref) over the response tokens, policy then reference, one model in memory at a time) and go through every
step above like the others; their fitted temperature gives the effective beta (beta / T, temperature_fits.json).

Where the parts live: `config` (CalibrationConfig), `load` (which RMs, loading them, external-RM checks),
`implicit_rms` (the DPO policies: entries, checks, scoring, their table.md section),
`overlap` (the evaluation splits, the train-overlap counts and exclusion), `pipeline.scoring.score_rm` (the
scoring pass), `analysis` (metrics, temperatures, comparisons, diversity), `tables` (table.md), `stage_plots`
(the PNGs). This module holds `run` and the other functions `pipeline.stages` calls; it imports the calibration
package, the leaves (`pipeline.io`, `logs`, `scoring`, `pipeline.data`) and nothing above the calibration layer.

Outputs in DIR/calibration/ (written by the main process only, the folder replaced atomically):
metrics.json, table.md, temperatures.json, scores.npz (every reward), diversity.json, comparisons.json,
comparisons.md, step0.json, config.json (settings, RMs, external paths), and PNGs
(reliability diagrams before/after scaling, reward-difference histograms, MORE weight trajectories,
diversity heatmaps).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.calibration.analysis import (
    averaging_rewards,
    check_finite_rewards,
    compare_rms,
    diversity_analysis,
    fit_temperatures,
    rm_metrics,
    source_metrics,
)
from pipeline.calibration.compare import default_comparisons, render_comparisons, resolve_comparisons
from pipeline.calibration.config import AVERAGING, CalibrationConfig, hh_sources
from pipeline.calibration.implicit_rms import (
    check_implicit_folders,
    effective_betas,
    implicit_entries,
    implicit_table,
    score_implicit,
    trained_implicit_entries,
)
from pipeline.calibration.load import check_external_tokenizers, load_rm, read_rms
from pipeline.calibration.overlap import (
    eval_splits,
    exclude_train_overlap,
    overlap_counts,
    prompt_hashes,
    report_overlap,
    train_prompt_records,
)
from pipeline.calibration.stage_plots import write_plots
from pipeline.calibration.step0 import load_start, plan_starts, step0_results
from pipeline.calibration.tables import render_table
from pipeline.calibration.temperature import few_pairs_warning
from pipeline.errors import RecipeError
from pipeline.io import UnsafePathError, atomic_dir, atomic_write_json, atomic_write_text, inside
from pipeline.logs import say
from pipeline.scoring import score_rm


@dataclass
class Evaluation:
    """What the stage evaluates, settled before any scoring (`plan_evaluation`)."""

    index: dict  # the trained RMs (DIR/reward/index.json)
    external: dict  # calibration.external_rms as index-like entries
    implicit: dict  # calibration.implicit_rms (DPO policies) as index-like entries
    singles: list[str]  # the single-source RMs, averaged into the Averaging RM when `with_averaging`
    with_averaging: bool
    comparisons: dict  # {"<a> vs <b>": (a, b)}
    data: dict  # {source: {"test": Dataset, "validation": Dataset | None}}, train overlap left out
    stats: dict  # pipeline.data.mixing.data_stats of the built splits
    overlap: dict  # {rm: overlap_counts(...)}
    excluded: dict  # {source: {split: pairs left out}}
    synthetic: set  # the synthetic sources (overlap counted, never excluded)
    sources: list[str]
    hh: list[str]  # the sources of the Helpful & Harmless average
    max_length: int | None
    starts: dict = field(default_factory=dict)  # {key: step0.Start}: the trained RMs' starting points (step 0)
    no_start: dict = field(default_factory=dict)  # {rm: why it has no step-0 reference}


@dataclass
class Results:
    """What the main process computes from the rewards (`compute_results`)."""

    temperatures: dict  # {rm: T}; empty without temperature scaling
    fits: dict  # {rm: fit details}
    metrics: dict  # metrics.json
    diversity: dict | None  # diversity.json
    compared: dict  # comparisons.json
    step0: dict | None = None  # step0.json


def plan_evaluation(recipe, run_dir: Path, cfg: CalibrationConfig, main: bool) -> Evaluation:
    """The RMs, comparisons and evaluation data of this run; fails before any scoring on a bad name or split.
    `main`: this is the main process (it prints the data and overlap lines)."""
    from pipeline.data.mixing import describe_data_stats

    index, external = read_rms(run_dir, cfg)
    trained = trained_implicit_entries(run_dir, index)  # the reward stage's dpo policies
    index = {n: e for n, e in index.items() if n not in trained}
    implicit = {**trained, **implicit_entries(cfg, [*index, *external, *trained])}
    check_implicit_folders(cfg)
    singles = [n for n, e in index.items() if e.get("method") == "single"]
    with_averaging = cfg.averaging and len(singles) >= 2
    names = [*index, *external, *implicit] + ([AVERAGING] if with_averaging else [])
    compare = cfg.compare
    if compare is None and implicit:  # each DPO policy against MORE and MultiTask, besides the defaults
        compare = default_comparisons(names)
        compare += [f"{n} vs {b}" for n in implicit for b in ("more", "multitask") if b in names]
    comparisons = resolve_comparisons(compare, names)  # fails before any scoring on an unknown name
    stats: dict = {}
    data = eval_splits(recipe, cfg, stats)
    if main:
        for line in describe_data_stats(stats):
            say("calibration", f"data {line}")
    # Pairs whose prompt an RM was trained on (its train_prompts.json): counted per RM, excluded by default.
    records = train_prompt_records({**index, **external, **implicit}, singles, with_averaging)
    hashes = prompt_hashes(data)
    overlap = {rm: overlap_counts(hashes, seen) for rm, seen in records.items()}
    synthetic = {sp.name for sp in recipe.data.sources if sp.format == "synthetic"}
    if main:
        report_overlap(overlap, data, cfg.exclude_train_overlap, synthetic)
    excluded: dict = {}
    if cfg.exclude_train_overlap:
        data, excluded = exclude_train_overlap(data, hashes, records, cfg, synthetic)
    sources = list(data)
    starts, no_start = plan_starts(index, external, run_dir, cfg) if cfg.step0_reference else ({}, {})
    if main:
        for rm, why in no_start.items():
            say("calibration", f"{rm}: no step-0 reference (its untrained starting point): {why}")
    return Evaluation(
        index=index,
        external=external,
        implicit=implicit,
        singles=singles,
        with_averaging=with_averaging,
        comparisons=comparisons,
        data=data,
        stats=stats,
        overlap=overlap,
        excluded=excluded,
        synthetic=synthetic,
        sources=sources,
        hh=hh_sources(sources, cfg),
        max_length=cfg.max_length if cfg.max_length is not None else recipe.data.max_length,
        starts=starts,
        no_start=no_start,
    )


def score_all(ev: Evaluation, cfg: CalibrationConfig, state) -> dict:
    """{rm: {source: {split: (r_chosen, r_rejected)}}} of every RM (data-parallel under several processes), and
    of the Averaging RM."""
    rewards: dict = {}
    for name, entry in {**ev.index, **ev.external}.items():
        model, tok = load_rm(name, entry, cfg, state.device)
        rewards[name] = score_rm(model, tok, ev.data, cfg, ev.max_length, state)
        del model
        check_finite_rewards(name, entry, rewards[name])
    for name, entry in ev.implicit.items():  # the policy, then the reference: one model in memory at a time
        rewards[name] = score_implicit(name, entry, ev.data, cfg, ev.max_length, state)
        check_finite_rewards(name, entry, rewards[name])
    if ev.with_averaging:
        rewards[AVERAGING] = averaging_rewards(rewards, ev.singles)
    return rewards


def score_starts(ev: Evaluation, cfg: CalibrationConfig, state) -> tuple[dict, float]:
    """({start key: {source: {split: (r_chosen, r_rejected)}}}, seconds): every distinct step-0 starting point
    scored once, like an RM (`score_rm`)."""
    rewards: dict = {}
    t0 = time.perf_counter()
    for key, start in ev.starts.items():
        if state.is_main_process:
            say("calibration", f"step 0 of {', '.join(start.rms)}: scoring its untrained starting point")
        model, tok = load_start(start, cfg, state.device)
        rewards[key] = score_rm(model, tok, ev.data, cfg, ev.max_length, state)
        del model
        check_finite_rewards(f"the step 0 of {', '.join(start.rms)}", {"path": start.base}, rewards[key])
    seconds = time.perf_counter() - t0
    if ev.starts and state.is_main_process:
        say("calibration", f"step 0: {len(ev.starts)} starting point(s) scored in {seconds:.1f} s")
    return rewards, seconds


def compute_results(
    ev: Evaluation, rewards: dict, cfg: CalibrationConfig, seed: int, starts: tuple[dict, float] | None = None
) -> Results:
    """Temperatures, metrics (with each RM's train overlap), diversity and paired comparisons; with `starts` (the
    rewards of the RMs' starting points and the seconds scoring them took) each RM vs its step 0 too."""
    temperatures, fits = fit_temperatures(rewards, ev.sources) if cfg.temperature_scaling else ({}, {})
    effective_betas(ev.implicit, temperatures, fits)
    for n_pairs in sorted({f["n_pairs"] for f in fits.values()}):
        if warning := few_pairs_warning(n_pairs):
            rms = ", ".join(rm for rm, f in fits.items() if f["n_pairs"] == n_pairs)
            say("calibration", f"warning: {rms}: {warning}")
    metrics = {
        rm: rm_metrics(
            {
                s: source_metrics(*by_source[s]["test"], ev.data[s]["test"], cfg, temperatures.get(rm), seed)
                for s in ev.sources
            },
            ev.hh,
        )
        for rm, by_source in rewards.items()
    }
    for rm in metrics:
        metrics[rm]["train_overlap"] = {
            **ev.overlap[rm],
            "excluded": cfg.exclude_train_overlap,
            "kept_sources": sorted(ev.synthetic & set(ev.sources)) if cfg.exclude_train_overlap else list(ev.sources),
        }
    diversity = diversity_analysis(ev.index, rewards, ev.sources, cfg)
    compared = {
        label: compare_rms(
            rewards[a],
            rewards[b],
            ev.data,
            ev.sources,
            ev.hh,
            cfg,
            seed,
            (temperatures[a], temperatures[b]) if temperatures else None,
        )
        for label, (a, b) in ev.comparisons.items()
    }
    step0 = None
    if starts is not None and (ev.starts or ev.no_start):
        against_start, step0 = step0_results(ev, rewards, *starts, temperatures, cfg, seed)
        compared.update(against_start)
    return Results(temperatures, fits, metrics, diversity, compared, step0)


def write_outputs(
    run_dir: Path, ev: Evaluation, rewards: dict, res: Results, cfg: CalibrationConfig, seed: int
) -> list[str]:
    """Write DIR/calibration/ atomically; returns its files (relative to run_dir)."""
    with atomic_dir(run_dir / "calibration") as tmp:
        atomic_write_json(tmp / "metrics.json", res.metrics)
        table = render_table(res.metrics, res.temperatures, ev.sources, ev.hh, cfg, res.diversity, res.fits)
        if ev.implicit:
            table = "\n".join([table, "", *implicit_table(ev.implicit, res.temperatures)])
        atomic_write_text(tmp / "table.md", table)
        atomic_write_json(
            tmp / "config.json",
            {
                **asdict(cfg),
                "max_length_used": ev.max_length,
                "seed_used": seed,
                "rms": list(rewards),
                "sources": ev.sources,
                "hh_sources": ev.hh,
                "external": {n: e["path"] for n, e in ev.external.items()},
                "implicit": {
                    n: {k: e.get(k) for k in ("path", "reference", "beta", "reference_free", "truncated_sequences")}
                    for n, e in ev.implicit.items()
                },
                "comparisons": list(res.compared),
                "train_overlap_excluded": ev.excluded,
                "data_stats": ev.stats,
            },
        )
        if res.step0 is not None:
            atomic_write_json(tmp / "step0.json", res.step0)
        if res.compared:
            atomic_write_json(tmp / "comparisons.json", res.compared)
            atomic_write_text(tmp / "comparisons.md", render_comparisons(res.compared, cfg.bootstrap_samples))
        if cfg.temperature_scaling:
            atomic_write_json(tmp / "temperatures.json", res.temperatures)
            atomic_write_json(tmp / "temperature_fits.json", res.fits)
        np.savez_compressed(
            tmp / "scores.npz",
            **{
                f"{rm}::{s}::{sp}::{side}": arr
                for rm, by_source in rewards.items()
                for s, by_split in by_source.items()
                for sp, pair in by_split.items()
                for side, arr in zip(("chosen", "rejected"), pair)
            },
        )
        if res.diversity:
            atomic_write_json(tmp / "diversity.json", res.diversity)
        if cfg.plots:
            write_plots(tmp, ev.index, rewards, ev.sources, res.temperatures, res.diversity, cfg)
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    return [f"calibration/{n}" for n in written]


def write_rm_temperatures(run_dir: Path, index: dict, res: Results, sources: list[str]) -> list[str]:
    """`<rm dir>/temperature.json` of every trained RM inside the run directory; returns the paths written."""
    artifacts = []
    for rm, t in res.temperatures.items():
        if rm not in index:
            continue
        rel = Path(index[rm]["path"]) / "temperature.json"
        try:  # an index entry may name an RM directory outside this run: never write there
            inside(run_dir, rel)
        except UnsafePathError:
            say(
                "calibration",
                f"{rm}: not writing temperature.json into {index[rm]['path']} (outside the run "
                f"directory {run_dir}); its temperature is in calibration/temperatures.json",
            )
            continue
        atomic_write_json(rel, {"temperature": t, **res.fits[rm], "fitted_on": "validation", "sources": sources})
        try:
            artifacts.append(str(rel.relative_to(run_dir)))
        except ValueError:
            artifacts.append(str(rel))
    return artifacts


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Evaluate every RM of DIR/reward/index.json and calibration.external_rms; returns the artifact paths
    relative to run_dir. Every external RM is scored by the same `score_rm` as the trained ones."""
    import torch
    from accelerate import PartialState

    run_dir = Path(run_dir)
    cfg = recipe.calibration
    seed = cfg.seed if cfg.seed is not None else int(recipe.seed)
    # a shared singleton: under pipeline.run this returns the orchestrator's state; alone under torchrun
    # on CPU, cpu=True makes it a gloo process group instead of N independent single processes
    state = PartialState(cpu=not torch.cuda.is_available())
    ev = plan_evaluation(recipe, run_dir, cfg, state.is_main_process)
    rewards = score_all(ev, cfg, state)
    starts = score_starts(ev, cfg, state)
    if not state.is_main_process:
        state.wait_for_everyone()
        return []
    res = compute_results(ev, rewards, cfg, seed, starts)
    artifacts = write_outputs(run_dir, ev, rewards, res, cfg, seed)
    trained = {**ev.index, **{n: e for n, e in ev.implicit.items() if e.get("trained")}}
    artifacts += write_rm_temperatures(run_dir, trained, res, ev.sources)
    state.wait_for_everyone()
    return artifacts


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the calibration section names besides the data sources: the external RMs, and the policies and
    references of the implicit RMs (their content is part of the stage's hash)."""
    out = [(p, "model") for p in (section.get("external_rms") or {}).values()]
    for spec in (section.get("implicit_rms") or {}).values():
        if isinstance(spec, dict):
            out += [(spec[k], "model") for k in ("policy", "reference") if isinstance(spec.get(k), str)]
    return out


def check(recipe, *, runs: bool, origin) -> None:
    """A local external RM without tokenizer files, or whose chat template does not parse, raises or runs past
    the check's time limit, fails before any work (also under --dry-run); so does an implicit RM whose policy or
    reference is missing or no causal LM, or whose policy has no tokenizer files."""
    if not runs:
        return
    try:
        check_external_tokenizers(recipe.calibration)
    except ValueError as e:
        raise RecipeError(f"{e} (in {origin('calibration.external_rms')})") from None
    try:
        check_implicit_folders(recipe.calibration)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(f"{e} (in {origin('calibration.implicit_rms')})") from None


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    return "calibration: no optimizer steps", None
