"""The model side of PPO: `PolicyWithValue` (a causal LM policy plus its value function, a scalar head on the
policy's last hidden state or a separate critic, in one module so that one `Accelerator.prepare` wraps both),
the response log-probs it yields, LoRA adapters, and copies of a model that also work under DeepSpeed ZeRO-3.

Imports: torch, `pipeline.align.ppo.functional` and `.config`; peft, deepspeed and transformers inside the
functions that need them.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import PPOConfig
from .functional import logprobs_from_logits, position_ids_from_mask


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
