#!/usr/bin/env bash
# Install the project and its dependencies. Without an NVIDIA GPU, the CPU build of torch is installed
# FIRST, so pip never pulls a multi-GB CUDA build; with a GPU, pip's default (CUDA) torch is used.
# GPU users who need a specific CUDA build: install torch from https://pytorch.org first; this script
# then keeps it.
set -euo pipefail
PY=${PYTHON:-python}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install "torch>=2.4"
else
  # A local/mirrored CPU wheel if the pip configuration offers one, else PyTorch's CPU index.
  "$PY" -m pip install "torch==2.13.0+cpu" 2>/dev/null \
    || "$PY" -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -e ".[dev,minilm]"
