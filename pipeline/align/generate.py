"""Batched sampling of n completions per prompt: the alignment stage's generator.

One `model.generate` call serves a whole batch of prompts with `num_return_sequences=n`, so the
prompt is encoded once per call and every decoding step runs over `batch * n` sequences (the
per-prompt loop runs `n` sequences per step and leaves most of an accelerator idle; see
scripts/bench_generate.py). Details that matter:

* prompts are tokenized by the POLICY's tokenizer, left-truncated to `max_prompt_length` (a leading
  BOS survives), sorted by length (longest first) so a batch holds prompts of similar length and
  little padding, LEFT-padded so every row's last prompt token sits in the same column, and the
  results are put back in input order;
* the KV cache is on (`use_cache=True`), and each prompt is encoded ONCE: all its tokens but the last go
  through one forward pass whose KV cache is repeated for its n samples (plain `generate` repeats the
  prompt n times before the prefill, paying its forward pass n times);
* on CUDA the forward runs under bf16 (fp16 where bf16 is not supported) autocast unless the model
  already is in half precision;
* each completion is cut at its first EOS (the EOS is not part of the text; `ended` records whether
  the policy stopped by itself or ran into `max_new_tokens`); optional `stop_texts` cut the decoded
  text too (e.g. "\\n\\nHuman:" for a base model that goes on writing the dialogue);
* `backend="continuous"` hands the same requests to transformers' continuous batching
  (`model.generate_batch`, paged KV cache, finished sequences replaced by waiting ones), and
  `backend="static"` uses a static KV cache with `torch.compile`d decoding; both are options for
  GPUs (see scripts/bench_generate.py for what was measured where).

`format_prompt` turns a dataset prompt (HH layout) into the policy's prompt format, raw or Alpaca's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.logs import progress_bar


ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_STYLES = ("raw", "alpaca")
BACKENDS = ("generate", "static", "continuous")
_FINAL_ASSISTANT = re.compile(r"(\n\nAssistant:|## Assistant:\n?)\s*$")
_SINGLE_HUMAN = re.compile(r"^\s*(\n\nHuman:|## Human:\n?)\s*")


def format_prompt(text: str, style: str = "raw") -> str:
    """The prompt the policy sees for a dataset prompt `text` (which ends with the assistant marker).

    * ``raw``: `text` unchanged (the HH layout the RMs were trained on).
    * ``alpaca``: Alpaca's instruction template. The final assistant marker is dropped; a single-turn
      prompt becomes its human turn, a multi-turn dialogue is kept whole (markers included) as the
      instruction so the earlier turns are not lost.
    """
    if style == "raw":
        return text
    if style != "alpaca":
        raise ValueError(f"unknown prompt_style {style!r}: use one of {', '.join(PROMPT_STYLES)}")
    body = _FINAL_ASSISTANT.sub("", text)
    if len(re.findall(r"(\n\nHuman:|## Human:)", body)) <= 1 and not re.search(
        r"(\n\nAssistant:|## Assistant:)", body
    ):
        body = _SINGLE_HUMAN.sub("", body)
    return ALPACA_TEMPLATE.format(instruction=body.strip())


@dataclass
class Completions:
    """`n` completions per prompt, in the order of the prompts given to `sample`."""

    texts: list[list[str]]
    ids: list[list[list[int]]]  # completion token ids, cut before the first EOS
    ended: list[list[bool]]  # whether the completion stopped at EOS (else it hit max_new_tokens)
    prompt_ids: list[list[int]] = field(default_factory=list)

    @property
    def n_new_tokens(self) -> int:
        """Generated tokens, EOS included (what the decoder actually produced)."""
        return sum(len(c) + int(e) for cs, es in zip(self.ids, self.ended) for c, e in zip(cs, es))


def encode_prompts(
    tokenizer, prompts: Sequence[str], max_prompt_length: int | None, add_special_tokens: bool | Sequence[bool] = True
) -> list[list[int]]:
    """Token ids of each prompt, left-truncated to `max_prompt_length` (a leading BOS is kept).

    `add_special_tokens` (one flag, or one per prompt): False for chat-templated prompts, which carry their
    own special tokens (`pipeline.data.render`)."""
    if isinstance(add_special_tokens, bool):
        ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    else:
        with_sp = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        without = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        ids = [a if flag else b for a, b, flag in zip(with_sp, without, add_special_tokens)]
    if max_prompt_length is None:
        return [list(x) for x in ids]
    out = []
    bos = tokenizer.bos_token_id
    for x in ids:
        x = list(x)
        if len(x) > max_prompt_length:
            keep_bos = bos is not None and x[0] == bos
            x = ([bos] if keep_bos else []) + x[len(x) - max_prompt_length + int(keep_bos) :]
        out.append(x)
    return out


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into `(input_ids, attention_mask)` long tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def cut_at_eos(row: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """`row` up to (not including) its first EOS, and whether there was one."""
    for j, t in enumerate(row):
        if t in eos_ids:
            return list(row[:j]), True
    return list(row), False


def cut_at_stop_texts(text: str, stop_texts: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop text."""
    cut = len(text)
    for s in stop_texts:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for t in src if isinstance(src, (list, tuple)) else [src]:
            if t is not None and t not in ids:
                ids.append(int(t))
    if not ids:
        raise ValueError(
            "the policy's tokenizer has no EOS token: generation could never stop; set tokenizer.eos_token"
        )
    return ids


