"""SIGTERM and Ctrl-C end a command with one line (and, where the command keeps a record, an
"interrupted" one), never a traceback or a stack dump (``cli.main``); a Ray started by a command
keeps the command's own SIGTERM handler (``runtime.cluster.session``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


FACTORY = """
from pathlib import Path

import bilevel_ray as br


def factory(config):
    Path(__file__).with_name("built").touch()  # the work starts now
    return br.problems.build_spec("quadratic", {})
"""


@pytest.mark.parametrize(
    "signum, code, line",
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")],
    ids=["sigterm", "ctrl-c"],
)
def test_a_signal_ends_a_command_with_one_line(tmp_path, signum, code, line):
    (tmp_path / "problem.py").write_text(FACTORY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["solve", f"{tmp_path}/problem.py:factory", "--steps", "100000000", "--quiet"]
    child = subprocess.Popen(
        [sys.executable, "-m", "bilevel_ray", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "built").is_file():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        time.sleep(1.0)
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert "Traceback" not in err and "***" not in err
    assert err.strip().splitlines()[-1].startswith(line)


def test_ray_init_keeps_the_processs_own_sigterm_handler(monkeypatch):
    # ray.init replaces the handler (sys.exit, and its core worker's stack dump); connect puts
    # the command line's (or a script's) back.
    from bilevel_ray.runtime.cluster import session

    def mine(signum, frame):
        raise KeyboardInterrupt

    def rays(signum, frame):
        sys.exit(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with session._keep_sigterm_handler():
            signal.signal(signal.SIGTERM, rays)  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_where_it_is_not_as_a_finished_one(tmp_path):
    # Tune's own handler would stop every trial and report them as a finished sweep (exit 0,
    # a best config and best_schedule.json from stopped trials).
    argv = ["tune", "quadratic", "--samples", "2", "--max-steps", "10000000", "--report-every",
            "1000", "--scheduler", "fifo", "--out", str(tmp_path), "--name", "s"]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "bilevel_ray", *argv],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        for line in child.stderr:
            if " started: " in line:  # a trial runs
                break
            assert time.monotonic() < deadline, "no trial started"
        time.sleep(3)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["outcome"]["status"] == "interrupted"
    assert not (tmp_path / "s" / "best_schedule.json").exists()
