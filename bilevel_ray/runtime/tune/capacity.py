"""How large a population fits: one trial's memory, what the sweep has, and the largest
population that holds.

A PBT / PB2 population runs all at once, each trial in a process of its own, so a population
larger than its machine is not queued: its trials are killed (by Ray's memory monitor or the
kernel's OOM killer) or crawl. The pre-flight sizes it first (:func:`population_size`): one
trial's memory is a worker process's own (:data:`WORKER_MEMORY`) plus what the problem took when
the driver built it and ran its first step, plus extra copies of the solver state; the sweep's
memory is the smallest of the cgroup's headroom, the kernel's ``MemAvailable`` and Ray's
``memory`` resource (a remote cluster: Ray's alone), and its CPUs bound the population too
(:data:`TRIALS_PER_CPU`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = [
    "DEFAULT_POPULATION",
    "RAY_PROCESSES",
    "STATE_COPIES",
    "TRIALS_PER_CPU",
    "WORKER_MEMORY",
    "Capacity",
    "PeakMemory",
    "cluster_capacity",
    "largest_population",
    "machine_capacity",
    "population_size",
    "state_bytes",
    "trial_memory",
]

MiB, GiB = 2**20, 2**30
DEFAULT_POPULATION = 36  # num_samples when the user leaves it out (br.tune's default)
# A running trial's process before its problem's own data: Python, torch, a Ray worker and
# Tune's function trainable. Measured on a 4-trial PBT of ``regression`` (2,000 rows) on a
# 2-CPU Linux machine (Ray 2.60, torch 2.13): RSS 402-423 MiB, of which about 160 MiB are library
# pages every trial maps once (shared); its own pages (USS) 245-259 MiB, its share of all
# (PSS) 262-323 MiB. 320 MiB is that share, rounded up.
WORKER_MEMORY = 320 * MiB
# A trial holds its solver state (x, y, optimizer moments) more than once: the payload held for
# a report with a checkpoint, its serialised copy, and a donor's checkpoint loaded by an exploit.
STATE_COPIES = 3
# Ray's own processes on a node it starts here (GCS, raylet, dashboard and runtime-env agents,
# log monitor, client server): 361 MiB of their own pages, measured as above.
RAY_PROCESSES = 400 * MiB
# Trials per CPU: each is a process of its own (its threads, its start importing torch, about
# 2 s of CPU, again at every exploit). Measured with PBT on ``regression`` (3,000-step trials,
# a process start per trial and exploit) on 2 CPUs, trial-steps per second: 954 with 2 trials
# per CPU, 725 with 4, 563 with 8, 584 with 16 and 625 with 24 (48 trials, every one
# completed). Past 8 per CPU more trials cost wall time only, and none failed up to 24, the
# most measured; so 24 (36 trials, br.tune's default and docs/measured.md's PBT runs, on 2).
TRIALS_PER_CPU = 24


@dataclass(frozen=True)
class Capacity:
    """What a sweep's trials have: bytes of memory (None: not known) and what said so, CPUs,
    and where that is (for a message)."""

    memory: float | None
    memory_source: str
    cpus: float
    where: str


def trial_memory(problem_bytes: int, state: int) -> int:
    """One population member's memory: a worker process, the problem (its data and a step, as
    measured on the driver) and :data:`STATE_COPIES` more copies of its ``state`` bytes."""
    return WORKER_MEMORY + max(problem_bytes, state) + STATE_COPIES * state


def largest_population(per_trial: int, capacity: Capacity) -> int:
    """The most trials of ``per_trial`` bytes that ``capacity`` runs at once."""
    by_cpus = math.floor(capacity.cpus * TRIALS_PER_CPU + 1e-9)
    if capacity.memory is None:
        return max(0, by_cpus)
    return max(0, min(by_cpus, math.floor(capacity.memory / per_trial)))


def population_size(
    kind: str, num_samples: int | None, per_trial: int, capacity: Capacity
) -> tuple[int, str | None]:
    """The population to run and a line saying how it was sized (None when as asked):
    ``num_samples`` when it fits, refused when it does not; left out (None), the default or
    as many as fit."""
    fits = largest_population(per_trial, capacity)
    if num_samples is None and fits >= 1:
        if fits >= DEFAULT_POPULATION:
            return DEFAULT_POPULATION, None
        return fits, (
            f"scheduler={kind!r}: a population of {fits} trials, as many as {capacity.where} "
            f"holds ({_room(capacity)}); the default is {DEFAULT_POPULATION}"
        )
    asked = DEFAULT_POPULATION if num_samples is None else num_samples
    if asked <= fits:
        return asked, None
    need = asked * per_trial
    fix = f"use num_samples={fits}, or" if fits >= 1 else "use"
    raise ConfigError(
        f"scheduler={kind!r} runs its whole population at once, and num_samples={asked} does "
        f"not fit: {asked} trials x {_size(per_trial)} each is {_size(need)}, and "
        f"{capacity.where} has {_room(capacity)}; the largest population that fits "
        f"is {fits}: {fix} more memory or CPUs (a Ray cluster: address=...)"
    )


def _room(capacity: Capacity) -> str:
    memory = (
        "memory not known"
        if capacity.memory is None
        else f"{_size(max(capacity.memory, 0))} of memory for the trials ({capacity.memory_source})"
    )
    return f"{memory} and {capacity.cpus:g} CPUs (at most {TRIALS_PER_CPU} trials per CPU)"


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# --- what a sweep has ---------------------------------------------------------------------------


def machine_capacity(
    ray_started: bool, ray_resources: dict[str, float] | None = None, root: str = "/"
) -> Capacity:
    """This machine's room for a local Ray's trials: the smallest of the cgroup's headroom,
    ``MemAvailable`` and (``ray_resources``, a Ray running here) Ray's ``memory`` resource,
    less Ray's own processes when Ray has yet to start (``ray_started`` False) and less the
    margin at which Ray's memory monitor kills a worker; CPUs: Ray's, or this process's (its
    affinity and the cgroup's quota)."""
    base = Path(root)
    meminfo = _meminfo(base / "proc/meminfo")
    total = meminfo.get("MemTotal")
    sources: list[tuple[float, str]] = []
    if "MemAvailable" in meminfo:
        sources.append((meminfo["MemAvailable"], "MemAvailable"))
    cgroup = _cgroup_headroom(base)
    if cgroup is not None:
        headroom, limit = cgroup
        sources.append((headroom, f"the cgroup's memory limit, {_size(limit)}"))
        total = min(total or limit, limit)
    if ray_resources and ray_resources.get("memory"):
        sources.append((ray_resources["memory"], "Ray's memory resource"))
    cpus = ray_resources.get("CPU", 0.0) if ray_resources else _cpus(base)
    if not sources:
        return Capacity(None, "", cpus, "this machine")
    memory, source = min(sources)
    # Ray's memory monitor kills a worker once the node uses this fraction of its memory.
    threshold = float(os.environ.get("RAY_memory_usage_threshold", "0.95"))  # noqa: SIM112
    memory -= (1 - min(max(threshold, 0.0), 1.0)) * (total or 0)
    if not ray_started:
        memory -= RAY_PROCESSES
    return Capacity(max(memory, 0.0), source, cpus, "this machine")


