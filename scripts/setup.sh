#!/usr/bin/env bash
# Creates .venv and installs bilevel_ray with its test extra. Safe to rerun.
# torch: the project asks for a range (torch>=2.4); on a machine without an NVIDIA GPU we install
# the CPU build first so that the range is satisfied without pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch>=2.4"
  else
    # 2.13.0 is the CPU build this project is tested with; TORCH_SPEC overrides it.
    "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
"${PIP[@]}" install -e ".[test]"
