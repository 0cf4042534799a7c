"""What an RM is trained from, and its fingerprint: `plan_rm` gathers one RM's inputs (its training settings,
the reward section, the training rows actually used, the tokenizer with its chat template text, the base
model's identity, the seed, the world size) into an `RMPlan` whose fingerprint is `sha256_json(inputs)`;
`stale_reason` says why a saved RM cannot be reused (its inputs changed: a readable diff; its files changed);
the tiny base model's fingerprint (`tiny_base_fingerprint`) says when DIR/reward/.base is rebuilt.

The values are stored in every RM directory (fingerprint.json): a change of the payload retrains every saved
RM, so it comes with a TRAINING_CODE_VERSION bump (tests/test_reward_stage.py pins the values of fixed inputs).

May import: pipeline leaves, `pipeline.reward.config`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.io import changed_files, content_sha256, hub_revision, safe_component, sha256_json
from pipeline.reward.config import tiny_chat_template


# Bump when a change to the training code changes what an RM trained from the same inputs looks like, and say
# why in VERSION_NOTES: an RM trained by an older version is retrained with that line as the reason.
TRAINING_CODE_VERSION = 3
VERSION_NOTES = {
    3: "over-length pairs are handled by the explicit reward.train.truncation (left, the pipeline's default; "
    "MORERewardTrainer alone now drops them as TRL does), and an RM's fingerprint covers only the settings its "
    "training reads (MORE's alpha and normalize only for MORE, the LoRA keys only with reward.peft)",
}
FINGERPRINT = "fingerprint.json"
# Training arguments that cannot change the trained weights (so changing them reuses RMs and checkpoints).
_NOT_FINGERPRINTED = frozenset(
    {
        "output_dir",
        "logging_dir",
        "report_to",
        "disable_tqdm",
        "run_name",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "dataloader_num_workers",
    }
)


# Training arguments only some methods read: an RM of another method does not depend on them, so changing one
# (reward.train.normalize) does not retrain the MultiTask, Uniform and single-source RMs.
METHOD_ONLY_TRAIN_ARGS = {"alpha": ("more",), "normalize": ("more",)}
# Keys of the reward section that only some settings read: the LoRA keys only with reward.peft != none.
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def read_train_args(args: dict, method: str) -> dict:
    """The training arguments an RM of `method` depends on (its fingerprint's `train_args`): every argument but
    those that cannot change the weights (`_NOT_FINGERPRINTED`) and those its method does not read; a
    DeepSpeed config file by its content."""
    return {
        k: (_deepspeed_record(v) if k == "deepspeed" else v)
        for k, v in sorted(args.items())
        if k not in _NOT_FINGERPRINTED and method in METHOD_ONLY_TRAIN_ARGS.get(k, (method,))
    }


def read_section(section: dict) -> dict:
    """The reward section's keys an RM depends on (its fingerprint's `reward`): all but `methods` and `train`
    (covered per RM by `method` and `train_args`) and `dpo` (the dpo policy's own), and the LoRA keys only when
    reward.peft uses them."""
    unread = {"methods", "train", "dpo"} | (set(LORA_KEYS) if section.get("peft", "none") == "none" else set())
    return {k: v for k, v in section.items() if k not in unread}


def checkpoint_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "reward" / ".checkpoints" / safe_component(name)


def tiny_base_fingerprint(recipe, texts: list[str]) -> str:
    """What the tiny tokenizer and random base model in DIR/reward/.base are built from."""
    cfg = recipe.reward
    return sha256_json(
        {
            "tiny": asdict(cfg.tiny),
            "vocab_size": cfg.tokenizer_vocab_size,
            "seed": recipe.seed,
            "texts": sha256_json(texts),
            "chat_template": tiny_chat_template(recipe.reward),
        }
    )


def base_is_current(base: Path, fp: str, needed: str) -> bool:
    try:
        return (base / needed).exists() and json.loads((base / FINGERPRINT).read_text())["fingerprint"] == fp
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _dataset_sha256(ds) -> str:
    """sha256 of a dataset's rows, in order (what the trainer actually reads)."""
    import hashlib

    h = hashlib.sha256(json.dumps(ds.column_names).encode())
    for batch in ds.iter(batch_size=1024):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def _tokenizer_sha256(tokenizer) -> str:
    """The tokenizer's vocabulary and merges, special tokens, padding side and chat template TEXT (the
    template the RM renders conversations with, wherever it came from: a file, the recipe, the tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a slow (Python) tokenizer has none
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    rec = {"tokenizer": text, "special": special, "padding_side": tokenizer.padding_side}
    template = getattr(tokenizer, "chat_template", None)  # tokenizer-like objects (processors) may have none
    if template:  # only when set, so fingerprints of RMs without a template stay as they were
        rec["chat_template_sha256"] = sha256_json(template)
    return sha256_json(rec)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def base_model_record(base: str) -> dict:
    """The base model's identity: for a local directory its config and the size and sha256 of every weight
    file (content hashes cached by `pipeline.io.content_sha256`, so a large model is read once per change);
    for a hub id its name and the commit the local hub cache resolves it to (None when not cached)."""
    p = Path(base)
    if not p.is_dir():
        return {"path": base, "revision": hub_revision(base)}
    rec = {
        "config": json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else None,
        "weights": {
            f.relative_to(p).as_posix(): f"{f.stat().st_size} bytes, sha256 {content_sha256(f)}"
            for f in sorted(p.rglob("*"))
            if f.suffix in WEIGHT_SUFFIXES and f.is_file() and not f.relative_to(p).as_posix().startswith(".")
        },
    }
    if (p / FINGERPRINT).is_file():  # the tiny base: what it was built from
        rec["fingerprint"] = json.loads((p / FINGERPRINT).read_text()).get("fingerprint")
    return rec


def _deepspeed_record(value):
    if isinstance(value, str) and Path(value).is_file():
        return {"file_sha256": sha256_json(Path(value).read_text())}
    return value


@dataclass
class RMPlan:
    """Everything one RM is trained from, and its fingerprint."""

    name: str
    method: str
    sources: list[str]
    train: Any
    args: dict
    inputs: dict
    fingerprint: str


def rm_training_args(recipe, run_dir: Path, name: str, method: str, sources: list[str]) -> dict:
    """The MORERewardConfig arguments RM `name` trains with: the recipe's reward.train, the pipeline's defaults,
    and what the pipeline derives (method, sources, batch size from data.per_source_batch, data.max_length, the
    seed, the CPU defaults on a machine without CUDA)."""
    cfg, data = recipe.reward, recipe.data
    balanced = method in ("more", "uniform")
    cpu_defaults = {}
    if not torch.cuda.is_available():
        # use_cpu: without it torchrun/accelerate on CPU set up no gloo DDP; TRL's bf16 default fails on CPU.
        cpu_defaults = {"use_cpu": True, "bf16": cfg.train.get("bf16", False)}
    return cfg.training_args(
        dict(
            **cpu_defaults,
            output_dir=str(checkpoint_dir(run_dir, name)),
            method=method,
            source_names=sources,
            balanced_batches=balanced,
            per_device_train_batch_size=data.per_source_batch * len(sources),
            disable_tqdm=True,  # pipeline.logs' progress (a bar on a terminal, 10 lines in a log file) instead
            max_length=data.max_length,
            seed=recipe.seed,
        )
    )


def plan_rm(recipe, run_dir: Path, name: str, method: str, sources: list[str], splits, tokenizer, base: str) -> RMPlan:
    """RM `name`'s plan: its training rows (`sources` mixed as `method` mixes them), training arguments, and
    the fingerprint of everything it is trained from."""
    from accelerate import PartialState

    from pipeline.data import mix

    cfg, data = recipe.reward, recipe.data
    train = mix(
        {s: splits[s]["train"] for s in sources},
        "balanced" if method in ("more", "uniform") else "concat",
        n_per_source=data.n_train_per_source,
        per_source_batch=data.per_source_batch,
        seed=recipe.seed,
    )
    args = rm_training_args(recipe, run_dir, name, method, sources)
    inputs = {
        "training_code_version": TRAINING_CODE_VERSION,
        "method": method,
        "sources": list(sources),
        "train_args": read_train_args(args, method),
        "reward": read_section(asdict(cfg)),
        "train_rows": len(train),
        "train_data_sha256": _dataset_sha256(train),
        "tokenizer_sha256": _tokenizer_sha256(tokenizer),
        "base_model": base_model_record(base),
        "seed": recipe.seed,
        "world_size": PartialState().num_processes,
    }
    return RMPlan(name, method, list(sources), train, args, inputs, sha256_json(inputs))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def fingerprint_changes(old: dict, new: dict, limit: int = 6) -> str:
    """A readable diff of two fingerprint input records ('train_args.learning_rate: 0.001 -> 0.05')."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {str(a.get(k, '<unset>'))[:40]} -> {str(b.get(k, '<unset>'))[:40]}" for k in keys[:limit]]
    return "; ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def stale_reason(out: Path, plan: RMPlan) -> str | None:
    """Why the RM saved in `out` cannot be reused for `plan`, or None when it can."""
    if not (out / "reward_info.json").exists():
        return "not trained yet"
    try:
        rec = json.loads((out / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return f"no readable {FINGERPRINT} (trained by an older version)"
    if rec.get("fingerprint") != plan.fingerprint:
        old_version = rec.get("inputs", {}).get("training_code_version")
        if old_version != TRAINING_CODE_VERSION:
            why = VERSION_NOTES.get(TRAINING_CODE_VERSION, "the training code changed")
            return f"trained by training-code version {old_version}, now {TRAINING_CODE_VERSION}: {why}"
        changes = fingerprint_changes(rec.get("inputs", {}), plan.inputs) or "fingerprint"
        return f"its inputs changed ({changes})"
    if bad := changed_files(out, rec.get("files", {})):
        return f"its files changed since it was saved: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    return None
