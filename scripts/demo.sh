#!/usr/bin/env bash
# Sets up .venv (see setup.sh) and runs the quick-start demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py "$@"
