"""Reward-model TRAINING throughput: our trainer (defaults) vs stock `trl.RewardTrainer`, in one interleaved run.

Three trainers train copies of the SAME randomly initialised RM on the SAME pairs with the SAME number of
pairs per optimizer step, one epoch each (so each sees every pair exactly once), under the same bf16
autocast; their steps are interleaved (trl, multitask, more, then rotated) so load on a shared machine
hits all three alike:

* trl       = stock `trl.RewardTrainer` with TRL's own `DataCollatorForPreference` and sampler (random
              batches, dynamic padding to the longest sequence of the batch): what a user would otherwise run;
* multitask = our `MORERewardTrainer(method="multitask")` with its defaults (pairs packed with one copy of
              their prompt, several per row; length-grouped batches);
* more      = our `MORERewardTrainer(method="more")` with its defaults, on balanced batches (per_source_batch
              pairs of every source per step).
A timed step = fetching and collating the batch + forward + backward + optimizer step.

Pairs: the real Helpful / Harmless / WebGPT / TL;DR slices in <repo>/../shared/data/real (one source each,
full transcripts; the shared prompt is their common prefix), tokenized by a BPE trained on them and
left-truncated to --max-length; otherwise (or with --synthetic) random tokens with the real length profile
(tokens per sequence log-normal, median 178, p90 404, cap 512) AND shared-prompt profile (the prompt is
SHARED_PROMPT_FRACTION of a pair's tokens, as measured on the real slices).
The last printed line is JSON with speedup_vs_trl (more pairs/s / trl pairs/s), more_overhead (multitask
pairs/s / more pairs/s), the model size, tokens per pair and the load average.

    python scripts/bench_train.py                         # ~25M-param GPT-NeoX on CPU (target speedup >= 1.5)
    python scripts/bench_train.py --size tiny --steps 3   # a smoke run
    python scripts/bench_train.py --pythia-1.4b --steps 20 --per-source-batch 4   # on a GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_scoring import LENGTH_PROFILE, REAL, _real_pairs  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from pipeline.data.tokenize import encode_left  # noqa: E402
from pipeline.models import TinyModelSpec, count_parameters, tiny_model, tiny_tokenizer  # noqa: E402
from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer  # noqa: E402
from pipeline.scoring import shared_prefix  # noqa: E402


SOURCES = ["helpful", "harmless", "webgpt", "summarize"]
# Share of a pair's tokens (chosen + rejected) that is the prompt both sides share, on the real slices
# (measured by this script on 2,000 real pairs, 512-token left truncation: 0.62).
SHARED_PROMPT_FRACTION = 0.62


def real_pairs(n_per_source: int, seed: int, vocab_size: int, max_length: int):
    groups = _real_pairs()
    corpus = [t for g in groups for a, b in g for t in (a, b)]
    tok = tiny_tokenizer(corpus, vocab_size=vocab_size)
    rng = np.random.default_rng(seed)
    rows = []
    for k, g in enumerate(groups):
        pick = rng.choice(len(g), size=n_per_source, replace=n_per_source > len(g))
        c, _ = encode_left(tok, [g[i][0] for i in pick], max_length)
        r, _ = encode_left(tok, [g[i][1] for i in pick], max_length)
        rows += [{"chosen_ids": a, "rejected_ids": b, "source_id": k} for a, b in zip(c, r)]
    return tok, rows, len(groups), f"real ({REAL}, {len(groups)} sources)"


def synthetic_pairs(n_per_source: int, seed: int, vocab_size: int, max_length: int, n_sources: int = 4):
    """Random token ids: per pair a sequence length from the real profile, a shared prompt of
    ~SHARED_PROMPT_FRACTION of the pair's tokens, and two continuations."""
    tok = tiny_tokenizer(
        [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 20000, 50)], vocab_size=min(vocab_size, 8000)
    )
    rng = np.random.default_rng(seed)
    sigma = np.log(LENGTH_PROFILE["p90"] / LENGTH_PROFILE["median"]) / 1.2816
    # prompt share p of a SEQUENCE so that 2p / (1 + p)... solved: pair share f = 2P / (2P + 2R) when both sides
    # have similar lengths, so the prompt is ~f of each sequence too.
    rows = []
    for k in range(n_sources):
        for _ in range(n_per_source):
            seq = int(min(rng.lognormal(np.log(LENGTH_PROFILE["median"]), sigma), max_length))
            frac = rng.beta(6.2, 3.8)  # mean 0.62
            prompt = max(1, int(frac * seq))
            resp_c = max(2, seq - prompt)
            resp_r = max(2, int(rng.lognormal(np.log(resp_c), 0.5)))
            ids = rng.integers(4, len(tok), size=prompt + resp_c + resp_r).tolist()
            c = ids[: prompt + resp_c][-max_length:] + [tok.eos_token_id]
            r = (ids[:prompt] + ids[prompt + resp_c :])[-max_length:] + [tok.eos_token_id]
            rows.append({"chosen_ids": c, "rejected_ids": r, "source_id": k})
    return tok, rows, n_sources, "synthetic (real length and shared-prompt profile)"