def _autocast_dtype(model, device: torch.device, dtype):
    if dtype != "auto":
        return dtype
    if device.type != "cuda" or next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def generation_config(
    *,
    n: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    backend: str = "generate",
):
    """The `GenerationConfig` of one sampling run (greedy decodes once per prompt; the rows are repeated)."""
    from transformers import GenerationConfig

    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}: use {', '.join(BACKENDS)}")
    kw = dict(
        do_sample=do_sample,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        num_return_sequences=n if do_sample else 1,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if backend == "static":
        kw.update(cache_implementation="static")  # transformers compiles the decoding step on CUDA
    return GenerationConfig(**{k: v for k, v in kw.items() if v is not None})


def _generate_shared_prompt(model, input_ids, mask, gen_config):
    """`generate` with `num_return_sequences = r` but each prompt encoded ONCE.

    Plain `generate` repeats every prompt r times before the prefill, so the prompt's forward pass is paid
    r times. Here all prompt tokens but the last go through one forward pass (positions from the left-padded
    mask, as `generate` computes them), the KV cache is repeated r times along the batch, and `generate`
    continues the r copies from the last prompt token with that cache.
    """
    import copy

    from transformers import DynamicCache

    r = gen_config.num_return_sequences
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=position_ids[:, :-1],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(r)
    cfg = copy.deepcopy(gen_config)
    cfg.num_return_sequences = 1
    return model.generate(
        input_ids=input_ids.repeat_interleave(r, 0),
        attention_mask=mask.repeat_interleave(r, 0),
        cache=cache,
        generation_config=cfg,
    )


@torch.no_grad()
def generate_rows(
    model,
    prompt_ids: Sequence[Sequence[int]],
    gen_config,
    *,
    n: int,
    pad_id: int,
    batch_size: int = 16,
    backend: str = "generate",
    dtype: torch.dtype | None | str = "auto",
    share_prompt: bool = True,
    progress: bool = False,
):
    """Raw continuations (token ids, EOS and padding included) `rows[i][j]` for prompt i, sample j.

    Prompts are sorted by length (longest first), left-padded, `batch_size` per `generate` call, and the
    rows are returned in the input order. With `share_prompt` (backend "generate", several samples per
    prompt) each prompt is encoded once and its KV cache shared by its samples (`_generate_shared_prompt`).
    """
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt cannot be continued: every prompt needs at least one token")
    device = next(model.parameters()).device
    amp = _autocast_dtype(model, device, dtype)
    rows: list = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if backend == "continuous":
                return _sample_continuous(model, prompt_ids, gen_config, n, progress)
            order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
            bar = progress_bar(total=len(order), desc=f"sampling {n} per prompt", disable=not progress)
            per = gen_config.num_return_sequences
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, mask = pad_left([prompt_ids[i] for i in idx], pad_id)
                input_ids, mask = input_ids.to(device), mask.to(device)
                if share_prompt and per > 1 and backend == "generate" and input_ids.shape[1] > 1:
                    out = _generate_shared_prompt(model, input_ids, mask, gen_config)
                else:
                    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_config)
                new = out[:, input_ids.shape[1] :].reshape(len(idx), per, -1).tolist()
                for k, i in enumerate(idx):
                    rows[i] = new[k] if per == n else [new[k][0]] * n
                bar.update(len(idx))
            bar.close()
    finally:
        model.train(was_training)
    return rows


