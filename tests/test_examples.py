"""The examples run and show what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pbgd_free  x = +0.0000   phi'(x) = +10.0000" in out
    assert "alt_pbgd   x = -5.0000" in out
    assert "[pbgd_free] step 600/600" in done.stderr
    errors = {  # the flat quadratic: both reach x*
        line.split()[0]: float(line.split("||x - x*|| = ")[1].split()[0])
        for line in out.splitlines()
        if "||x - x*|| = " in line
    }
    assert set(errors) == {"pbgd_free", "implicit_cg"} and max(errors.values()) < 1e-8
    assert out.strip().splitlines()[-1].startswith("quick start done in ")


def test_representation_example_with_tiny_settings():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "representation.py"),
            "--steps",
            "30",
            "--methods",
            "pbgd_free",
            "implicit_cg",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "test MSE" in line]
    assert [line.split()[0] for line in lines] == ["pbgd_free", "implicit_cg"]
    for line in lines:  # both lower the held-out MSE from the same start
        before, after = (float(v) for v in line.split("test MSE ")[1].split(",")[0].split(" -> "))
        assert after < before
