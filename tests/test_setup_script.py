"""scripts/setup.sh says what it does, phase by phase: checked in its dry mode, and with a stand-in
for python and pip so that nothing is installed (a real set-up is measured in README.md)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for python: the interpreter setup.sh creates .venv with, and .venv/bin/python. It
# answers the -c checks setup.sh makes, creates .venv for "-m venv", and for "-m pip" records its
# arguments in .venv/pip-calls, prints two lines around a pause (FAKE_PIP_SLEEP) and exits with
# FAKE_PIP_STATUS; installing torch leaves .venv/torch-installed behind.
FAKE_PYTHON = r"""#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
if [ "$1" = "-c" ]; then
  case "$2" in
    *"version_info < (3, 10)"*) [ "${FAKE_PY_OLD:-0}" = 1 ] && exit 1; exit 0 ;;
    *"sys.version"*) if [ "${FAKE_PY_OLD:-0}" = 1 ]; then echo 3.8.10; else echo 3.11.0; fi
      exit 0 ;;
    *"torch.__version__"*) echo 2.13.0+cpu; exit 0 ;;
    *"import torch"*) [ -e "$here/../torch-installed" ] && exit 0; exit 1 ;;
  esac
  exit 3
fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  shift 2
  echo "$*" >> "$here/../pip-calls"
  echo "Collecting ${*: -1}"
  sleep "${FAKE_PIP_SLEEP:-0}"
  echo "Installing collected packages: ${*: -1}"
  case "$*" in *torch*) touch "$here/../torch-installed" ;; esac
  exit "${FAKE_PIP_STATUS:-0}"
fi
exit 4
"""

PIP = ".venv/bin/python -m pip --disable-pip-version-check install --progress-bar off"


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def checkout(tmp_path):
    """A folder with scripts/setup.sh and the stand-in python (fake/python3); no .venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    _executable(tmp_path / "fake" / "python3", FAKE_PYTHON)
    return tmp_path


def _setup(checkout: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": f"{checkout / 'fake'}:/usr/bin:/bin",
        "HOME": str(checkout),
        "PYTHON": str(checkout / "fake" / "python3"),
    }
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh"), *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        cwd=checkout,
        timeout=120,
    )


