"""Torch's thread count: the CPUs a process was given, not the machine's.

Torch sizes its intra-op pool from the machine's cores. Two Ray workers (or trials) on a 2-CPU
machine then run four threads on two cores, and a 3 ms step takes tens of ms: measured, a
500-step run took 15-24 s with the default and 0.8 s with one thread per worker.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from bilevel_ray.errors import ConfigError

__all__ = [
    "process_cpus",
    "threads_for_cpus",
    "threads_for_work",
    "use_cpus",
    "use_process_cpus",
    "use_work_threads",
]


MAX_THREADS = 1024  # torch threads per process: more is a mistake (OMP_NUM_THREADS, --threads)


def threads_for_cpus(cpus: float) -> int:
    """Threads for a share of ``cpus`` CPUs: its whole CPUs, at least one."""
    return max(1, math.floor(cpus))


def use_cpus(cpus: float) -> int:
    """Set torch's intra-op threads for a process given ``cpus`` CPUs (a Ray worker or trial);
    returns the count."""
    threads = threads_for_cpus(cpus)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def process_cpus() -> int:
    """The CPUs an in-process run may use: ``OMP_NUM_THREADS`` when set (the first number of an
    OpenMP list such as "4,2"), else the CPUs this process may run on (its affinity, which a
    container or ``taskset`` narrows)."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if raw:
        first = raw.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(
                f"OMP_NUM_THREADS={raw!r}: must be a whole number >= 1 (e.g. OMP_NUM_THREADS=1), "
                "or unset to use every CPU this process may run on"
            )
        if int(first) > MAX_THREADS:
            raise ConfigError(
                f"OMP_NUM_THREADS={raw!r}: at most {MAX_THREADS} (torch would try to start that "
                "many threads; a machine's process limit is often 32,768); use the CPUs you "
                "have, e.g. OMP_NUM_THREADS=2, or unset it"
            )
        return int(first)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # no affinity on this platform (macOS)


def use_process_cpus() -> int:
    """Set torch's threads for work in this process to :func:`process_cpus`."""
    return use_cpus(process_cpus())


# Below this many parameters (x and y together) a step is a few small kernels, and a second
# thread costs more in hand-offs than it saves: measured by benchmarks/threads.py (see there).
SMALL_PROBLEM_PARAMETERS = 100_000


def threads_for_work(parameters: int, cpus: int) -> int:
    """Torch threads for an in-process run of a problem with ``parameters`` parameters on
    ``cpus`` CPUs: one for a small problem, all of them otherwise."""
    return 1 if parameters < SMALL_PROBLEM_PARAMETERS else max(1, cpus)


def use_work_threads(x0: Any, y0: Any, threads: int | None = None) -> int:
    """Set torch's threads for in-process work on the problem starting at (x0, y0):
    ``threads`` when given (``--threads N``), else ``OMP_NUM_THREADS`` when set (the user's
    own count), else :func:`threads_for_work` of its size and :func:`process_cpus`. Returns the
    count."""
    if threads is not None:
        whole = not isinstance(threads, bool) and isinstance(threads, int)
        if not whole or not 1 <= threads <= MAX_THREADS:
            raise ConfigError(
                f"threads={threads!r}: must be a whole number in [1, {MAX_THREADS}] (torch's CPU "
                "threads for this process), e.g. --threads 1"
            )
        return use_cpus(threads)
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return use_process_cpus()
    size = sum(v.numel() for part in (x0, y0) for v in part.values())
    return use_cpus(threads_for_work(size, process_cpus()))
