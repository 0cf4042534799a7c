"""The export certificate: each engine's reward from the exported folder, on the input that engine builds, against
the pipeline's reward (`pipeline.scoring.score_ids` with the run's own RM, divided by T when T was folded in).

Two numbers per engine, on the sides (chosen and rejected) of held-out pairs:

* **read-out** (`readout_max_abs_diff`, `certified`): the engine's reward against the pipeline's reward on the
  SAME token ids (the ones the engine fed its model). Within `TOLERANCE` the engine computes the pipeline's
  reward function from the folder.
* **input gap** (`gap_max_abs`, ...): the engine's reward against the pipeline's reward on the pipeline's OWN
  input (what training and calibration used: left-truncated to max_length, the tokenizer's special tokens, an EOS
  appended), next to the spread of the pipeline's rewards (`pipeline_reward_std`) and the share of pairs the
  engine orders as the pipeline does (`same_preference`). Zero where the export makes the engine build the
  pipeline's ids; otherwise measured, with the differences found (`differences`: how many sides lack the BOS,
  lack the EOS, carry an EOS the pipeline does not append, were cut by the pipeline, are read at a trailing token
  the pipeline's read-out skips, or tokenize otherwise).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.data.render import decode_conversation, plain_to_messages, render_pair
from pipeline.data.tokenize import encode_pairs
from pipeline.export.engines import Side, openrlhf_rewards, trl_rewards, verl_rewards
from pipeline.export.folder import pipeline_affixes
from pipeline.layout import model_pad_id
from pipeline.scoring import score_ids


TOLERANCE = 1e-4

# engine -> (what it is, how its reward is computed from a folder)
ENGINES: dict[str, tuple[str, Callable]] = {
    "trl": ("TRL RLOOTrainer/GRPOTrainer, text prompts", lambda f, s: trl_rewards(f, s, conversational=False)),
    "trl-chat": (
        "TRL RLOOTrainer/GRPOTrainer, conversational prompts",
        lambda f, s: trl_rewards(f, s, conversational=True),
    ),
    "openrlhf": ("OpenRLHF reward model (serve_rm)", openrlhf_rewards),
    "verl": ("verl FSDP reward worker (chat-template switch)", verl_rewards),
}


def pair_sides(tokenizer, pairs: Sequence[dict]) -> list[Side]:
    """The chosen and rejected side of each pair (chosen first, pair by pair), rendered for `tokenizer` as the
    pipeline renders them (`render_pair`), and as chat messages (the row's conversation; for a text row its
    plain-layout prompt read back as turns, `plain_to_messages`, and the response as the assistant's turn)."""
    sides = []
    for p in pairs:
        conv = decode_conversation(p.get("conversation") or "")
        rendered = render_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], p.get("conversation") or "")
        for key, text in (("chosen", rendered.chosen), ("rejected", rendered.rejected)):
            if conv is not None:
                messages = list(conv["prompt"]) + list(conv[key])
            else:
                messages = plain_to_messages(p["prompt"]) + [{"role": "assistant", "content": p[key]}]
            sides.append(Side(prompt=rendered.prompt, response=text, messages=messages))
    return sides


def pipeline_ids(tokenizer, pairs: Sequence[dict], max_length: int | None) -> tuple[list[list[int]], list[bool]]:
    """The pipeline's own token ids of every side (`encode_pairs`, left-truncated to max_length) and whether the
    cut removed tokens, in `pair_sides` order."""

    def interleave(a, b):
        return [x for pair in zip(a, b) for x in pair]

    cols = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    convs = [p.get("conversation") or "" for p in pairs]
    cut_c, cut_r, _ = encode_pairs(tokenizer, *cols, convs, max_length)
    full_c, full_r, _ = encode_pairs(tokenizer, *cols, convs, None)
    ids = interleave(cut_c, cut_r)
    return ids, [a != b for a, b in zip(ids, interleave(full_c, full_r))]


def _strip(ids: Sequence[int], pad: int | None) -> list[int]:
    ids = list(ids)
    while pad is not None and ids and ids[-1] == pad:
        ids.pop()
    return ids


