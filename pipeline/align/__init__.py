"""Alignment: batched sampling, RM rewards (cross-tokenizer, calibrated), best-of-n / rejection sampling /
PPO / RLOO, pairwise judging and perplexity. The stage lives in `pipeline.align.stage`."""
