#!/usr/bin/env bash
# Creates .venv in the checkout and installs bilevel_ray into it, saying what it does, phase by
# phase. Safe to rerun (a phase that is already done is skipped or only checked).
#
#   bash scripts/setup.sh [demo|test|all] [--dry-run] [--quiet]
#
#   demo (default)  bilevel_ray (ray[tune,train], torch, pyarrow) + the 'demo' extra (matplotlib
#                   for report.png, optuna for the sweep's TPE searcher)
#   test            + the 'test' extra: pytest, ruff and every optional package the tests import
#                   (scikit-learn, transformers, peft, ...)
#   all             the test extra (it holds every other extra)
#   --dry-run       print the phases and the commands they would run; change nothing
#   --quiet         no "still installing" lines (phase lines and errors are still printed)
#
# torch: the project asks for a range (torch>=2.4); on a machine without an NVIDIA GPU the CPU
# build is installed first so that the range is satisfied without pulling a multi-GB CUDA build.
# TORCH_SPEC overrides what is installed; PYTHON picks the interpreter (default python3).
# pip's full output goes to .venv/setup-<phase>.log; its last line is shown every 10 s
# (SETUP_PROGRESS_EVERY) while it runs, when stderr is a terminal or with SETUP_PROGRESS=1. See
# README.md, "Set-up", for the measured time and size.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRA=demo
DRY=0
QUIET=0
for arg in "$@"; do
  case "$arg" in
    demo | test | all) EXTRA=$arg ;;
    --dry-run) DRY=1 ;;
    --quiet) QUIET=1 ;;
    -h | --help)
      sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup.sh: unknown argument '$arg': give demo, test or all, and optionally --dry-run or --quiet" >&2
      exit 2
      ;;
  esac
done
if [ "$EXTRA" = all ]; then EXTRA=test; fi

PYTHON=${PYTHON:-python3}
START=$SECONDS
STEP_START=$SECONDS

say() { echo "[setup] $*" >&2; }
elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# Runs "$@" (a pip command); its output goes to LOG; with progress on, the last line of LOG is
# shown every 10 s. On failure the end of LOG is printed and the script stops.
run_logged() {
  local log=$1
  shift
  if [ "$DRY" = 1 ]; then
    say "  would run: $*"
    return 0
  fi
  local progress=0
  if [ "$QUIET" = 0 ] && { [ -t 2 ] || [ "${SETUP_PROGRESS:-0}" = 1 ]; }; then
    progress=1
  fi
  : >"$log"
  "$@" >"$log" 2>&1 &
  local pid=$!
  if [ "$progress" = 1 ]; then
    while kill -0 "$pid" 2>/dev/null; do
      sleep "${SETUP_PROGRESS_EVERY:-10}"
      if kill -0 "$pid" 2>/dev/null; then
        local last
        last=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-100 || true)
        say "  ... $(elapsed $((SECONDS - STEP_START))): ${last:-working}"
      fi
    done
  fi
  local status=0
  wait "$pid" || status=$?
  if [ "$status" -ne 0 ]; then
    say "FAILED (exit code $status); the end of $log:"
    tail -n 25 "$log" >&2
    exit "$status"
  fi
}

phase_done() { say "  done in $(elapsed $((SECONDS - STEP_START)))"; }

# 1. the environment
STEP_START=$SECONDS
if [ -x .venv/bin/python ]; then
  say "1/3 creating .venv: already there ($(.venv/bin/python -c 'import sys; print(sys.version.split()[0])'))"
else
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    say "python '$PYTHON' not found: install Python >= 3.10, or set PYTHON=/path/to/python3"
    exit 2
  fi
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    say "$PYTHON is Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); bilevel_ray needs >= 3.10: set PYTHON=/path/to/python3.10 (or newer)"
    exit 2
  fi
  say "1/3 creating .venv with $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
  if [ "$DRY" = 1 ]; then
    say "  would run: $PYTHON -m venv .venv"
  else
    "$PYTHON" -m venv .venv
    phase_done
  fi
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check install --progress-bar off)

# 2. torch
STEP_START=$SECONDS
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  say "2/3 installing torch: already there ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "2/3 installing torch (an NVIDIA GPU is present: the CUDA build, several GB)"
  run_logged .venv/setup-torch.log "${PIP[@]}" "${TORCH_SPEC:-torch>=2.4}"
  [ "$DRY" = 1 ] || phase_done
else
  # 2.13.0 is the CPU build this project is tested with; TORCH_SPEC overrides it.
  say "2/3 installing torch, CPU build (${TORCH_SPEC:-torch==2.13.0}; about 180 MB to download, 750 MB installed)"
  run_logged .venv/setup-torch.log "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  [ "$DRY" = 1 ] || phase_done
fi

# 3. the rest
STEP_START=$SECONDS
if [ "$EXTRA" = test ]; then
  say "3/3 installing bilevel_ray with the 'test' extra: ray[tune,train], pyarrow, pytest, ruff, matplotlib, optuna, scikit-learn, transformers, peft, datasets, mlflow-skinny, tensorboard, ray[default] (the job server)"
else
  say "3/3 installing bilevel_ray with the 'demo' extra: ray[tune,train], pyarrow, matplotlib, optuna (the test extra adds scikit-learn, transformers, peft: bash scripts/setup.sh test)"
fi
run_logged .venv/setup-rest.log "${PIP[@]}" -e ".[$EXTRA]"
if [ "$DRY" = 1 ]; then
  say "dry run: nothing was changed"
else
  phase_done
  say "set-up done in $(elapsed $((SECONDS - START))); .venv holds $(du -sh .venv 2>/dev/null | cut -f1)"
fi
