"""The reward stage: train one reward model per requested method and write DIR/reward/.

For every RM name (`more`, `multitask`, `uniform`, `single-<source>`), the stage mixes the sources
(balanced blocks for more/uniform, a shuffled concatenation for multitask), trains a
`MORERewardTrainer`, and saves `DIR/reward/<name>/` (model, tokenizer, model card, train_log.json)
atomically, with `fingerprint.json`: a hash of everything that determines the RM (its training settings,
the reward section, the training rows actually used, the tokenizer with its chat template text, the base
model's config and weight CONTENT (sha256) or hub revision, the seed, the world size) and the size and
sha256 of every file written. A name that is not a safe path component (a `group_by` source `src/a/b`, a
name with `..` or NUL) gets the directory `pipeline.io.safe_component(name)` (a slug plus a hash), and every
path is checked to lie inside the run directory before it is written or deleted. A finished RM is reused only when its fingerprint
matches and its files are intact; otherwise it is retrained and the log says why (`force=True`, i.e.
`--force reward`, retrains every RM). An interrupted RM resumes from its last COMPLETE Trainer checkpoint in
`DIR/reward/.checkpoints/<name>/` (one whose fingerprint matches; incomplete ones are deleted, and the log
says which checkpoint it resumes from). `DIR/reward/index.json` lists what was trained, with paths
relative to the run directory, so a copied or moved run directory stays self-contained. Each RM directory
holds `train_prompts.json` (the hashes of the prompts it was trained on, `pipeline.data.mixing.prompt_hash`;
calibration uses it to count and exclude evaluation pairs the RM has seen), and `DIR/reward/data_stats.json`
holds every source's pairs per split, the records read and the pairs dropped on loading, by reason (also
printed), and each RM's count of over-length (left-truncated) training pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.data.render import check_template_setting
from pipeline.io import (
    atomic_write_json,
    changed_files,
    content_sha256,
    file_records,
    hub_revision,
    inside,
    remove_tree,
    safe_component,
    sha256_json,
    weights_bytes,
)
from pipeline.logs import attach_progress, clock, human_bytes
from pipeline.models import (
    TinyModelSpec,
    load_tokenizer,
    quantization_config,
    section_model_inputs,
    tiny_model,
    tiny_tokenizer,
)
from pipeline.reward.index import rm_dir
from pipeline.reward.trainer import MORERewardConfig


STAGE_METHODS = ("more", "multitask", "uniform", "single")
PEFT_MODES = ("none", "lora", "qlora4", "qlora8")
# Bump when a change to the training code changes what an RM trained from the same inputs looks like.
TRAINING_CODE_VERSION = 2
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


# The TrainingArguments fields `--show-keys` lists under reward.train (every other one is accepted too).
SHOWN_TRAINING_ARGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "bf16",
    "activation_checkpointing",
    "deepspeed",
    "logging_steps",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "report_to",
    "dataloader_num_workers",
)


@dataclass
class RewardStageConfig:
    """The `reward:` section of a recipe."""

    methods: list[str] = field(
        default_factory=lambda: ["more", "multitask"],
        metadata={
            "help": "RMs to train: more, multitask, uniform, single (one RM per source, for the "
            "diversity analysis and the Averaging baseline)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local directory of the base model; null builds a tiny random model "
            "(see `tiny`) with a tokenizer trained on the data."
        },
    )
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec, metadata={"help": "The in-process model."})
    tokenizer_vocab_size: int = field(default=1000, metadata={"help": "Vocabulary of the tiny tokenizer."})
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template the RM renders conversational data with (pipeline.data.render): null "
            "keeps the tokenizer's own (none for the tiny model), a Jinja string, a path to a .jinja file, "
            "or 'none' for the plain HH layout. Saved with the RM's tokenizer, so calibration and "
            "alignment score in the same layout."
        },
    )
    peft: str = field(default="none", metadata={"help": "none, lora, qlora4 (4-bit NF4 base) or qlora8."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | str | None = field(
        default="all-linear", metadata={"help": "Modules to adapt (peft's target_modules)."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype when loading: float32 or bfloat16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    train: dict = field(
        default_factory=dict,
        metadata={
            "keys": MORERewardConfig,
            "key_fields": SHOWN_TRAINING_ARGS,
            "help": "MORERewardConfig fields (learning_rate, max_steps, alpha, normalize, bf16, "
            "deepspeed, ...; any trl.RewardConfig / TrainingArguments field). per_device_train_batch_size "
            "is derived from data.per_source_batch.",
        },
    )

    def __post_init__(self):
        bad = [m for m in self.methods if m not in STAGE_METHODS]
        if bad or not self.methods:
            raise ValueError(f"reward.methods: unknown {bad or 'empty list'}; valid: {list(STAGE_METHODS)}")
        if self.peft not in PEFT_MODES:
            raise ValueError(f"reward.peft must be one of {PEFT_MODES}, got {self.peft!r}")
        self.training_args({})  # validate the keys of `train` early

    def training_args(self, extra: dict):
        """Check `train` keys against MORERewardConfig and merge `extra` (which wins)."""
        valid = {f.name for f in fields(MORERewardConfig)}
        unknown = sorted(set(self.train) - valid)
        if unknown:
            import difflib

            hints = [
                f"{k} (did you mean {difflib.get_close_matches(k, valid, 1)[0]}?)"
                if difflib.get_close_matches(k, valid, 1)
                else k
                for k in unknown
            ]
            raise ValueError(
                f"reward.train: unknown MORERewardConfig field(s) {', '.join(hints)}. Valid fields are those of "
                "trl.RewardConfig / transformers.TrainingArguments plus method, alpha, normalize, source_names, "
                "balanced_batches."
            )
        return {**self.train, **extra}


def checkpoint_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "reward" / ".checkpoints" / safe_component(name)


def rm_names(cfg: RewardStageConfig, sources: list[str]) -> list[tuple[str, str, list[str]]]:
    """(rm name, trainer method, sources) for every RM the config asks for."""
    out = []
    for m in cfg.methods:
        if m == "single":
            out += [(f"single-{s}", "multitask", [s]) for s in sources]
        else:
            out.append((m, m, list(sources)))
    return out


def planned_steps(recipe, splits=None, world: int = 1) -> dict[str, int]:
    """Optimizer steps each RM of the recipe trains for, as the Trainer computes them: `max_steps` when > 0,
    else ceil(num_train_epochs x ceil(batches / gradient_accumulation_steps)). Batches per epoch: with
    `length_grouping` (the default) the sampler's full batches only (`LengthGroupedBalancedSampler`: the
    smallest source's pairs // per_source_batch for more/uniform, pairs // batch size for multitask), else
    ceil(pairs / batch size); divided over `world` processes (ceil). `splits` defaults to loading the data."""
    import math
    from collections import Counter

    from pipeline.data import build_splits, mix

    splits = build_splits(recipe.data) if splits is None else splits
    train = recipe.reward.train
    defaults = {f.name: f.default for f in fields(MORERewardConfig) if f.name in ("max_steps", "num_train_epochs")}
    max_steps = int(train.get("max_steps", defaults["max_steps"]))
    epochs = float(train.get("num_train_epochs", defaults["num_train_epochs"]))
    accum = int(train.get("gradient_accumulation_steps", 1))
    grouping = bool(train.get("length_grouping", True))
    out = {}
    for name, method, srcs in rm_names(recipe.reward, list(splits)):
        if max_steps > 0:
            out[name] = max_steps
            continue
        balanced = method in ("more", "uniform")
        mixed = mix(
            {s: splits[s]["train"] for s in srcs},
            "balanced" if balanced else "concat",
            n_per_source=recipe.data.n_train_per_source,
            per_source_batch=recipe.data.per_source_batch,
            seed=recipe.seed,
        )
        psb, batch = recipe.data.per_source_batch, recipe.data.per_source_batch * len(srcs)
        if grouping and balanced:
            batches = min(Counter(mixed["source"]).values()) // psb
        elif grouping:
            batches = len(mixed) // batch
        else:
            batches = math.ceil(len(mixed) / batch)
        batches = math.ceil(batches / world)
        out[name] = math.ceil(epochs * max(math.ceil(batches / accum), 1))
    return out


def measured_step_seconds(run_dir: Path) -> float | None:
    """Seconds per optimizer step of the RMs last trained in `run_dir` (their train_log.json's train_runtime /
    step, pooled), or None when none was trained there."""
    runtime = steps = 0.0
    for log_file in sorted((Path(run_dir) / "reward").glob("*/train_log.json")):
        try:
            last = json.loads(log_file.read_text())[-1]
            runtime, steps = runtime + float(last["train_runtime"]), steps + float(last["step"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
    return runtime / steps if steps else None


def _synthetic_texts(recipe, splits) -> list[str]:
    """Texts to train the tiny tokenizer on: the synthetic corpus, else the training pairs."""
    formats = {s.format for s in recipe.data.sources}
    if formats == {"synthetic"}:
        from pipeline.data.synthetic import synthetic_corpus

        return synthetic_corpus(recipe.data.synthetic)
    texts = []
    for dd in splits.values():
        tr = dd["train"]
        texts += [p + c for p, c in zip(tr["prompt"], tr["chosen"])] + list(tr["rejected"])
    return texts


def _tiny_base_fingerprint(recipe, texts: list[str]) -> str:
    """What the tiny tokenizer and random base model in DIR/reward/.base are built from."""
    cfg = recipe.reward
    return sha256_json(
        {
            "tiny": asdict(cfg.tiny),
            "vocab_size": cfg.tokenizer_vocab_size,
            "seed": recipe.seed,
            "texts": sha256_json(texts),
            "chat_template": _tiny_chat_template(recipe),
        }
    )


def _base_is_current(base: Path, fp: str, needed: str) -> bool:
    try:
        return (base / needed).exists() and json.loads((base / FINGERPRINT).read_text())["fingerprint"] == fp
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_tokenizer(recipe, splits, run_dir: Path):
    """The tokenizer every RM of this run shares (trained once for tiny models, saved in DIR/reward/)."""
    from pipeline.data.render import set_chat_template

    cfg = recipe.reward
    if cfg.model_name_or_path:
        from pipeline.models import check_model_source

        check_model_source(cfg.model_name_or_path, key="reward.model_name_or_path")  # one line, not a traceback
        tok = load_tokenizer(
            cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, key="reward.model_name_or_path"
        )
        return set_chat_template(tok, cfg.chat_template, where="reward.chat_template")
    texts = _synthetic_texts(recipe, splits)
    tok_dir = run_dir / "reward" / ".base"
    if _base_is_current(tok_dir, _tiny_base_fingerprint(recipe, texts), "tokenizer.json"):
        return load_tokenizer(str(tok_dir))
    return tiny_tokenizer(texts, vocab_size=cfg.tokenizer_vocab_size, chat_template=_tiny_chat_template(recipe))


def _tiny_chat_template(recipe) -> str | None:
    """The recipe's reward.chat_template resolved to template text (or None) before the tiny tokenizer exists."""
    from pipeline.data.render import set_chat_template

    class _Holder:
        chat_template = None

    return set_chat_template(_Holder(), recipe.reward.chat_template, where="reward.chat_template").chat_template


