"""The reward stage: train one reward model per requested method and write DIR/reward/.

For every RM name (`more`, `multitask`, `uniform`, `single-<source>`), the stage mixes the sources
(balanced blocks for more/uniform, a shuffled concatenation for multitask), trains a
`MORERewardTrainer`, and saves `DIR/reward/<name>/` (model, tokenizer, model card, train_log.json)
atomically. Finished RMs are skipped on rerun; an interrupted one resumes from its last Trainer
checkpoint in `DIR/reward/.checkpoints/<name>/`. `DIR/reward/index.json` lists what was trained.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from pipeline.io import atomic_write_json
from pipeline.models import TinyModelSpec, load_tokenizer, quantization_config, tiny_model, tiny_tokenizer

STAGE_METHODS = ("more", "multitask", "uniform", "single")
PEFT_MODES = ("none", "lora", "qlora4", "qlora8")


@dataclass
class RewardStageConfig:
    """The `reward:` section of a recipe."""

    methods: list[str] = field(
        default_factory=lambda: ["more", "multitask"],
        metadata={"help": "RMs to train: more, multitask, uniform, single (one RM per source, for the "
                  "diversity analysis and the Averaging baseline)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of the base model; null builds a tiny random model "
                  "(see `tiny`) with a tokenizer trained on the data."},
    )
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec, metadata={"help": "The in-process model."})
    tokenizer_vocab_size: int = field(default=1000, metadata={"help": "Vocabulary of the tiny tokenizer."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template the RM renders conversational data with (pipeline.data.render): null "
                  "keeps the tokenizer's own (none for the tiny model), a Jinja string, a path to a .jinja file, "
                  "or 'none' for the plain HH layout. Saved with the RM's tokenizer, so calibration and "
                  "alignment score in the same layout."},
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
        metadata={"help": "MORERewardConfig fields (learning_rate, max_steps, alpha, normalize, bf16, "
                  "deepspeed, ...). per_device_train_batch_size is derived from data.per_source_batch."},
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
        from pipeline.reward.trainer import MORERewardConfig

        valid = {f.name for f in fields(MORERewardConfig)}
        unknown = sorted(set(self.train) - valid)
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {difflib.get_close_matches(k, valid, 1)[0]}?)"
                     if difflib.get_close_matches(k, valid, 1) else k for k in unknown]
            raise ValueError(
                f"reward.train: unknown MORERewardConfig field(s) {', '.join(hints)}. Valid fields are those of "
                "trl.RewardConfig / transformers.TrainingArguments plus method, alpha, normalize, source_names, "
                "balanced_batches."
            )
        return {**self.train, **extra}


def rm_names(cfg: RewardStageConfig, sources: list[str]) -> list[tuple[str, str, list[str]]]:
    """(rm name, trainer method, sources) for every RM the config asks for."""
    out = []
    for m in cfg.methods:
        if m == "single":
            out += [(f"single-{s}", "multitask", [s]) for s in sources]
        else:
            out.append((m, m, list(sources)))
    return out


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


def build_tokenizer(recipe, splits, run_dir: Path):
    """The tokenizer every RM of this run shares (trained once for tiny models, saved in DIR/reward/)."""
    from pipeline.data.render import set_chat_template

    cfg = recipe.reward
    if cfg.model_name_or_path:
        tok = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        return set_chat_template(tok, cfg.chat_template, where="reward.chat_template")
    tok_dir = run_dir / "reward" / ".base"
    template = set_chat_template(_TemplateHolder(), cfg.chat_template, where="reward.chat_template").chat_template
    if (tok_dir / "tokenizer.json").exists():
        tok = load_tokenizer(str(tok_dir))
        if (tok.chat_template or None) != (template or None):
            raise RuntimeError(f"{tok_dir} holds the tiny base model and tokenizer built for another "
                               "reward.chat_template (its vocabulary has that template's markers). Fix: delete "
                               f"{run_dir / 'reward'} or use a new --output-dir")
        return tok
    return tiny_tokenizer(_synthetic_texts(recipe, splits), vocab_size=cfg.tokenizer_vocab_size,
                          chat_template=template)


class _TemplateHolder:
    """Resolves a recipe's chat_template value before the tiny tokenizer exists."""

    chat_template = None


