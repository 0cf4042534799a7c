#!/usr/bin/env bash
# Install the project and its dependencies. Without an NVIDIA GPU, the CPU build of torch is installed
# FIRST, so pip never pulls a multi-GB CUDA build; with a GPU, pip's default (CUDA) torch is used.
# GPU users who need a specific CUDA build: install torch from https://pytorch.org first; this script
# then keeps it.
# Every other package is installed at the exact version CI tested (constraints.txt, written by
# scripts/make_constraints.py). INSTALL_LATEST=1 installs the latest versions pyproject.toml's ranges allow
# instead (to refresh the pins; see scripts/make_constraints.py).
set -euo pipefail
cd "$(dirname "$0")/.."
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
if [ "${INSTALL_LATEST:-0}" = "1" ]; then
  echo "install.sh: INSTALL_LATEST=1: the latest versions pyproject.toml allows (not the tested pins)"
  "$PY" -m pip install -e ".[dev,minilm]"
else
  "$PY" -m pip install -c constraints.txt -e ".[dev,minilm]"
fi