def base_model_path(recipe, tokenizer, run_dir: Path, splits=None) -> str:
    """A path to load the base model from; the tiny random model is saved once to DIR/reward/.base (and
    rebuilt when what it is built from changes)."""
    cfg = recipe.reward
    if cfg.model_name_or_path:
        return _resolve_model_path(cfg.model_name_or_path)
    from accelerate import PartialState

    base = run_dir / "reward" / ".base"
    fp = _tiny_base_fingerprint(recipe, _synthetic_texts(recipe, splits)) if splits is not None else None
    state = PartialState()
    stale = not (base / "config.json").exists() or (fp is not None and not _base_is_current(base, fp, "config.json"))
    if state.is_main_process and stale:
        if (base / "config.json").exists():
            print("[reward] the tiny base model's settings or training texts changed: rebuilding reward/.base")
        tmp = base.with_name(".base.partial")
        remove_tree(tmp, run_dir)
        tiny_model(cfg.tiny, tokenizer, task="reward", seed=recipe.seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fp is not None:
            atomic_write_json(tmp / FINGERPRINT, {"fingerprint": fp})
        remove_tree(base, run_dir)
        os.replace(tmp, base)
    state.wait_for_everyone()
    return str(base)


def _resolve_model_path(path: str) -> str:
    """`pkg:<module>` names a model shipped inside an installed Python package (recipes resolve it when
    loaded; this covers configs built in code)."""
    if not path.startswith("pkg:"):
        return path
    from pipeline.io import resolve_pkg_path

    return resolve_pkg_path(path, "reward.model_name_or_path")


def load_base_model(cfg: RewardStageConfig, path: str, seed: int | None = None):
    """The base model with a reward head (and the LoRA config when `cfg.peft` asks). With `seed`, the RNG is
    seeded first, so a newly initialised head gets the same weights whatever this process ran before (the
    Trainer seeds only after the model exists: without this, the second RM of a run started from another
    head than the same RM trained alone)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    if seed is not None:
        set_seed(seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    bits = {"qlora4": 4, "qlora8": 8}.get(cfg.peft)
    kwargs = dict(num_labels=1, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if bits:  # QLoRA: TRL keeps adapters (and the saved head) in bf16, so the unquantized rest is bf16 too
        kwargs["dtype"] = torch.bfloat16
        kwargs["quantization_config"] = quantization_config(bits, compute_dtype=torch.bfloat16)
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    peft_config = None
    if cfg.peft != "none":
        from peft import LoraConfig

        from pipeline.reward.trainer import find_reward_head

        head = next(n for n, m in model.named_modules() if m is find_reward_head(model))
        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            modules_to_save=[head.split(".")[-1]],
        )
    return model, peft_config


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
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    rec = {"tokenizer": text, "special": special, "padding_side": tokenizer.padding_side}
    template = getattr(tokenizer, "chat_template", None)
    if template:  # only when set, so fingerprints of RMs without a template stay as they were
        rec["chat_template_sha256"] = sha256_json(template)
    return sha256_json(rec)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def _base_model_record(base: str) -> dict:
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


def plan_rm(recipe, run_dir: Path, name: str, method: str, sources: list[str], splits, tokenizer, base: str) -> RMPlan:
    from accelerate import PartialState

    from pipeline.data import mix

    cfg, data = recipe.reward, recipe.data
    balanced = method in ("more", "uniform")
    train = mix(
        {s: splits[s]["train"] for s in sources},
        "balanced" if balanced else "concat",
        n_per_source=data.n_train_per_source,
        per_source_batch=data.per_source_batch,
        seed=recipe.seed,
    )
    cpu_defaults = {}
    if not torch.cuda.is_available():
        # use_cpu: without it torchrun/accelerate on CPU set up no gloo DDP; TRL's bf16 default fails on CPU.
        cpu_defaults = {"use_cpu": True, "bf16": cfg.train.get("bf16", False)}
    args = cfg.training_args(
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
    section = {k: v for k, v in asdict(cfg).items() if k not in ("methods", "train")}
    inputs = {
        "training_code_version": TRAINING_CODE_VERSION,
        "method": method,
        "sources": list(sources),
        "train_args": {
            k: (_deepspeed_record(v) if k == "deepspeed" else v)
            for k, v in sorted(args.items())
            if k not in _NOT_FINGERPRINTED
        },
        "reward": section,
        "train_rows": len(train),
        "train_data_sha256": _dataset_sha256(train),
        "tokenizer_sha256": _tokenizer_sha256(tokenizer),
        "base_model": _base_model_record(base),
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
        changes = fingerprint_changes(rec.get("inputs", {}), plan.inputs) or "fingerprint"
        return f"its inputs changed ({changes})"
    if bad := changed_files(out, rec.get("files", {})):
        return f"its files changed since it was saved: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    return None


def _resume_point(ckpt_dir: Path, plan: RMPlan, run_dir: Path) -> str | None:
    """The checkpoint to resume from (main process decides; deletes stale and incomplete ones)."""
    from pipeline.reward.trainer import checkpoint_problem, list_checkpoints

    if not ckpt_dir.is_dir():
        return None
    try:
        recorded = json.loads((ckpt_dir / FINGERPRINT).read_text()).get("fingerprint")
    except (OSError, ValueError):
        recorded = None
    if recorded != plan.fingerprint:
        if list_checkpoints(ckpt_dir):
            print(f"[reward] {plan.name}: discarding checkpoints in {ckpt_dir}: they were made from other inputs")
        remove_tree(ckpt_dir, run_dir)
        return None
    for ckpt in list_checkpoints(ckpt_dir):
        problem = checkpoint_problem(ckpt, plan.method)
        if problem is None:
            return str(ckpt)
        print(f"[reward] {plan.name}: skipping incomplete checkpoint {ckpt.name} ({problem}); deleting it")
        remove_tree(ckpt, run_dir)
    return None


def train_one(recipe, run_dir: Path, plan: RMPlan, tokenizer, base: str, fresh: bool = False, label: str = ""):
    """Train (or resume) one RM and save it atomically to DIR/reward/<name>/ with its fingerprint (`label`,
    e.g. 'more, RM 2 of 3', names its progress lines)."""
    from accelerate import PartialState

    from pipeline.reward.trainer import MORERewardTrainer

    cfg, name = recipe.reward, plan.name
    out = inside(run_dir, rm_dir(run_dir, name))
    ckpt_dir = inside(run_dir, checkpoint_dir(run_dir, name))
    if cfg.train.get("deepspeed") and not torch.cuda.is_available():
        # DeepSpeed on CPU: its comm layer must wrap the gloo group before the Trainer builds its config
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    state = PartialState()
    last = None
    if state.is_main_process:
        if fresh:
            remove_tree(ckpt_dir, run_dir)
        last = _resume_point(ckpt_dir, plan, run_dir)
        if last:
            print(f"[reward] {name}: resuming from {last} (its last complete checkpoint)")
        elif ckpt_dir.is_dir() and not fresh:
            print(f"[reward] {name}: no complete checkpoint to resume from; training from the start")
        atomic_write_json(ckpt_dir / FINGERPRINT, {"fingerprint": plan.fingerprint, "inputs": plan.inputs})
    if state.num_processes > 1:
        import torch.distributed as dist

        box = [last]
        dist.broadcast_object_list(box, src=0)
        last = box[0]
    args = MORERewardConfig(**plan.args)
    model, peft_config = load_base_model(cfg, base, seed=args.seed)
    trainer = MORERewardTrainer(
        model, args, train_dataset=plan.train, processing_class=tokenizer, peft_config=peft_config
    )
    attach_progress(trainer, f"reward {label or name}")
    trainer.train(resume_from_checkpoint=last)

    partial = inside(run_dir, out.with_name(f".{out.name}.partial"))
    if state.is_main_process:
        remove_tree(partial, run_dir)
    state.wait_for_everyone()
    trainer.save_with_card(partial, base_model=cfg.model_name_or_path)  # every rank (ZeRO-3 gathers)
    if state.is_main_process:
        tokenizer.save_pretrained(partial)
        _write_train_prompts(partial, plan.train)
        atomic_write_json(partial / "train_log.json", trainer.state.log_history)
        atomic_write_json(
            partial / "reward_info.json",
            {
                "name": name,
                "method": plan.method,
                "sources": plan.sources,
                "n_train_pairs": len(plan.train),
                "n_truncated_sequences": trainer.n_truncated.get("train", 0),
            },
        )
        files = file_records(partial, ["."])
        atomic_write_json(
            partial / FINGERPRINT,
            {
                "fingerprint": plan.fingerprint,
                "inputs": plan.inputs,
                "files": {str(Path(f)): r for f, r in files.items()},
            },
        )
        remove_tree(out, run_dir)
        os.replace(partial, out)
        remove_tree(ckpt_dir, run_dir)
    state.wait_for_everyone()
    del trainer, model


def _write_train_prompts(rm_dir: Path, train) -> None:
    """<rm dir>/train_prompts.json: the hashes of the prompts the RM was trained on, so calibration can count
    (and exclude) evaluation pairs it has seen, in this run or when another run evaluates it as external."""
    from pipeline.data.mixing import TRAIN_PROMPTS, train_prompts_record

    atomic_write_json(Path(rm_dir) / TRAIN_PROMPTS, train_prompts_record(train["prompt"]))


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Train every RM the recipe asks for; reuse those saved from the same inputs (all retrained when
    `force`). Returns artifact paths relative to run_dir."""
    from accelerate import PartialState

    from pipeline.data import build_splits
    from pipeline.data.mixing import TRAIN_PROMPTS, data_stats, describe_data_stats

    run_dir = Path(run_dir)
    splits = build_splits(recipe.data)
    sources = list(splits)
    stats = data_stats(splits)
    if PartialState().is_main_process:
        for line in describe_data_stats(stats):
            print(f"[reward] data {line}")
    tokenizer = build_tokenizer(recipe, splits, run_dir)
    base = base_model_path(recipe, tokenizer, run_dir, splits)
    index = {}
    rms = rm_names(recipe.reward, sources)
    for i, (name, method, srcs) in enumerate(rms, 1):
        out = inside(run_dir, rm_dir(run_dir, name))
        plan = plan_rm(recipe, run_dir, name, method, srcs, splits, tokenizer, base)
        reason = "forced (--force reward)" if force else stale_reason(out, plan)
        of = f"RM {i} of {len(rms)}"
        if reason is None:
            print(
                f"[reward] {of}: {name}: already trained, skipping (same inputs: fingerprint {plan.fingerprint[:10]})"
            )
            if PartialState().is_main_process and not (out / TRAIN_PROMPTS).is_file():  # trained before the record
                _write_train_prompts(out, plan.train)
        else:
            print(f"[reward] {of}: training {name} (method={method}, sources={srcs}): {reason}")
            train_one(recipe, run_dir, plan, tokenizer, base, fresh=force, label=f"{name}, {of}")
        index[name] = {  # the key is the RM's name as given; the path its directory (safe_component)
            "path": f"reward/{out.name}",
            "method": "single" if name.startswith("single-") else method,
            "sources": srcs,
            "train_prompts": f"reward/{out.name}/{TRAIN_PROMPTS}",
        }
    if PartialState().is_main_process:
        truncated = {}
        for name in index:
            try:
                truncated[name] = json.loads((rm_dir(run_dir, name) / "reward_info.json").read_text())[
                    "n_truncated_sequences"
                ]
            except (OSError, ValueError, KeyError):
                truncated[name] = None
        atomic_write_json(
            run_dir / "reward" / "data_stats.json",
            {
                "sources": stats,
                "over_length_pairs": {
                    "note": f"training pairs longer than data.max_length={recipe.data.max_length} tokens: kept, "
                    "cut from the left",
                    "per_rm": truncated,
                },
            },
        )
        atomic_write_json(run_dir / "reward" / "index.json", index)
        # pairs per source and split, for the report's "What ran" (the data the RMs actually saw)
        atomic_write_json(
            run_dir / "reward" / "data.json", {s: {k: len(v) for k, v in dd.items()} for s, dd in splits.items()}
        )
    PartialState().wait_for_everyone()
    return ["reward/index.json", "reward/data_stats.json", "reward/data.json"] + [
        f"reward/{v['path'].split('/')[-1]}" for v in index.values()
    ]


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the reward section names besides the data sources: the base model and a chat-template file."""
    return section_model_inputs(section)


def check(recipe, *, runs: bool, origin) -> None:
    """A reward.chat_template that does not parse or raises fails before any work (also under --dry-run)."""
    check_template_setting(recipe.reward.chat_template, "reward.chat_template", origin)


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, str]:
    """The --dry-run line: every RM's optimizer steps, and a training time only where this directory measured
    a step time before."""
    counts = planned_steps(recipe, world=world)
    total = sum(counts.values())
    work = (
        f"{len(counts)} RMs, {total} optimizer steps ("
        + ", ".join(f"RM {i} of {len(counts)} {rm}: {n}" for i, (rm, n) in enumerate(counts.items(), 1))
        + ")"
    )
    sec = measured_step_seconds(run_dir)
    if not sec:
        return work, "training time unknown (no step time measured in this directory yet)"
    return work, f"training about {clock(sec * total)} at the {sec:.3g} s/step measured in this directory"


def space_needed(recipe, run_dir: Path) -> tuple[int, str] | None:
    """Free space the stage needs, per RM: a checkpoint (weights plus AdamW's two moments: 3x the weights)
    and the RM itself (1x); None when the base model's weights are not on disk yet."""
    base = recipe.reward.model_name_or_path
    local = Path(base) if base and Path(base).is_dir() else Path(run_dir) / "reward" / ".base"
    weights = weights_bytes(local)
    if not weights:
        return None
    return 4 * weights, f"a checkpoint and a saved RM: 4x the {human_bytes(weights)} of base model weights"
