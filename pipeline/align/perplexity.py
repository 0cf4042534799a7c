"""Perplexity of reference answers under a policy, response tokens only (the paper's PPL columns).

PPL = exp( sum of -log p(response token | prompt, earlier response tokens) / number of response tokens ),
pooled over all answers (token-weighted, as a language-model perplexity is). The prompt and the
response are tokenized separately and joined, exactly as the policy generates (its response tokens
follow the prompt's tokens); over-long examples lose prompt tokens from the left first
(`pipeline.policy.warm_start.response_mask_labels`). No EOS is appended: the answer text alone is scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


IGNORE_INDEX = -100


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL over positions whose label is not IGNORE_INDEX, number of such tokens).

    `logits[b, t]` predicts `labels[b, t + 1]`; the sum is accumulated in float64.
    """
    shift_logits = logits[:, :-1, :].double()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if not mask.any():
        return 0.0, 0
    logp = torch.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(picked * mask).sum()), int(mask.sum())


def response_examples(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int):
    """`(input_ids, labels)` per example: prompt tokens (+ BOS if the tokenizer adds one) then response tokens."""
    from pipeline.policy.warm_start import response_mask_labels

    if len(prompts) != len(responses):
        raise ValueError(f"perplexity: {len(prompts)} prompts but {len(responses)} responses")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [response_mask_labels(p, r, None, max_length) for p, r in zip(p_ids, r_ids)]


@torch.no_grad()
def response_nll(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_length: int = 512, batch_size: int = 8
) -> tuple[float, int]:
    """(total NLL of the response tokens, their number) under `model`, batched with right padding."""
    from pipeline.policy.warm_start import collate_right

    examples = response_examples(tokenizer, prompts, responses, max_length)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            batch = collate_right([examples[i] for i in order[start : start + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, c = masked_nll_sum(logits, batch["labels"])
            total += s
            count += c
    finally:
        model.train(was_training)
    return total, count


def response_perplexity(model, tokenizer, prompts, responses, *, max_length: int = 512, batch_size: int = 8) -> float:
    """Token-pooled perplexity of `responses` given `prompts` (NaN when there is no response token)."""
    total, count = response_nll(model, tokenizer, prompts, responses, max_length=max_length, batch_size=batch_size)
    return math.exp(total / count) if count else float("nan")
