"""Batched reward-model scoring: sort by length, pad per batch, no gradients, bf16 where it helps.

Shared by the calibration stage (scores every RM on every test split) and the alignment stage
(scores sampled responses, possibly tokenized by another tokenizer than the policy's).
"""

from __future__ import annotations

import inspect
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


def _cache_kwarg(model) -> str | None:
    """The forward argument that takes a KV cache ('cache' in transformers 5, else 'past_key_values');
    None for encoders (BERT), whose tokens all see each other, so no prefix can be shared."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def score_pair_ids(
    model,
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = 16,
    max_tokens_per_batch: int | None = None,
    dtype: torch.dtype | None | str = "auto",
    temperature: float = 1.0,
    share_prefix: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) for tokenized pairs.

    Default: all 2N sequences through `score_ids` (sorted by length, padded per batch).
    `share_prefix=True` (decoder RMs): the two sides' common token prefix (the prompt) is encoded ONCE
    per pair: prefixes run left-padded with a KV cache, which is repeated for the chosen and rejected
    continuations (right-padded, positions continuing each row's prefix). Same rewards (tested). On the
    2-core CPU it measured SLOWER despite ~70% shared tokens (scripts/bench_scoring.py --pairs 200: 1.84x
    vs 2.23x over the naive loop), because prefix and suffix are padded separately and the per-call
    batches are smaller; it is kept as an option for long shared prompts and GPUs, off by default.
    """
    n = len(chosen_ids)
    cache_kw = _cache_kwarg(model) if share_prefix else None
    # Keep >= 2 tokens of each side out of the prefix, so each continuation holds its own last tokens
    # (and a trailing EOS that equals the pad token cannot leave a side without a non-pad token).
    prefix = [min(_common_prefix(c, r), len(c) - 2, len(r) - 2) for c, r in zip(chosen_ids, rejected_ids)]
    shared = [i for i in range(n) if cache_kw is not None and prefix[i] >= 1]
    plain = [i for i in range(n) if cache_kw is None or prefix[i] < 1]
    r_c, r_r = np.empty(n), np.empty(n)
    if plain:
        out = score_ids(model, [chosen_ids[i] for i in plain] + [rejected_ids[i] for i in plain], pad_id,
                        batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, dtype=dtype,
                        temperature=temperature, progress=progress)
        r_c[plain], r_r[plain] = out[: len(plain)], out[len(plain) :]
    if not shared:
        return r_c, r_r
    device = next(model.parameters()).device
    if dtype == "auto":
        dtype = autocast_dtype(device)
    was_training = model.training
    model.eval()
    total = {i: max(len(chosen_ids[i]), len(rejected_ids[i])) for i in shared}
    order = sorted(shared, key=lambda i: -total[i])
    pairs_per_batch = max(1, batch_size // 2)
    bar = tqdm(total=len(order), desc="scoring pairs", disable=not progress)
    start = 0
    with _FP32Head(model, enabled=dtype is not None):
        while start < len(order):
            m = pairs_per_batch
            if max_tokens_per_batch:
                m = max(1, min(m, max_tokens_per_batch // (2 * max(total[order[start]], 1))))
            idx = order[start : start + m]
            p_len = torch.tensor([prefix[i] for i in idx])
            width = int(p_len.max())
            # prefixes, LEFT-padded so every row's prefix ends at the same column
            pre_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            pre_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                pre_ids[row, width - prefix[i] :] = torch.as_tensor(chosen_ids[i][: prefix[i]])
                pre_mask[row, width - prefix[i] :] = 1
            pre_pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
            # continuations, chosen and rejected interleaved, RIGHT-padded
            suffixes = [seq[prefix[i] :] for i in idx for seq in (chosen_ids[i], rejected_ids[i])]
            suf_ids, suf_mask = pad_right(suffixes, pad_id)
            suf_pos = p_len.repeat_interleave(2).unsqueeze(1) + torch.arange(suf_ids.shape[1]).unsqueeze(0)
            full_mask = torch.cat([pre_mask.repeat_interleave(2, dim=0), suf_mask], dim=1)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(input_ids=pre_ids.to(device), attention_mask=pre_mask.to(device),
                            position_ids=pre_pos.to(device), use_cache=True)
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                cache.batch_repeat_interleave(2)
                logits = model(input_ids=suf_ids.to(device), attention_mask=full_mask.to(device),
                               position_ids=suf_pos.to(device), use_cache=True, **{cache_kw: cache}).logits
            rewards = logits.float().reshape(2 * len(idx), -1)[:, 0].cpu().double().numpy() / temperature
            r_c[idx], r_r[idx] = rewards[0::2], rewards[1::2]
            start += len(idx)
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return r_c, r_r


def score_pairs(model, tokenizer, prompts, chosen, rejected, *, max_length: int | None = 512, **kwargs):
    """(r_chosen, r_rejected) arrays for preference pairs in the project schema (shared prompts encoded
    once per pair for decoder RMs, see `score_pair_ids`)."""
    c_ids, _ = encode_left(tokenizer, [p + c for p, c in zip(prompts, chosen)], max_length)
    r_ids, _ = encode_left(tokenizer, [p + r for p, r in zip(prompts, rejected)], max_length)
    return score_pair_ids(model, c_ids, r_ids, tokenizer.pad_token_id, **kwargs)
