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
in comparisons.json and comparisons.md.

Outputs in DIR/calibration/ (written by the main process only, the folder replaced atomically):
metrics.json, table.md, temperatures.json, scores.npz (every reward), diversity.json, comparisons.json,
comparisons.md, config.json (settings, RMs, external paths), and PNGs
(reliability diagrams before/after scaling, reward-difference histograms, MORE weight trajectories,
diversity heatmaps).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.calibration import metrics as M
from pipeline.calibration.compare import metric_keys, paired_bootstrap, render_comparisons, resolve_comparisons
from pipeline.calibration.temperature import fit_temperature
from pipeline.io import is_hub_id
from pipeline.reward.index import read_index


HH_NAMES = ("helpful", "harmless")
AVERAGING = "averaging"
SCORED_SPLITS = ("test", "validation")
AUTOCAST = {
    "auto": "auto",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": None,
    "float32": None,
    "none": None,
}
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class CalibrationConfig:
    """The `calibration:` section of a recipe."""

    n_bins: list[int] = field(
        default_factory=lambda: [5, 10, 20],
        metadata={"help": "Bin counts M for which ECE is reported (ece_<M>); the paper's headline is 10."},
    )
    headline_bins: int = field(
        default=10,
        metadata={"help": "M used for ACE/MCE, bootstrap intervals, tables, plots and the diversity matrix."},
    )
    strategy: str = field(
        default="uniform", metadata={"help": "Bins: uniform (equal width, the paper's) or quantile."}
    )
    bootstrap_samples: int = field(
        default=1000, metadata={"help": "Bootstrap resamples for 95% intervals of accuracy and ECE (0 = none)."}
    )
    batch_size: int = field(
        default=64, metadata={"help": "Sequences per scoring forward pass (a packed pair counts as 2)."}
    )
    max_tokens_per_batch: int | None = field(
        default=4096,
        metadata={
            "help": "Cap on sequences * padded length per forward (long batches shrink); "
            "null = no cap. 4096 measured fastest on a 2-core CPU (scripts/bench_scoring.py); "
            "raise it on GPUs."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per sequence after LEFT truncation; null = the data config's max_length."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Autocast dtype for scoring: auto (bf16 where supported), bf16, fp16 or fp32 (no autocast)."
        },
    )
    load_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype when loading: auto (bfloat16 on a CUDA device that supports it, else "
            "float32), float32, bfloat16 or float16."
        },
    )
    bits: int | None = field(
        default=None, metadata={"help": "Load RMs in 4- or 8-bit (bitsandbytes); null = full precision."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    rms: list[str] | None = field(
        default=None, metadata={"help": "RM names from DIR/reward/index.json to evaluate; null = all."}
    )
    external_rms: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Reward models NOT trained in this run, evaluated like the trained ones: name -> a local "
            "save_pretrained directory (a relative path is taken from the current directory), a hub id, or "
            "a PEFT adapter directory (its base model is read from adapter_config.json). Any scalar-head "
            "(num_labels=1) AutoModelForSequenceClassification. A run with only external_rms needs no reward "
            "stage."
        },
    )
    compare: list[str] | None = field(
        default=None,
        metadata={
            "help": "Paired comparisons '<a> vs <b>' (RM names) with 95% paired bootstrap intervals, written "
            "to comparisons.json; null = 'more vs multitask' when both exist, plus each of them vs 'uniform' "
            "when it exists; [] = none."
        },
    )
    averaging: bool = field(
        default=True,
        metadata={"help": "Score the Averaging RM (mean reward of the single-source RMs) when >= 2 exist."},
    )
    temperature_scaling: bool = field(
        default=True,
        metadata={"help": "Fit one temperature per RM on the validation splits and report scaled metrics."},
    )
    hh_sources: list[str] | None = field(
        default=None,
        metadata={
            "help": "Sources of the Helpful & Harmless average; null = those named or containing helpful/harmless."
        },
    )
    max_pairs_per_split: int | None = field(
        default=None,
        metadata={"help": "Use at most this many pairs of each test/validation split (first ones); null = all."},
    )
    exclude_train_overlap: bool = field(
        default=True,
        metadata={
            "help": "Leave out every test/validation pair whose prompt an evaluated RM was trained on (read from "
            "the RM's train_prompts.json, which the reward stage writes; RMs without one are not checked), so "
            "no RM is scored on prompts it saw. The counts per RM and source are printed and written to "
            "metrics.json (train_overlap) either way. Synthetic sources are counted, never excluded (their "
            "test pairs are fresh draws over the same small prompt pool by design)."
        },
    )
    plots: bool = field(default=True, metadata={"help": "Write the PNG plots."})
    seed: int | None = field(default=None, metadata={"help": "Bootstrap seed; null = the recipe's seed."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar while scoring."})

    def __post_init__(self):
        self.n_bins = [int(m) for m in ([self.n_bins] if isinstance(self.n_bins, int) else self.n_bins)]
        for m in [*self.n_bins, self.headline_bins]:
            M.check_bins(m, "uniform")
        if self.strategy not in M.STRATEGIES:
            raise ValueError(
                f"calibration.strategy: unknown bin strategy {self.strategy!r}; use one of {', '.join(M.STRATEGIES)}"
            )
        if self.dtype not in AUTOCAST:
            raise ValueError(f"calibration.dtype must be one of {sorted(AUTOCAST)}, got {self.dtype!r}")
        if self.load_dtype not in LOAD_DTYPES:
            raise ValueError(f"calibration.load_dtype must be one of {LOAD_DTYPES}, got {self.load_dtype!r}")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"calibration.bits must be 4, 8 or null, got {self.bits!r}")
        if self.batch_size < 1 or self.bootstrap_samples < 0:
            raise ValueError("calibration.batch_size must be >= 1 and calibration.bootstrap_samples >= 0")
        if self.external_rms is not None:
            if not isinstance(self.external_rms, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.external_rms.items()
            ):
                raise ValueError(
                    "calibration.external_rms must map RM names to paths or hub ids, e.g. "
                    f"{{my-rm: /path/to/rm, hub-rm: owner/name}}; got {self.external_rms!r}"
                )
            bad = [k for k in self.external_rms if not re.fullmatch(r"[\w.+-]+", k)]
            if bad:
                raise ValueError(
                    f"calibration.external_rms: RM names {bad} may only hold letters, digits and . _ + - "
                    "(they are used in file names and in 'a vs b' comparisons)"
                )
            self.external_rms = dict(self.external_rms)
        if self.compare is not None:
            from pipeline.calibration.compare import parse_comparison

            self.compare = [self.compare] if isinstance(self.compare, str) else list(self.compare)
            for text in self.compare:
                parse_comparison(text)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def eval_splits(recipe, cfg: CalibrationConfig, stats: dict | None = None) -> dict:
    """{source: {"test": Dataset, "validation": Dataset | None}} with one clear error per bad source; `stats`,
    when given, receives `pipeline.data.mixing.data_stats` of the built splits."""
    from pipeline.data import build_splits
    from pipeline.data.mixing import data_stats

    splits = build_splits(recipe.data)
    if stats is not None:  # pairs per split and dropped pairs per source, for the log and config.json
        stats.update(data_stats(splits))
    out = {}
    for source, dd in splits.items():
        names = list(dd.keys()) if hasattr(dd, "keys") else []
        if "test" not in names or len(dd["test"]) == 0:
            raise ValueError(
                f"calibration: source {source!r} has no test split (its splits: {names}, "
                f"test pairs: {len(dd['test']) if 'test' in names else 0}); give it test data in the "
                "recipe's data section (a test split/file, or a test fraction for sources that ship one split)"
            )
        val = dd["validation"] if "validation" in names and len(dd["validation"]) > 0 else None
        if cfg.temperature_scaling and val is None:
            raise ValueError(
                f"calibration: source {source!r} has no validation split to fit the temperature on; give it "
                "validation data in the recipe's data section, or set calibration.temperature_scaling=false"
            )
        picked = {"test": dd["test"], "validation": val}
        if cfg.max_pairs_per_split:
            picked = {
                k: (d.select(range(min(len(d), cfg.max_pairs_per_split))) if d is not None else None)
                for k, d in picked.items()
            }
        out[source] = picked
    if not out:
        raise ValueError("calibration: the data config yields no sources")
    return out


def train_prompt_records(entries: dict, singles: list[str], with_averaging: bool) -> dict:
    """{rm: set of prompt hashes it was trained on, or None when it has no train_prompts.json} for every RM
    (a hub id has none); the Averaging RM saw what its members saw (None if one of them has no record)."""
    from pipeline.data.mixing import read_train_prompts

    out = {n: read_train_prompts(e["path"]) if Path(e["path"]).is_dir() else None for n, e in entries.items()}
    if with_averaging:
        members = [out[n] for n in singles]
        out[AVERAGING] = None if any(m is None for m in members) else set().union(*members)
    return out


def _prompt_hashes(data: dict) -> dict:
    from pipeline.data.mixing import prompt_hash

    return {
        s: {sp: [prompt_hash(p) for p in ds["prompt"]] for sp, ds in by_split.items() if ds is not None}
        for s, by_split in data.items()
    }


def overlap_counts(hashes: dict, seen: set | None) -> dict:
    """{"checked": bool, "test": {source: n}, "validation": {source: n}}: evaluation pairs whose prompt is in
    `seen` (an RM's training prompts); nothing is counted when the RM has no record."""
    out: dict = {"checked": seen is not None, "test": {}, "validation": {}}
    for s, by_split in hashes.items():
        for sp in SCORED_SPLITS:
            out[sp][s] = sum(h in seen for h in by_split.get(sp, [])) if seen is not None else None
    return out


def drop_seen_prompts(data: dict, hashes: dict, seen: set, keep_sources=()) -> tuple[dict, dict]:
    """`data` without the pairs whose prompt hash is in `seen` (sources in `keep_sources` untouched), and
    {source: {split: pairs removed}}."""
    out, removed = {}, {}
    for s, by_split in data.items():
        out[s] = dict(by_split)
        for sp, ds in by_split.items():
            if ds is None or s in keep_sources:
                continue
            keep = [i for i, h in enumerate(hashes[s][sp]) if h not in seen]
            if len(keep) < len(ds):
                out[s][sp] = ds.select(keep)
                removed.setdefault(s, {})[sp] = len(ds) - len(keep)
    return out, removed


def _report_overlap(overlap: dict, data: dict, exclude: bool, synthetic: set) -> None:
    """Print, per RM, how many evaluation pairs have a prompt it was trained on, and what happens to them."""
    total = sum(len(d) for by_split in data.values() for d in by_split.values() if d is not None)
    for rm, o in overlap.items():
        if not o["checked"]:
            print(
                f"[calibration] {rm}: no train_prompts.json beside it; its overlap with the evaluation data is unknown"
            )
            continue
        per = {s: o["test"][s] + o["validation"][s] for s in o["test"]}
        if not any(per.values()):
            print(f"[calibration] {rm}: none of the {total} evaluation pairs has a prompt it was trained on")
            continue
        shown = ", ".join(f"{s} {o['test'][s]}+{o['validation'][s]}" for s, n in per.items() if n)
        if not exclude:
            fate = "KEPT (calibration.exclude_train_overlap=false): its scores on them are inflated"
        else:
            gone = sum(n for s, n in per.items() if s not in synthetic)
            kept = sum(n for s, n in per.items() if s in synthetic)
            fate = f"{gone} excluded" + (f", {kept} kept on synthetic sources (by design)" if kept else "")
        print(
            f"[calibration] {rm}: {sum(per.values())} of {total} evaluation pairs have a prompt it was trained on "
            f"(test+validation per source: {shown}); {fate}"
        )


def hh_sources(sources: list[str], cfg: CalibrationConfig) -> list[str]:
    if cfg.hh_sources is not None:
        unknown = [s for s in cfg.hh_sources if s not in sources]
        if unknown:
            raise ValueError(f"calibration.hh_sources: {unknown} are not sources of this run ({sources})")
        return list(cfg.hh_sources)
    return [s for s in sources if any(h in s.lower() for h in HH_NAMES)]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
SUPPORTED_RMS = (
    "Supported: a scalar-head sequence classifier, i.e. a checkpoint that AutoModelForSequenceClassification loads "
    "with num_labels=1 (config.json architectures ending in 'ForSequenceClassification'), given as a local "
    "save_pretrained directory or a hub id, or a PEFT adapter directory (task_type SEQ_CLS) on such a model."
)


def external_entries(cfg: CalibrationConfig, taken: list[str]) -> dict:
    """calibration.external_rms as index-like entries ({"path", "method": "external", "external": True, ...})."""
    out = {}
    for name, spec in (cfg.external_rms or {}).items():
        if name in taken or name == AVERAGING:
            used_by = "the Averaging RM" if name == AVERAGING else "a reward model trained in this run"
            raise ValueError(f"calibration.external_rms: the name {name!r} is already used by {used_by}; pick another")
        local = Path(spec).expanduser()
        if local.exists():
            if not local.is_dir():
                raise FileNotFoundError(
                    f"calibration.external_rms.{name}: {spec} is a file; give the directory save_pretrained wrote "
                    "(config.json + weights + tokenizer), a PEFT adapter directory or a hub id"
                )
            path = str(local.resolve())
        elif is_hub_id(spec):
            path = spec
        else:
            raise FileNotFoundError(
                f"calibration.external_rms.{name}: {spec} is neither an existing directory nor a hub id (owner/name); "
                "fix the path"
            )
        out[name] = {"path": path, "method": "external", "sources": [], "external": True}
    return out


def check_external_rm(name: str, path: str, trust_remote_code: bool) -> str | None:
    """Fail clearly unless `path` is a scalar-head sequence classifier (or a SEQ_CLS adapter on one).

    Returns the directory/hub id to load the tokenizer from (an adapter without its own tokenizer: its base).
    """
    from transformers import AutoConfig

    def fail(problem: str):
        return ValueError(f"calibration: external reward model {name!r} ({path}): {problem}. {SUPPORTED_RMS}")

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        try:
            acfg = json.loads(adapter.read_text())
        except json.JSONDecodeError as e:
            raise fail(f"adapter_config.json is not valid JSON ({e})") from e
        if acfg.get("task_type") != "SEQ_CLS":
            raise fail(
                f"it is a PEFT adapter with task_type {acfg.get('task_type')!r}, not SEQ_CLS (sequence classification)"
            )
        base = acfg.get("base_model_name_or_path")
        if not base:
            raise fail("its adapter_config.json has no base_model_name_or_path")
        has_tok = any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return path if has_tok else base
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - one clear message whatever broke inside transformers
        from pipeline.models import ModelLoadError, check_model_source, hub_error

        key = f"calibration.external_rms.{name}"
        check_model_source(path, key=key)  # the precise reason, when it is one: no config.json, invalid JSON, ...
        if not Path(path).is_dir():
            raise hub_error(path, key, e) from None
        raise ModelLoadError(
            f"calibration: external reward model {name!r} at {path}: its config does not load "
            f"({type(e).__name__}: {e}). {SUPPORTED_RMS}"
        ) from e
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise fail(
            "its config.json names no architecture, so it cannot be told from a language model whose "
            'reward head would be randomly initialised (add e.g. "architectures": '
            '["LlamaForSequenceClassification"] if it is a sequence classifier)'
        )
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise fail(
            f"it is a {', '.join(archs)} checkpoint, not a sequence classifier (loading it as one would "
            "give a randomly initialised reward head)"
        )
    if getattr(config, "num_labels", 1) != 1:
        raise fail(f"its head has num_labels={config.num_labels} outputs, not a single scalar reward")
    return path


def load_rm(name: str, entry: dict, cfg: CalibrationConfig, device):
    """(model, tokenizer) of one RM, on `device`, in eval mode; one clear error when it does not load."""
    import torch

    from pipeline.models import (
        ModelLoadError,
        check_model_source,
        copy_pad_token_id,
        load_reward_model,
        load_tokenizer,
    )

    path = entry["path"]
    external = bool(entry.get("external"))
    tok_path = path
    if external:
        tok_path = check_external_rm(name, path, cfg.trust_remote_code)
        check_model_source(path, key=f"calibration.external_rms.{name}")  # weights, an adapter's base
    elif not Path(path).is_dir():
        raise FileNotFoundError(
            f"calibration: reward model {name!r}: directory {path} does not exist (listed in DIR/reward/index.json); "
            "rerun the reward stage or fix the path"
        )
    load_dtype = cfg.load_dtype
    if load_dtype == "auto":
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        load_dtype = "bfloat16" if cuda_bf16 else "float32"
    try:
        tok = load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
        model = load_reward_model(
            path, dtype=getattr(torch, load_dtype), bits=cfg.bits, trust_remote_code=cfg.trust_remote_code
        )
        copy_pad_token_id(model, tok, key=f"calibration: reward model {name!r} ({path})")
    except Exception as e:  # noqa: BLE001 - one clear message whatever broke inside transformers
        expected = (
            SUPPORTED_RMS
            if external
            else "Expected a save_pretrained directory with config.json, model "
            "weights and a tokenizer, as the reward stage writes."
        )
        if isinstance(e, ModelLoadError):
            raise ModelLoadError(f"calibration: reward model {name!r}: {e}") from None
        raise ModelLoadError(
            f"calibration: reward model {name!r} at {path} does not load ({type(e).__name__}: {e}). {expected}"
        ) from e
    if external:
        from pipeline.reward.trainer import find_reward_head

        try:
            head = find_reward_head(model)
        except ValueError as e:
            raise ValueError(f"calibration: external reward model {name!r} ({path}): {e}. {SUPPORTED_RMS}") from e
        out = getattr(head, "out_features", None)
        if out is None and hasattr(head, "modules_to_save"):  # a PEFT ModulesToSaveWrapper
            out = getattr(getattr(head, "original_module", None), "out_features", None)
        if out not in (None, 1):
            raise ValueError(
                f"calibration: external reward model {name!r} ({path}): its reward head has {out} "
                f"outputs, not one. {SUPPORTED_RMS}"
            )
    if not cfg.bits:
        model = model.to(device)
    model.eval()
    return model, tok


def score_rm(model, tok, data: dict, cfg: CalibrationConfig, max_length: int | None, state=None) -> dict:
    """{source: {split: (r_chosen, r_rejected)}} for every split in `data`, in one sorted scoring pass.

    Under several processes every rank scores a contiguous shard and the shards are gathered.
    """
    import torch

    from pipeline.scoring import score_pairs

    keys, prompts, chosen, rejected, convs = [], [], [], [], []
    for source, by_split in data.items():
        for split, ds in by_split.items():
            if ds is None:
                continue
            keys.append((source, split, len(ds)))
            prompts += list(ds["prompt"])
            chosen += list(ds["chosen"])
            rejected += list(ds["rejected"])
            # conversational rows: rendered with the RM's chat template (pipeline.data.render)
            convs += list(ds["conversation"]) if "conversation" in ds.column_names else [""] * len(ds)
    n = len(prompts)
    dtype = AUTOCAST[cfg.dtype]
    dtype = getattr(torch, dtype) if dtype not in (None, "auto") else dtype
    kwargs = dict(
        max_length=max_length,
        batch_size=cfg.batch_size,
        max_tokens_per_batch=cfg.max_tokens_per_batch,
        dtype=dtype,
        progress=cfg.progress,
    )
    world = state.num_processes if state is not None else 1
    if world > 1:
        from accelerate.utils import gather_object

        bounds = np.linspace(0, n, world + 1).astype(int)
        lo, hi = bounds[state.process_index], bounds[state.process_index + 1]
        part = (
            score_pairs(
                model, tok, prompts[lo:hi], chosen[lo:hi], rejected[lo:hi], conversations=convs[lo:hi], **kwargs
            )
            if hi > lo
            else ([], [])
        )
        shards = gather_object([(int(lo), np.asarray(part[0]).tolist(), np.asarray(part[1]).tolist())])
        rc, rr = np.empty(n), np.empty(n)
        for start, c, r in shards:
            rc[start : start + len(c)], rr[start : start + len(r)] = c, r
    else:
        rc, rr = score_pairs(model, tok, prompts, chosen, rejected, conversations=convs, **kwargs)
    out: dict = {}
    start = 0
    for source, split, size in keys:
        out.setdefault(source, {})[split] = (rc[start : start + size], rr[start : start + size])
        start += size
    return out


def check_finite_rewards(name: str, entry: dict, by_source: dict) -> None:
    """One clear error naming the RM when any of its rewards is NaN or inf (corrupt weights, a diverged run)."""
    bad = [
        (source, split, int((~(np.isfinite(rc) & np.isfinite(rr))).sum()), len(rc))
        for source, by_split in by_source.items()
        for split, (rc, rr) in by_split.items()
    ]
    n_bad, n = sum(b[2] for b in bad), sum(b[3] for b in bad)
    if n_bad:
        source, split = next((b[0], b[1]) for b in bad if b[2])
        raise ValueError(
            f"calibration: reward model {name!r} at {entry.get('path')} gives a non-finite reward (NaN or inf) for "
            f"{n_bad} of {n} pairs (first in source {source!r}, {split} split): its weights are corrupt or its "
            "training diverged. Fix: retrain it (pipeline.run ... --force reward), or leave it out with calibration.rms"
        )


def averaging_rewards(rewards: dict, members: list[str]) -> dict:
    """The Averaging RM: per pair, the mean reward of the member RMs (same sources and splits)."""
    out: dict = {}
    for source, by_split in rewards[members[0]].items():
        for split in by_split:
            rc = np.mean([rewards[m][source][split][0] for m in members], axis=0)
            rr = np.mean([rewards[m][source][split][1] for m in members], axis=0)
            out.setdefault(source, {})[split] = (rc, rr)
    return out


# --------------------------------------------------------------------------------------------------
# Metrics, tables, diversity
# --------------------------------------------------------------------------------------------------
def source_metrics(rc, rr, ds, cfg: CalibrationConfig, temperature: float | None, seed: int) -> dict:
    """all_metrics before (and after) temperature scaling, with truth metrics on synthetic data."""
    cols = set(ds.column_names)
    kw = dict(
        n_bins=cfg.n_bins,
        strategy=cfg.strategy,
        bootstrap_samples=cfg.bootstrap_samples,
        seed=seed,
        headline_bins=cfg.headline_bins,
    )
    true_prob = np.asarray(ds["true_prob"], dtype=np.float64) if "true_prob" in cols else None
    gold_prob = np.asarray(ds["gold_prob"], dtype=np.float64) if "gold_prob" in cols else None

    def block(t: float) -> dict:
        m = M.all_metrics(rc, rr, temperature=t, true_prob=true_prob, **kw)
        if gold_prob is not None:
            m["truth_gold"] = M.truth_metrics(rc, rr, gold_prob, cfg.headline_bins, cfg.strategy, t)
        return m

    out = block(1.0)
    if temperature is not None:
        out["temperature_scaled"] = block(temperature)
    return out


def rm_metrics(per_source: dict, hh: list[str]) -> dict:
    """{source: {...}, "hh_average": {...}, "all_average": {...}} for one RM."""
    out = dict(per_source)
    entries = list(per_source.values())
    if hh:
        out["hh_average"] = _average_with_ts([per_source[s] for s in hh])
        out["hh_average"]["sources"] = list(hh)
    out["all_average"] = _average_with_ts(entries)
    out["all_average"]["sources"] = list(per_source)
    return out


def _average_with_ts(entries: list[dict]) -> dict:
    avg = M.average_metrics(entries)
    if all("temperature_scaled" in e for e in entries):
        avg["temperature_scaled"] = M.average_metrics([e["temperature_scaled"] for e in entries])
    return avg


def compare_rms(
    a: dict,
    b: dict,
    data: dict,
    sources: list[str],
    hh: list[str],
    cfg: CalibrationConfig,
    seed: int,
    temperatures: tuple[float, float] | None,
) -> dict:
    """comparisons.json entry of one '<a> vs <b>': paired bootstrap over the same test pairs of every source."""

    def probs(col: str) -> dict | None:
        if not all(col in data[s]["test"].column_names for s in sources):
            return None
        return {s: np.asarray(data[s]["test"][col], dtype=np.float64) for s in sources}

    out = paired_bootstrap(
        {s: a[s]["test"] for s in sources},
        {s: b[s]["test"] for s in sources},
        sources=sources,
        hh=hh,
        headline_bins=cfg.headline_bins,
        strategy=cfg.strategy,
        temperatures=temperatures,
        true_prob=probs("true_prob"),
        gold_prob=probs("gold_prob"),
        n_samples=cfg.bootstrap_samples,
        seed=seed,
    )
    keys = metric_keys(cfg.headline_bins, temperatures is not None, True, True)
    return {group: {k: by_metric[k] for k in keys if k in by_metric} for group, by_metric in out.items()}


def diversity_analysis(index: dict, rewards: dict, sources: list[str], cfg: CalibrationConfig) -> dict | None:
    """Cross matrix of the single-source RMs: rows trained on source i, columns tested on source j."""
    singles = []
    for name, entry in index.items():
        if entry.get("method") == "single" and name in rewards:
            trained = entry["sources"][0] if entry.get("sources") else name.removeprefix("single-")
            singles.append((name, trained))
    if not singles:
        return None
    acc = [[M.accuracy(*rewards[n][s]["test"]) for s in sources] for n, _ in singles]
    ece = [
        [M.pairwise_ece(*rewards[n][s]["test"], cfg.headline_bins, cfg.strategy) for s in sources] for n, _ in singles
    ]
    return {
        "rms": [n for n, _ in singles],
        "trained_on": [t for _, t in singles],
        "tested_on": list(sources),
        "accuracy": acc,
        f"ece_{cfg.headline_bins}": ece,
    }


def more_trajectories(rm_path: str) -> dict:
    """{source: (steps, lambdas)} from <rm dir>/train_log.json entries with `more/lambda/<source>` keys."""
    log_path = Path(rm_path) / "train_log.json"
    if not log_path.is_file():
        return {}
    try:
        log = json.loads(log_path.read_text())
    except json.JSONDecodeError:
        return {}
    if isinstance(log, dict):
        log = log.get("log_history", [])
    out: dict = {}
    for i, entry in enumerate(log if isinstance(log, list) else []):
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if key.startswith("more/lambda/") and isinstance(value, (int, float)):
                steps, vals = out.setdefault(key[len("more/lambda/") :], ([], []))
                steps.append(entry.get("step", i))
                vals.append(float(value))
    return out


def _f(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def render_table(
    metrics: dict,
    temperatures: dict,
    sources: list[str],
    hh: list[str],
    cfg: CalibrationConfig,
    diversity: dict | None,
) -> str:
    """calibration/table.md: the paper's Table 2 and Table 1 layouts, before and after temperature scaling."""
    h = cfg.headline_bins
    ece = f"ece_{h}"
    rms = list(metrics)
    lines = ["# Reward-model calibration", ""]
    lines += [
        f"ECE: the paper's symmetrized ECE with {h} {cfg.strategy} bins (lower is better); accuracy in %, "
        "reward ties count half. Averages are unweighted means over sources.",
        "",
    ]

    def table2(key: str | None, title: str):
        lines.append(f"## {title}")
        lines.append("")
        lines.append("| RM | " + " | ".join(sources) + " | Avg. acc | ECE |")
        lines.append("|---" * (len(sources) + 3) + "|")
        for rm in rms:
            get = (lambda d: d[key]) if key else (lambda d: d)
            row = [_pct(get(metrics[rm][s])["accuracy"]) for s in sources]
            avg = get(metrics[rm]["all_average"])
            lines.append(f"| {rm} | " + " | ".join(row) + f" | {_pct(avg['accuracy'])} | {_f(avg[ece])} |")
        lines.append("")

    def ece_rows(key: str | None, title: str):
        lines.append(f"## {title}")
        lines.append("")
        lines.append("| RM | " + " | ".join(sources) + " | Avg. |")
        lines.append("|---" * (len(sources) + 2) + "|")
        for rm in rms:
            get = (lambda d: d[key]) if key else (lambda d: d)
            row = [_f(get(metrics[rm][s])[ece]) for s in sources]
            lines.append(f"| {rm} | " + " | ".join(row) + f" | {_f(get(metrics[rm]['all_average'])[ece])} |")
        lines.append("")

    table2(None, "Table 2 layout: test accuracy (%) per source, average, and average ECE")
    ece_rows(None, f"ECE (M={h}) per source")
    if hh:
        lines.append(f"## Table 1 layout: Helpful & Harmless average ({', '.join(hh)})")
        lines.append("")
        ts = bool(temperatures)
        lines.append("| RM | H&H acc | H&H ECE |" + (" H&H ECE (temperature-scaled) |" if ts else ""))
        lines.append("|---|---|---|" + ("---|" if ts else ""))
        for rm in rms:
            a = metrics[rm]["hh_average"]
            row = f"| {rm} | {_pct(a['accuracy'])} | {_f(a[ece])} |"
            if ts:
                row += f" {_f(a['temperature_scaled'][ece])} |"
            lines.append(row)
        lines.append("")
    if temperatures:
        lines.append("## Temperature scaling (T fitted on the validation pairs of all sources)")
        lines.append("")
        lines.append("Accuracy does not change (dividing rewards by T > 0 keeps every sign).")
        lines.append("")
        lines.append("| RM | T | ECE before | ECE after | NLL before | NLL after | Brier before | Brier after |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for rm in rms:
            a = metrics[rm]["all_average"]
            b = a["temperature_scaled"]
            lines.append(
                f"| {rm} | {_f(temperatures[rm], 3)} | {_f(a[ece])} | {_f(b[ece])} | {_f(a['nll'])} | "
                f"{_f(b['nll'])} | {_f(a['brier'])} | {_f(b['brier'])} |"
            )
        lines.append("")
        table2("temperature_scaled", "Table 2 layout after temperature scaling")
        ece_rows("temperature_scaled", f"ECE (M={h}) per source after temperature scaling")
    if any("truth" in metrics[rm][s] for rm in rms for s in sources):
        key = f"ece_vs_truth_{h}"
        lines.append("## Against the truth (synthetic benchmark)")
        lines.append("")
        lines.append(
            "`truth`: each pair's true preference probability under its source's own utility (what the "
            "label was drawn from); `gold`: the probability under the shared gold reward r*. MAE = mean "
            "|p_RM - p_true|; ECE vs truth bins p_RM and compares with the mean true probability."
        )
        lines.append("")
        lines.append("| RM | " + " | ".join(sources) + " | Avg. MAE | Avg. ECE vs truth | Avg. MAE vs gold |")
        lines.append("|---" * (len(sources) + 4) + "|")
        for rm in rms:
            row = [_f(metrics[rm][s].get("truth", {}).get("prob_mae")) for s in sources]
            a = metrics[rm]["all_average"]
            lines.append(
                f"| {rm} | " + " | ".join(row) + f" | {_f(a.get('truth', {}).get('prob_mae'))} | "
                f"{_f(a.get('truth', {}).get(key))} | {_f(a.get('truth_gold', {}).get('prob_mae'))} |"
            )
        lines.append("")
        lines.append("(per-source cells: MAE vs the true probability)")
        lines.append("")
    if cfg.bootstrap_samples:
        lines.append(f"## 95% bootstrap intervals ({cfg.bootstrap_samples} resamples of the test pairs)")
        lines.append("")
        lines.append("| RM | source | accuracy (%) | ECE |")
        lines.append("|---|---|---|---|")
        for rm in rms:
            for s in sources:
                iv = metrics[rm][s]["intervals"]
                lines.append(
                    f"| {rm} | {s} | {_pct(iv['accuracy'][0])} - {_pct(iv['accuracy'][1])} | "
                    f"{_f(iv[ece][0])} - {_f(iv[ece][1])} |"
                )
        lines.append("")
    if diversity:
        for key, fmt in (("accuracy", _pct), (ece, _f)):
            lines.append(f"## Diversity: {key} of single-source RMs (row: trained on, column: tested on)")
            lines.append("")
            lines.append("| trained on \\ tested on | " + " | ".join(diversity["tested_on"]) + " |")
            lines.append("|---" * (len(diversity["tested_on"]) + 1) + "|")
            for t, row in zip(diversity["trained_on"], diversity[key]):
                lines.append(f"| {t} | " + " | ".join(fmt(v) for v in row) + " |")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def _max_length(recipe, cfg: CalibrationConfig) -> int | None:
    if cfg.max_length is not None:
        return cfg.max_length
    return getattr(getattr(recipe, "data", None), "max_length", 512)


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Evaluate every RM of DIR/reward/index.json and calibration.external_rms; returns the artifact paths
    relative to run_dir. Every external RM is scored by the same `score_rm` as the trained ones."""
    import torch
    from accelerate import PartialState

    from pipeline.io import UnsafePathError, atomic_dir, atomic_write_json, atomic_write_text, inside

    run_dir = Path(run_dir)
    cfg = getattr(recipe, "calibration", None) or CalibrationConfig()
    seed = cfg.seed if cfg.seed is not None else int(getattr(recipe, "seed", 0))
    # a shared singleton: under pipeline.run this returns the orchestrator's state; alone under torchrun
    # on CPU, cpu=True makes it a gloo process group instead of N independent single processes
    state = PartialState(cpu=not torch.cuda.is_available())
    # Trained RMs come from DIR/reward/index.json; a run that only evaluates external RMs needs none.
    trained_needed = cfg.rms is not None or not cfg.external_rms
    if trained_needed and not (run_dir / "reward" / "index.json").is_file():
        raise FileNotFoundError(
            f"calibration: {run_dir / 'reward' / 'index.json'} not found; run the reward stage first "
            "(python -m pipeline.reward), or name reward models trained elsewhere in calibration.external_rms "
            "(see the rm-eval recipe)"
        )
    index = (
        read_index(run_dir, cfg.rms, key="calibration.rms")
        if trained_needed or (run_dir / "reward" / "index.json").is_file()
        else {}
    )
    external = external_entries(cfg, list(index))
    singles = [n for n, e in index.items() if e.get("method") == "single"]
    with_averaging = cfg.averaging and len(singles) >= 2
    names = [*index, *external] + ([AVERAGING] if with_averaging else [])
    comparisons = resolve_comparisons(cfg.compare, names)  # fails before any scoring on an unknown name
    stats: dict = {}
    data = eval_splits(recipe, cfg, stats)
    if state.is_main_process:
        from pipeline.data.mixing import describe_data_stats

        for line in describe_data_stats(stats):
            print(f"[calibration] data {line}")
    # Pairs whose prompt an RM was trained on (its train_prompts.json): counted per RM, excluded by default.
    records = train_prompt_records({**index, **external}, singles, with_averaging)
    hashes = _prompt_hashes(data)
    overlap = {rm: overlap_counts(hashes, seen) for rm, seen in records.items()}
    synthetic = {sp.name for sp in getattr(getattr(recipe, "data", None), "sources", []) if sp.format == "synthetic"}
    if state.is_main_process:
        _report_overlap(overlap, data, cfg.exclude_train_overlap, synthetic)
    excluded: dict = {}
    if cfg.exclude_train_overlap:
        seen_by_any = set().union(*(r for r in records.values() if r is not None))
        data, excluded = drop_seen_prompts(data, hashes, seen_by_any, keep_sources=synthetic)
        for s, by_split in data.items():
            for sp, ds in by_split.items():
                if ds is None or len(ds) > 0:
                    continue
                if sp == "validation" and not cfg.temperature_scaling:
                    by_split[sp] = None
                    continue
                fix = "or set calibration.temperature_scaling=false, " if sp == "validation" else ""
                raise ValueError(
                    f"calibration: every {sp} pair of source {s!r} has a prompt that an evaluated RM was trained on "
                    "(its train_prompts.json), so none is left. Fix: evaluate on data the RMs never saw (for a "
                    "file they were trained on: the training run's data.test_fraction and data.valid_fraction, "
                    f"which select exactly its unseen test and validation prompts), {fix}or set "
                    "calibration.exclude_train_overlap=false to score them anyway (inflated)"
                )
    sources = list(data)
    hh = hh_sources(sources, cfg)
    max_length = _max_length(recipe, cfg)

    # 1. Score every RM on every test (and validation) split (data-parallel under several processes).
    rewards: dict = {}
    for name, entry in {**index, **external}.items():
        model, tok = load_rm(name, entry, cfg, state.device)
        rewards[name] = score_rm(model, tok, data, cfg, max_length, state)
        del model
        check_finite_rewards(name, entry, rewards[name])
    if with_averaging:
        rewards[AVERAGING] = averaging_rewards(rewards, singles)

    if not state.is_main_process:
        state.wait_for_everyone()
        return []

    # 2. Temperatures, metrics, diversity.
    temperatures, fits = {}, {}
    if cfg.temperature_scaling:
        for rm, by_source in rewards.items():
            rc = np.concatenate([by_source[s]["validation"][0] for s in sources])
            rr = np.concatenate([by_source[s]["validation"][1] for s in sources])
            fit = fit_temperature(rc, rr)
            temperatures[rm], fits[rm] = fit.temperature, fit.to_dict()
    metrics = {
        rm: rm_metrics(
            {
                s: source_metrics(*by_source[s]["test"], data[s]["test"], cfg, temperatures.get(rm), seed)
                for s in sources
            },
            hh,
        )
        for rm, by_source in rewards.items()
    }
    for rm in metrics:
        metrics[rm]["train_overlap"] = {
            **overlap[rm],
            "excluded": cfg.exclude_train_overlap,
            "kept_sources": sorted(synthetic & set(sources)) if cfg.exclude_train_overlap else list(sources),
        }
    diversity = diversity_analysis(index, rewards, sources, cfg)
    compared = {
        label: compare_rms(
            rewards[a],
            rewards[b],
            data,
            sources,
            hh,
            cfg,
            seed,
            (temperatures[a], temperatures[b]) if temperatures else None,
        )
        for label, (a, b) in comparisons.items()
    }

    # 3. Write DIR/calibration/ atomically (and each RM dir's temperature.json).
    out_dir = run_dir / "calibration"
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "table.md", render_table(metrics, temperatures, sources, hh, cfg, diversity))
        atomic_write_json(
            tmp / "config.json",
            {
                **asdict(cfg),
                "max_length_used": max_length,
                "seed_used": seed,
                "rms": list(rewards),
                "sources": sources,
                "hh_sources": hh,
                "external": {n: e["path"] for n, e in external.items()},
                "comparisons": list(compared),
                "train_overlap_excluded": excluded,
                "data_stats": stats,
            },
        )
        if compared:
            atomic_write_json(tmp / "comparisons.json", compared)
            atomic_write_text(tmp / "comparisons.md", render_comparisons(compared, cfg.bootstrap_samples))
        if cfg.temperature_scaling:
            atomic_write_json(tmp / "temperatures.json", temperatures)
            atomic_write_json(tmp / "temperature_fits.json", fits)
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
        if diversity:
            atomic_write_json(tmp / "diversity.json", diversity)
        if cfg.plots:
            _plots(tmp, index, rewards, sources, temperatures, diversity, cfg)
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    artifacts = [f"calibration/{n}" for n in written]
    for rm, t in temperatures.items():
        if rm in index:
            try:  # an index entry may name an RM directory outside this run: never write there
                inside(run_dir, Path(index[rm]["path"]) / "temperature.json")
            except UnsafePathError:
                print(
                    f"[calibration] {rm}: not writing temperature.json into {index[rm]['path']} (outside the run "
                    f"directory {run_dir}); its temperature is in calibration/temperatures.json"
                )
                continue
            atomic_write_json(
                Path(index[rm]["path"]) / "temperature.json",
                {"temperature": t, **fits[rm], "fitted_on": "validation", "sources": sources},
            )
            rel = Path(index[rm]["path"]) / "temperature.json"
            try:
                artifacts.append(str(rel.relative_to(run_dir)))
            except ValueError:
                artifacts.append(str(rel))
    state.wait_for_everyone()
    return artifacts


def _plots(out: Path, index: dict, rewards: dict, sources: list[str], temperatures: dict, diversity, cfg) -> None:
    from pipeline.calibration import plots
    from pipeline.io import safe_component

    test = {rm: {s: by_source[s]["test"] for s in sources} for rm, by_source in rewards.items()}
    plots.reliability_diagram(test, out / "reliability.png", n_bins=cfg.headline_bins, strategy=cfg.strategy)
    if temperatures:
        plots.reliability_diagram(
            test,
            out / "reliability_temperature_scaled.png",
            n_bins=cfg.headline_bins,
            strategy=cfg.strategy,
            temperatures=temperatures,
            title="Reliability after temperature scaling",
        )
    plots.reward_difference_histograms(test, out / "reward_differences.png")
    for rm, entry in index.items():
        traj = more_trajectories(entry["path"])
        if plots.has_learned_weights(entry.get("method", ""), traj):  # not uniform, multitask, single-source
            plots.more_weight_trajectories(
                traj, out / f"more_weights_{safe_component(rm)}.png", title=f"MORE source weights ({rm})"
            )
    if diversity:
        rows, cols = [f"{t} ({n})" for n, t in zip(diversity["rms"], diversity["trained_on"])], diversity["tested_on"]
        plots.heatmap(
            100 * np.asarray(diversity["accuracy"], dtype=np.float64),  # in %, as in every table
            rows,
            cols,
            out / "diversity_accuracy.png",
            title="Accuracy (%) of single-source RMs",
            fmt="{:.1f}",
            value_label="accuracy (%), higher is better",
        )
        plots.heatmap(
            diversity[f"ece_{cfg.headline_bins}"],
            rows,
            cols,
            out / "diversity_ece.png",
            title=f"ECE (M={cfg.headline_bins}) of single-source RMs",
            cmap="magma_r",
            value_label="ECE, lower is better",
        )


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the calibration section names besides the data sources: the external RMs."""
    return [(p, "model") for p in (section.get("external_rms") or {}).values()]


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    return "calibration: no optimizer steps", None
