#!/usr/bin/env bash
# The embedded default on a laptop-class CPU: the whole pipeline on the synthetic benchmark.
#   scripts/run_tiny_cpu.sh [OUTPUT_DIR] [key.sub=value ...]
# Hardware/time: 2 CPU cores, < 2 GB RAM, target <= 5 minutes (scripts/bench_demo.py measures it).
# With TWO processes (every multi-process code path, gloo): NPROC=2 scripts/run_tiny_cpu.sh
set -euo pipefail
OUT="runs/tiny-cpu"
if [[ $# -gt 0 && "$1" != *=* ]]; then OUT="$1"; shift; fi
cd "$(dirname "$0")/.."
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec accelerate launch --config_file accelerate_configs/cpu_2proc.yaml --num_processes "$NPROC" \
    -m pipeline.run --recipe tiny-cpu --output-dir "$OUT" "$@"
fi
exec python -m pipeline.run --recipe tiny-cpu --output-dir "$OUT" "$@"
