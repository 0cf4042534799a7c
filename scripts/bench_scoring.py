"""Benchmark: the calibration stage's batched RM scorer vs batched dynamic padding (the headline) and vs a
per-pair loop padded to 512 tokens (a second field).

All score the SAME pairs with the SAME randomly initialised reward model, the same left truncation to
`--max-length` tokens and the same autocast (`--precision`), in one run:

* ours  = `pipeline.scoring.score_pairs` (what the calibration stage calls): pairs sorted by length,
  padded per batch, `--batch-size` sequences per forward, no gradients, and for decoder RMs each pair
  packed into one sequence holding one copy of the prompt both sides share (a 4D attention mask keeps
  the two continuations apart; `--no-share` scores them as separate sequences);
* dynamic = the fair baseline, what a user would otherwise run: pairs in their given order, chosen and
  rejected of up to batch_size/2 pairs per forward, padded to the longest of the batch (batched dynamic
  padding, like TRL's collator), no sorting, no prompt sharing;
* naive = one forward per pair (chosen + rejected), every sequence padded to `--max-length` tokens (the
  authors' recipe pads everything to 512); `--no-naive` skips it.
The timing discipline is scripts/bench_common.py's: a timed step = `--round-pairs` pairs on every side
(ours takes consecutive slices of the length-sorted pairs, the baselines the pairs in their given order),
the sides take turns step by step, step 0 runs once untimed first on every side, and the pass over all
pairs is repeated `--repeats` times. The JSON carries the pair tokens each side scored (equal: the same
pairs) and the tokens each side actually fed the model (`input_tokens`, from a forward pre-hook).

Texts: the real Helpful / Harmless / WebGPT / TL;DR slices in <repo>/../shared/data/real when present
(pairs drawn evenly across them with a seed), tokenized by a BPE trained on them; otherwise synthetic
texts whose token lengths follow the recorded length profile of those slices (see LENGTH_PROFILE).
The last printed line is JSON: {"benchmark": "rm_scoring", "ratio_vs_dynamic_padding": dynamic s / ours s
(median over repeats, with _min and _max), "ratio_vs_naive_pad": likewise, ...}.

    python scripts/bench_scoring.py --precision fp32   # 200 pairs, mini GPT-NeoX, 20 steps x 3 repeats, CPU
    python scripts/bench_scoring.py --pairs 400 --round-pairs 20 --size small
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_common  # noqa: E402

from pipeline.calibration.config import CalibrationConfig  # noqa: E402
from pipeline.data.tokenize import encode_left, pad_right  # noqa: E402
from pipeline.models import TinyModelSpec, count_parameters, tiny_model, tiny_tokenizer  # noqa: E402
from pipeline.scoring import score_pair_ids, score_pairs  # noqa: E402


REAL = REPO.parent / "shared" / "data" / "real"

# Token lengths per sequence (prompt + response) of 2,000 real pairs from the Helpful/Harmless/WebGPT/TL;DR
# slices in ../shared/data/real, tokenized with a 50k BPE and left-truncated to 512 tokens, as recorded in
# ../shared/reference/ANCHORS.md (measured 2026-11-26): mean 202, median 178, p90 404. We draw lengths
# from a log-normal with that median whose p90 is 404 (sigma = ln(404/178) / 1.2816), capped at 512.
LENGTH_PROFILE = {"mean": 202, "median": 178, "p90": 404, "max": 512}


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------
def _real_pairs() -> list[list[tuple[str, str]]]:
    """Full transcripts (a, b) per real source, read directly from the shared files (format per README)."""
    groups = []
    for rel in ("hh-rlhf-helpful/helpful.test.json", "hh-rlhf-harmless/harmless.test.json", "webgpt/webgpt.test.json"):
        path = REAL / rel
        if path.is_file():
            groups.append([(r["text"][0], r["text"][1]) for r in json.loads(path.read_text(encoding="utf-8"))])
    summ = REAL / "summarize-from-feedback" / "comparisons" / "batch13.json"
    if summ.is_file():
        pairs = []
        opener = gzip.open if summ.suffix == ".gz" else open
        with opener(summ, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    info = r["info"]
                    prompt = (
                        f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\n"
                        f"POST: {info.get('post', '')}\nTL;DR:"
                    )
                    pairs.append((prompt + r["summaries"][0]["text"], prompt + r["summaries"][1]["text"]))
        groups.append(pairs)
    return [g for g in groups if g]


def real_texts(n_pairs: int, seed: int, vocab_size: int):
    groups = _real_pairs()
    rng = np.random.default_rng(seed)
    per = [n_pairs // len(groups) + (i < n_pairs % len(groups)) for i in range(len(groups))]
    pairs = []
    for g, k in zip(groups, per):
        pairs += [g[i] for i in rng.choice(len(g), size=min(k, len(g)), replace=False)]
    corpus = [t for g in groups for a, b in g for t in (a, b)]
    tok = tiny_tokenizer(corpus, vocab_size=vocab_size)
    return tok, [a for a, _ in pairs], [b for _, b in pairs], f"real ({REAL}, {len(groups)} sources)"


def synthetic_texts(n_pairs: int, seed: int, vocab_size: int):
    """Texts built from random tokens whose re-tokenized lengths follow LENGTH_PROFILE."""
    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus

    tok = tiny_tokenizer(synthetic_corpus(SyntheticConfig()), vocab_size=min(vocab_size, 2000))
    rng = np.random.default_rng(seed)
    sigma = np.log(LENGTH_PROFILE["p90"] / LENGTH_PROFILE["median"]) / 1.2816
    lengths = np.minimum(rng.lognormal(np.log(LENGTH_PROFILE["median"]), sigma, 2 * n_pairs), LENGTH_PROFILE["max"])
    # word-level tokens: a word from the tokenizer's vocabulary that encodes to exactly one token
    words = [
        w
        for w in (tok.decode([i]) for i in range(len(tok)))
        if w.startswith(" ") and w.strip().isalpha() and len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    ]
    texts = [" ".join(rng.choice([w.strip() for w in words], size=max(1, int(n) - 1))) for n in lengths]
    return tok, texts[:n_pairs], texts[n_pairs:], "synthetic (recorded length profile)"


# --------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def naive_scores(model, tok, chosen, rejected, max_length: int, dtype):
    """One forward per pair, both sequences right-padded to exactly max_length tokens."""
    rc, rr = np.empty(len(chosen)), np.empty(len(chosen))
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        ids, _ = encode_left(tok, [c, r], max_length)
        input_ids, mask = pad_right(ids, tok.pad_token_id)
        pad = max_length - input_ids.shape[1]
        input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=tok.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(input_ids=input_ids, attention_mask=mask).logits.float()[:, 0]
        rc[i], rr[i] = float(out[0]), float(out[1])
    return rc, rr


@torch.no_grad()
def dynamic_scores(model, c_ids, r_ids, pad_id: int, batch_size: int, dtype):
    """Batched dynamic padding in the given order: batch_size/2 pairs (both sides) per forward."""
    m = max(1, batch_size // 2)
    rc, rr = np.empty(len(c_ids)), np.empty(len(c_ids))
    for s in range(0, len(c_ids), m):
        input_ids, mask = pad_right(list(c_ids[s : s + m]) + list(r_ids[s : s + m]), pad_id)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(input_ids=input_ids, attention_mask=mask).logits.float()[:, 0].numpy()
        k = len(c_ids[s : s + m])
        rc[s : s + k], rr[s : s + k] = out[:k], out[k:]
    return rc, rr


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="number of preference pairs scored by every side")
    ap.add_argument(
        "--size", default="mini", choices=["tiny", "mini", "small"], help="TinyModelSpec size (small ~25M)"
    )
    ap.add_argument("--arch", default="gpt_neox", choices=["gpt_neox", "llama", "bert"])
    ap.add_argument(
        "--batch-size",
        type=int,
        default=CalibrationConfig().batch_size,
        help="sequences per forward for the batched scorers (default: the calibration stage's)",
    )
    ap.add_argument(
        "--round-pairs",
        type=int,
        default=10,
        help="pairs per timed step (every side scores the same number of pairs per step; 200 / 10 = 20 steps)",
    )
    ap.add_argument("--repeats", type=int, default=bench_common.MIN_REPEATS, help="timed passes over the pairs")
    ap.add_argument("--max-length", type=int, default=512, help="left-truncation length = the naive padding length")
    ap.add_argument("--vocab-size", type=int, default=16000, help="BPE vocabulary trained on the texts")
    bench_common.add_precision_argument(ap, "autocast of ALL scorers")
    ap.add_argument("--no-naive", action="store_true", help="skip the per-pair pad-to-max-length loop")
    ap.add_argument(
        "--synthetic", action="store_true", help="use the recorded length profile even if real data exists"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=CalibrationConfig().max_tokens_per_batch,
        help="token budget per forward, --batch-size sequences at most (default: the stage's)",
    )
    ap.add_argument(
        "--no-share",
        action="store_true",
        help="score chosen and rejected as separate sequences "
        "(default: each pair packed with one copy of its shared prompt)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = bench_common.load_average()

    use_real = REAL.is_dir() and not args.synthetic
    tok, chosen, rejected, data_desc = (real_texts if use_real else synthetic_texts)(
        args.pairs, args.seed, args.vocab_size
    )
    ids, n_cut = encode_left(tok, chosen + rejected, args.max_length)
    lengths = np.array([len(s) for s in ids])
    model = tiny_model(
        TinyModelSpec(arch=args.arch, size=args.size, max_position_embeddings=max(1024, args.max_length)),
        tok,
        task="reward",
        seed=args.seed,
    ).eval()
    precision, why = bench_common.choose_precision(args.precision, "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else None
    print(
        f"data: {data_desc}; {len(chosen)} pairs, tokens/sequence mean {lengths.mean():.0f} median "
        f"{np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f} max {lengths.max()} ({n_cut} truncated); "
        f"model {args.arch}/{args.size} {count_parameters(model) / 1e6:.1f}M params; {precision} ({why}); "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    # `score_pairs` = `encode_left` of both sides + `score_pair_ids` (shared prompt prefix encoded once,
    # pairs sorted by length, padded per batch). Every side scores the SAME pairs, --round-pairs per timed
    # step: ours takes consecutive slices of the length-sorted pairs (its sorting is part of what is
    # measured), the baselines take the pairs in their given (random) order. Encoding is done once, outside
    # the timing, for all sides alike (the naive loop re-encodes, as a user's loop would).
    n = len(chosen)
    c_ids, _ = encode_left(tok, chosen, args.max_length)
    r_ids, _ = encode_left(tok, rejected, args.max_length)
    order = np.argsort([-max(len(a), len(b)) for a, b in zip(c_ids, r_ids)], kind="stable")
    n_steps = max(1, -(-n // args.round_pairs))
    plans = {"ours": [a.tolist() for a in np.array_split(order, n_steps)]}
    plans["dynamic"] = [a.tolist() for a in np.array_split(np.arange(n), n_steps)]
    if not args.no_naive:
        plans["naive"] = plans["dynamic"]
    rewards = {side: (np.empty(n), np.empty(n)) for side in plans}
    prefix_tokens = sum(min(len(os.path.commonprefix([a, b])), len(a) - 2, len(b) - 2) for a, b in zip(c_ids, r_ids))

    def scorer(side, counter):
        def step(i):
            sel = plans[side][i]
            counter.take()
            if side == "ours":
                rc, rr = score_pair_ids(
                    model,
                    [c_ids[j] for j in sel],
                    [r_ids[j] for j in sel],
                    tok.pad_token_id,
                    batch_size=args.batch_size,
                    max_tokens_per_batch=args.max_tokens,
                    dtype=dtype,
                    share_prefix=not args.no_share,
                )
            elif side == "dynamic":
                rc, rr = dynamic_scores(
                    model, [c_ids[j] for j in sel], [r_ids[j] for j in sel], tok.pad_token_id, args.batch_size, dtype
                )
            else:
                rc, rr = naive_scores(
                    model, tok, [chosen[j] for j in sel], [rejected[j] for j in sel], args.max_length, dtype
                )
            rewards[side][0][sel], rewards[side][1][sel] = rc, rr
            return counter.take()

        return step

    with bench_common.count_tokens(model) as counter:
        timings = bench_common.run_interleaved(
            {side: scorer(side, counter) for side in plans},
            n_steps,
            repeats=args.repeats,
            warmup_steps=1,
            progress=lambda s: print(s, flush=True),
        )
    load_after = bench_common.load_average()
    # the whole-call path gives the same rewards (a check that the slicing changed nothing)
    check = score_pairs(
        model,
        tok,
        [""] * min(n, 8),
        chosen[:8],
        rejected[:8],
        max_length=args.max_length,
        batch_size=args.batch_size,
        dtype=dtype,
    )

    def diff(a, b):
        return float(max(np.abs(a[0] - b[0]).max(), np.abs(a[1] - b[1]).max()))

    ours, dyn = rewards["ours"], rewards["dynamic"]
    scale = float(np.abs(np.concatenate(dyn)).max()) or 1.0
    tol = (2e-2 if dtype is not None else 1e-5) * scale  # bf16 keeps ~3 significant digits
    same = bool(np.allclose(check[0], ours[0][:8], atol=tol) and np.allclose(check[1], ours[1][:8], atol=tol))
    secs = bench_common.seconds_per_side(timings)
    pair_len = [len(a) + len(b) for a, b in zip(c_ids, r_ids)]
    result = {
        "benchmark": "rm_scoring",
        **bench_common.flat_ratio_fields(
            "ratio_vs_dynamic_padding", bench_common.ratio_summary(timings, "dynamic", "ours")
        ),
        **bench_common.discipline(timings),
        "baseline": "batched dynamic padding of the same pairs in their given order, batch_size/2 pairs (both sides) "
        "per forward, padded to the longest of the batch",
        "timed_pairs_identical": bench_common.same_multiset(*plans.values()) and len(order) == n,
        "timed_pair_tokens": {side: sum(pair_len[j] for b in p for j in b) for side, p in plans.items()},
        "input_tokens": {side: sum(timings.out[side][0]) for side in plans},
        "seconds_per_repeat": secs,
        "pairs_per_s": {side: round(n / s, 2) for side, s in secs.items()},
        "max_abs_reward_diff_dynamic": diff(ours, dyn),
        "n_pairs": n,
        "data": "real" if use_real else "synthetic-profile",
        "tokens_per_sequence": {
            "mean": round(float(lengths.mean()), 1),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
        },
        "model": f"{args.arch}/{args.size}",
        "params_m": round(count_parameters(model) / 1e6, 1),
        "batch_size": args.batch_size,
        "round_pairs": args.round_pairs,
        "max_tokens_per_batch": args.max_tokens,
        "shared_prefix": not args.no_share,
        "shared_prefix_token_fraction": round(2 * prefix_tokens / float(lengths.sum()), 3),
        "max_length": args.max_length,
        "slices_match_score_pairs": same,
        "reward_scale": scale,
        **bench_common.environment("cpu", precision, why, torch.get_num_threads()),
        "load_before": load_before,
        "load_after": load_after,
    }
    if "naive" in plans:
        result.update(
            bench_common.flat_ratio_fields("ratio_vs_naive_pad", bench_common.ratio_summary(timings, "naive", "ours"))
        )
        result["naive"] = f"one forward per pair, both sides padded to {args.max_length} tokens (the authors' recipe)"
        result["max_abs_reward_diff_naive"] = diff(ours, rewards["naive"])
    return bench_common.emit(result)


if __name__ == "__main__":
    main()