def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n: int = 4,
    temperature: float = 1.2,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    min_new_tokens: int = 0,
    do_sample: bool = True,
    batch_size: int = 16,
    max_prompt_length: int | None = 512,
    stop_texts: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    add_special_tokens: bool | Sequence[bool] = True,
    seed: int | None = 0,
    dtype: torch.dtype | None | str = "auto",
    backend: str = "generate",
    progress: bool = False,
) -> Completions:
    """Sample `n` completions for each prompt; `batch_size` prompts (so `batch_size * n` sequences) per call.

    `do_sample=False` gives greedy decoding (then every one of the n completions is the same).
    `stop_token_ids` end a completion like EOS does (a chat template's end-of-turn token); `add_special_tokens`
    goes to `encode_prompts` (False for chat-templated prompts).
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_new_tokens and batch_size must be >= 1 (got {n}, {max_new_tokens}, {batch_size})")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    eos += [int(t) for t in stop_token_ids if int(t) not in eos]
    gen_config = generation_config(
        n=n,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_ids=eos,
        pad_id=pad_id,
        backend=backend,
    )
    if seed is not None:
        torch.manual_seed(seed)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length, add_special_tokens)
    rows = generate_rows(
        model,
        prompt_ids,
        gen_config,
        n=n,
        pad_id=pad_id,
        batch_size=batch_size,
        backend=backend,
        dtype=dtype,
        progress=progress,
    )

    eos_set = set(eos)
    texts, ids, ended = [], [], []
    for per_prompt in rows:
        t_p, i_p, e_p = [], [], []
        for row in per_prompt:
            toks, hit = cut_at_eos(row, eos_set)
            text = tokenizer.decode(toks, skip_special_tokens=True)
            t_p.append(cut_at_stop_texts(text, stop_texts) if stop_texts else text)
            i_p.append(toks)
            e_p.append(hit)
        texts.append(t_p)
        ids.append(i_p)
        ended.append(e_p)
    return Completions(texts=texts, ids=ids, ended=ended, prompt_ids=prompt_ids)


def _sample_continuous(model, prompt_ids, gen_config, n, progress):
    """transformers' continuous batching (`generate_batch`, paged attention): n requests per prompt."""
    if not hasattr(model, "generate_batch"):
        raise RuntimeError(
            "this transformers version has no continuous batching (model.generate_batch); use backend=generate"
        )
    import copy

    cfg = copy.deepcopy(gen_config)
    cfg.num_return_sequences = 1
    per = n if cfg.do_sample else 1
    inputs = [p for p in prompt_ids for _ in range(per)]
    on_gpu = next(model.parameters()).device.type == "cuda"  # warmup captures CUDA graphs; on CPU it only costs time
    results = model.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=progress, warmup=on_gpu)
    # request ids are "req_<i>" in submission order; sort numerically to map them back
    ordered = sorted(results.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
    if len(ordered) != len(inputs):
        raise RuntimeError(f"continuous batching returned {len(ordered)} results for {len(inputs)} requests")
    failed = [r for r in ordered if getattr(r, "error", None)]
    if failed:
        raise RuntimeError(
            f"continuous batching failed on {len(failed)} of {len(inputs)} requests ({failed[0].error}); "
            "this model may not support paged attention in this transformers version: use backend=generate"
        )
    rows = []
    for i in range(len(prompt_ids)):
        rows.append([list(ordered[i * per + (j % per)].generated_tokens) for j in range(n)])
    return rows
