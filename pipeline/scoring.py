"""Batched reward-model scoring: sort by length, pad per batch, no gradients, bf16 where it helps.

Shared by the calibration stage (scores every RM on every test split) and the alignment stage
(scores sampled responses, possibly tokenized by another tokenizer than the policy's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data.tokenize import encode_left, pad_right


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it and on CPU (where bf16 matmuls are ~3x faster); else None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return None


class _FP32Head:
    """Context manager: run a Linear reward head in fp32 inside autocast, so bf16 scoring does not round
    rewards to ~3 significant digits (which would create artificial ties and coarse probabilities)."""

    def __init__(self, model, enabled: bool):
        from pipeline.reward.trainer import find_reward_head

        self.handle = None
        if enabled:
            try:
                head = find_reward_head(model)
            except ValueError:
                return
            if isinstance(head, torch.nn.Linear):
                self.handle = head.register_forward_hook(self._hook)

    @staticmethod
    def _hook(module, inputs, output):
        with torch.autocast(inputs[0].device.type, enabled=False):
            bias = None if module.bias is None else module.bias.float()
            return torch.nn.functional.linear(inputs[0].float(), module.weight.float(), bias)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def score_ids(
    model,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = 16,
    max_tokens_per_batch: int | None = None,
    dtype: torch.dtype | None | str = "auto",
    temperature: float = 1.0,
    progress: bool = False,
) -> np.ndarray:
    """Rewards for pre-tokenized sequences, in input order (float64 numpy array)."""
    device = next(model.parameters()).device
    if dtype == "auto":
        dtype = autocast_dtype(device)
    was_training = model.training
    model.eval()
    order = np.argsort([-len(s) for s in ids], kind="stable")  # longest first: OOM shows up at once
    out = np.empty(len(ids), dtype=np.float64)
    start = 0
    bar = tqdm(total=len(ids), desc="scoring", disable=not progress)
    with _FP32Head(model, enabled=dtype is not None):
        while start < len(order):
            width = len(ids[order[start]])
            n = batch_size
            if max_tokens_per_batch:
                n = max(1, min(batch_size, max_tokens_per_batch // max(width, 1)))
            idx = order[start : start + n]
            input_ids, mask = pad_right([ids[i] for i in idx], pad_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            out[idx] = logits.float().reshape(len(idx), -1)[:, 0].cpu().double().numpy() / temperature
            start += len(idx)
            bar.update(len(idx))
        bar.close()
    model.train(was_training)
    return out


def score_texts(model, tokenizer, texts: Sequence[str], *, max_length: int | None = 512, **kwargs) -> np.ndarray:
    """Rewards of full texts (prompt + response), left-truncated with the RM's own tokenizer."""
    ids, _ = encode_left(tokenizer, texts, max_length)
    return score_ids(model, ids, tokenizer.pad_token_id, **kwargs)


def score_pairs(model, tokenizer, prompts, chosen, rejected, *, max_length: int | None = 512, **kwargs):
    """(r_chosen, r_rejected) arrays for preference pairs in the project schema."""
    texts = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    rewards = score_texts(model, tokenizer, texts, max_length=max_length, **kwargs)
    return rewards[: len(prompts)], rewards[len(prompts) :]