def base_model_path(recipe, tokenizer, run_dir: Path) -> str:
    """A path to load the base model from; the tiny random model is saved once to DIR/reward/.base."""
    cfg = recipe.reward
    if cfg.model_name_or_path:
        return _resolve_model_path(cfg.model_name_or_path)
    from accelerate import PartialState

    base = run_dir / "reward" / ".base"
    state = PartialState()
    if state.is_main_process and not (base / "config.json").exists():
        tmp = base.with_name(".base.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_model(cfg.tiny, tokenizer, task="reward", seed=recipe.seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(base, ignore_errors=True)
        os.replace(tmp, base)
    state.wait_for_everyone()
    return str(base)


def _resolve_model_path(path: str) -> str:
    """`pkg:<module>` names a model shipped inside an installed Python package (recipes resolve it when
    loaded; this covers configs built in code)."""
    if not path.startswith("pkg:"):
        return path
    from pipeline.config import resolve_pkg_path

    return resolve_pkg_path(path, "reward.model_name_or_path")


def load_base_model(cfg: RewardStageConfig, path: str):
    from transformers import AutoModelForSequenceClassification

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
            task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, modules_to_save=[head.split(".")[-1]],
        )
    return model, peft_config


def train_one(recipe, run_dir: Path, name: str, method: str, sources: list[str], splits, tokenizer, base: str):
    """Train (or resume) one RM and save it atomically to DIR/reward/<name>/."""
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.data import mix
    from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer

    cfg, data = recipe.reward, recipe.data
    out = run_dir / "reward" / name
    ckpt_dir = run_dir / "reward" / ".checkpoints" / name
    balanced = method in ("more", "uniform")
    train = mix(
        {s: splits[s]["train"] for s in sources},
        "balanced" if balanced else "concat",
        n_per_source=data.n_train_per_source,
        per_source_batch=data.per_source_batch,
        seed=recipe.seed,
    )
    per_device = data.per_source_batch * len(sources)
    if cfg.train.get("deepspeed") and not torch.cuda.is_available():
        # DeepSpeed on CPU: its comm layer must wrap the gloo group before the Trainer builds its config
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    cpu_defaults = {}
    if not torch.cuda.is_available():
        # use_cpu: without it torchrun/accelerate on CPU set up no gloo DDP; TRL's bf16 default fails on CPU.
        cpu_defaults = {"use_cpu": True, "bf16": cfg.train.get("bf16", False)}
    args = MORERewardConfig(
        **cfg.training_args(dict(
            **cpu_defaults,
            output_dir=str(ckpt_dir),
            method=method,
            source_names=sources,
            balanced_batches=balanced,
            per_device_train_batch_size=per_device,
            max_length=data.max_length,
            seed=recipe.seed,
        )),
    )
    model, peft_config = load_base_model(cfg, base)
    trainer = MORERewardTrainer(
        model, args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last:
        print(f"[reward] {name}: resuming from {last}")
    trainer.train(resume_from_checkpoint=last)

    state = PartialState()
    partial = out.with_name(f".{name}.partial")
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_with_card(partial, base_model=cfg.model_name_or_path)  # every rank (ZeRO-3 gathers)
    if state.is_main_process:
        tokenizer.save_pretrained(partial)
        atomic_write_json(partial / "train_log.json", trainer.state.log_history)
        atomic_write_json(partial / "reward_info.json", {
            "name": name, "method": method, "sources": sources, "n_train_pairs": len(train),
            "n_truncated_sequences": trainer.n_truncated.get("train", 0),
        })
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    state.wait_for_everyone()
    del trainer, model


def run(recipe, run_dir: Path) -> list[str]:
    """Train every RM the recipe asks for; skip those already saved. Returns artifact paths."""
    from accelerate import PartialState

    from pipeline.data import build_splits

    run_dir = Path(run_dir)
    splits = build_splits(recipe.data)
    sources = list(splits)
    tokenizer = build_tokenizer(recipe, splits, run_dir)
    base = base_model_path(recipe, tokenizer, run_dir)
    index = {}
    for name, method, srcs in rm_names(recipe.reward, sources):
        out = run_dir / "reward" / name
        if (out / "reward_info.json").exists():
            print(f"[reward] {name}: already trained, skipping")
        else:
            print(f"[reward] training {name} (method={method}, sources={srcs})")
            train_one(recipe, run_dir, name, method, srcs, splits, tokenizer, base)
        index[name] = {"path": str(out), "method": "single" if name.startswith("single-") else method,
                       "sources": srcs}
    if PartialState().is_main_process:
        atomic_write_json(run_dir / "reward" / "index.json", index)
    PartialState().wait_for_everyone()
    return ["reward/index.json"] + [f"reward/{n}" for n in index]


def load_index(run_dir: Path) -> dict:
    path = Path(run_dir) / "reward" / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the reward stage first (python -m pipeline.run --stages reward)")
    return json.loads(path.read_text())
