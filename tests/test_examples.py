"""The examples run and show what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
