"""`PPOConfig`: the hyper-parameters of `pipeline.align.ppo.train_ppo` (per-device batch sizes, like TRL), checked
when built. The align stage fills it from `align.ppo` (`--show-keys` lists its fields and help).

Imports: the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.strict import COUNT, COUNT0, FRACTION, NON_NEGATIVE, POSITIVE, Range


# Why PPO refuses nucleus sampling (instead of computing log-probs under the same truncation): the nucleus of a
# token's distribution changes as the policy learns, so the new/old ratio of truncated probabilities is not a
# likelihood ratio of one fixed distribution (and the KL to the reference would compare two different
# truncations); sampling from the full distribution keeps the ratio exact from the first step.
TOP_P_MESSAGE = (
    "ppo.top_p={top_p}: PPO samples from the full distribution (top_p=1.0). Its ratio and KL penalty use "
    "log-probs of the full distribution, so nucleus-sampled rollouts would put the ratio off from the first step. "
    "Fix: align.ppo.top_p=1.0 (align.top_p still applies to the candidates and the other methods)"
)


@dataclass
class PPOConfig:
    """Hyper-parameters of `train_ppo` (per-device batch sizes, like TRL)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (policy, value head/critic)."})
    rollout_batch_size: int = field(
        default=16, metadata={"range": COUNT, "help": "Prompts sampled per device per PPO step (one response each)."}
    )
    mini_batch_size: int = field(
        default=8,
        metadata={"range": COUNT, "help": "Rollouts per device per optimizer step; must divide rollout_batch_size."},
    )
    ppo_epochs: int = field(default=4, metadata={"range": COUNT, "help": "Passes over each rollout batch."})
    num_steps: int = field(default=100, metadata={"range": COUNT, "help": "Number of PPO steps (rollout batches)."})
    gamma: float = field(default=1.0, metadata={"range": FRACTION, "help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"range": FRACTION, "help": "Lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"range": POSITIVE, "help": "Clip range of the policy ratio."})
    cliprange_value: float = field(
        default=0.2, metadata={"range": POSITIVE, "help": "Clip range of the value prediction around the old value."}
    )
    vf_coef: float = field(default=0.1, metadata={"range": NON_NEGATIVE, "help": "Weight of the value loss."})
    kl_coef: float = field(
        default=0.05,
        metadata={"range": NON_NEGATIVE, "help": "Weight of the per-token KL penalty to the reference policy."},
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (keeping their mean) before GAE."}
    )
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={
            "range": Range(),
            "help": "Subtracted from the score of responses that never emit EOS; null disables.",
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"range": NON_NEGATIVE, "help": "Gradient clipping norm."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts are truncated from the LEFT to this many tokens."}
    )
    max_new_tokens: int = field(default=64, metadata={"range": COUNT, "help": "Longest response sampled."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (log-probs are computed at the same temperature)."}
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "range": Range(0, 1, lo_open=True),
            "help": "Nucleus sampling threshold; must be 1.0: the PPO ratio and KL use log-probs of the full "
            "distribution, so rollouts must be sampled from it.",
        },
    )
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={
            "range": COUNT0,
            "help": "Token ids that end a response like EOS (a chat template's end-of-turn token; the align stage sets it for a chat-templated policy).",
        },
    )
    value_model: str = field(
        default="head",
        metadata={
            "help": "head: scalar head on the policy's last hidden state | critic: a separate copy of the backbone with a scalar head."
        },
    )
    use_peft: bool = field(
        default=False, metadata={"help": "Train LoRA adapters; the reference is the adapter-disabled model (no copy)."}
    )
    lora_r: int = field(default=16, metadata={"range": COUNT, "help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"range": COUNT, "help": "LoRA alpha."})
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "range": Range(0, 1, hi_open=True),
            "help": "LoRA dropout (0 keeps rollout and update log-probs consistent).",
        },
    )
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; null = peft's default for the architecture."}
    )
    save_every: int = field(
        default=0,
        metadata={"range": COUNT0, "help": "Write a resumable checkpoint every N steps (0: only at the end)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the prompt order, value-head init and sampling."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on the main process."})

    def __post_init__(self):
        if self.value_model not in ("head", "critic"):
            raise ValueError(f"ppo.value_model must be 'head' or 'critic', got {self.value_model!r}")
        for name in ("rollout_batch_size", "mini_batch_size", "ppo_epochs", "num_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must divide ppo.rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.temperature <= 0:
            raise ValueError(f"ppo.temperature must be > 0, got {self.temperature}")
        if self.top_p != 1.0:
            raise ValueError(TOP_P_MESSAGE.format(top_p=self.top_p))
