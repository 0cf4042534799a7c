"""DPO policies evaluated as implicit reward models (`calibration.implicit_rms`) in the calibration stage.

`implicit_entries` turns the recipe's entries into index-like entries ({"path": the policy, "reference", "beta",
"reference_free", "method": "implicit", "implicit": True}), so the stage treats them like any RM from then on:
metrics, temperature scaling, plots, comparisons, train overlap (a policy folder holding train_prompts.json is
counted like an RM's). `check_implicit_folders` runs before any work and under --dry-run. `score_implicit` gives
the same {source: {split: (r_chosen, r_rejected)}} as `pipeline.scoring.score_rm`: every pair rendered with the
POLICY's tokenizer and chat template, each side's reward beta * (sum log pi - sum log pi_ref) over its response
tokens (`pipeline.implicit`), the policy loaded and run over every sequence, freed, then the reference: one model
in memory at a time. Under several processes each rank scores a contiguous shard of the pairs, gathered like
`score_rm`'s.

The reward stage's `dpo` policies (index entries of kind "implicit", `trained_implicit_entries`) join them the same
way, read from their implicit.json (the policy stage's base policy as reference).

Imports the leaves (`pipeline.implicit`, `io`, `logs`, `models`, `pipeline.data.render`), the calibration config and
`pipeline.reward.index` (an implicit RM's descriptor).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from pipeline.calibration.config import CalibrationConfig
from pipeline.io import is_hub_id
from pipeline.logs import say
from pipeline.scoring import by_source_split


def implicit_entries(cfg: CalibrationConfig, taken: list[str]) -> dict:
    """calibration.implicit_rms as index-like entries, local paths resolved; a name already used by another RM of
    the run, or a path that is neither a directory nor a hub id, is one error naming the key."""
    out = {}
    for name, spec in (cfg.implicit_rms or {}).items():
        key = f"calibration.implicit_rms.{name}"
        if name in taken:
            raise ValueError(
                f"{key}: the name {name!r} is already used by another reward model of this run; pick another"
            )
        out[name] = {
            "path": _resolve(spec.policy, f"{key}.policy"),
            "reference": _resolve(spec.reference, f"{key}.reference") if spec.reference is not None else None,
            "beta": float(spec.beta),
            "reference_free": bool(spec.reference_free),
            "method": "implicit",
            "sources": [],
            "implicit": True,
        }
    return out


def trained_implicit_entries(run_dir: Path, index: dict) -> dict:
    """The entries of DIR/reward/index.json of kind "implicit" (the reward stage's dpo policies, trained from the
    policy stage's base policy and referenced against it) in the form of `implicit_entries`, from their
    implicit.json; "trained": their directory lies in this run (their temperature.json is written there)."""
    from pipeline.reward.index import implicit_spec

    out = {}
    for name, entry in index.items():
        if entry.get("kind") != "implicit":
            continue
        spec = implicit_spec(run_dir, name, entry)
        out[name] = {
            "path": spec["policy"],
            "reference": spec.get("reference"),
            "beta": float(spec["beta"]),
            "reference_free": spec.get("reference") is None,
            "method": entry.get("method", "dpo"),
            "sources": list(entry.get("sources", [])),
            "implicit": True,
            "trained": True,
        }
    return out


def _resolve(spec: str, key: str) -> str:
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if local.exists():
        raise FileNotFoundError(f"{key}: {spec} is a file; give the model's directory (save_pretrained) or a hub id")
    if is_hub_id(spec):
        return spec
    raise FileNotFoundError(f"{key}: {spec} is neither an existing directory nor a hub id (owner/name); fix the path")


def check_implicit_folders(cfg: CalibrationConfig) -> None:
    """Before any work (also --dry-run): every local policy and reference is a causal LM directory (config.json
    naming a ...ForCausalLM, weights; or a CAUSAL_LM adapter), the policy's tokenizer files are there and the chat
    template they ship renders. One error naming the key otherwise."""
    from pipeline.data.render import check_tokenizer_templates
    from pipeline.implicit import check_causal_lm, tokenizer_source
    from pipeline.models import check_tokenizer_files, saved_chat_templates

    for name, spec in (cfg.implicit_rms or {}).items():
        key = f"calibration.implicit_rms.{name}"
        for part in ("policy", "reference"):
            path = getattr(spec, part)
            if path is not None:
                check_causal_lm(
                    _resolve(path, f"{key}.{part}"), key=f"{key}.{part}", trust_remote_code=cfg.trust_remote_code
                )
        tok_dir = tokenizer_source(_resolve(spec.policy, f"{key}.policy"))
        if Path(tok_dir).expanduser().is_dir():
            check_tokenizer_files(tok_dir, key=f"{key}.policy")
            check_tokenizer_templates(saved_chat_templates(tok_dir), f"{key}.policy ({tok_dir})")


def describe(name: str, entry: dict) -> str:
    """'policy P against reference R, beta b' or 'policy P, reference-free (beta * log pi alone), beta b'."""
    ref = (
        f"against reference {entry['reference']}"
        if entry.get("reference")
        else "REFERENCE-FREE (beta * log pi alone, no reference)"
    )
    return f"implicit RM {name!r}: policy {entry['path']} {ref}, beta {entry['beta']:g}"


def _pairs(tok, data: dict) -> tuple[list, list, list, list]:
    """(keys, chosen rows, rejected rows, templated flags): every pair rendered for the policy's tokenizer."""
    from pipeline.data.render import render_pair

    keys, chosen, rejected, templated = [], [], [], []
    for source, by_split in data.items():
        for split, ds in by_split.items():
            if ds is None:
                continue
            keys.append((source, split, len(ds)))
            convs = ds["conversation"] if "conversation" in ds.column_names else [""] * len(ds)
            for p, c, r, v in zip(ds["prompt"], ds["chosen"], ds["rejected"], convs):
                rendered = render_pair(tok, p, c, r, v)
                chosen.append((rendered.prompt, rendered.chosen))
                rejected.append((rendered.prompt, rendered.rejected))
                templated.append(rendered.templated)
    return keys, chosen, rejected, templated


def _load_dtype(cfg: CalibrationConfig, device):
    import torch

    load_dtype = cfg.load_dtype
    if load_dtype == "auto":
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        load_dtype = "bfloat16" if cuda_bf16 else "float32"
    return getattr(torch, load_dtype)


def _sum_logprobs(path: str, key: str, ids, starts, cfg: CalibrationConfig, device) -> np.ndarray:
    """Sum of response log-probs of every sequence under the causal LM at `path`, which is freed afterwards."""
    import torch

    from pipeline.implicit import load_causal_lm, sequence_logprobs

    model = load_causal_lm(
        path, device=device, dtype=_load_dtype(cfg, device), trust_remote_code=cfg.trust_remote_code, key=key
    )
    try:
        return sequence_logprobs(
            model,
            ids,
            starts,
            batch_size=cfg.batch_size,
            max_tokens_per_batch=cfg.max_tokens_per_batch,
            progress=cfg.progress,
        )
    finally:
        del model
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def score_implicit(name: str, entry: dict, data: dict, cfg: CalibrationConfig, max_length, state=None) -> dict:
    """{source: {split: (r_chosen, r_rejected)}} of one implicit RM (see the module docstring); records in `entry`
    how many scored sequences were cut from the left (`truncated_sequences`, `scored_sequences`)."""
    from pipeline.data.render import check_tokenizer_templates
    from pipeline.implicit import encode_rows, tokenizer_source
    from pipeline.models import load_tokenizer

    key = f"calibration.implicit_rms.{name}"
    tok_dir = tokenizer_source(entry["path"])
    tok = load_tokenizer(tok_dir, trust_remote_code=cfg.trust_remote_code, key=f"{key}.policy")
    check_tokenizer_templates(tok.chat_template, f"{key}.policy ({tok_dir})")
    keys, chosen, rejected, templated = _pairs(tok, data)
    n = len(chosen)
    world = state.num_processes if state is not None else 1
    lo, hi = 0, n
    if world > 1:
        bounds = np.linspace(0, n, world + 1).astype(int)
        lo, hi = int(bounds[state.process_index]), int(bounds[state.process_index + 1])
    device = state.device if state is not None else "cpu"
    rows = chosen[lo:hi] + rejected[lo:hi]
    ids, starts, cut = encode_rows(tok, rows, max_length, templated=templated[lo:hi] * 2)
    reward = np.zeros(len(rows))
    if rows:
        reward = _sum_logprobs(entry["path"], f"{key}.policy", ids, starts, cfg, device)
        if entry.get("reference"):
            reward = reward - _sum_logprobs(entry["reference"], f"{key}.reference", ids, starts, cfg, device)
        reward = entry["beta"] * reward
    part = (int(lo), reward[: hi - lo].tolist(), reward[hi - lo :].tolist(), int(sum(cut)))
    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object([part])
    else:
        shards = [part]
    rc, rr = np.empty(n), np.empty(n)
    for start, c, r, _ in shards:
        rc[start : start + len(c)], rr[start : start + len(r)] = c, r
    entry["truncated_sequences"] = sum(s[3] for s in shards)
    entry["scored_sequences"] = 2 * n
    if state is None or state.is_main_process:
        say(
            "calibration",
            f"{describe(name, entry)}; {entry['truncated_sequences']} of {2 * n} sequences cut from the left to "
            f"{max_length} tokens",
        )
    return by_source_split(keys, rc, rr)


def effective_betas(implicit: dict, temperatures: dict, fits: dict) -> None:
    """Temperature scaling divides rewards by T: for an implicit RM that is beta / T, its fitted effective beta,
    added to its fit details (temperature_fits.json) next to the beta it was given."""
    for name, entry in implicit.items():
        if name in temperatures and name in fits:
            fits[name]["beta"] = entry["beta"]
            fits[name]["effective_beta"] = entry["beta"] / temperatures[name]


def implicit_table(implicit: dict, temperatures: dict) -> list[str]:
    """table.md's section on the implicit RMs: policy, reference (or that none was used), beta, T, beta / T."""
    from pipeline.tables import markdown_table

    if not implicit:
        return []
    rows = []
    for name, e in implicit.items():
        t = temperatures.get(name)
        rows.append(
            [
                name,
                f"`{e['path']}`",
                f"`{e['reference']}`" if e.get("reference") else "none (reference-free: beta * log pi)",
                f"{e['beta']:g}",
                "-" if t is None else f"{t:.3f}",
                "-" if t is None else f"{e['beta'] / t:.4g}",
                f"{e.get('truncated_sequences', 0)} of {e.get('scored_sequences', 0)}",
            ]
        )
    header = ["RM", "policy", "reference", "beta", "T", "effective beta (beta / T)", "sequences cut from the left"]
    lines = [
        "## Implicit reward models (DPO policies)",
        "",
        "Reward of a response: beta * (sum over its tokens of log pi(token | context) - log pi_ref(token | context)), "
        "response tokens only, under the policy's tokenizer and chat template, an EOS appended to text responses "
        "(TRL's DPOTrainer's rewards/chosen and rewards/rejected, per pair). Temperature scaling divides it by T, "
        "i.e. it fits beta: the effective beta is the one that calibrates the policy's preferences on the "
        "validation pairs.",
        "",
        *markdown_table(header, rows),
        "",
    ]
    free = [n for n, e in implicit.items() if not e.get("reference")]
    if free:
        lines += [
            f"Reference-free (asked for with reference_free: true): {', '.join(free)}; their rewards are beta * log "
            "pi(y|x) alone, which also reward short and likely responses, not the DPO implicit reward.",
            "",
        ]
    return lines
