"""Time MORE vs MultiTask reward-model training steps on the same model and batches, in one run.

Both trainers wrap the SAME model; steps alternate (multitask, more, multitask, ...) on the same fixed
balanced batches so machine noise hits both alike. A step = forward + backward + optimizer step.
The last line printed is JSON: {"benchmark": "more_vs_multitask_step_time", "ratio": more/multitask, ...}
where ratio is the median over iterations of (more step time / multitask step time on the same batch).
Target: ratio <= 1.01 (MORE's extra work is a hook, an index_add over pooled features and a K x K solve).
The fair baseline, what a user would otherwise run, is timed in the same rounds: a stock `trl.RewardTrainer`
step on the same pairs collated by TRL's own `DataCollatorForPreference` (dynamic padding); the JSON adds
"more_vs_trl" (median of more / trl step time on the same pairs; < 1 means MORE is faster) and "trl_s".
Our trainers run their defaults (pairs packed; these random pairs share no prompt, so packing only removes
padding here; scripts/bench_train.py measures the real shared-prompt profile).

    python scripts/bench_reward.py                       # ~25M-param GPT-NeoX, 8 pairs x 256 tokens, CPU
    python scripts/bench_reward.py --arch llama --steps 20 --bf16
    python scripts/bench_reward.py --pythia-1.4b --pairs 16 --seq 512 --bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt_neox", choices=["gpt_neox", "llama"])
    p.add_argument("--size", default="small", help="tiny | mini | small (~25M params with --vocab 8000)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--pythia-1.4b", dest="pythia", action="store_true", help="Pythia-1.4B shape, random init")
    p.add_argument("--pairs", type=int, default=8, help="pairs per step (spread over the 5 sources)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=12, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

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
            bf16=args.bf16,
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
        bf16=args.bf16,
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
    rows = [[data[i] for i in range(b * args.pairs, (b + 1) * args.pairs)] for b in range(args.warmup + args.steps)]
    batches = [trainers["more"].data_collator(r) for r in rows]
    trl_batches = [trl.data_collator([{k: v for k, v in e.items() if k != "source_id"} for e in r]) for r in rows]

    def step(method, batch):
        t = trainers[method]
        batch = {k: v.to(t.args.device) for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # training_step outside train() runs on the unprepared model: apply the bf16 autocast ourselves
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            t.training_step(t.model, batch)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {"multitask": [], "more": [], "trl": []}
    for i, batch in enumerate(batches):
        order = ("multitask", "more", "trl") if i % 2 == 0 else ("trl", "more", "multitask")
        for method in order:
            dt = step(method, trl_batches[i] if method == "trl" else batch)
            if i >= args.warmup:
                times[method].append(dt)
    med = {m: statistics.median(v) for m, v in times.items()}
    # Paired estimate: each iteration ran both methods back to back on the same batch, so the median of
    # the per-iteration ratios cancels slow drifts of the machine's speed.
    paired = statistics.median(a / b for a, b in zip(times["more"], times["multitask"]))
    vs_trl = statistics.median(a / b for a, b in zip(times["more"], times["trl"]))
    result = {
        "benchmark": "more_vs_multitask_step_time",
        "ratio": paired,
        "more_vs_trl": vs_trl,
        "trl_s": med["trl"],
        "baseline": "stock trl.RewardTrainer step, DataCollatorForPreference (dynamic padding), same pairs",
        "ratio_of_medians": med["more"] / med["multitask"],
        "more_s": med["more"],
        "multitask_s": med["multitask"],
        "params": n_params,
        "pairs": args.pairs,
        "seq": args.seq,
        "steps": args.steps,
        "dtype": "bf16" if args.bf16 else "fp32",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "load_average_1m": round(__import__("os").getloadavg()[0], 2),
        "lambda_last": trainers["more"]._last_lambda.tolist(),
    }
    print(f"median step: multitask {med['multitask']:.4f}s, more {med['more']:.4f}s ({n_params / 1e6:.1f}M params)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
