#!/usr/bin/env bash
# The demo. Sets up .venv with the 'demo' extra (scripts/setup.sh demo: bilevel_ray with Ray,
# torch's CPU build, pyarrow, matplotlib for report.png and optuna for the TPE searcher; not the
# test extra's scikit-learn, transformers or peft), then, on a local Ray:
#   1. diagnoses the paper's two toys (is PBGD-Free suitable? exit code 3 = unsuitable),
#   2. runs a small Ray Tune sweep of PBGD-Free on `representation` with the flatness watch; its
#      "flatness:" line says what the watch's verdicts mean for the best configuration it prints,
#   3. prints the report (a table) and writes report.png.
# Each phase says how long it took; README.md ("Set-up") has the measured times. Outputs go to
# runs/demo (or $DEMO_OUT). --quiet: no progress lines (they go to stderr only on a terminal).
set -euo pipefail
cd "$(dirname "$0")/.."
QUIET=()
for arg in "$@"; do
  case "$arg" in
    --quiet) QUIET=(--quiet) ;;
    *)
      echo "demo.sh: unknown argument '$arg' (the only option is --quiet)" >&2
      exit 2
      ;;
  esac
done
START=$SECONDS
PHASE=$SECONDS
took() { echo "   (took $((SECONDS - PHASE)) s)"; PHASE=$SECONDS; }

bash scripts/setup.sh demo ${QUIET[@]+"${QUIET[@]}"}
OUT=${DEMO_OUT:-runs/demo}
BR=.venv/bin/bilevel-ray
PHASE=$SECONDS

# The times in the phase lines were measured on a 2-CPU machine (README.md, "Set-up").
echo "== 1/3 flatness diagnostic on the paper's two toys (7-11 s measured on 2 CPUs)"
status=0
# A 4000-step horizon: PBGD-Free has reached its end point there (the problem's own 40,000
# steps certify the same verdict in about five times the time).
"$BR" diagnose toy-positive --gamma 16 --steps 4000 --set lr_y=0.01 --set inner_steps=2 \
  ${QUIET[@]+"${QUIET[@]}"} || status=$?
if [ "$status" -ne 0 ]; then
  echo "expected exit code 0 (suitable) from the positive toy, got $status" >&2
  exit 1
fi
status=0
"$BR" diagnose toy-negative ${QUIET[@]+"${QUIET[@]}"} || status=$?
if [ "$status" -ne 3 ]; then
  echo "expected exit code 3 (unsuitable) from the negative toy, got $status" >&2
  exit 1
fi
echo "(exit code 3: unsuitable, as the paper shows; --on-unsuitable fallback would switch to alt_pbgd)"
took

echo "== 2/3 a Ray Tune sweep of PBGD-Free on representation: 8 trials of 300 steps, 2 at a time"
echo "   on a local Ray (87-108 s measured on 2 CPUs; a line per trial event)"
"$BR" tune representation --samples 8 --max-steps 300 --on-unsuitable warn \
  --diagnose-window 100 --out "$OUT" --name sweep --resume
took

echo "== 3/3 the report"
"$BR" report "$OUT/sweep"
took
echo "demo done in $((SECONDS - START)) s (set-up included); outputs in $OUT/sweep"
