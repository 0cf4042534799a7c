"""PPO for language models, implemented here (TRL 1.16 no longer ships a PPO trainer).

The algorithm (Ziegler et al. 2019; Ouyang et al. 2022; the "N implementation details of RLHF with PPO"):
every step
1. rollout: sample one response per prompt from the policy (left-padded prompts, `generate`),
   score the decoded responses with `reward_fn(prompts, responses)` (an RM, the synthetic gold reward...);
2. one no-grad forward of the policy (per-token log-probs and values) and of the frozen reference
   (per-token log-probs): the reference is a deep copy of the initial policy, or, with LoRA, the same
   model with its adapter disabled;
3. per-token rewards: -kl_coef * (logp - logp_ref) on every response token, plus the sequence score at
   the last response token, minus `missing_eos_penalty` if the response never emitted EOS
   (`per_token_kl_rewards`); optionally whitened (`whiten(shift_mean=False)`);
4. advantages by GAE(gamma, lambda) (`gae`), whitened; returns = advantages + values;
5. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss (`clipped_policy_loss`) +
   vf_coef * clipped value loss (`clipped_value_loss`), one optimizer step per mini-batch.

The math is in small pure functions at the top of the module, tested against independent references.
`train_ppo` only wires them. The value function is either a scalar head on the policy's last hidden
state (`value_model="head"`, one network) or a separate critic, a copy of the policy backbone with its own
scalar head (`value_model="critic"`); both live in one `PolicyWithValue` module so that one
`Accelerator.prepare` call wraps them for DDP or DeepSpeed.

Distributed (what the tests verify on 2 CPU processes with gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3): every
rank samples its own share of the prompts; gradients are averaged by DDP/DeepSpeed, so all ranks hold
identical weights after every step; logged statistics are averaged over ranks. Generation uses the bare
module (`accelerator.unwrap_model`); under DeepSpeed, TRL 1.16's `trl.models.utils.
unwrap_model_for_generation`, which under ZeRO-3 gathers the sharded parameters
(`deepspeed.zero.GatheredParameters`) and removes/restores ZeRO-3's hooks around `generate`. Under ZeRO-3
the reference (and a critic) are rebuilt from the config and loaded from the gathered weights, since
`from_config` already partitioned the policy; the reference gets its own inference engine
(`trl.models.utils.prepare_deepspeed`). Dropout is off throughout (the model stays in eval mode), so the
first PPO epoch starts at ratio 1.

CPU launch notes: on a CPU-only machine accelerate goes multi-process only with `Accelerator(cpu=True)`
(the default here); DeepSpeed on CPU needs `deepspeed.init_distributed(dist_backend="gloo")` and
`Accelerator(deepspeed_plugin=..., kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])` (see
tests/test_ppo_distributed.py). Outputs in `output_dir`: `ppo_log.jsonl` (one row per step), `ppo_config.json`,
`ppo_summary.json`, `policy/` (HF format + tokenizer + `value_model.safetensors`), and while running,
`checkpoint/` every `save_every` steps (a rerun resumes from it; it is removed when the run finishes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, remove_tree
from pipeline.logs import progress_bar


# --------------------------------------------------------------------------------------------------
# Pure functions (the math)
# --------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (over `dim`, or over everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of `x` (Bessel-corrected when `unbiased`)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalize the masked entries of `x` to unit variance (and zero mean if `shift_mean`).

    Statistics are over the masked entries only; masked-out entries of the result are 0.
    With `shift_mean=False` the mean is kept (used for rewards, whose sign matters).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over `[batch, time]` tensors; returns `(advantages, returns)`.

    Steps with `mask == 0` (padding) do not exist for the recursion: they get advantage 0, and the step
    before a padded stretch bootstraps from the next REAL step (or from 0 at the end). For the usual
    right-padded responses this is the standard recursion with V = 0 after the last token:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}.
    returns = A + V on real steps, 0 elsewhere.
    """
    mask = mask.to(rewards.dtype)
    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    returns = (advantages + values) * mask
    return advantages, returns


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under `logits` (`[..., vocab]` and `[...]`), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by `logits` (last dim)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean over masked tokens of max(-A r, -A clip(r, 1-eps, 1+eps)).

    Returns `(loss, clipfrac, approx_kl)`: clipfrac = fraction of tokens where the clipped branch is the
    larger one (i.e. the one used), approx_kl = 0.5 * mean((logp - logp_old)^2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean over masked tokens of max((V - R)^2, (V_clip - R)^2).

    V_clip = V_old + clip(V - V_old, -clip, clip). Returns `(loss, clipfrac)`, clipfrac = fraction of
    tokens where the clipped error is the larger one.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clipfrac


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where `mask` is 1 in each row (0 for an all-zero row)."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values


def per_token_kl_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    scores: torch.Tensor,
    eos_missing_penalty: float | None,
    has_eos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a KL penalty on every response token plus the score at the last one.

    kl_t = logp_t - logp_ref_t (the k1 estimator, on real tokens); reward_t = -kl_coef * kl_t, and the
    sequence score (minus `eos_missing_penalty` for responses without EOS) is added at the last real
    token. Returns `(rewards, kl, adjusted_scores)`.
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f
    rewards = -kl_coef * kl
    scores = scores.to(rewards.dtype)
    if eos_missing_penalty:
        scores = scores - eos_missing_penalty * (~has_eos.bool()).to(rewards.dtype)
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_tokens = mask.sum(1) > 0
    rewards[rows, last] += torch.where(has_tokens, scores, torch.zeros_like(scores))
    return rewards, kl, scores


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_id: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the real tokens of generated responses: everything up to and including the first EOS (any of
    `eos_id` when a list: EOS and a chat template's end-of-turn token).

    Returns `(mask [batch, new_tokens] long, has_eos [batch] bool)`.
    """
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    is_eos = torch.isin(response_ids, torch.tensor(ids, device=response_ids.device))
    # number of EOS strictly before position t; real iff none has appeared yet
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long(), is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded inputs, as `generate` computes them: cumsum(mask) - 1, 0 on padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """Hyper-parameters of `train_ppo` (per-device batch sizes, like TRL)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (policy, value head/critic)."})
    rollout_batch_size: int = field(
        default=16, metadata={"help": "Prompts sampled per device per PPO step (one response each)."}
    )
    mini_batch_size: int = field(
        default=8, metadata={"help": "Rollouts per device per optimizer step; must divide rollout_batch_size."}
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_steps: int = field(default=100, metadata={"help": "Number of PPO steps (rollout batches)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip range of the value prediction around the old value."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference policy."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (keeping their mean) before GAE."}
    )
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "Subtracted from the score of responses that never emit EOS; null disables."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts are truncated from the LEFT to this many tokens."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response sampled."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (log-probs are computed at the same temperature)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Token ids that end a response like EOS (a chat template's end-of-turn token; the align stage sets it for a chat-templated policy)."
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
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout (0 keeps rollout and update log-probs consistent)."}
    )
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; null = peft's default for the architecture."}
    )
    save_every: int = field(
        default=0, metadata={"help": "Write a resumable checkpoint every N steps (0: only at the end)."}
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


# --------------------------------------------------------------------------------------------------
# Model wrapper: policy + value function in one module
# --------------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (without its LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


class PolicyWithValue(nn.Module):
    """A causal LM policy plus a value function: a scalar head on its last hidden state, or a critic."""

    def __init__(self, policy: nn.Module, value_model: str = "head", critic_backbone: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic_backbone if value_model == "critic" else None
        hidden = _hidden_size(policy)
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)

    # trl.models.utils.unwrap_model_for_generation reads this attribute
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def forward(self, input_ids, attention_mask):
        position_ids = position_ids_from_mask(attention_mask)
        if self.critic is None:
            out = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
            )
            hidden = out.hidden_states[-1]
        else:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            hidden = self.critic(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values


def _response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, temperature: float):
    """Log-probs (at `temperature`) of the response tokens `input_ids[:, prompt_len:]`."""
    logits = logits[:, prompt_len - 1 : -1, :] / temperature
    return logprobs_from_logits(logits, input_ids[:, prompt_len:]), logits


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------


def _apply_lora(policy, cfg: PPOConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(policy, lora)


def _set_deepspeed_batch_size(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """DeepSpeed wants a micro-batch size in its config; we have no dataloader for accelerate to read it from."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = micro_batch * ds["gradient_accumulation_steps"] * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = max_grad_norm
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # so that accelerator.get_state_dict can gather the final weights
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return is_deepspeed_zero3_enabled()


def _clone(module: nn.Module) -> nn.Module:
    """A deep copy of a (transformers) module. Under DeepSpeed ZeRO-3, `from_config` already partitioned
    the parameters (accelerate's plugin turns on `zero.Init`), so `copy.deepcopy` would copy empty shards:
    build a fresh partitioned module from the config instead and load the gathered weights into it."""
    if not _zero3_enabled() or not hasattr(module, "config"):
        return copy.deepcopy(module)
    import deepspeed

    clone = type(module)._from_config(module.config)  # partitioned at construction under zero.Init
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(clone.parameters()), modifier_rank=0):
        clone.load_state_dict(state)
    return clone


def _is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


@contextlib.contextmanager
def _unwrap_for_generation(model, accelerator):
    """The bare module for `generate`. Under DeepSpeed, TRL's `unwrap_model_for_generation` (TRL 1.16,
    trl/models/utils.py), which under ZeRO-3 gathers the sharded parameters with
    `deepspeed.zero.GatheredParameters` and removes/re-adds ZeRO-3's forward hooks around generation;
    otherwise (single process, DDP) `accelerator.unwrap_model` is all it takes (and TRL's import is skipped)."""
    if _is_deepspeed(accelerator):
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
    else:
        yield accelerator.unwrap_model(model)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_ppo(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    reward_fn: Callable[[list[str], list[str]], Sequence[float]],
    cfg: PPOConfig,
    output_dir: str | os.PathLike,
    *,
    ref_policy: nn.Module | None = None,
    accelerator=None,
    gold_fn: Callable[[list[str], list[str]], Sequence[float]] | None = None,
) -> dict:
    """Run PPO on `policy` (a causal LM) and save the result under `output_dir/policy` (HF format).

    `reward_fn(prompts, responses)` scores decoded responses (one float each). `gold_fn`, when given,
    is logged as `gold_mean` per step (e.g. the synthetic benchmark's gold reward). `ref_policy` defaults
    to a frozen deep copy of `policy` (or, with `cfg.use_peft`, the adapter-disabled policy).
    Writes `output_dir/ppo_log.jsonl` (one line per step, rewritten atomically every step),
    `output_dir/ppo_config.json`, `output_dir/ppo_summary.json`, and with `cfg.save_every` resumable
    checkpoints in `output_dir/checkpoint` (a rerun with the same output_dir resumes from it; a run whose
    `policy/` and summary exist is not redone). Returns the summary dict (with the per-step log).
    """
    from accelerate import Accelerator

    output_dir = Path(output_dir)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("train_ppo: no prompts given; the alignment prompt set is empty after filtering")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            "train_ppo: the policy tokenizer needs pad and EOS tokens (see pipeline.models.load_tokenizer)"
        )
    # on a CPU-only box accelerate goes distributed (gloo) under torchrun only with cpu=True
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    summary_path = output_dir / "ppo_summary.json"
    if summary_path.exists() and (output_dir / "policy").is_dir():
        return json.loads(summary_path.read_text())

    # --- models --------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    critic = None
    if cfg.value_model == "critic":
        critic = _clone(_backbone(policy))
    if cfg.use_peft:
        if ref_policy is not None:
            raise ValueError(
                "train_ppo: with use_peft the reference is the adapter-disabled policy; do not pass ref_policy"
            )
        if not hasattr(policy, "disable_adapter"):
            policy = _apply_lora(policy, cfg)
    elif ref_policy is None:
        ref_policy = _clone(policy)
    if ref_policy is not None:
        ref_policy.eval().requires_grad_(False)
    model = PolicyWithValue(policy, cfg.value_model, critic)
    model.eval()  # no dropout anywhere: rollout and update log-probs must agree
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)

    _set_deepspeed_batch_size(accelerator, cfg.mini_batch_size, cfg.max_grad_norm or 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.eval()
    device = accelerator.device
    if ref_policy is not None:
        if _is_deepspeed(accelerator):
            from trl.models.utils import prepare_deepspeed

            ref_policy = prepare_deepspeed(ref_policy, accelerator)
        else:
            ref_policy = ref_policy.to(device)

    # --- resume --------------------------------------------------------------------------------
    ckpt_dir = output_dir / "checkpoint"
    log_path = output_dir / "ppo_log.jsonl"
    start_step, log = 0, []
    if (ckpt_dir / "state.json").exists():
        state = json.loads((ckpt_dir / "state.json").read_text())
        accelerator.load_state(str(ckpt_dir / state["dir"]))
        start_step = state["step"]
        log = _read_log(log_path)[:start_step]
        accelerator.print(f"[ppo] resuming from step {start_step} ({ckpt_dir})")
    if main:
        atomic_write_json(output_dir / "ppo_config.json", asdict(cfg))

    # --- prompts: a seeded order shared by all ranks, each rank takes its slice -----------------
    prompt_ids, n_trunc = _encode_prompts(tokenizer, prompts, cfg.max_prompt_length)
    if n_trunc and main:
        accelerator.print(f"[ppo] {n_trunc} prompts truncated from the left to {cfg.max_prompt_length} tokens")
    global_batch = cfg.rollout_batch_size * world

    def prompt_indices(step: int) -> list[int]:
        per_epoch = max(1, len(prompts) // global_batch)
        epoch, within = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(prompts))
        if len(order) < global_batch:  # fewer prompts than a batch: repeat them
            order = np.resize(order, global_batch)
        chunk = order[within * global_batch : (within + 1) * global_batch]
        return chunk[rank * cfg.rollout_batch_size : (rank + 1) * cfg.rollout_batch_size].tolist()

    bar = progress_bar(
        range(start_step, cfg.num_steps),
        total=cfg.num_steps,
        initial=start_step,
        desc="ppo",
        disable=not (main and cfg.progress),
    )
    stop_ids = [tokenizer.eos_token_id] + [int(t) for t in cfg.stop_token_ids if int(t) != tokenizer.eos_token_id]
    for step in bar:
        t0 = time.time()
        idx = prompt_indices(step)
        batch_prompts = [prompts[i] for i in idx]
        query, query_mask = _left_pad([prompt_ids[i] for i in idx], tokenizer.pad_token_id, device)
        plen = query.shape[1]

        # 1. rollout
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        with torch.no_grad(), _unwrap_for_generation(model, accelerator) as unwrapped:
            generated = unwrapped.policy.generate(
                input_ids=query,
                attention_mask=query_mask,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
        response = generated[:, plen:]
        resp_mask, has_eos = response_mask_from_ids(response, stop_ids)
        response = torch.where(resp_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
        texts = _decode(tokenizer, response, resp_mask, stop_ids)
        scores = _call_scorer(reward_fn, "reward_fn", batch_prompts, texts).to(device)
        gold = _call_scorer(gold_fn, "gold_fn", batch_prompts, texts) if gold_fn is not None else None

        # 2. log-probs and values of the rollout, reference log-probs
        input_ids = torch.cat([query, response], dim=1)
        attn = torch.cat([query_mask, resp_mask], dim=1)
        with torch.no_grad():
            old_logprobs, old_values = [], []
            ref_logprobs = []
            for s in range(0, len(idx), cfg.mini_batch_size):
                sl = slice(s, s + cfg.mini_batch_size)
                logits, values = model(input_ids[sl], attn[sl])
                lp, _ = _response_logprobs(logits, input_ids[sl], plen, cfg.temperature)
                old_logprobs.append(lp)
                old_values.append(values[:, plen - 1 : -1].float())
                ref_logprobs.append(_ref_logprobs(model, accelerator, ref_policy, input_ids[sl], attn[sl], plen, cfg))
            old_logprobs = torch.cat(old_logprobs)
            old_values = torch.cat(old_values) * resp_mask
            ref_logprobs = torch.cat(ref_logprobs)

            # 3-4. rewards, advantages
            rewards, kl, adj_scores = per_token_kl_rewards(
                old_logprobs, ref_logprobs, resp_mask, cfg.kl_coef, scores, cfg.missing_eos_penalty, has_eos
            )
            if cfg.whiten_rewards:
                rewards = whiten(rewards, resp_mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, resp_mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, resp_mask, shift_mean=True)

        # 5. PPO epochs over mini-batches
        stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "entropy")}
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(idx), generator=gen).tolist()
            for s in range(0, len(idx), cfg.mini_batch_size):
                mb = torch.as_tensor(perm[s : s + cfg.mini_batch_size], device=device)
                m = resp_mask[mb]
                logits, values = model(input_ids[mb], attn[mb])
                lp, resp_logits = _response_logprobs(logits, input_ids[mb], plen, cfg.temperature)
                values = values[:, plen - 1 : -1].float()
                pg_loss, clipfrac, approx_kl = clipped_policy_loss(
                    lp, old_logprobs[mb], advantages[mb], m, cfg.cliprange
                )
                vf_loss, vf_clipfrac = clipped_value_loss(values, old_values[mb], returns[mb], m, cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm and not _is_deepspeed(accelerator):
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    ent = masked_mean(entropy_from_logits(resp_logits), m)
                for k, v in zip(stats, (pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, ent)):
                    stats[k].append(v.detach().float())

        # 6. statistics, averaged over ranks
        local = {
            "score_mean": adj_scores.float().mean(),
            "raw_score_mean": scores.float().mean(),
            "kl_mean": kl.sum(1).mean(),
            "response_length": resp_mask.sum(1).float().mean(),
            "eos_fraction": has_eos.float().mean(),
            "advantage_mean_raw": masked_mean(returns - old_values, resp_mask),
            "value_mean": masked_mean(old_values, resp_mask),
            **{k: torch.stack(v).mean() for k, v in stats.items()},
        }
        if gold is not None:
            local["gold_mean"] = gold.float().mean().to(device)
        keys = sorted(local)
        reduced = accelerator.reduce(torch.stack([local[k].to(device).float() for k in keys]), reduction="mean")
        row = {"step": step + 1, **{k: round(float(v), 6) for k, v in zip(keys, reduced.tolist())}}
        row["seconds"] = round(time.time() - t0, 3)
        log.append(row)
        if main:
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
            bar.set_postfix(score=f"{row['raw_score_mean']:.3f}", kl=f"{row['kl_mean']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.num_steps:
            _save_checkpoint(accelerator, ckpt_dir, step + 1)

    # --- save the final policy --------------------------------------------------------------------
    accelerator.wait_for_everyone()
    policy_dir = output_dir / "policy"
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; collective, every rank calls it
    if main:
        unwrapped = accelerator.unwrap_model(model)
        _save_policy(unwrapped, state_dict, tokenizer, policy_dir, cfg)
        summary = _summary(log, cfg, policy_dir)
        atomic_write_json(summary_path, summary)
        remove_tree(ckpt_dir, output_dir)  # the finished policy supersedes the checkpoints
    accelerator.wait_for_everyone()
    return _summary(log, cfg, policy_dir)


def _summary(log: list[dict], cfg: PPOConfig, policy_dir: Path) -> dict:
    def mean_of(key, rows):
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    k = min(3, max(1, len(log) // 2))
    return {
        "policy_dir": str(policy_dir),
        "steps": len(log),
        "first_score_mean": mean_of("raw_score_mean", log[:k]),
        "last_score_mean": mean_of("raw_score_mean", log[-k:]),
        "first_gold_mean": mean_of("gold_mean", log[:k]),
        "last_gold_mean": mean_of("gold_mean", log[-k:]),
        "config": asdict(cfg),
        "log": log,
    }


def _call_scorer(fn, name: str, prompts: list[str], texts: list[str]) -> torch.Tensor:
    """Call a `(prompts, responses) -> scores` function; accept lists, numpy arrays or tensors."""
    out = fn(prompts, texts)
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    scores = torch.as_tensor(np.asarray(out, dtype=np.float64), dtype=torch.float32)
    if scores.shape != (len(texts),):
        raise ValueError(
            f"train_ppo: {name} returned shape {tuple(scores.shape)} for {len(texts)} responses; "
            "it must return one float per (prompt, response)"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"train_ppo: {name} returned non-finite scores: {scores.tolist()}")
    return scores


def _ref_logprobs(model, accelerator, ref_policy, input_ids, attn, plen, cfg):
    pos = position_ids_from_mask(attn)
    if ref_policy is None:  # LoRA: the reference is the same network with its adapter disabled
        policy = accelerator.unwrap_model(model).policy
        with policy.disable_adapter():
            logits = policy(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits
    else:
        logits = ref_policy(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits
    lp, _ = _response_logprobs(logits, input_ids, plen, cfg.temperature)
    return lp


def _encode_prompts(tokenizer, prompts, max_length):
    from pipeline.data.tokenize import encode_left

    ids, n_trunc = encode_left(tokenizer, prompts, max_length, add_eos=False)
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"train_ppo: prompt #{empty[0]} tokenizes to nothing; drop empty prompts")
    return ids, n_trunc


def _left_pad(seqs, pad_id, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _decode(tokenizer, response, mask, eos_id) -> list[str]:
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out = []
    for row, m in zip(response.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t not in stops]
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def _save_checkpoint(accelerator, ckpt_dir: Path, step: int) -> None:
    """Accelerate state (model, optimizer, RNG) of `step` into a fresh folder, then `state.json` (written
    atomically) points at it, then older folders go: a crash at any moment leaves a usable checkpoint."""
    name = f"step-{step:06d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt_dir / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(ckpt_dir / "state.json", {"step": step, "dir": name})
        for old in ckpt_dir.glob("step-*"):
            if old.name != name:
                remove_tree(old, ckpt_dir)
    accelerator.wait_for_everyone()


def _save_policy(unwrapped: PolicyWithValue, state_dict: dict, tokenizer, policy_dir: Path, cfg: PPOConfig) -> None:
    """Save the policy as a plain HF causal LM (LoRA merged; under ZeRO-3 the LoRA adapter) + tokenizer,
    and the value head (and critic) alongside in value_model.safetensors."""
    from safetensors.torch import save_file

    policy_sd = {k[len("policy.") :]: v for k, v in state_dict.items() if k.startswith("policy.")}
    value_sd = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith("policy.")}
    policy = unwrapped.policy
    with atomic_dir(policy_dir) as tmp:
        if cfg.use_peft and _zero3_enabled():
            # the module's parameters are ZeRO-3 shards here (gathering them is collective, and this runs
            # on the main process only): save the adapter from the gathered state dict instead of merging
            policy.save_pretrained(tmp, state_dict=policy_sd)
        elif cfg.use_peft:
            merged = policy.merge_and_unload()  # plain causal LM; the trained weights are already in place
            merged.save_pretrained(tmp)
        else:
            policy.save_pretrained(tmp, state_dict=policy_sd)
        tokenizer.save_pretrained(tmp)
        save_file(value_sd, str(Path(tmp) / "value_model.safetensors"))
