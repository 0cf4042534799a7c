"""Batched reward-model scoring: sort by length, pad per batch, no gradients, bf16 where it helps.

Shared by the calibration stage (scores every RM on every test split) and the alignment stage
(scores sampled responses, possibly tokenized by another tokenizer than the policy's).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.data.tokenize import encode_left, encode_pairs, pad_right
from pipeline.logs import progress_bar


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
    bar = progress_bar(total=len(ids), desc="scoring", disable=not progress)
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


def unwrap_model(model):
    """The transformers model inside PEFT / DeepSpeed / DDP wrappers (whose forward hides its signature)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def packable(model) -> bool:
    """Decoder RMs with an attention kernel that takes a 4D mask (sdpa/eager) and position ids can take a
    pair packed (GPT-NeoX, Llama/Mistral/Qwen families, GPT-2). BERT-like encoders and flash-attention
    kernels cannot."""
    model = unwrap_model(model)
    params = inspect.signature(model.forward).parameters
    decoder = "cache" in params or "past_key_values" in params  # BERT-style encoders take neither
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return decoder and "position_ids" in params and impl in ("sdpa", "eager")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens both sides of a pair share and a packed pair encodes once (the prompt). At least 2 tokens of
    each side stay out of it, so each side keeps its own last tokens; 0 when they share nothing."""
    return max(0, min(_common_prefix(chosen, rejected), len(chosen) - 2, len(rejected) - 2))


def _readout(seq: Sequence[int], pad_id: int | None) -> int:
    """Index the model pools at: the rightmost token that is not the pad token (transformers' rule)."""
    if pad_id is None:
        return len(seq) - 1
    for j in range(len(seq) - 1, -1, -1):
        if seq[j] != pad_id:
            return j
    return 0


def packed_length(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens of a pair packed with one copy of its shared prefix."""
    return len(chosen) + len(rejected) - shared_prefix(chosen, rejected)


def pack_pair_rows(
    rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], pad_id: int, readout_pad_id: int | None = None
):
    """Lay out preference pairs packed into rows: each row holds one or more pairs back to back, each pair
    as prefix + chosen continuation + rejected continuation (see `shared_prefix`).

    Positions restart at 0 for every pair and at the prefix length for the rejected continuation; the 4D
    boolean attention mask [B, 1, W, W] is causal within a pair, lets the rejected continuation see the
    prefix but not the chosen one, and keeps pairs of one row apart. Padding rows attend to themselves only
    (no empty softmax). Returns `(input_ids [B, W], position_ids [B, W], mask, read_c, read_r)` where
    read_c/read_r are flat indices into the B*W positions of each pair's pooling token (the rightmost token
    that is not `readout_pad_id`, transformers' rule), in the order the pairs were given, row by row.
    """
    lengths = [sum(packed_length(c, r) for c, r in row) for row in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    read_c, read_r = [], []
    for b, row in enumerate(rows):
        at = 0
        for c, r in row:
            L = shared_prefix(c, r)
            t = len(c) + len(r) - L
            s = slice(at, at + t)
            ids[b, s] = torch.as_tensor(list(c) + list(r[L:]), dtype=torch.long)
            pos[b, at : at + len(c)] = torch.arange(len(c))
            pos[b, at + len(c) : at + t] = torch.arange(L, len(r))
            mask[b, 0, s, s] = torch.tril(torch.ones(t, t, dtype=torch.bool))
            mask[b, 0, at + len(c) : at + t, at + L : at + len(c)] = False  # rejected cannot see chosen
            k_c, k_r = _readout(c, readout_pad_id), _readout(r, readout_pad_id)
            read_c.append(b * width + at + k_c)
            read_r.append(b * width + at + (k_r if k_r < L else len(c) + k_r - L))
            at += t
        mask[b, 0, at:, at:] = torch.eye(width - at, dtype=torch.bool)
    return ids, pos, mask, read_c, read_r


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
    share_prefix: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) for tokenized pairs.

    Decoder RMs (with `share_prefix`): each pair is PACKED into one sequence, prefix + chosen
    continuation + rejected continuation, where the prefix is the tokens both sides share (the prompt),
    position ids restart after the prefix for the rejected continuation, and a 4D attention mask stops
    it from seeing the chosen one. Rewards are read from the reward head at each side's pooling token.
    Same rewards as scoring the two full sequences (tested to 1e-5 in fp32) with one copy of the prompt.
    Encoder RMs (BERT), other attention kernels, and pairs without a shared prefix go through
    `score_ids` (all sequences sorted by length, padded per batch). `batch_size` counts sequences; a
    packed pair counts as two.
    """
    from pipeline.reward.trainer import find_reward_head

    n = len(chosen_ids)
    can_pack = share_prefix and packable(model)
    prefix = [shared_prefix(c, r) for c, r in zip(chosen_ids, rejected_ids)]
    packed = [i for i in range(n) if can_pack and prefix[i] >= 1]
    plain = [i for i in range(n) if not (can_pack and prefix[i] >= 1)]
    r_c, r_r = np.empty(n), np.empty(n)
    if plain:
        out = score_ids(
            model,
            [chosen_ids[i] for i in plain] + [rejected_ids[i] for i in plain],
            pad_id,
            batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch,
            dtype=dtype,
            temperature=temperature,
            progress=progress,
        )
        r_c[plain], r_r[plain] = out[: len(plain)], out[len(plain) :]
    if not packed:
        return r_c, r_r
    device = next(model.parameters()).device
    if dtype == "auto":
        dtype = autocast_dtype(device)
    head = find_reward_head(model)
    captured = {}
    handle = head.register_forward_hook(lambda mod, inp, out: captured.update(z=inp[0]))
    was_training = model.training
    model.eval()
    width_of = {i: len(chosen_ids[i]) + len(rejected_ids[i]) - prefix[i] for i in packed}
    order = sorted(packed, key=lambda i: -width_of[i])
    bar = progress_bar(total=len(order), desc="scoring pairs", disable=not progress)
    start = 0
    try:
        while start < len(order):
            width = width_of[order[start]]
            m = max(1, batch_size // 2)
            if max_tokens_per_batch:
                m = max(1, min(m, max_tokens_per_batch // max(width, 1)))
            idx = order[start : start + m]
            ids, pos, mask, read_c, read_r = pack_pair_rows(
                [[(chosen_ids[i], rejected_ids[i])] for i in idx], pad_id, pad_id
            )
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device))
            z = captured.pop("z")
            z = z.reshape(-1, z.shape[-1])
            feats = z[torch.tensor(read_c + read_r, device=z.device)]
            with torch.autocast(device.type, enabled=False):  # the head at its weights' precision
                rewards = head(feats.to(next(head.parameters()).dtype))
            captured.clear()  # the hook also saw this call
            rewards = rewards.float().reshape(2 * len(idx), -1)[:, 0].cpu().double().numpy() / temperature
            r_c[idx], r_r[idx] = rewards[: len(idx)], rewards[len(idx) :]
            start += len(idx)
            bar.update(len(idx))
    finally:
        handle.remove()
        bar.close()
        model.train(was_training)
    return r_c, r_r


def score_pairs(
    model, tokenizer, prompts, chosen, rejected, *, conversations=None, max_length: int | None = 512, **kwargs
):
    """(r_chosen, r_rejected) arrays for preference pairs in the project schema, rendered for the RM's
    tokenizer by `encode_pairs` (its chat template for conversational rows, given as `conversations`, the
    rows' `conversation` column). For decoder RMs each pair is packed with one copy of its shared prefix,
    the rendered prompt (see `score_pair_ids`)."""
    c_ids, r_ids, _ = encode_pairs(tokenizer, prompts, chosen, rejected, conversations, max_length)
    return score_pair_ids(model, c_ids, r_ids, tokenizer.pad_token_id, **kwargs)
