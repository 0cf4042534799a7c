"""Batched reward-model scoring: sort by length, pad per batch, no gradients, bf16 where it helps.

Shared by the calibration stage (`score_rm`: every RM on every test and validation split, sharded over the
processes) and the alignment stage (scores sampled responses, possibly tokenized by another tokenizer than the
policy's). A leaf: imports `pipeline.data.tokenize`, `pipeline.layout` and `pipeline.logs`, never a stage package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.data.tokenize import encode_left, encode_pairs, pad_right
from pipeline.layout import (
    find_reward_head,
    model_pad_id,
    pack_pair_rows,
    packed_attention_mask,
    packing_problem,
    shared_prefix,
)
from pipeline.logs import progress_bar


# Scoring dtype names (calibration.dtype) -> the autocast dtype: "auto" (`autocast_dtype`), a torch dtype name,
# or None (no autocast, fp32).
AUTOCAST = {
    "auto": "auto",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": None,
    "float32": None,
    "none": None,
}


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
    """Rewards for pre-tokenized sequences, in input order (float64 numpy array): each the reward the model's own
    forward pass gives the sequence alone.

    Rows are filled with the MODEL's config pad id, so the model reads each reward where it reads it on the
    sequence alone (the rightmost token that is not its pad id) whatever `pad_id` (the caller's, e.g. the
    tokenizer's) is. A model whose config has no pad id is scored one sequence at a time (transformers pools no
    batch without one); `pad_id` is then unused.
    """
    device = next(model.parameters()).device
    if dtype == "auto":
        dtype = autocast_dtype(device)
    was_training = model.training
    model.eval()
    fill = model_pad_id(model)
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
            if fill is None:  # transformers pools a batch of one only (its last token) when the config has no pad id
                idx = idx[:1]
            input_ids, mask = pad_right([ids[i] for i in idx], pad_id if fill is None else fill)
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
    it from seeing the chosen one (`pipeline.layout`: boolean for sdpa, additive for eager, the model's
    sliding window applied). Rewards are read from the reward head at each side's pooling token, where the
    model reads it (its config pad id, not `pad_id`). Same rewards as the model's own forward pass on each
    full sequence alone (tested to 1e-5 in fp32) with one copy of the prompt. Models that cannot take the
    packed layout exactly (`pipeline.layout.packing_problem`: encoders, flash/flex kernels, attention
    patterns it does not lay out) and pairs without a shared prefix go through `score_ids` (all sequences sorted by length,
    padded per batch). `batch_size` counts sequences; a packed pair counts as two.
    """
    n = len(chosen_ids)
    can_pack = share_prefix and packing_problem(model) is None
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
    readout_pad = model_pad_id(model)  # where the model reads its reward, whatever id the caller pads with
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
            rows = [[(chosen_ids[i], rejected_ids[i])] for i in idx]
            if readout_pad is None:  # transformers runs no batch of several rows without a pad id: one row
                rows = [[pair for row in rows for pair in row]]
            ids, pos, mask, read_c, read_r = pack_pair_rows(rows, pad_id, readout_pad)
            mask = packed_attention_mask(model, mask.to(device), pos.to(device))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device))
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


def score_rm(model, tok, data: dict, cfg, max_length: int | None, state=None) -> dict:
    """{source: {split: (r_chosen, r_rejected)}} for every split in `data`, in one sorted scoring pass.

    `data`: {source: {split: Dataset or None}} in the project schema; `cfg`: the calibration section (its
    `dtype`, a key of AUTOCAST, `batch_size`, `max_tokens_per_batch` and `progress`). Under several processes
    (`state`, an accelerate PartialState) every rank scores a contiguous shard and the shards are gathered.
    """
    keys, prompts, chosen, rejected, convs = [], [], [], [], []
    for source, by_split in data.items():
        for split, ds in by_split.items():
            if ds is None:
                continue
            keys.append((source, split, len(ds)))
            prompts += list(ds["prompt"])
            chosen += list(ds["chosen"])
            rejected += list(ds["rejected"])
            # conversational rows: rendered with the RM's chat template (pipeline.data.render)
            convs += list(ds["conversation"]) if "conversation" in ds.column_names else [""] * len(ds)
    n = len(prompts)
    dtype = AUTOCAST[cfg.dtype]
    dtype = getattr(torch, dtype) if dtype not in (None, "auto") else dtype
    kwargs = dict(
        max_length=max_length,
        batch_size=cfg.batch_size,
        max_tokens_per_batch=cfg.max_tokens_per_batch,
        dtype=dtype,
        progress=cfg.progress,
    )
    world = state.num_processes if state is not None else 1
    if world > 1:
        from accelerate.utils import gather_object

        bounds = np.linspace(0, n, world + 1).astype(int)
        lo, hi = bounds[state.process_index], bounds[state.process_index + 1]
        part = (
            score_pairs(
                model, tok, prompts[lo:hi], chosen[lo:hi], rejected[lo:hi], conversations=convs[lo:hi], **kwargs
            )
            if hi > lo
            else ([], [])
        )
        shards = gather_object([(int(lo), np.asarray(part[0]).tolist(), np.asarray(part[1]).tolist())])
        rc, rr = np.empty(n), np.empty(n)
        for start, c, r in shards:
            rc[start : start + len(c)], rr[start : start + len(r)] = c, r
    else:
        rc, rr = score_pairs(model, tok, prompts, chosen, rejected, conversations=convs, **kwargs)
    return by_source_split(keys, rc, rr)


def by_source_split(keys: list[tuple[str, str, int]], rc, rr) -> dict:
    """{source: {split: (r_chosen, r_rejected)}} from the flat rewards of the (source, split, size) blocks in
    `keys`, in that order."""
    out: dict = {}
    start = 0
    for source, split, size in keys:
        out.setdefault(source, {})[split] = (rc[start : start + size], rr[start : start + size])
        start += size
    return out
