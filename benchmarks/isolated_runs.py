"""Benchmarks that run each measured case in a fresh child process (no state, allocator or
cache carried over from another case), and the peak memory of such a child.

``run_child`` starts ``script --worker JSON`` and reads the JSON line it prints last. The peak
is the kernel's high-water mark of the resident set (VmHWM in /proc/self/status), reset to the
current size through /proc/self/clear_refs once the case is built, so that it measures the
case's own loop. ``ru_maxrss`` is no substitute: a child started by exec keeps its parent's peak
there, and clear_refs does not reset it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

__all__ = ["reset_peak", "run_child", "status_mib"]


def run_child(script: str, job: dict[str, Any], timeout: float, label: str) -> Any:
    """``python script --worker json(job)``; its last stdout line, parsed as JSON."""
    done = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", ...) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024  # the file says kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False
