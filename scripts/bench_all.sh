#!/usr/bin/env bash
# Runs every CPU benchmark with its default (CPU-sized) settings, one after another, and writes
#   docs/benchmarks.json  (every benchmark's last JSON line, the command, date, CPU model, load before/after)
#   docs/benchmarks.md    (the table)
#   README.md             (the same table between the <!-- benchmarks:begin ... --> / <!-- benchmarks:end --> lines)
# so no benchmark number in the README is typed by hand. Usage, from anywhere:
#   bash scripts/bench_all.sh                 # 5.7 min on 2 quiet cores (2026-12-07); far longer on a loaded machine
#   bash scripts/bench_all.sh --tiny          # seconds-long smoke run of the same commands (writes to $BENCH_OUT)
# Progress and each script's log go to stderr. Precision: fp32 on CPU (bf16 autocast was slower than fp32 on
# this project's AMD EPYC in an informal trial, not a recorded benchmark); override with
# BENCH_PRECISION=auto|bf16|fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PREC=(--precision "${BENCH_PRECISION:-fp32}")
if [[ "${1:-}" == "--tiny" ]]; then
  OUT="${BENCH_OUT:?--tiny writes to \$BENCH_OUT (a folder), never to docs/}"
  mkdir -p "$OUT"
  JSON="$OUT/benchmarks.json" MD="$OUT/benchmarks.md" README=""
  RUNS=(
    "bench_train.py --size tiny --per-source-batch 1 --steps 2 --warmup 1 --repeats 2 --synthetic --vocab-size 500"
    "bench_scoring.py --size tiny --pairs 8 --round-pairs 4 --repeats 2 --synthetic --vocab-size 500"
    "bench_reward.py --size tiny --steps 2 --warmup 1 --repeats 2 --seq 32 --pairs 5"
    "bench_generate.py --hidden 64 --layers 2 --heads 2 --vocab 500 --prompts 4 --batch-size 2 --new-tokens 2 --min-prompt 4 --max-prompt 8 --repeats 2"
    "bench_minnorm.py --ks 8 16 --repeats 3"
  )
else
  JSON=docs/benchmarks.json MD=docs/benchmarks.md README=README.md
  RUNS=("bench_train.py" "bench_scoring.py" "bench_reward.py" "bench_generate.py" "bench_minnorm.py" "bench_demo.py")
fi
LOAD_BEFORE=$(python -c "import os; print(*(round(x, 2) for x in os.getloadavg()))")
LINES=$(mktemp)
ONE=$(mktemp)
trap 'rm -f "$LINES" "$ONE"' EXIT
for run in "${RUNS[@]}"; do
  args=($run)
  extra=()
  [[ "${args[0]}" == bench_minnorm.py || "${args[0]}" == bench_demo.py ]] || extra=("${PREC[@]}")
  echo "== python scripts/$run ${extra[*]}" >&2
  # (tee to a file and our stderr; `tee /dev/stderr` would reopen, and so truncate, a redirected log)
  python "scripts/${args[0]}" "${args[@]:1}" "${extra[@]}" 2>&1 | tee "$ONE" >&2
  last=$(tail -n 1 "$ONE")
  python -c "import json, sys; json.loads(sys.argv[1])" "$last" || { echo "bench_all.sh: $run printed no JSON line" >&2; exit 1; }
  printf 'python scripts/%s\t%s\n' "$run${extra[*]:+ ${extra[*]}}" "$last" >> "$LINES"
done
python scripts/bench_common.py "$LINES" --json "$JSON" --md "$MD" --readme "$README" \
  --command "bash scripts/bench_all.sh${1:+ $1}" --load-before $LOAD_BEFORE
echo "bench_all.sh: wrote $JSON, $MD${README:+ and $README}" >&2