def test_dry_run_prints_the_three_phases_and_their_commands_and_changes_nothing(checkout):
    done = _setup(checkout, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # everything the set-up says goes to stderr
    python = checkout / "fake" / "python3"
    assert done.stderr.splitlines() == [
        f"[setup] 1/3 creating .venv with {python} (3.11.0)",
        f"[setup]   would run: {python} -m venv .venv",
        "[setup] 2/3 installing torch, CPU build (torch==2.13.0; about 180 MB to download, "
        "750 MB installed)",
        f"[setup]   would run: {PIP} torch==2.13.0",
        "[setup] 3/3 installing bilevel_ray with the 'demo' extra: ray[tune,train], pyarrow, "
        "matplotlib, optuna (the test extra adds scikit-learn, transformers, peft: bash "
        "scripts/setup.sh test)",
        f"[setup]   would run: {PIP} -e .[demo]",
        "[setup] dry run: nothing was changed",
    ]
    assert not (checkout / ".venv").exists()


@pytest.mark.parametrize("extra", ["test", "all"])
def test_dry_run_of_the_test_extra(checkout, extra):
    done = _setup(checkout, extra, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert (
        "[setup] 3/3 installing bilevel_ray with the 'test' extra: ray[tune,train], pyarrow, "
        "pytest, ruff, matplotlib, optuna, scikit-learn, transformers, peft, datasets, "
        "mlflow-skinny, tensorboard, ray[default] (the job server)\n" in done.stderr
    )
    assert f"would run: {PIP} -e .[test]" in done.stderr
    assert ".[demo]" not in done.stderr


def test_dry_run_on_a_machine_with_an_nvidia_gpu_asks_for_the_cuda_build(checkout):
    _executable(checkout / "fake" / "nvidia-smi", "#!/usr/bin/env bash\necho 'GPU 0: H100'\n")
    done = _setup(checkout, "--dry-run")
    assert "2/3 installing torch (an NVIDIA GPU is present: the CUDA build, several GB)" in (
        done.stderr
    )
    assert f"would run: {PIP} torch>=2.4\n" in done.stderr
    done = _setup(checkout, "--dry-run", TORCH_SPEC="torch==2.5.1")
    assert f"would run: {PIP} torch==2.5.1\n" in done.stderr


def test_phases_already_done_say_so(checkout):
    _executable(checkout / ".venv" / "bin" / "python", FAKE_PYTHON)
    (checkout / ".venv" / "torch-installed").touch()
    done = _setup(checkout, "--dry-run")
    lines = done.stderr.splitlines()
    assert lines[:2] == [
        "[setup] 1/3 creating .venv: already there (3.11.0)",
        "[setup] 2/3 installing torch: already there (2.13.0+cpu)",
    ]
    assert lines[3] == f"[setup]   would run: {PIP} -e .[demo]"  # pip checks the rest each time


def test_a_real_run_shows_progress_while_pip_works_and_the_total_at_the_end(checkout):
    done = _setup(checkout, SETUP_PROGRESS="1", SETUP_PROGRESS_EVERY="1", FAKE_PIP_SLEEP="2.5")
    assert done.returncode == 0, done.stderr
    calls = (checkout / ".venv" / "pip-calls").read_text().splitlines()
    assert calls == [
        "--disable-pip-version-check install --progress-bar off torch==2.13.0",
        "--disable-pip-version-check install --progress-bar off -e .[demo]",
    ]
    lines = done.stderr.splitlines()
    phases = [
        line for line in lines if line.startswith(("[setup] 1/3", "[setup] 2/3", "[setup] 3"))
    ]
    assert [p[:13] for p in phases] == ["[setup] 1/3 c", "[setup] 2/3 i", "[setup] 3/3 i"]
    # while pip runs: the time so far and pip's last line, every SETUP_PROGRESS_EVERY seconds
    waiting = [line for line in lines if line.startswith("[setup]   ... ")]
    assert any(line.endswith(": Collecting torch==2.13.0") for line in waiting), lines
    assert any(line.endswith(": Collecting .[demo]") for line in waiting), lines
    assert sum(line.startswith("[setup]   done in ") for line in lines) == 3  # three phases
    assert lines[-1].startswith("[setup] set-up done in 0m") and "; .venv holds " in lines[-1]
    log = (checkout / ".venv" / "setup-rest.log").read_text()
    assert log == "Collecting .[demo]\nInstalling collected packages: .[demo]\n"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--quiet",), {"SETUP_PROGRESS": "1"}),
        ((), {}),  # stderr is a pipe here, not a terminal: no progress lines by default
    ],
)
def test_no_progress_lines_when_quiet_or_not_on_a_terminal(checkout, args, env):
    done = _setup(checkout, *args, SETUP_PROGRESS_EVERY="1", FAKE_PIP_SLEEP="1.5", **env)
    assert done.returncode == 0, done.stderr
    assert "[setup]   ... " not in done.stderr
    assert "[setup] 3/3 installing" in done.stderr  # the phases are always named


def test_a_failing_pip_stops_the_set_up_and_shows_the_end_of_its_log(checkout):
    done = _setup(checkout, FAKE_PIP_STATUS="1")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[-3:] == [
        "[setup] FAILED (exit code 1); the end of .venv/setup-torch.log:",
        "Collecting torch==2.13.0",
        "Installing collected packages: torch==2.13.0",
    ]
    assert "3/3" not in done.stderr


def test_an_unknown_argument_exits_2(checkout):
    done = _setup(checkout, "tests")
    assert done.returncode == 2
    assert done.stderr == (
        "setup.sh: unknown argument 'tests': give demo, test or all, and optionally --dry-run "
        "or --quiet\n"
    )


def test_a_missing_python_exits_2(checkout):
    done = _setup(checkout, "--dry-run", PYTHON=str(checkout / "nowhere" / "python3"))
    assert done.returncode == 2
    assert done.stderr == (
        f"[setup] python '{checkout / 'nowhere' / 'python3'}' not found: install Python >= 3.10, "
        "or set PYTHON=/path/to/python3\n"
    )


def test_an_old_python_exits_2(checkout):
    done = _setup(checkout, "--dry-run", FAKE_PY_OLD="1")
    assert done.returncode == 2
    assert done.stderr == (
        f"[setup] {checkout / 'fake' / 'python3'} is Python 3.8.10; bilevel_ray needs >= 3.10: "
        "set PYTHON=/path/to/python3.10 (or newer)\n"
    )


def test_help_lists_the_extras_and_the_dry_mode(checkout):
    done = _setup(checkout, "--help")
    assert done.returncode == 0
    for word in ("demo (default)", "test ", "--dry-run", "--quiet", "TORCH_SPEC"):
        assert word in done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_the_real_script_dry_runs_in_this_checkout():
    """In this checkout .venv exists: the dry run names what is there and changes nothing."""
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout")
    before = sorted(os.listdir(ROOT / ".venv"))
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh"), "test", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "[setup] 1/3 creating .venv: already there" in done.stderr
    assert done.stderr.splitlines()[-1] == "[setup] dry run: nothing was changed"
    assert sorted(os.listdir(ROOT / ".venv")) == before
