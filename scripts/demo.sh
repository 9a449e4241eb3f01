#!/usr/bin/env bash
# The demo: sets up .venv (see setup.sh), then on a local Ray
#   1. diagnoses two built-in problems (is PBGD-Free suitable? exit code 3 = unsuitable),
#   2. runs a small Ray Tune sweep of PBGD-Free on `representation` with the flatness watch,
#   3. prints the best configuration and writes the report (a table and report.png).
# About 2-3 minutes on 2 CPUs after set-up. Outputs go to runs/demo (or $DEMO_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${DEMO_OUT:-runs/demo}
BR=.venv/bin/bilevel-ray

echo "== 1. flatness diagnostic: the paper's two toys"
"$BR" diagnose toy-positive --gamma 16 --set lr_y=0.01 --set inner_steps=2
status=0
"$BR" diagnose toy-negative || status=$?
if [ "$status" -ne 3 ]; then
  echo "expected exit code 3 (unsuitable) from the negative toy, got $status" >&2
  exit 1
fi
echo "(exit code 3: unsuitable, as the paper shows; --on-unsuitable fallback would switch to alt_pbgd)"

echo "== 2. a Ray Tune sweep of PBGD-Free on representation (local Ray, 2 trials at a time)"
"$BR" tune representation --samples 8 --max-steps 300 --on-unsuitable warn \
  --diagnose-window 100 --out "$OUT" --name sweep --resume

echo "== 3. the report"
"$BR" report "$OUT/sweep"