def difference(engine: list[int], own: list[int], truncated: bool, readout_differs: bool, marks: dict) -> str | None:
    """Why an engine's input differs from the pipeline's own (None: the same ids, read at the same token). `marks`:
    the pipeline's `prefix` and `suffix` ids around a text (`pipeline_affixes`), the model's `pad` id, the `eos` id."""
    if truncated:
        return "cut from the left by the pipeline (max_length); the engine keeps the whole text"
    pad, eos = marks["pad"], marks["eos"]
    e, o = _strip(engine, pad), _strip(own, pad)
    if e == o:
        if readout_differs and engine and engine[-1] == pad:
            token = "pad token (here the EOS)" if pad == eos else "pad token"
            return f"read at the trailing {token}, which the pipeline's read-out skips"
        if readout_differs:
            return "the same ids, read otherwise than the pipeline reads them (e.g. an encoder RM's pooled token)"
        return None
    prefix, suffix = marks["prefix"], _strip(marks["suffix"], pad)
    found = []
    if prefix and o[: len(prefix)] == prefix and e[: len(prefix)] != prefix:
        found.append("no BOS" if len(prefix) == 1 else "no leading special tokens")
        o = o[len(prefix) :]
    if suffix and o[-len(suffix) :] == suffix and e[-len(suffix) :] != suffix:
        found.append("no EOS" if len(suffix) == 1 else "no trailing special tokens")
        o = o[: -len(suffix)]
    if eos is not None and e == o + [eos]:
        found.append("an EOS after the chat template's end of turn, which the pipeline does not append")
    elif e != o:
        found.append("other tokens")
    return ", ".join(found)


def summarize(r_engine, ids_engine, r_same, r_own, own_ids, truncated, marks: dict) -> dict:
    """One engine's certificate entry (see the module docstring)."""
    readout = np.abs(r_engine - r_same)
    gap = np.abs(r_engine - r_own)
    whys = [
        difference(e, o, t, bool(d > TOLERANCE), marks) for e, o, t, d in zip(ids_engine, own_ids, truncated, readout)
    ]
    kept = ~np.asarray(truncated, dtype=bool)
    engine_pref = r_engine[0::2] > r_engine[1::2]  # sides are chosen, rejected, pair by pair
    own_pref = r_own[0::2] > r_own[1::2]
    return {
        "n_sides": len(r_engine),
        "readout_max_abs_diff": float(readout.max()) if len(readout) else 0.0,
        "certified": bool(len(readout) and readout.max() <= TOLERANCE),
        "identical_inputs": sum(w is None for w in whys),
        "gap_max_abs": float(gap.max()) if len(gap) else 0.0,
        "gap_mean_abs": float(gap.mean()) if len(gap) else 0.0,
        "gap_max_abs_untruncated": float(gap[kept].max()) if kept.any() else 0.0,
        "pipeline_reward_std": float(np.std(r_own)) if len(r_own) else 0.0,
        "same_preference": float(np.mean(engine_pref == own_pref)) if len(own_pref) else 1.0,
        "n_truncated_by_pipeline": int(sum(truncated)),
        "differences": dict(Counter(w for w in whys if w is not None)),
    }


def certify(
    run_model,
    run_tokenizer,
    folder,
    pairs: Sequence[dict],
    *,
    max_length: int | None,
    temperature: float = 1.0,
    engines: Sequence[str] = tuple(ENGINES),
    batch_size: int = 16,
) -> dict:
    """{engine: certificate entry} for the exported `folder` against the run's RM (`run_model`, `run_tokenizer`,
    fp32) on `pairs` (dicts with prompt, chosen, rejected and optionally conversation). `temperature`: the T folded
    into the folder (the pipeline's reward is then r / T)."""
    pad = model_pad_id(run_model)
    fill = run_tokenizer.pad_token_id if run_tokenizer.pad_token_id is not None else 0

    def pipeline_reward(ids):
        return score_ids(run_model, ids, fill, batch_size=batch_size, dtype=None, temperature=temperature)

    own_ids, truncated = pipeline_ids(run_tokenizer, pairs, max_length)
    r_own = pipeline_reward(own_ids)
    sides = pair_sides(run_tokenizer, pairs)
    prefix, suffix = pipeline_affixes(run_tokenizer)
    marks = {"prefix": prefix, "suffix": suffix, "pad": pad, "eos": run_tokenizer.eos_token_id}
    out = {}
    for name in engines:
        what, compute = ENGINES[name]
        try:
            r_engine, ids_engine = compute(folder, sides)
        except Exception as e:  # noqa: BLE001 - an engine that cannot score the folder is a certificate result
            out[name] = {"engine": what, "certified": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        entry = summarize(r_engine, ids_engine, pipeline_reward(ids_engine), r_own, own_ids, truncated, marks)
        out[name] = {"engine": what, **entry}
    return out
