"""What the RMs saved in a run directory were really trained with, read back from their own files (each RM's
fingerprint.json `inputs`, reward_info.json and train_log.json), never from the recipe of a later command:

- `recipe_mismatch(recipe, run_dir)`: the recipe keys an RM's fingerprint covers (reward.train.*, reward.*,
  data.max_length, data.per_source_batch, seed) whose value in `recipe` differs from what the saved RMs
  record. The orchestrator refuses to rerun a stage that consumes these RMs on such a recipe (`pipeline.plan`).
- `training_settings(run_dir)`: each RM's learning rate, length, method options, data and truncation, for the
  report's "What ran".

Keys the machine sets (`use_cpu`, and `bf16` where the recipe leaves it to the CPU default) and keys derived
from the RM itself (method, sources, output directory) are not compared. A key unset on one side counts as its
MORERewardConfig default. May import: pipeline leaves and `pipeline.reward.*`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from pipeline.reward.fingerprint import (
    FINGERPRINT,
    METHOD_ONLY_TRAIN_ARGS,
    read_section,
    read_train_args,
    rm_training_args,
)
from pipeline.reward.index import read_index


# Training arguments the pipeline derives from the RM itself (its name, method and sources), never set by a recipe.
_DERIVED = frozenset({"method", "source_names", "balanced_batches", "disable_tqdm", "output_dir", "use_cpu"})
# Training arguments the pipeline fills from other recipe keys.
_RECIPE_KEY = {"max_length": "data.max_length", "per_device_train_batch_size": "data.per_source_batch", "seed": "seed"}


@functools.cache
def train_defaults() -> dict:
    """MORERewardConfig's field defaults (what an unset reward.train key means)."""
    from pipeline.reward.trainer import MORERewardConfig

    out = {}
    for f in dataclasses.fields(MORERewardConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return _plain(out)


def _plain(value):
    """JSON-shaped, so a value read back from fingerprint.json compares equal to the recipe's."""
    return json.loads(json.dumps(value, default=str))


def read_fingerprint(rm_path: Path) -> dict | None:
    """The `inputs` an RM's fingerprint.json records, or None (missing, unreadable, trained by an old version)."""
    try:
        inputs = json.loads((Path(rm_path) / FINGERPRINT).read_text(encoding="utf-8")).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None
    return inputs if isinstance(inputs, dict) and isinstance(inputs.get("train_args"), dict) else None


def saved_rms(run_dir: Path) -> dict[str, dict]:
    """{RM name: the inputs its fingerprint.json records} for every RM of DIR/reward/index.json that has one."""
    try:
        index = read_index(run_dir)
    except (FileNotFoundError, ValueError):
        return {}
    out = {}
    for name, entry in index.items():
        inputs = read_fingerprint(entry["path"])
        if inputs is not None:
            out[name] = inputs
    return out


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _train_items(args: dict, method: str, n_sources: int, explicit_bf16: bool) -> dict:
    """{recipe key: value} of the training arguments an RM of `method` reads, defaults filled in."""
    defaults = train_defaults()
    out = {}
    for k, v in args.items():
        if k in _DERIVED or (k == "bf16" and not explicit_bf16):
            continue
        if method not in METHOD_ONLY_TRAIN_ARGS.get(k, (method,)):
            continue  # recorded by an older version: not read by this RM's method
        if k == "per_device_train_batch_size":
            v = v // max(n_sources, 1) if isinstance(v, int) else v
        out[_RECIPE_KEY.get(k, f"reward.train.{k}")] = v
    for k in set(defaults) - set(args) - _DERIVED:
        if method in METHOD_ONLY_TRAIN_ARGS.get(k, (method,)) and (k != "bf16" or explicit_bf16):
            out.setdefault(_RECIPE_KEY.get(k, f"reward.train.{k}"), defaults[k])
    return out


def _settings(inputs: dict, explicit_bf16: bool) -> dict:
    """{recipe key: value} an RM's fingerprint inputs stand for (the keys a recipe sets)."""
    method, n = inputs.get("method", ""), len(inputs.get("sources") or [])
    out = _train_items(_plain(inputs.get("train_args") or {}), method, n, explicit_bf16)
    out.update(_flat(read_section(_plain(inputs.get("reward") or {})), "reward."))
    if "seed" in inputs:
        out["seed"] = inputs["seed"]
    return out


def recipe_mismatch(recipe, run_dir: Path) -> list[dict]:
    """[{"key", "recipe": value, "recorded": {value as JSON: [RM names]}}] for every recipe key an RM's
    fingerprint covers whose value in `recipe` differs from what a saved RM records; [] when they agree (or no
    RM is saved)."""
    explicit_bf16 = "bf16" in (recipe.reward.train or {})
    found: dict[str, dict] = {}
    for name, inputs in saved_rms(run_dir).items():
        method, sources = inputs.get("method", ""), list(inputs.get("sources") or [])
        if method == "dpo":  # a dpo policy reads reward.dpo (and the seed), no reward.train key
            old = {**_flat(_plain(inputs.get("dpo") or {}), "reward.dpo."), "seed": inputs.get("seed")}
            new = {**_flat(_plain(dataclasses.asdict(recipe.reward.dpo)), "reward.dpo."), "seed": recipe.seed}
        else:
            args = rm_training_args(recipe, Path(run_dir), name, method, sources)
            now = {
                "method": method,
                "sources": sources,
                "train_args": read_train_args(args, method),
                "reward": read_section(dataclasses.asdict(recipe.reward)),
                "seed": recipe.seed,
            }
            old, new = _settings(inputs, explicit_bf16), _settings(_plain(now), explicit_bf16)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                rec = found.setdefault(key, {"key": key, "recipe": new.get(key), "recorded": {}})
                rec["recorded"].setdefault(json.dumps(old.get(key)), []).append(name)
    return list(found.values())


# ---------------------------------------------------------------------------------------------------
# For the report: each RM's real training settings


def _steps_run(rm_path: Path) -> int | None:
    """Optimizer steps the RM's training ran (the last step of its train_log.json), or None."""
    try:
        log = json.loads((Path(rm_path) / "train_log.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    steps = [e.get("step") for e in log if isinstance(e, dict) and isinstance(e.get("step"), int)]
    return max(steps) if steps else None


def _method_options(method: str, args: dict) -> str:
    if method == "dpo":
        return f"DPO (TRL's DPOTrainer, beta {args.get('beta')}, sigmoid loss) from and against DIR/policy"
    if method == "more":
        return f"MORE weights (alpha {args.get('alpha')}, normalize {args.get('normalize')}), balanced batches"
    if method == "uniform":
        return "equal source weights, balanced batches"
    return "one mixture (concatenated, shuffled)"


def training_settings(run_dir: Path) -> dict[str, dict]:
    """{RM name: {"method", "learning_rate", "schedule", "length", "batch", "options", "data", "truncation",
    "seed"}} (strings) from each RM's own fingerprint.json inputs, reward_info.json and train_log.json;
    {"recorded": False} for an RM without a readable fingerprint.json."""
    try:
        index = read_index(run_dir)
    except (FileNotFoundError, ValueError):
        return {}
    defaults = train_defaults()
    out = {}
    for name, entry in index.items():
        inputs = read_fingerprint(entry["path"])
        if inputs is None:
            out[name] = {"recorded": False}
            continue
        args = {**defaults, **_plain(inputs["train_args"])}
        method = inputs.get("method", "")
        try:
            info = json.loads((Path(entry["path"]) / "reward_info.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        steps = _steps_run(entry["path"])
        epochs = args["num_train_epochs"]
        length = (
            f"{args['max_steps']} max steps" if args["max_steps"] > 0 else f"{epochs:g} epoch{'s' * (epochs != 1)}"
        )
        sources = inputs.get("sources") or []
        out[name] = {
            "recorded": True,
            "method": method,
            "learning_rate": f"{args['learning_rate']:g}",
            "schedule": f"{args['lr_scheduler_type']}, warmup {args['warmup_steps']:g}",
            "length": length + (f" ({steps} steps run)" if steps is not None else ""),
            "batch": f"{args['per_device_train_batch_size']} pairs"
            + (f" x {args['gradient_accumulation_steps']}" if args.get("gradient_accumulation_steps", 1) > 1 else ""),
            "options": _method_options(method, args),
            "data": f"{info.get('n_train_pairs', inputs.get('train_rows', '?'))} pairs from {len(sources)} source(s)",
            "truncation": f"max_length {args['max_length']}, "
            + (f"TRL {args.get('truncation_mode')}" if method == "dpo" else str(args["truncation"])),
            "seed": str(inputs.get("seed", "?")),
        }
    return out