def cluster_capacity(resources: dict[str, float]) -> Capacity:
    """A Ray cluster's room, as Ray reports it (its nodes' ``memory`` resource and CPUs)."""
    memory = resources.get("memory")
    cpus = resources.get("CPU", 0.0)
    return Capacity(memory or None, "Ray's memory resource", cpus, "the Ray cluster")


def _meminfo(path: Path) -> dict[str, int]:
    """/proc/meminfo in bytes, by field; empty where there is none (not Linux)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields = value.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _cgroup_headroom(root: Path) -> tuple[int, int] | None:
    """(limit less working set, limit) of the tightest memory limit over this process's cgroup
    and its parents (v2, or v1's memory controller); None when there is none. The working set
    leaves out inactive file cache, which the kernel reclaims before it kills."""
    best = None
    for folder, (limit_file, usage_file, inactive) in _cgroup_folders(root):
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= 2**60:  # "max", or v1's "no limit" (a huge number)
            continue
        usage = _read_int(folder / usage_file) or 0
        stat = _meminfo_like(folder / "memory.stat")
        headroom = limit - max(usage - stat.get(inactive, 0), 0)
        if best is None or headroom < best[0]:
            best = (headroom, limit)
    return best


_V2 = ("memory.max", "memory.current", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_folders(root: Path) -> Iterator[tuple[Path, tuple[str, str, str]]]:
    """This process's cgroup folders with a memory limit (its own and its parents') and the
    names of their limit, usage and inactive-cache files."""
    mount = root / "sys/fs/cgroup"
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        number, controllers, path = [*line.split(":", 2), "", ""][:3]
        if number == "0" and controllers == "":  # v2's one hierarchy
            folder = mount / path.strip("/")
            while True:
                yield folder, _V2
                if folder == mount:
                    break
                folder = folder.parent
        elif "memory" in controllers.split(","):
            yield mount / "memory" / path.strip("/"), _V1
    # A container's own cgroup is the root of its (namespaced) mount.
    yield mount, _V2
    yield mount / "memory", _V1


def _meminfo_like(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, _, v in (line.partition(" ") for line in lines) if v.isdigit()}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cpus(root: Path) -> float:
    """This process's CPUs: its affinity, bounded by the cgroup's quota (as Ray counts them)."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    mount = root / "sys/fs/cgroup"
    quota = _read_words(mount / "cpu.max")  # v2: "max 100000" or "200000 100000"
    if len(quota) < 2:  # v1: the quota (-1: none) and the period, in two files
        quota = _read_words(mount / "cpu/cpu.cfs_quota_us") + _read_words(
            mount / "cpu/cpu.cfs_period_us"
        )
    if len(quota) >= 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]):
        cpus = min(cpus, int(quota[0]) / int(quota[1]))
    return cpus


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


# --- what the problem takes -----------------------------------------------------------------------


class PeakMemory:
    """The peak growth of this process's resident memory over ``with`` blocks (Linux: the
    kernel's high-water mark, reset at each block's start), summed over blocks; 0 where the
    system does not say."""

    def __init__(self) -> None:
        self.bytes = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        start = _status("VmRSS")
        reset = _reset_peak()
        yield
        peak = _status("VmHWM") if reset else _status("VmRSS")
        if start is not None and peak is not None:
            self.bytes += max(peak - start, 0)


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak resident size of this process to its current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def state_bytes(value: Any) -> int:
    """The bytes of every tensor in ``value`` (a solver state: nested tuples, lists, dicts)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0
