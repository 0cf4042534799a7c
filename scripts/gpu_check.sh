#!/usr/bin/env bash
# One prepared GPU check (issue 11): prints one JSON line per benchmark, nothing else on stdout.
#   1. RM training throughput: scripts/bench_train.py with a Pythia-1.4B-shaped random-init RM (GPT-NeoX,
#      hidden 2048, 24 layers; bf16 autocast, SDPA attention) on the real length profile of
#      ../shared/data/real (synthetic fallback with the same length and shared-prompt profile), 16 pairs per
#      optimizer step (4 sources x 4), our trainer's defaults vs stock trl.RewardTrainer, interleaved.
#      Targets: >= 80 pairs/s on an H100-class card (anchors: stock TRL 47.5, with length grouping 67.2).
#      Memory: three 1.4B models with AdamW states (~22 GB each) plus activations: an 80 GB card is tight.
#   2. Best-of-n generation: scripts/bench_generate.py --llama7b-shape (Alpaca-7B shape, bf16), 64 prompts per
#      call vs a per-prompt loop. Target: >= 20x the loop.
# Usage (from the repo root):  bash scripts/gpu_check.sh            # on a GPU machine, ~10 minutes
#                              bash scripts/gpu_check.sh --tiny     # CPU smoke test of the same commands
# Progress goes to stderr; the two JSON lines to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--tiny" ]]; then
  TRAIN=(--size tiny --per-source-batch 1 --steps 1 --warmup 0 --synthetic --vocab-size 500)
  GEN=(--hidden 64 --layers 2 --heads 2 --vocab 500 --prompts 2 --batch-size 2 --new-tokens 2 --loop-prompts 1
       --min-prompt 4 --max-prompt 8)
else
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device (use --tiny for the CPU smoke test)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
  TRAIN=(--pythia-1.4b --per-source-batch 4 --steps 14 --warmup 4)
  GEN=(--llama7b-shape --prompts 64 --batch-size 64 --new-tokens 128 --loop-prompts 8)
fi
python scripts/bench_train.py "${TRAIN[@]}" 2>/tmp/gpu_check_train.log | tail -n 1
python scripts/bench_generate.py "${GEN[@]}" 2>/tmp/gpu_check_generate.log | tail -n 1
