"""The alignment stage's prompts: which RMs and sources it uses, the training and held-out prompt sets drawn
from the run's data splits, and how a prompt (or a chosen response) is rendered for the policy: its chat
template for conversational prompts when it has one, else `format_prompt` (raw HH layout or Alpaca).

May import: pipeline leaves (`pipeline.data.*`) and `pipeline.align.generate` (`format_prompt`).
"""

from __future__ import annotations

import json
import random


def select_rms(index: dict, wanted: list[str] | None) -> list[str]:
    """RM names to align with: `wanted`, or every RM of the index except single-source ones."""
    if wanted is None:
        names = [n for n in index if not n.startswith("single-")]
    else:
        missing = [n for n in wanted if n not in index]
        if missing:
            raise ValueError(f"align.rms: {missing} not in DIR/reward/index.json (it has {list(index)})")
        names = list(wanted)
    if not names:
        raise ValueError(
            "align: no reward model to align with (DIR/reward/index.json lists none besides single-source RMs)"
        )
    return names


def distinct_prompts(prompts, n: int | None, seed: int) -> list[str]:
    """Distinct prompts in first-seen order, then a seeded sample of `n` of them (all when n is None)."""
    seen = list(dict.fromkeys(prompts))
    if n is not None and n < len(seen):
        idx = sorted(random.Random(seed).sample(range(len(seen)), n))
        seen = [seen[i] for i in idx]
    return seen


def load_splits(recipe) -> dict:
    from pipeline.data import build_splits

    return build_splits(recipe.data)


def is_synthetic(splits: dict, sources) -> bool:
    return all("gold_prob" in splits[s]["test"].column_names for s in sources if s in splits)


def pick_sources(splits: dict, wanted: list[str], what: str) -> list[str]:
    missing = [s for s in wanted if s not in splits]
    if missing or not wanted:
        raise ValueError(
            f"align.{what}: {missing or wanted} not among the data sources of this run "
            f"{list(splits)}. Fix: name sources from that list"
        )
    return list(wanted)


def prompt_conversations(ds) -> dict:
    """{prompt text: '{"prompt": [messages]}'} for the conversational rows of a split ({} for text rows)."""
    if "conversation" not in ds.column_names:
        return {}
    out = {}
    for p, c in zip(ds["prompt"], ds["conversation"]):
        if c and p not in out:
            out[p] = json.dumps({"prompt": json.loads(c)["prompt"]}, ensure_ascii=False)
    return out


def split_conversations(splits: dict, sources: list[str]) -> dict:
    """The conversational prompts of `sources` (train and test splits), so they keep their messages."""
    out = {}
    for s in dict.fromkeys(sources):
        for part in ("train", "test"):
            out.update(prompt_conversations(splits[s][part]))
    return out


def prompt_sets(
    cfg, splits: dict, train_sources: list[str], eval_sources: list[str], conversations: dict, seed: int
) -> tuple[list[dict], list[dict], dict]:
    """(training prompt records, held-out prompt records, {source: (test prompts, chosen answers)} for the
    perplexities). A record is {"prompt", "set"} plus "conversation" for a conversational prompt; `cfg` is
    the align section (`n_prompts` spread over the training sources, `n_eval_prompts` per held-out set)."""

    def prompt_rec(p: str, s: str) -> dict:
        return {"prompt": p, "set": s} | ({"conversation": conversations[p]} if p in conversations else {})

    train_prompts = []
    for i, s in enumerate(train_sources):
        per = None if cfg.n_prompts is None else -(-cfg.n_prompts // len(train_sources))
        train_prompts += [prompt_rec(p, s) for p in distinct_prompts(splits[s]["train"]["prompt"], per, seed + i)]
    if not train_prompts:
        raise ValueError(f"align: no training prompts in the train splits of {train_sources}")
    eval_prompts, ppl_data = [], {}
    for i, s in enumerate(eval_sources):
        test = splits[s]["test"]
        eval_prompts += [
            prompt_rec(p, s) for p in distinct_prompts(test["prompt"], cfg.n_eval_prompts, seed + 100 + i)
        ]
        m = min(cfg.n_ppl, len(test))
        ppl_data[s] = (list(test["prompt"][:m]), list(test["chosen"][:m]))
    return train_prompts, eval_prompts, ppl_data


def policy_prompt(tok, rec: dict, style: str) -> tuple[str, bool]:
    """(text the policy sees, templated) for a prompt record: the policy's chat template for conversational
    prompts when it has one (pipeline.data.render), else `format_prompt` (raw HH layout or Alpaca)."""
    from pipeline.align.generate import format_prompt
    from pipeline.data.render import render_prompt

    text, templated = render_prompt(tok, rec["prompt"], rec.get("conversation"))
    if templated:
        if style != "raw":
            raise ValueError(
                f"align.prompt_style={style!r} is for text prompts; this policy renders conversational "
                "prompts with its chat template. Fix: align.prompt_style=raw, or align.chat_template=none "
                "to use the plain layout with the prompt style"
            )
        return text, True
    return format_prompt(text, style), False


def turn_stops(tok) -> dict:
    """Extra stops for a chat-templated policy: its end-of-turn token (when one token) and text; {} without."""
    from pipeline.data.render import end_of_turn_text

    eot = end_of_turn_text(tok)
    if not eot:
        return {}
    ids = tok(eot, add_special_tokens=False)["input_ids"]
    return {"stop_token_ids": tuple(ids) if len(ids) == 1 else (), "extra_stop_texts": (eot,)}


def sft_completion(tok, rec: dict, response: str) -> str:
    """The SFT completion for a chosen sample: under the policy's template, the assistant turn with its
    end-of-turn markers (so the completion-only loss also teaches where a turn ends); else the text."""
    from pipeline.data.render import render_response

    if not rec.get("templated"):
        return response
    return render_response(tok, rec["prompt"], response, rec["conversation"])[1]
