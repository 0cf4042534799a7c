#!/usr/bin/env bash
# The one prepared GPU check (issues 11, 18): prints one JSON line per benchmark on stdout, nothing else
# (progress and logs on stderr), with the timing discipline of scripts/bench_common.py (same work per side,
# identical untimed warm-up, interleaved steps, 3 repeats; median and min-max in the JSON).
#   1. RM training throughput: scripts/bench_train.py with a Pythia-1.4B-shaped random-init RM (GPT-NeoX,
#      hidden 2048, 24 layers; bf16 autocast, SDPA attention) on the real length profile of
#      ../shared/data/real (synthetic fallback with the same length and shared-prompt profile), 16 pairs per
#      optimizer step (4 sources x 4), our trainer's defaults vs stock trl.RewardTrainer, 20 timed steps x 3
#      repeats. All sides step one shared model (--share-model: one copy of the weights plus three AdamW
#      states, ~45 GB, fits an 80 GB card). Targets: >= 80 pairs/s on an H100-class card (anchors: stock TRL
#      47.5, with length grouping 67.2).
#   2. Best-of-n generation: scripts/bench_generate.py --llama7b-shape (Alpaca-7B shape, bf16), n=4, exactly
#      128 new tokens, 64 prompts in one call vs a per-prompt loop timed on 4 uniformly drawn prompts (scaled;
#      the JSON says timed_prompts_identical=false and loop_time_scale), 3 repeats. Target: >= 20x the loop.
#      At 7B one repeat is one call of ours (~20 s at the anchors' 1,735 tokens/s), so this line says
#      meets_discipline=false (1 step, < 60 s per side): more would not fit the 8 minutes.
# Budget: <= 8 minutes on one H100/H200 (estimated from ANCHORS.md: train ~1-2 min, generate ~3 min; each
# benchmark is capped by `timeout`: 200 s and 260 s). Not yet run on a GPU: none was lent to these sessions.
# It installs nothing from the network. If trl, datasets or peft are missing it installs them from wheels in
# the repository's ignored .whl/ folder (see README "Checking on a GPU": `pip download --no-deps -d .whl ...`
# on a machine with the same Python), with `pip install --no-index --find-links .whl`.
# Usage (from anywhere):  bash scripts/gpu_check.sh            # on a GPU machine
#                         bash scripts/gpu_check.sh --tiny     # CPU rehearsal of the same commands, tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d)}"
if ! python -c "import trl, datasets, peft" 2>/dev/null; then
  if [[ -d .whl ]]; then
    echo "gpu_check.sh: installing trl/datasets/peft from .whl/ (no network)" >&2
    pip install --no-index --find-links .whl trl datasets peft >&2 || {
      echo "gpu_check.sh: a wheel is missing from .whl/; bring them along as README 'Checking on a GPU' says" >&2
      exit 2
    }
  else
    echo "gpu_check.sh: trl/datasets/peft are not installed and there is no .whl/ folder; bring the wheels" \
      "along as README 'Checking on a GPU' says" >&2
    exit 2
  fi
fi
if [[ "${1:-}" == "--tiny" ]]; then
  TRAIN=(--size tiny --per-source-batch 1 --steps 2 --warmup 1 --repeats 3 --synthetic --vocab-size 500
         --share-model)
  GEN=(--hidden 64 --layers 2 --heads 2 --vocab 500 --prompts 4 --batch-size 2 --new-tokens 2 --loop-prompts 2
       --min-prompt 4 --max-prompt 8 --repeats 3)
  TRAIN_LIMIT=600 GEN_LIMIT=600
else
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device (use --tiny for the CPU rehearsal)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
  TRAIN=(--pythia-1.4b --per-source-batch 4 --steps 20 --warmup 3 --repeats 3 --share-model)
  GEN=(--llama7b-shape --prompts 64 --batch-size 64 --new-tokens 128 --loop-prompts 4 --repeats 3)
  TRAIN_LIMIT=200 GEN_LIMIT=260
fi
echo "gpu_check.sh: logs in $LOGS" >&2
timeout "$TRAIN_LIMIT" python scripts/bench_train.py "${TRAIN[@]}" >"$LOGS/train.log" 2>&1 || {
  echo "gpu_check.sh: bench_train failed or ran past ${TRAIN_LIMIT}s:" >&2; tail -n 20 "$LOGS/train.log" >&2; }
tail -n 1 "$LOGS/train.log" | grep '^{' || true
timeout "$GEN_LIMIT" python scripts/bench_generate.py "${GEN[@]}" >"$LOGS/generate.log" 2>&1 || {
  echo "gpu_check.sh: bench_generate failed or ran past ${GEN_LIMIT}s:" >&2; tail -n 20 "$LOGS/generate.log" >&2; }
tail -n 1 "$LOGS/generate.log" | grep '^{' || true
