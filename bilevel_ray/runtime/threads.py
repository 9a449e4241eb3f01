"""Torch's thread count: the CPUs a process was given, not the machine's.

Torch sizes its intra-op pool from the machine's cores. Two Ray workers (or trials) on a 2-CPU
machine then run four threads on two cores, and a 3 ms step takes tens of ms: measured, a
500-step run took 15-24 s with the default and 0.8 s with one thread per worker.
"""

from __future__ import annotations

import math
import os

import torch

from bilevel_ray.errors import ConfigError

__all__ = ["process_cpus", "threads_for_cpus", "use_cpus", "use_process_cpus"]


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
        return int(first)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # no affinity on this platform (macOS)


def use_process_cpus() -> int:
    """Set torch's threads for work in this process to :func:`process_cpus`."""
    return use_cpus(process_cpus())
