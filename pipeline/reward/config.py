"""The `reward:` section of a recipe (`RewardStageConfig`, with the checks of its own values), the names it
accepts, and what the section says about the RMs to train (`rm_names`) and the tiny tokenizer's template.

May import: pipeline leaves, `pipeline.reward.trainer` (the `train:` keys are MORERewardConfig fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline.models import TinyModelSpec
from pipeline.reward.trainer import MORERewardConfig
from pipeline.strict import COUNT, FRACTION, INT_MAX, POSITIVE, TRAINING_ARGS_RANGES, Range


STAGE_METHODS = ("more", "multitask", "uniform", "single", "dpo")
PEFT_MODES = ("none", "lora", "qlora4", "qlora8")


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


# The allowed values of reward.train (checked at load): TrainingArguments' fields and MORERewardConfig's own (kept
# here: a "range" in MORERewardConfig's field metadata would reach HfArgumentParser, which refuses unknown keys).
TRAIN_RANGES = {**TRAINING_ARGS_RANGES, "alpha": Range(0, 1, lo_open=True), "packing_max_tokens": Range(4, INT_MAX)}


@dataclass
class DPOSettings:
    """`reward.dpo`: how the `dpo` method trains its policy (TRL's DPOTrainer, sigmoid loss, reverse KL)."""

    beta: float = field(
        default=0.1,
        metadata={
            "range": POSITIVE,
            "help": "DPO's beta: the KL weight of the loss, and the scale of the implicit reward "
            "beta * (log pi(y|x) - log pi_ref(y|x)) the DPO policy is read as.",
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the DPO policy (AdamW)."})
    num_train_epochs: float = field(
        default=1.0, metadata={"range": POSITIVE, "help": "Passes over the run's training pairs."}
    )
    max_steps: int = field(
        default=-1,
        metadata={"range": Range(1, INT_MAX, also=(-1,)), "help": "Optimizer steps; -1: num_train_epochs decides."},
    )
    batch_size: int = field(
        default=16, metadata={"range": COUNT, "help": "Pairs per optimizer step (per process, before accumulation)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"range": COUNT, "help": "Batches per step."})
    warmup_ratio: float = field(
        default=0.05, metadata={"range": FRACTION, "help": "Fraction of the steps with a linear warmup."}
    )
    max_length: int = field(
        default=256,
        metadata={
            "range": COUNT,
            "help": "Longest prompt + response in tokens (TRL's truncation_mode keep_start: a longer pair loses the "
            "end of its response; a pair whose prompt alone fills it is dropped, as TRL does).",
        },
    )
    logging_steps: int = field(default=10, metadata={"range": COUNT, "help": "Steps between train_log.json lines."})


@dataclass
class RewardStageConfig:
    """The `reward:` section of a recipe."""

    methods: list[str] = field(
        default_factory=lambda: ["more", "multitask"],
        metadata={
            "help": "RMs to train: more, multitask, uniform, single (one RM per source, for the "
            "diversity analysis and the Averaging baseline), dpo (a policy trained by DPO on the same pairs from "
            "the policy stage's base policy, referenced against it: an implicit RM, see reward.dpo)."
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
    dpo: DPOSettings = field(
        default_factory=DPOSettings,
        metadata={"help": "The dpo method (full fine-tuning of the base policy; reward.train and peft are not used)."},
    )
    tokenizer_vocab_size: int = field(
        default=1000, metadata={"range": COUNT, "help": "Vocabulary of the tiny tokenizer."}
    )
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
    lora_r: int = field(default=16, metadata={"range": COUNT, "help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"range": COUNT, "help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"range": Range(0, 1, hi_open=True), "help": "LoRA dropout."})
    lora_target_modules: list[str] | str | None = field(
        default="all-linear", metadata={"help": "Modules to adapt (peft's target_modules)."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype when loading: float32 or bfloat16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    train: dict = field(
        default_factory=dict,
        metadata={
            "keys": MORERewardConfig,
            "ranges": TRAIN_RANGES,
            "key_fields": SHOWN_TRAINING_ARGS,
            "help": "MORERewardConfig fields (learning_rate, max_steps, alpha, normalize, truncation, bf16, "
            "deepspeed, ...; any trl.RewardConfig / TrainingArguments field). per_device_train_batch_size "
            "is derived from data.per_source_batch; truncation defaults to 'left' here (TRL drops long pairs).",
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
        return {**PIPELINE_TRAIN_DEFAULTS, **self.train, **extra}


# The pipeline's own defaults for MORERewardConfig fields (a recipe's reward.train overrides them): a pair longer
# than max_length is cut from the LEFT, as the paper's recipe does, where stock TRL (and MORERewardConfig's own
# default) drops it.
PIPELINE_TRAIN_DEFAULTS = {"truncation": "left"}


def rm_names(cfg: RewardStageConfig, sources: list[str]) -> list[tuple[str, str, list[str]]]:
    """(rm name, trainer method, sources) for every RM the config asks for."""
    out = []
    for m in cfg.methods:
        if m == "single":
            out += [(f"single-{s}", "multitask", [s]) for s in sources]
        else:
            out.append((m, m, list(sources)))
    return out


def tiny_chat_template(cfg: RewardStageConfig) -> str | None:
    """The section's chat_template resolved to template text (or None) before the tiny tokenizer exists."""
    from pipeline.data.render import chat_template_text

    if cfg.chat_template is None:
        return None
    return chat_template_text(cfg.chat_template, where="reward.chat_template")
