#!/usr/bin/env bash
# Set up .venv for diffusers_dist_attn on a fresh machine.
# - A torch already installed on this machine (e.g. a GPU image's CUDA build) is kept: the venv sees it.
# - Without one and without a GPU, the CPU wheel torch==2.13.0 is installed first, so pip never pulls a
#   multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the torch already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" torch==2.13.0
  fi
fi
"${PIP[@]}" -e ".[test]"
echo "setup: $(.venv/bin/python -c 'import torch, diffusers; print("torch", torch.__version__, "| diffusers", diffusers.__version__)')"
