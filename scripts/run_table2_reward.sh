#!/usr/bin/env bash
# Table 2 of the MORE paper: MORE vs MultiTask reward models on one base model, five hub datasets.
#
#   scripts/run_table2_reward.sh pythia-1.4b [OUTPUT_DIR] [key.sub=value ...]
#   scripts/run_table2_reward.sh llama2-7b runs/llama2 reward.methods=[more,multitask,single]
#
# Hardware and time assumptions (estimates, not measurements of this project):
#   - 8 GPUs with >= 40 GB each (the paper: 8 x A100-40G), one node, >= 200 GB host RAM for CPU offload.
#   - DeepSpeed ZeRO-3 with CPU offload (the paper's setting): accelerate_configs/deepspeed_zero3_offload.yaml.
#     On 80 GB cards ZeRO-3 without offload is faster: ACCELERATE_CONFIG=accelerate_configs/deepspeed_zero3.yaml.
#   - Per RM: 200k pairs (5 x 40k), 1 epoch, global batch 80 = 2,500 optimizer steps. Throughput anchor
#     (../shared/reference/ANCHORS.md): ~25-65 pairs/s for Pythia-1.4B on ONE H100, so roughly 0.5-1.5 h
#     per RM on 8 GPUs for 1.4B, ~2x that for 2.8B, ~5x for 7B; calibration adds minutes.
#   - Hub access for the datasets and the base model (LLaMA-2 is gated: `huggingface-cli login`).
#   - Run from the repository root (the accelerate configs point at deepspeed_configs/ by relative path).
# Rerunning the same command resumes: finished RMs/stages are skipped, an interrupted RM resumes from its
# last checkpoint (reward.train.save_steps).
set -euo pipefail
BASE="${1:?usage: $0 pythia-1.4b|pythia-2.8b|llama2-7b [OUTPUT_DIR] [key=value ...]}"
shift
case "$BASE" in
  pythia-1.4b|pythia-2.8b|llama2-7b) ;;
  *) echo "unknown base model '$BASE': use pythia-1.4b, pythia-2.8b or llama2-7b" >&2; exit 2 ;;
esac
OUT="runs/paper-$BASE"
if [[ $# -gt 0 && "$1" != *=* ]]; then OUT="$1"; shift; fi
NUM_GPUS="${NUM_GPUS:-8}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-accelerate_configs/deepspeed_zero3_offload.yaml}"
cd "$(dirname "$0")/.."
# Global batch 80 = per_source_batch (2) x 5 sources x gradient_accumulation_steps x GPUs: keep it at 80.
if (( NUM_GPUS < 1 || 8 % NUM_GPUS != 0 )); then
  echo "NUM_GPUS=$NUM_GPUS: use 1, 2, 4 or 8 so that 10 pairs/device x accumulation x GPUs = 80" >&2; exit 2
fi
GAS=$(( 8 / NUM_GPUS ))
set -x
accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
  -m pipeline.run --recipe "paper-$BASE" --output-dir "$OUT" \
  reward.train.gradient_accumulation_steps="$GAS" "$@"
