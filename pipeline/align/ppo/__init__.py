"""PPO for language models, implemented here (TRL 1.16 no longer ships a PPO trainer). Experimental: RLOO through
TRL's `RLOOTrainer` is the supported RL method.

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

The math is in small pure functions (`functional`), tested against independent references.
`train_ppo` (`trainer`) only wires them. The value function is either a scalar head on the policy's last hidden
state (`value_model="head"`, one network) or a separate critic, a copy of the policy backbone with its own
scalar head (`value_model="critic"`); both live in one `PolicyWithValue` module so that one
`Accelerator.prepare` call wraps them for DDP or DeepSpeed (`model`); `PPOConfig` (`config`) holds the
hyper-parameters. `trainer` documents the distributed set-up and the files a run writes.

Imports: the modules of this package (this file only re-exports their public names).
"""

from .config import PPOConfig
from .functional import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    per_token_kl_rewards,
    position_ids_from_mask,
    response_mask_from_ids,
    whiten,
)
from .model import PolicyWithValue
from .trainer import train_ppo


__all__ = [
    "PPOConfig",
    "PolicyWithValue",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "gae",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "per_token_kl_rewards",
    "position_ids_from_mask",
    "response_mask_from_ids",
    "train_ppo",
    "whiten",
]
