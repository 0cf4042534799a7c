#!/usr/bin/env bash
# Table 1 (alignment) of the MORE paper: rejection-sampling fine-tuning of Alpaca-7B with the LLaMA2-7B
# MORE RM vs the MultiTask RM, judged pairwise by GPT-4 on held-out Helpful & Harmless prompts.
#
#   OPENAI_API_KEY=... scripts/run_table1_rjs.sh [OUTPUT_DIR] [key.sub=value ...]
#
# Hardware and time assumptions (estimates, not measurements of this project):
#   - 8 GPUs with 80 GB each (A100/H100-80G), one node, DeepSpeed ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml)
#     for the 7B reward models and the 7B SFT; ~150 GB host RAM.
#   - Reward stage: as scripts/run_table2_reward.sh llama2-7b (the recipes share data/reward/seed, so
#     pointing OUTPUT_DIR at a finished paper-llama2-7b run reuses its RMs: default runs/paper-llama2-7b).
#   - Sampling: ~85k Helpful/Harmless training prompts x 4 samples x <= 256 tokens = ~87M new tokens. At the
#     measured ~1,700 new tokens/s of batched HF generate per H100 (../shared/reference/ANCHORS.md) that is
#     ~14 GPU-hours, i.e. ~2 h on 8 GPUs; scoring with two 7B RMs ~1 h; SFT of Alpaca on ~85k winners
#     (1 epoch, batch 64) ~2-3 h per RM. Total: roughly 8-12 h on one 8-GPU node.
#   - GPT-4 judging: 500 prompts x 2 sets x 2 orders = 2,000 requests (align.judge.max_requests caps it).
#   - Hub access for Alpaca-7B weights (see align.model_name_or_path in the recipe) and the datasets.
# Rerunning the same command resumes where it stopped (stages, RMs, samples and SFT checkpoints).
set -euo pipefail
OUT="runs/paper-llama2-7b"
if [[ $# -gt 0 && "$1" != *=* ]]; then OUT="$1"; shift; fi
NUM_GPUS="${NUM_GPUS:-8}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-accelerate_configs/deepspeed_zero3.yaml}"
cd "$(dirname "$0")/.."
if (( NUM_GPUS < 1 || 8 % NUM_GPUS != 0 )); then
  echo "NUM_GPUS=$NUM_GPUS: use 1, 2, 4 or 8 so that 10 pairs/device x accumulation x GPUs = 80" >&2; exit 2
fi
GAS=$(( 8 / NUM_GPUS ))
if [[ -z "${OPENAI_API_KEY:-}" ]]; then
  echo "note: OPENAI_API_KEY is not set; the GPT-4 judge will fail (or pass align.judge.kind=gold align.judge.gold=<RM dir>)" >&2
fi
set -x
accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
  -m pipeline.run --recipe alpaca-7b-rjs --output-dir "$OUT" \
  reward.train.gradient_accumulation_steps="$GAS" "$@"
