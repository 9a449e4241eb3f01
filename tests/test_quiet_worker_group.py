"""A two-worker ``br.train`` shows its own progress once per line and no Ray log line: Train's
per-report lines, the placement-group cleaner and the preemption watcher's error are off unless
BILEVEL_RAY_VERBOSE is set.

The run starts its own local Ray, in namespaces of its own (network: loopback only; process
ids: Ray's auto-detection sees no other Ray of the test session), beside a planted second
"raylet" of another Ray instance, as on a shared machine: Train's placement-group cleaner, which
finds "the" Ray instance as ``ray status`` does, printed a 43-line "Found multiple active Ray
instances" traceback there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

RUN = """
import bilevel_ray as br
br.train("representation", num_workers=2, steps=200, report_every=10, progress=True,
         in_process=False, resources_per_worker={"CPU": 1}, storage_path=%r, name="quiet")
"""
SLEEP = "import time; time.sleep(600)"


def _isolation_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.ray
@pytest.mark.skipif(not _isolation_available(), reason="needs unshare (root) and ip")
@pytest.mark.slow
def test_a_two_worker_train_prints_progress_once_and_no_ray_log_lines(tmp_path):
    (tmp_path / "run.py").write_text(RUN % str(tmp_path))
    # What Ray's auto-detection takes for another instance's raylet (its name and a GCS
    # address); it ends with the namespace.
    other = f"exec -a other-raylet {sys.executable} -c {SLEEP!r} --gcs-address=127.0.0.1:9"
    script = f"ip link set lo up && ({other} &) && exec {sys.executable} {tmp_path / 'run.py'}"
    done = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    progress = re.findall(r"\[pbgd_free\] step (\d+)/200 ", output)
    assert progress and progress[-1] == "200", output
    assert len(progress) == len(set(progress)), f"a progress line shown twice:\n{output}"
    noise = [
        line
        for line in output.splitlines()
        if not line.startswith("[pbgd_free] step ")
        and re.search(
            r"WARNING|ERROR|Error|Reporting training result| E \d|Failed to|Traceback|Ray's own",
            line,
        )
        # The isolation's own trace: a namespace without a route makes Ray's first probe for
        # the machine's address (a UDP connect, no packet) fail; a machine with a network
        # answers it silently.
        and "Failed to determine local IP via external connectivity" not in line
    ]
    assert not noise, "\n".join(noise)
