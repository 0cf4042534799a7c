"""Left-truncating tokenization shared by training, scoring and alignment.

TRL's `RewardConfig.max_length` drops pairs longer than the limit. We keep every pair and cut tokens
from the LEFT (the oldest dialogue turns), so that the response, which the reward is about, survives.
Special tokens survive too: a BERT-style tokenizer keeps its [CLS] (its pooling token) and [SEP]; a
decoder tokenizer that adds no special tokens gets an EOS appended, as TRL does, so the reward is read
at a token that has seen the whole response.
"""

from __future__ import annotations

from collections.abc import Sequence


def encode_left(tokenizer, texts: Sequence[str], max_length: int | None, *, add_eos: bool = True):
    """Tokenize `texts` and truncate each from the left to at most `max_length` tokens.

    Returns `(ids, n_truncated)`: a list of token-id lists and how many texts lost tokens.
    """
    if max_length is not None and max_length < 4:
        raise ValueError(f"max_length must be at least 4 tokens, got {max_length}")
    bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    eos = [tokenizer.eos_token_id] if (add_eos and n_special == 0 and tokenizer.eos_token_id is not None) else []
    out, n_truncated = [], 0
    for body in bodies:
        if max_length is not None:
            keep = max_length - n_special - len(eos)
            if len(body) > keep:
                body = body[len(body) - keep :]
                n_truncated += 1
        ids = tokenizer.build_inputs_with_special_tokens(body) if n_special else list(body)
        if eos and (not ids or ids[-1] != eos[0]):
            ids = ids + eos
        out.append(ids)
    return out, n_truncated


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, multiple_of: int | None = None):
    """Right-pad id lists into `(input_ids, attention_mask)` long tensors."""
    import torch

    width = max(len(s) for s in seqs)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
