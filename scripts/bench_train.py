"""Reward-model TRAINING throughput: our trainer (defaults) vs stock `trl.RewardTrainer`, in one interleaved run.

Three trainers train copies of the SAME randomly initialised RM with the SAME number of pairs per optimizer
step under the same autocast (`--precision`; auto = bf16 on CUDA and on CPUs with avx512_bf16/amx_bf16):

* trl       = stock `trl.RewardTrainer` with TRL's own `DataCollatorForPreference` and sampler (random
              batches, dynamic padding to the longest sequence of the batch): what a user would otherwise run;
* more      = our `MORERewardTrainer(method="more")` with its defaults (pairs packed with one copy of their
              prompt, several per row; length-grouped balanced batches: per_source_batch pairs of every source);
* multitask = `MORERewardTrainer(method="multitask")` on MORE's very batches (same sampler, same packing), so
              `more_overhead` (MORE s / MultiTask s) measures MORE's weight computation and nothing else.
The timing discipline is scripts/bench_common.py's: the timed pairs are ONE pool that every side covers
exactly once per repeat (each side's own sampler decides its batches: that is part of what is compared);
the warm-up runs on a separate pool of pairs, the same batches on every side, untimed; the sides take turns
step by step (the order rotates); the timed pass is repeated `--repeats` times. A timed step = collating the
batch + forward + backward + optimizer step. The JSON carries the evidence: `timed_pairs_identical`, the pair
tokens of each side's timed batches (`timed_pair_tokens_trl` = `timed_pair_tokens_ours` when the pairs are the
same) and the tokens each side actually fed the model (`input_tokens_trl`, `input_tokens_ours`).

Pairs: the real Helpful / Harmless / WebGPT / TL;DR slices in <repo>/../shared/data/real (one source each,
full transcripts; the shared prompt is their common prefix), tokenized by a BPE trained on them and
left-truncated to --max-length; otherwise (or with --synthetic) random tokens with the real length profile
(tokens per sequence log-normal, median 178, p90 404, cap 512) AND shared-prompt profile (the prompt is
SHARED_PROMPT_FRACTION of a pair's tokens, as measured on the real slices).
The last printed line is JSON: speedup_vs_trl (TRL s / MORE s per repeat: median, _min, _max), more_overhead
(likewise), repeats, the token counts, precision, threads, load_before, load_after.

    python scripts/bench_train.py --precision fp32        # 1.8M-param GPT-NeoX, 8 pairs/step, 20 steps x 3, CPU
    python scripts/bench_train.py --size tiny --steps 2 --repeats 1   # a smoke run
    python scripts/bench_train.py --pythia-1.4b --per-source-batch 4  # on a GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_common  # noqa: E402
from bench_scoring import LENGTH_PROFILE, REAL, _real_pairs  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from pipeline.data.tokenize import encode_left  # noqa: E402
from pipeline.layout import shared_prefix  # noqa: E402
from pipeline.models import TinyModelSpec, count_parameters, tiny_model, tiny_tokenizer  # noqa: E402
from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer  # noqa: E402


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


def balanced_split(rows, k: int, per_source: int, warm_steps: int):
    """(warm-up rows, timed rows): per source, its first warm_steps * per_source pairs warm up, the rest are
    timed. Both pools hold the same number of pairs of every source (what balanced batches need)."""
    by_src = [[r for r in rows if r["source_id"] == j] for j in range(k)]
    n_warm = warm_steps * per_source
    warm = [by_src[j][b * per_source + i] for b in range(warm_steps) for j in range(k) for i in range(per_source)]
    timed = [r for j in range(k) for r in by_src[j][n_warm:]]
    return warm, timed


def batch_plan(trainer, n_rows: int, pairs_per_step: int) -> list[list[int]]:
    """The pair indices of each batch of one epoch, in the trainer's own sampler's order."""
    order = [int(i) for i in trainer._get_train_sampler(trainer.train_dataset)]
    if sorted(order) != list(range(n_rows)):
        raise RuntimeError(f"{type(trainer).__name__}'s sampler does not visit each of the {n_rows} pairs once")
    return [order[s : s + pairs_per_step] for s in range(0, len(order), pairs_per_step)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt_neox", choices=["gpt_neox", "llama"])
    ap.add_argument("--size", default="mini", choices=["tiny", "mini", "small"], help="TinyModelSpec size")
    ap.add_argument("--pythia-1.4b", dest="pythia", action="store_true", help="Pythia-1.4B shape, random init, sdpa")
    ap.add_argument("--per-source-batch", type=int, default=2, help="pairs per source per step (x4 sources)")
    ap.add_argument("--steps", type=int, default=bench_common.MIN_STEPS, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (the same pairs)")
    ap.add_argument("--repeats", type=int, default=bench_common.MIN_REPEATS, help="timed passes over the pairs")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument(
        "--packing-max-tokens",
        type=int,
        default=None,
        help="override our trainer's packing_max_tokens (default: the config default)",
    )
    bench_common.add_precision_argument(ap, "autocast of ALL sides")
    ap.add_argument("--synthetic", action="store_true", help="synthetic pairs even if the real data exists")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument(
        "--share-model",
        action="store_true",
        help="all sides step ONE model (each with its own optimizer): a third of the weight memory, for GPUs "
        "that cannot hold three copies with AdamW states (the timings are unaffected; the weights just drift)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = bench_common.load_average()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = bench_common.choose_precision(args.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    use_real = REAL.is_dir() and not args.synthetic
    make = real_pairs if use_real else synthetic_pairs
    n_per_source = (args.warmup + args.steps) * args.per_source_batch
    tok, rows, k, data_desc = make(n_per_source, args.seed, args.vocab_size, args.max_length)
    pairs_per_step = k * args.per_source_batch
    warm_rows, timed_rows = balanced_split(rows, k, args.per_source_batch, args.warmup)
    data = Dataset.from_list(timed_rows)
    seq = np.array([len(r[s]) for r in timed_rows for s in ("chosen_ids", "rejected_ids")])
    pair_len = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in timed_rows]
    pair_tokens = float(np.mean(pair_len))
    prompt_frac = (
        float(np.mean([2 * shared_prefix(r["chosen_ids"], r["rejected_ids"]) for r in timed_rows])) / pair_tokens
    )

    base = build_model(args, tok)
    n_params = count_parameters(base)
    tmp = tempfile.mkdtemp()

    models = iter([base] * 3 if args.share_model else [copy.deepcopy(base), copy.deepcopy(base), base])

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
    )
    trainers = {
        "trl": RewardTrainer(
            next(models),
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
            balanced_batches=True,  # MultiTask gets MORE's sampler: more_overhead compares IDENTICAL batches
            **common,
            **extra,
        )
        trainers[method] = MORERewardTrainer(next(models), cfg, train_dataset=data, processing_class=tok)
    del base
    for t in trainers.values():
        t.create_optimizer()
        t.current_gradient_accumulation_steps = 1  # set by the train loop, which we bypass
        t.model.train()

    # Each side's own sampler decides its batches over the SAME timed pairs (TRL: random batches; ours:
    # length-grouped balanced batches); MultiTask takes MORE's batches verbatim. The warm-up pairs are
    # separate and the same on every side.
    plans = {"trl": batch_plan(trainers["trl"], len(timed_rows), pairs_per_step)}
    plans["more"] = batch_plan(trainers["more"], len(timed_rows), pairs_per_step)
    plans["multitask"] = plans["more"]
    n_steps = min(len(p) for p in plans.values())
    plans = {n: p[:n_steps] for n, p in plans.items()}
    warm_plan = [list(range(s, s + pairs_per_step)) for s in range(0, len(warm_rows), pairs_per_step)]

    def rows_for(name, pool, idx):
        if name == "trl":
            return [{"chosen_ids": pool[i]["chosen_ids"], "rejected_ids": pool[i]["rejected_ids"]} for i in idx]
        return [pool[i] for i in idx]

    def run_step(name, examples):
        t = trainers[name]
        batch = t.data_collator(examples)
        batch = {key: v.to(t.args.device) if hasattr(v, "to") else v for key, v in batch.items()}
        width = batch["input_ids"].numel()
        # training_step outside train() runs on the unprepared model: apply the autocast ourselves (all alike)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            t.training_step(t.model, batch)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        return width

    timed_examples = {n: [rows_for(n, timed_rows, idx) for idx in plans[n]] for n in trainers}
    warm_examples = {n: [rows_for(n, warm_rows, idx) for idx in warm_plan] for n in trainers}
    first = {n: trainers[n].data_collator(timed_examples[n][0]) for n in ("more", "multitask")}
    batches_identical = (
        all(torch.equal(first["more"][key], first["multitask"][key]) for key in first["more"] if key != "source_id")
        and plans["more"] == plans["multitask"]
    )

    peak = {}

    def stepper(name, examples):
        def f(i):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            width = run_step(name, examples[i])
            if device == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2**30)
            return width

        return f

    timings = bench_common.run_interleaved(
        {n: stepper(n, timed_examples[n]) for n in trainers},
        n_steps,
        repeats=args.repeats,
        warmup_steps=len(warm_plan),
        warmup={n: stepper(n, warm_examples[n]) for n in trainers},
        sync=torch.cuda.synchronize if device == "cuda" else None,
        progress=lambda s: print(s, flush=True),
    )
    load_after = bench_common.load_average()

    timed_pairs = n_steps * pairs_per_step
    secs = bench_common.seconds_per_side(timings)
    pps = {n: round(timed_pairs / s, 2) for n, s in secs.items()}
    tokens = {n: sum(timings.out[n][0]) for n in trainers}  # identical in every repeat (the same batches)
    plan_tokens = {n: sum(pair_len[i] for b in plans[n] for i in b) for n in trainers}
    speedup = bench_common.ratio_summary(timings, "trl", "more")
    overhead = bench_common.ratio_summary(timings, "more", "multitask")
    more = trainers["more"]
    result = {
        "benchmark": "rm_train_throughput",
        **bench_common.flat_ratio_fields("speedup_vs_trl", speedup),
        "multitask_speedup_vs_trl": bench_common.ratio_summary(timings, "trl", "multitask")["median"],
        **bench_common.flat_ratio_fields("more_overhead", overhead),
        "more_overhead_batches_identical": bool(batches_identical),
        **bench_common.discipline(timings),
        "timed_pairs_identical": bench_common.same_multiset(plans["trl"], plans["more"], plans["multitask"])
        and timed_pairs == len(timed_rows),
        "timed_pairs_per_repeat": timed_pairs,
        "timed_pair_tokens_trl": plan_tokens["trl"],
        "timed_pair_tokens_ours": plan_tokens["more"],
        "input_tokens_trl": tokens["trl"],
        "input_tokens_ours": tokens["more"],
        "input_token_ratio_trl_vs_ours": round(tokens["trl"] / tokens["more"], 3),
        "warmup_steps": len(warm_plan),
        "warmup": "the same separate warm-up pairs on every side, untimed",
        "pairs_per_s": pps,
        "seconds_per_repeat": secs,
        "baseline": "stock trl.RewardTrainer, DataCollatorForPreference (dynamic padding), its random sampler",
        "ours": f"MORERewardTrainer(method='more') defaults: packing={more.packed}, packing_max_tokens="
        f"{more.args.packing_max_tokens}, length_grouping={more.args.length_grouping}, balanced batches",
        "more_overhead_def": "MORE seconds / MultiTask seconds on the same batches (same sampler and packing)",
        "speedup_def": "stock TRL seconds / MORE seconds over the same timed pairs, per repeat",
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
        "model": "pythia-1.4b-shape" if args.pythia else f"{args.arch}/{args.size}",
        "params_m": round(n_params / 1e6, 1),
        "shared_model": args.share_model,
        **bench_common.environment(device, precision, why, torch.get_num_threads()),
        "peak_gpu_gib": {n: round(v, 1) for n, v in peak.items()} or None,
        "load_before": load_before,
        "load_after": load_after,
    }
    return bench_common.emit(result)


if __name__ == "__main__":
    main()