def build_model(args, tok):
    if args.pythia:
        from transformers import AutoModelForSequenceClassification

        from pipeline.models import pythia_1_4b_config

        config = pythia_1_4b_config(tok)
        config._attn_implementation = "sdpa"
        torch.manual_seed(args.seed)
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    spec = TinyModelSpec(arch=args.arch, size=args.size, max_position_embeddings=max(1024, args.max_length))
    return tiny_model(spec, tok, task="reward", seed=args.seed)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt_neox", choices=["gpt_neox", "llama"])
    ap.add_argument("--size", default="small", choices=["tiny", "mini", "small"], help="TinyModelSpec size")
    ap.add_argument("--pythia-1.4b", dest="pythia", action="store_true", help="Pythia-1.4B shape, random init, sdpa")
    ap.add_argument("--per-source-batch", type=int, default=4, help="pairs per source per step (x4 sources)")
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per trainer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer first")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument(
        "--packing-max-tokens",
        type=int,
        default=None,
        help="override our trainer's packing_max_tokens (default: the config default)",
    )
    ap.add_argument("--no-bf16", action="store_true", help="fp32 instead of bf16 autocast (all trainers)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic pairs even if the real data exists")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_steps = args.warmup + args.steps
    use_real = REAL.is_dir() and not args.synthetic
    make = real_pairs if use_real else synthetic_pairs
    tok, rows, k, data_desc = make(n_steps * args.per_source_batch, args.seed, args.vocab_size, args.max_length)
    pairs_per_step = k * args.per_source_batch
    # balanced layout for MORE (block b = per_source_batch pairs of every source); the others shuffle anyway
    by_src = [[r for r in rows if r["source_id"] == j] for j in range(k)]
    balanced = [
        by_src[j][b * args.per_source_batch + i]
        for b in range(n_steps)
        for j in range(k)
        for i in range(args.per_source_batch)
    ]
    data = Dataset.from_list(balanced)
    seq = np.array([len(r[s]) for r in rows for s in ("chosen_ids", "rejected_ids")])
    pair_tokens = float(np.mean([len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]))
    prompt_frac = float(np.mean([2 * shared_prefix(r["chosen_ids"], r["rejected_ids"]) for r in rows])) / pair_tokens

    base = build_model(args, tok)
    n_params = count_parameters(base)
    dtype = None if args.no_bf16 else torch.bfloat16
    tmp = tempfile.mkdtemp()
    common = dict(
        per_device_train_batch_size=pairs_per_step,
        learning_rate=1e-5,
        bf16=False,
        use_cpu=device == "cpu",
        activation_checkpointing=False,
        report_to="none",
        max_length=None,
        logging_steps=10**9,
        disable_tqdm=True,
        save_strategy="no",
        seed=args.seed,
        max_steps=n_steps,
    )
    trainers = {
        "trl": RewardTrainer(
            copy.deepcopy(base),
            RewardConfig(output_dir=f"{tmp}/trl", **common),
            train_dataset=data.remove_columns(["source_id"]),
            processing_class=tok,
        ),
    }
    extra = {} if args.packing_max_tokens is None else {"packing_max_tokens": args.packing_max_tokens}
    for method in ("multitask", "more"):
        cfg = MORERewardConfig(
            output_dir=f"{tmp}/{method}",
            method=method,
            source_names=SOURCES[:k],
            balanced_batches=method == "more",
            **common,
            **extra,
        )
        trainers[method] = MORERewardTrainer(copy.deepcopy(base), cfg, train_dataset=data, processing_class=tok)
    del base
    iters = {}
    for name, t in trainers.items():
        t.create_optimizer()
        t.current_gradient_accumulation_steps = 1  # set by the train loop, which we bypass
        t.model.train()
        iters[name] = iter(t.get_train_dataloader())

    def step(name):
        t = trainers[name]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = next(iters[name])
        batch = {key: v.to(t.args.device) if hasattr(v, "to") else v for key, v in batch.items()}
        width = batch["input_ids"].numel()
        # training_step outside train() runs on the unprepared model: apply the bf16 autocast ourselves (all alike)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            t.training_step(t.model, batch)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, width

    names = list(trainers)
    secs = dict.fromkeys(names, 0.0)
    tokens = dict.fromkeys(names, 0)
    peak = {}
    for s in range(n_steps):
        order = names[s % 3 :] + names[: s % 3]
        for name in order:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt, width = step(name)
            if device == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2**30)
            if s >= args.warmup:
                secs[name] += dt
                tokens[name] += width
        print(f"step {s + 1}/{n_steps}: " + ", ".join(f"{n} {secs[n]:.1f}s" for n in names), flush=True)
    pps = {n: args.steps * pairs_per_step / secs[n] for n in names}
    more = trainers["more"]
    result = {
        "benchmark": "rm_train_throughput",
        "speedup_vs_trl": round(pps["more"] / pps["trl"], 3),
        "multitask_speedup_vs_trl": round(pps["multitask"] / pps["trl"], 3),
        "more_overhead": round(pps["multitask"] / pps["more"], 3),
        "pairs_per_s": {n: round(v, 2) for n, v in pps.items()},
        "baseline": "stock trl.RewardTrainer, DataCollatorForPreference (dynamic padding), random batches",
        "ours": f"MORERewardTrainer defaults: packing={more.packed}, packing_max_tokens="
        f"{more.args.packing_max_tokens}, length_grouping={more.args.length_grouping}",
        "input_tokens_per_pair": {n: round(tokens[n] / (args.steps * pairs_per_step), 1) for n in names},
        "tokens_per_pair": round(pair_tokens, 1),
        "shared_prompt_token_fraction": round(prompt_frac, 3),
        "tokens_per_sequence": {
            "mean": round(float(seq.mean()), 1),
            "median": float(np.median(seq)),
            "p90": float(np.percentile(seq, 90)),
            "max": int(seq.max()),
        },
        "data": "real" if use_real else "synthetic-profile",
        "data_desc": data_desc,
        "pairs_per_step": pairs_per_step,
        "timed_steps": args.steps,
        "model": "pythia-1.4b-shape" if args.pythia else f"{args.arch}/{args.size}",
        "params_m": round(n_params / 1e6, 1),
        "autocast": "bf16" if dtype is not None else "fp32",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "peak_gpu_gib": {n: round(v, 1) for n, v in peak.items()} or None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
