"""Time MORE vs MultiTask reward-model training steps on the same model and batches, in one run.

Both trainers wrap the SAME model; steps alternate (multitask, more, multitask, ...) on the same fixed
balanced batches so machine noise hits both alike. A step = forward + backward + optimizer step.
The last line printed is JSON: {"benchmark": "more_vs_multitask_step_time", "ratio": more/multitask, ...}
where ratio is the median over repeats of (MORE's total seconds / MultiTask's on the same batches), with its
min-max ("ratio_min", "ratio_max"); the timing discipline (interleaving, identical untimed warm-up, repeats)
is scripts/bench_common.py's. Target: ratio <= 1.01 (MORE's extra work is a hook, an index_add over pooled
features and a K x K solve). The fair baseline, what a user would otherwise run, is timed in the same
rounds: a stock `trl.RewardTrainer` step on the same pairs collated by TRL's own `DataCollatorForPreference`
(dynamic padding); "more_vs_trl" is MORE / TRL seconds (< 1 means MORE is faster).
Our trainers run their defaults (pairs packed; these random pairs share no prompt, so packing only removes
padding here; scripts/bench_train.py measures the real shared-prompt profile).

    python scripts/bench_reward.py                       # mini GPT-NeoX, 10 pairs x 64 tokens, CPU
    python scripts/bench_reward.py --arch llama --precision bf16
    python scripts/bench_reward.py --pythia-1.4b --pairs 16 --seq 512          # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from pipeline.models import TinyModelSpec, count_parameters, pythia_1_4b_config, tiny_model, tiny_tokenizer  # noqa: E402
from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer  # noqa: E402


SOURCES = ["helpful", "harmless", "oasst1", "webgpt", "summarize"]


def make_batches(tok, n_batches, pairs, seq, seed=0):
    """Balanced batches of random token ids, exactly `seq` tokens per sequence."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(n_batches * pairs):
        ids = torch.randint(4, len(tok), (2, seq), generator=g).tolist()
        rows.append({"chosen_ids": ids[0], "rejected_ids": ids[1], "source_id": b % len(SOURCES)})
    return Dataset.from_list(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt_neox", choices=["gpt_neox", "llama"])
    p.add_argument("--size", default="mini", help="tiny | mini | small (~25M params with --vocab 8000)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--pythia-1.4b", dest="pythia", action="store_true", help="Pythia-1.4B shape, random init")
    p.add_argument("--pairs", type=int, default=10, help="pairs per step (spread over the 5 sources)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=bench_common.MIN_STEPS, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=bench_common.MIN_REPEATS, help="timed passes over the steps")
    bench_common.add_precision_argument(p, "autocast of ALL sides")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = tiny_tokenizer([" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 20000, 50)], args.vocab)
    if args.pythia:
        config = pythia_1_4b_config(tok)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = tiny_model(
            TinyModelSpec(arch=args.arch, size=args.size, max_position_embeddings=max(1024, args.seq)),
            tok,
            task="reward",
        )
    n_params = count_parameters(model)
    data = make_batches(tok, args.warmup + args.steps, args.pairs, args.seq)
    tmp = tempfile.mkdtemp()
    trainers = {}
    for method in ("multitask", "more"):
        cfg = MORERewardConfig(
            output_dir=f"{tmp}/{method}",
            method=method,
            source_names=SOURCES,
            balanced_batches=True,
            per_device_train_batch_size=args.pairs,
            bf16=False,
            use_cpu=device == "cpu",
            activation_checkpointing=False,
            report_to="none",
            max_length=None,
            learning_rate=1e-5,
            logging_steps=10**9,
            disable_tqdm=True,
        )
        t = MORERewardTrainer(model, cfg, train_dataset=data, processing_class=tok)
        t.create_optimizer()
        t.current_gradient_accumulation_steps = 1  # set by the train loop, which we bypass
        trainers[method] = t
    trl_cfg = RewardConfig(
        output_dir=f"{tmp}/trl",
        per_device_train_batch_size=args.pairs,
        bf16=False,
        use_cpu=device == "cpu",
        activation_checkpointing=False,
        report_to="none",
        max_length=None,
        learning_rate=1e-5,
        logging_steps=10**9,
        disable_tqdm=True,
    )
    trl = RewardTrainer(model, trl_cfg, train_dataset=data.remove_columns(["source_id"]), processing_class=tok)
    trl.create_optimizer()
    trl.current_gradient_accumulation_steps = 1
    trainers["trl"] = trl
    n_batches = args.warmup + args.steps
    plan = [list(range(b * args.pairs, (b + 1) * args.pairs)) for b in range(n_batches)]
    rows = [[data[i] for i in idx] for idx in plan]
    batches = [trainers["more"].data_collator(r) for r in rows]
    trl_batches = [trl.data_collator([{k: v for k, v in e.items() if k != "source_id"} for e in r]) for r in rows]
    precision, why = bench_common.choose_precision(args.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(method, offset):
        def f(i):
            t = trainers[method]
            batch = (trl_batches if method == "trl" else batches)[offset + i]
            batch = {k: v.to(t.args.device) for k, v in batch.items()}
            # training_step outside train() runs on the unprepared model: apply the autocast ourselves
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                t.training_step(t.model, batch)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            return batch["input_ids"].numel()

        return f

    load_before = bench_common.load_average()
    methods = ("multitask", "more", "trl")
    timings = bench_common.run_interleaved(
        {m: step(m, args.warmup) for m in methods},
        args.steps,
        repeats=args.repeats,
        warmup_steps=args.warmup,
        warmup={m: step(m, 0) for m in methods},
        sync=torch.cuda.synchronize if device == "cuda" else None,
        progress=lambda s: print(s, flush=True),
    )
    load_after = bench_common.load_average()
    secs = bench_common.seconds_per_side(timings)
    # Paired estimate too: each step ran the methods back to back on the same batch, so the median of the
    # per-step ratios cancels slow drifts of the machine's speed.
    more_s = [x for rep in timings.seconds["more"] for x in rep]
    paired = statistics.median(a / b for a, b in zip(more_s, [x for rep in timings.seconds["multitask"] for x in rep]))
    pair_tokens = sum(
        len(data[i]["chosen_ids"]) + len(data[i]["rejected_ids"]) for idx in plan[args.warmup :] for i in idx
    )
    result = {
        "benchmark": "more_vs_multitask_step_time",
        **bench_common.flat_ratio_fields("ratio", bench_common.ratio_summary(timings, "more", "multitask")),
        **bench_common.flat_ratio_fields("more_vs_trl", bench_common.ratio_summary(timings, "more", "trl")),
        **bench_common.discipline(timings),
        "ratio_def": "MORE seconds / MultiTask seconds on the same batches, per repeat (<= 1.01 is the target)",
        "more_vs_trl_def": "MORE seconds / stock TRL seconds on the same pairs (< 1: MORE is faster)",
        "paired_step_ratio_median": round(paired, 4),
        "baseline": "stock trl.RewardTrainer step, DataCollatorForPreference (dynamic padding), same pairs",
        "timed_pairs_identical": True,  # every side steps on batches collated from rows[i], by construction
        "timed_pair_tokens": pair_tokens,
        "input_tokens": {m: sum(timings.out[m][0]) for m in methods},
        "seconds_per_repeat": secs,
        "params": n_params,
        "pairs": args.pairs,
        "seq": args.seq,
        "model": "pythia-1.4b-shape" if args.pythia else f"{args.arch}/{args.size}",
        **bench_common.environment(device, precision, why, torch.get_num_threads()),
        "load_before": load_before,
        "load_after": load_after,
        "lambda_last": trainers["more"]._last_lambda.tolist(),
    }
    print(f"seconds per repeat: {secs} ({n_params / 1e6:.1f}M params)")
    return bench_common.emit(result)


if __name__ == "__main__":
    main()
