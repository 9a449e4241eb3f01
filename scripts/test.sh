#!/usr/bin/env bash
# Sets up .venv (see setup.sh), checks lint and format, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check bilevel_ray tests examples benchmarks
.venv/bin/ruff format --check bilevel_ray tests examples benchmarks
.venv/bin/python -m pytest -q --doctest-modules bilevel_ray tests "$@"
