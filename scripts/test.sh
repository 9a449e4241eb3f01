#!/usr/bin/env bash
# CI's test command (.ci/run calls it). Sets up .venv with the 'test' extra (scripts/setup.sh
# test: the demo's packages plus pytest, ruff, scikit-learn, transformers and peft, which the
# tests import), checks lint and format, and runs the whole test suite: the slow tier too
# (plain `pytest` runs only the fast one: addopts in pyproject.toml). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
echo "== lint and format (ruff)" >&2
.venv/bin/ruff check bilevel_ray tests examples benchmarks
.venv/bin/ruff format --check bilevel_ray tests examples benchmarks
echo "== the test suite (pytest)" >&2
.venv/bin/python -m pytest -q --doctest-modules -m "slow or not slow" bilevel_ray tests "$@"
