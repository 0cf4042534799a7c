"""The implicit RMs of a run in the calibration stage: an index entry of kind "implicit" (the reward stage's `dpo`
method) is a DPO policy read as a reward, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (`pipeline.implicit`).
Its rewards of every evaluation pair side take the place of a classic RM's scores, so everything the stage does
for classic RMs applies unchanged: per-source accuracy, ECE/ACE/MCE, Brier, NLL, temperature scaling (which here
rescales beta), reliability diagrams, paired comparisons.

The descriptor is the RM directory's implicit.json, {"policy", "reference", "beta"}, paths relative to the run
directory (or a hub id / absolute path). Text pairs are scored as `prompt + response` with the tokenizer's special
tokens and an EOS appended (TRL's DPOTrainer's input); conversational pairs, when the policy has a chat template,
rendered with it. Sequences longer than the calibration max_length are cut from the LEFT, as the classic RMs' are
(`pipeline.implicit.encode_rows`). One model at a time: the policy's log-probabilities of every pair side, then
the reference's. Under several processes every rank scores every pair (no sharding).

May import: pipeline leaves (`pipeline.implicit`, `pipeline.data.render`) and the calibration config.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np


KIND = "implicit"


def is_implicit(entry: dict) -> bool:
    return entry.get("kind") == KIND


def implicit_spec(run_dir: Path, name: str, entry: dict) -> dict:
    """The implicit RM's {policy, reference, beta} with run-relative paths resolved; one error naming the file."""
    path = Path(entry["path"]) / "implicit.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"calibration: implicit RM {name!r}: cannot read {path} ({e}); rerun the reward stage (--force reward)"
        ) from None

    def resolve(p):
        if p is None:
            return None
        local = Path(run_dir) / str(p)
        return str(local) if local.exists() else str(p)

    return {**spec, "policy": resolve(spec.get("policy")), "reference": resolve(spec.get("reference"))}


def _rows(tok, data: dict) -> tuple[list[tuple], list[tuple], list[bool], list[tuple]]:
    """(chosen rows, rejected rows, templated flags, (source, split, size) keys) of every evaluation split."""
    from pipeline.data.render import render_response

    chosen, rejected, flags, keys = [], [], [], []
    for source, by_split in data.items():
        for split, ds in by_split.items():
            if ds is None:
                continue
            keys.append((source, split, len(ds)))
            convs = ds["conversation"] if "conversation" in ds.column_names else [""] * len(ds)
            for p, c, r, conv in zip(ds["prompt"], ds["chosen"], ds["rejected"], convs):
                pc, cc, templated = render_response(tok, p, c, conv or None)
                pr, rr, _ = render_response(tok, p, r, conv or None)
                chosen.append((pc, cc))
                rejected.append((pr, rr))
                flags.append(templated)
    return chosen, rejected, flags, keys


def score_implicit_rm(run_dir: Path, name: str, entry: dict, data: dict, cfg, max_length: int | None, device) -> dict:
    """{source: {split: (r_chosen, r_rejected)}} of an implicit RM, like `pipeline.scoring.score_rm`'s."""
    from pipeline.implicit import check_spec, encode_rows, load_causal_lm, sequence_logprobs, tokenizer_source
    from pipeline.models import load_tokenizer

    spec = implicit_spec(run_dir, name, entry)
    key = f"implicit RM {name} ({Path(entry['path']) / 'implicit.json'})"
    check_spec(spec, key)
    tok = load_tokenizer(tokenizer_source(spec["policy"]), trust_remote_code=cfg.trust_remote_code)
    chosen, rejected, flags, keys = _rows(tok, data)
    ids, starts, _ = encode_rows(tok, chosen + rejected, max_length, templated=flags + flags)
    kw = dict(batch_size=cfg.batch_size, max_tokens_per_batch=cfg.max_tokens_per_batch, progress=cfg.progress)
    logps = []
    for which in ("policy", "reference"):
        if spec.get(which) is None:  # reference-free scoring, asked for explicitly in the descriptor
            logps.append(np.zeros(len(ids)))
            continue
        model = load_causal_lm(spec[which], device=device, trust_remote_code=cfg.trust_remote_code, key=key)
        logps.append(sequence_logprobs(model, ids, starts, **kw))
        del model
        gc.collect()
    rewards = float(spec["beta"]) * (logps[0] - logps[1])
    rc, rr = rewards[: len(chosen)], rewards[len(chosen) :]
    out: dict = {}
    start = 0
    for source, split, size in keys:
        out.setdefault(source, {})[split] = (rc[start : start + size], rr[start : start + size])
        start += size
    return out
