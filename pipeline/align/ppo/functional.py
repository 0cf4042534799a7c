"""The math of PPO for language models as small pure functions over `[batch, time]` tensors: masked
statistics and whitening, GAE, log-probs and entropy from logits, the clipped policy and value losses,
per-token KL rewards, and the masks and position ids of left-padded prompts and generated responses.

Padding rules: a `mask` marks the real tokens (1) of each row; masked-out entries take no part in any mean,
variance or recursion and come out as 0 where a tensor is returned. Each function is tested against an
independent reference (tests/test_ppo.py).

Imports: torch and the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
