"""Benchmark: the alignment stage's best-of-n sampler vs a per-prompt loop, same prompts, one run.

* ours = `pipeline.align.generate.generate_rows` (what `sample`, and so the stage, calls): prompts sorted
  by length, left-padded, `--batch-size` prompts per `generate` call with n sequences each, KV cache on,
  and (backend "generate") each prompt encoded ONCE with its KV cache shared by its n samples (plain
  `generate` prefills every prompt n times); `--no-share-prompt` turns that off; `--backend` picks plain
  `generate`, a static KV cache (compiled decoding on CUDA), or transformers' continuous batching;
* loop = one `generate` call per prompt with `num_return_sequences=n` (the same GenerationConfig).
Both decode EXACTLY `--new-tokens` tokens per sequence (min_new_tokens = max_new_tokens), so the work is
identical; sampling at `--temperature`. The timing discipline is scripts/bench_common.py's: a timed step =
one of our batches and the same prompts through the loop, the sides take turns (the order rotates), step 0
runs once untimed first on both, and the pass over all prompts is repeated `--repeats` times.
The last printed line is JSON:
    {"benchmark": "bon_generation", "ratio": loop s / ours s (median over repeats; ratio_min, ratio_max), ...}
with the prompt tokens, new tokens and model input tokens of each side as the identical-work evidence
(with `--loop-prompts K` the loop is timed on K prompts drawn uniformly at random (seeded) from all of
them, its time scaled by N/K, and `timed_prompts_identical` is false).

    python scripts/bench_generate.py                         # small random GPT-NeoX on CPU, 80 prompts, 20 steps x 3
    python scripts/bench_generate.py --arch llama --prompts 32 --batch-size 32
    python scripts/bench_generate.py --llama7b-shape --prompts 64 --batch-size 64 --new-tokens 128 --loop-prompts 8
    python scripts/bench_generate.py --llama7b-shape ... --backend static     # static KV cache + torch.compile

Prompts are random token ids with lengths uniform in [--min-prompt, --max-prompt] (the anchors: 20-200).

Beyond plain batched `generate` (what was checked, 2026-11, transformers 5.24 / torch 2.13)
------------------------------------------------------------------------------------------
Plain batched `generate` on an H100 reaches ~13% of what memory bandwidth allows for a 7B model
(../shared/reference/ANCHORS.md): decoding is memory-bound, and HF's eager decoding step adds Python and
kernel-launch overhead per token, wastes the slots of sequences that finished early (they keep decoding
padding until the longest is done), and grows a dynamic KV cache by concatenation. The paths beyond it:

1. `--backend static`: `cache_implementation="static"` preallocates the KV cache; on CUDA transformers then
   compiles the decoding step with `torch.compile` (CUDA graphs, "reduce-overhead") automatically. Best for
   a fixed batch shape (the stage's batches are bucketed by length); the first call per shape pays the
   compile. On CPU there is no compilation and it gives plain-generate speed (checked: same greedy tokens).
2. `--backend continuous`: transformers' continuous batching (`model.generate_batch`, a
   `ContinuousBatchingManager` with a paged KV cache): finished sequences are replaced by waiting ones,
   so no slot decodes padding. Present in 5.24 and tested equal to plain generate on a Llama; it fails on
   GPT-NeoX in 5.24 (`PagedAttentionCache.update()` signature mismatch in the GPT-NeoX attention), and on
   CPU it is much SLOWER (~10-30 s for a few tokens of 1-4 tiny requests, spent in its background thread) — a
   GPU option only.
3. vLLM (PagedAttention + CUDA graphs + continuous batching) is the production answer for 7B sampling
   (TRL's RLOOTrainer exposes it as `use_vllm`). It is not installed here (no GPU, no wheel for this
   torch) and is therefore not a backend of `pipeline.align.generate`; adding it is a `backend="vllm"`
   branch mapping `SamplingParams(n, temperature, top_p, max_tokens)` onto `LLM.generate`.
4. Shared-prompt prefill (implemented, the default): the prompt's forward pass is paid once instead of n
   times. It matters when prompts are long relative to the responses (the anchors' 20-200-token prompts).
On a GPU run this script with each `--backend` on the same machine and compare the ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_common  # noqa: E402

from pipeline.align.generate import BACKENDS, generate_rows, generation_config  # noqa: E402


LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if args.llama7b_shape:
        config = LlamaConfig(**LLAMA_7B, **special)
    elif args.arch == "llama":
        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            vocab_size=args.vocab,
            max_position_embeddings=1024,
            **special,
        )
    else:
        config = GPTNeoXConfig(
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            vocab_size=args.vocab,
            max_position_embeddings=1024,
            rotary_pct=0.25,
            use_parallel_residual=True,
            **special,
        )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config


def plan_rounds(prompts: list, batch_size: int, loop_prompts: int | None, seed: int) -> tuple[list, float]:
    """Rounds of (our batch, the loop's prompts from that batch), and the factor scaling the loop's time to
    all prompts. Our batches are the stage's (sorted by length, longest first); the loop's prompts are a
    uniform sample of K of ALL prompts (not the first, longest ones of each batch)."""
    n = len(prompts)
    k = n if loop_prompts is None else max(1, min(loop_prompts, n))
    chosen = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    rounds = []
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        rounds.append(([prompts[i] for i in idx], [prompts[i] for i in idx if i in chosen]))
    return rounds, n / k


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["gpt_neox", "llama"], default="gpt_neox")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--llama7b-shape", action="store_true", help="Alpaca-7B's LLaMA shape (bf16; needs a GPU)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument(
        "--loop-prompts",
        type=int,
        default=None,
        help="time the loop on K prompts drawn uniformly at random (its time scaled by N/K)",
    )
    ap.add_argument("--new-tokens", type=int, default=16, help="exactly this many new tokens per sequence")
    ap.add_argument("--min-prompt", type=int, default=20)
    ap.add_argument("--max-prompt", type=int, default=200)
    ap.add_argument(
        "--batch-size", type=int, default=4, help="prompts per generate call (ours); 80 / 4 = 20 timed steps"
    )
    ap.add_argument("--temperature", type=float, default=1.2)
    ap.add_argument("--backend", choices=BACKENDS, default="generate")
    ap.add_argument("--no-share-prompt", action="store_true", help="prefill each prompt n times, as plain generate")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=bench_common.MIN_REPEATS, help="timed passes over the prompts")
    bench_common.add_precision_argument(ap, "model dtype of both sides")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    precision, precision_reason = bench_common.choose_precision(args.precision, device.type)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, config = build_model(args, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, size=args.prompts)
    prompts = [rng.integers(3, config.vocab_size, size=int(L)).tolist() for L in lengths]
    gen = generation_config(
        n=args.n,
        do_sample=True,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        eos_ids=[1],
        pad_id=0,
        backend=args.backend,
    )
    loop_gen = generation_config(
        n=args.n,
        do_sample=True,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        eos_ids=[1],
        pad_id=0,
    )
    print(
        f"model: {'llama-7b shape' if args.llama7b_shape else args.arch} {n_params / 1e6:.1f}M params, {dtype}, "
        f"{device}; {args.prompts} prompts x n={args.n} x {args.new_tokens} new tokens, prompt lengths "
        f"{lengths.min()}-{lengths.max()}, backend={args.backend}",
        flush=True,
    )

    def ours(ps):
        return generate_rows(
            model,
            ps,
            gen,
            n=args.n,
            pad_id=0,
            batch_size=args.batch_size,
            backend=args.backend,
            share_prompt=not args.no_share_prompt,
        )

    @torch.no_grad()
    def loop(ps):
        rows = []
        for p in ps:
            ids = torch.tensor([p], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=loop_gen)
            rows.append(out[:, ids.shape[1] :].tolist())
        return rows

    # Steps: one batch of ours (the stage's length-sorted batches) and the same prompts through the loop,
    # interleaved (the order rotates), repeated; the first step of each side is run once more before, untimed
    # (kernels, allocator; the static backend compiles its step there for the first shape).
    rounds, scale = plan_rounds(prompts, args.batch_size, args.loop_prompts, args.seed)
    torch.manual_seed(args.seed)
    load_before = bench_common.load_average()
    rows = [[] for _ in rounds]
    loop_rows = [[] for _ in rounds]

    def step(which, counter):
        def f(i):
            batch, sub = rounds[i]
            counter.take()
            if which == "ours":
                rows[i] = ours(batch)
            elif sub:
                loop_rows[i] = loop(sub)
            return counter.take()

        return f

    with bench_common.count_tokens(model) as counter:
        timings = bench_common.run_interleaved(
            {"ours": step("ours", counter), "loop": step("loop", counter)},
            len(rounds),
            repeats=args.repeats,
            warmup_steps=1,
            sync=lambda: sync(device),
            progress=lambda s: print(s, flush=True),
        )
    load_after = bench_common.load_average()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    secs = bench_common.seconds_per_side(timings)
    ours_s, loop_s = secs["ours"], secs["loop"] * scale
    k = sum(len(sub) for _, sub in rounds)

    new_tokens = sum(len(r) for batch_rows in rows for per in batch_rows for r in per)
    loop_new = sum(len(r) for batch_rows in loop_rows for per in batch_rows for r in per)
    expected = args.prompts * args.n * args.new_tokens
    assert new_tokens == expected, f"ours produced {new_tokens} tokens, expected {expected}"
    assert loop_new == k * args.n * args.new_tokens, f"the loop produced {loop_new} tokens"
    summary = bench_common.ratio_summary(timings, "loop", "ours")
    if scale != 1:
        summary = {
            key: (round(v * scale, 3) if key != "per_repeat" else [round(x * scale, 3) for x in v])
            for key, v in summary.items()
        }
    result = {
        "benchmark": "bon_generation",
        **bench_common.flat_ratio_fields("ratio", summary),
        **bench_common.discipline(timings),
        "baseline": "one generate call per prompt with num_return_sequences=n (same GenerationConfig)",
        "timed_prompts_identical": k == args.prompts,
        "loop_time_scale": scale,
        "timed_prompt_tokens": {
            "ours": sum(len(p) for batch, _ in rounds for p in batch),
            "loop": sum(len(p) for _, sub in rounds for p in sub),
        },
        "new_tokens": {"ours": new_tokens, "loop": loop_new},
        "input_tokens": {side: sum(timings.out[side][0]) for side in ("ours", "loop")},
        "tokens_per_s": round(new_tokens / ours_s, 1),
        "loop_tokens_per_s": round(new_tokens / loop_s, 1),
        "ours_s": round(ours_s, 3),
        "loop_s": round(loop_s, 3),
        "loop_prompts_timed": k,
        "prompts": args.prompts,
        "n": args.n,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "share_prompt": not args.no_share_prompt,
        "model": "llama-7b-shape"
        if args.llama7b_shape
        else f"{args.arch} h{args.hidden} l{args.layers} v{args.vocab}",
        "params_m": round(n_params / 1e6, 1),
        "peak_mem_gb": None if peak is None else round(peak, 2),
        **bench_common.environment(
            device.type, "bf16" if dtype == torch.bfloat16 else "fp32", precision_reason, torch.get_num_threads()
        ),
        "load_before": load_before,
        "load_after": load_after,
    }
    print(
        f"ours: {ours_s:.2f} s ({result['tokens_per_s']} new tokens/s); loop: {loop_s:.2f} s "
        f"({result['loop_tokens_per_s']} new tokens/s); ratio {result['ratio']}x",
        flush=True,
    )
    return bench_common.emit(result)


if __name__ == "__main__":
    main()
