"""Left-truncating tokenization shared by training, scoring and alignment.

TRL's `RewardConfig.max_length` drops pairs longer than the limit; the pipeline keeps every pair and cuts
tokens from the LEFT (the oldest dialogue turns), so that the response, which the reward is about, survives
(`MORERewardTrainer` does either, by its `truncation` option).
Special tokens survive too: a BERT-style tokenizer keeps its [CLS] (its pooling token) and [SEP]; a
decoder tokenizer that adds no special token after a text (none at all, or only a BOS like Llama 3's)
gets an EOS appended, as TRL does, so the reward is read at a token that has seen the whole response.
"""

from __future__ import annotations

from collections.abc import Sequence


def encode_left(tokenizer, texts: Sequence[str], max_length: int | None, *, add_eos: bool = True):
    """Tokenize `texts` and truncate each from the left to at most `max_length` tokens.

    Returns `(ids, n_truncated)`: a list of token-id lists and how many texts lost tokens.
    """
    ids, flags = encode_left_flags(tokenizer, texts, max_length, add_eos=add_eos)
    return ids, sum(flags)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single text ([CLS] / [SEP] for BERT, often none).

    Found by encoding a probe with and without special tokens (transformers 5 tokenizers no longer all
    offer build_inputs_with_special_tokens).
    """
    probe = "hello"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(body) + 1):
        if with_special[i : i + len(body)] == body:
            return list(with_special[:i]), list(with_special[i + len(body) :])
    return [], []


def encode_left_flags(
    tokenizer, texts: Sequence[str], max_length: int | None, *, add_eos: bool = True, templated: bool = False
):
    """Like `encode_left`, but returns `(ids, truncated)` with one bool per text.

    `templated`: the texts come from a chat template (`pipeline.data.render`), which writes its own special
    tokens: nothing is added (no [CLS]/[SEP], no EOS), and the cut from the left keeps the template's tail
    (the final assistant turn's end-of-turn markers) whole, so the reward head reads the same last token.
    """
    if max_length is not None and max_length < 4:
        raise ValueError(f"max_length must be at least 4 tokens, got {max_length}")
    bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    prefix, suffix = ([], []) if templated else special_affixes(tokenizer)
    add_eos = add_eos and not templated
    n_special = len(prefix) + len(suffix)
    # TRL appends the EOS whenever the tokenizer closes a text with nothing of its own (a BOS-only tokenizer
    # such as Llama 3's included); a closing special token ([SEP], </s>) is the pooling end already
    eos = [tokenizer.eos_token_id] if (add_eos and not suffix and tokenizer.eos_token_id is not None) else []
    out, truncated = [], []
    for body in bodies:
        cut = False
        if max_length is not None:
            keep = max_length - n_special - len(eos)
            if len(body) > keep:
                body = body[len(body) - keep :]
                cut = True
        ids = prefix + list(body) + suffix
        if eos and (not ids or ids[-1] != eos[0]):
            ids = ids + eos
        out.append(ids)
        truncated.append(cut)
    return out, truncated


def truncate_left(ids: Sequence[int], max_length: int, prefix: Sequence[int] = ()) -> list[int]:
    """`ids` cut from the LEFT to at most `max_length`, keeping a leading `prefix` (a BERT tokenizer's [CLS],
    its pooling token) when the ids start with it: what `encode_left` does to an already tokenized text."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    head = list(prefix) if prefix and ids[: len(prefix)] == list(prefix) else []
    return head + ids[len(ids) - (max_length - len(head)) :]


def truncated_pair(chosen_ids, rejected_ids, max_length: int, prefix: Sequence[int] = ()) -> dict:
    """Both sides of a tokenized pair cut from the left (`truncate_left`), as a dataset row."""
    return {
        "chosen_ids": truncate_left(chosen_ids, max_length, prefix),
        "rejected_ids": truncate_left(rejected_ids, max_length, prefix),
    }


def encode_pairs(tokenizer, prompts, chosen, rejected, conversations=None, max_length: int | None = None):
    """Token ids of `prompt + chosen` and `prompt + rejected` for rows of the project schema, each pair
    rendered for `tokenizer` by `pipeline.data.render.render_pair` (chat template for conversational rows
    when the tokenizer has one, the strings as they are otherwise) and LEFT-truncated by `encode_left`.

    Returns `(chosen_ids, rejected_ids, truncated)` with one bool per pair (either side lost tokens).
    """
    from .render import render_pair

    conversations = conversations if conversations is not None else [None] * len(prompts)
    rendered = [render_pair(tokenizer, p, c, r, v) for p, c, r, v in zip(prompts, chosen, rejected, conversations)]
    c_ids, r_ids, flags = [None] * len(rendered), [None] * len(rendered), [False] * len(rendered)
    for templated in (False, True):
        idx = [i for i, x in enumerate(rendered) if x.templated == templated]
        if not idx:
            continue
        c, fc = encode_left_flags(
            tokenizer, [rendered[i].prompt + rendered[i].chosen for i in idx], max_length, templated=templated
        )
        r, fr = encode_left_flags(
            tokenizer, [rendered[i].prompt + rendered[i].rejected for i in idx], max_length, templated=templated
        )
        for k, i in enumerate(idx):
            c_ids[i], r_ids[i], flags[i] = c[k], r[k], fc[k] or fr[k]
    return c_ids, r_ids, flags


def encode_responses(tokenizer, prompts, responses, conversations=None, max_length: int | None = None):
    """Token ids of `prompt + response` for scoring generated responses with an RM: a conversational prompt
    (its `{"prompt": [...]}` messages in `conversations`) gets the response as an assistant message under
    the tokenizer's chat template (`render_response`); other prompts are `prompt + response` text."""
    from .render import render_response

    conversations = conversations if conversations is not None else [None] * len(prompts)
    rendered = [render_response(tokenizer, p, r, c) for p, r, c in zip(prompts, responses, conversations)]
    out = [None] * len(rendered)
    for templated in (False, True):
        idx = [i for i, x in enumerate(rendered) if x[2] == templated]
        if idx:
            ids, _ = encode_left_flags(
                tokenizer, [rendered[i][0] + rendered[i][1] for i in idx], max_length, templated=templated
            )
            for k, i in enumerate(idx):
                out[i] = ids[k]
    return out


def tokenize_pairs(ds, tokenizer, max_length: int | None, *, keep_text: bool = False, batch_size: int = 1024):
    """Tokenize preference pairs: `prompt + chosen` and `prompt + rejected` rendered for the tokenizer
    (`encode_pairs`: a chat template for conversational rows when it has one), LEFT-truncated by `encode_left`.
    Without a `prompt` column (TRL's implicit-prompt text layout) `chosen` and `rejected` are the whole texts.

    Returns `(dataset, n_truncated)`: the dataset has int-list columns `chosen_ids` and `rejected_ids` and
    keeps every non-text column (`source_id`, `margin`, `true_prob`, ...; the string columns prompt,
    chosen, rejected and source too when `keep_text`). `n_truncated` counts PAIRS where either side lost
    tokens; it is logged.
    """
    import logging

    import datasets

    text_cols = {"prompt", "chosen", "rejected", "source", "conversation"}
    for c in ("chosen", "rejected"):
        if c not in ds.column_names:
            raise ValueError(f"tokenize_pairs: the dataset has no {c!r} column (columns: {ds.column_names})")
    chosen_ids, rejected_ids, n_truncated = [], [], 0
    for start in range(0, len(ds), batch_size):
        batch = ds[start : start + batch_size]
        # TRL's implicit-prompt layout: chosen/rejected hold the whole text (its prompt included), which is
        # what gets tokenized; the prompt is then the empty string
        prompts = batch["prompt"] if "prompt" in batch else [""] * len(batch["chosen"])
        c, r, flags = encode_pairs(
            tokenizer, prompts, batch["chosen"], batch["rejected"], batch.get("conversation"), max_length
        )
        chosen_ids += c
        rejected_ids += r
        n_truncated += sum(flags)
    keep = [c for c in ds.column_names if keep_text or c not in text_cols]
    keep = [c for c in keep if c not in ("chosen_ids", "rejected_ids")]
    if keep:
        out = ds.select_columns(keep).add_column("chosen_ids", chosen_ids).add_column("rejected_ids", rejected_ids)
    else:
        out = datasets.Dataset.from_dict({"chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    logging.getLogger(__name__).info(
        "tokenize_pairs: %d of %d pairs truncated from the left to max_length=%s", n_truncated, len(ds), max_length
    )
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
