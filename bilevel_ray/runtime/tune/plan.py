"""A sweep's plan: everything ``br.tune`` will run, validated on the driver before Ray starts.

:func:`plan_sweep` builds the factory's problem once, checks the settings, the search space
(analytically) and one step of one trial (:mod:`~bilevel_ray.runtime.tune.preflight`), picks the
search strategy (a searcher and a scheduler, or a population, sized to the memory and CPUs it
will have: :mod:`~bilevel_ray.runtime.tune.capacity`) and names the sweep's folder and the record
kept there. The driver (:mod:`~bilevel_ray.runtime.tune.driver`) then places, runs
and writes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bilevel_ray.config import SolverConfig
from bilevel_ray.counts import check_count
from bilevel_ray.errors import ConfigError
from bilevel_ray.records.fingerprint import fingerprinted_spec
from bilevel_ray.runtime.cluster.shipping import portable_factory
from bilevel_ray.runtime.local.output_files import check_writable
from bilevel_ray.runtime.local.run_spec import Placement, RunSpec, build_run, check_run_name
from bilevel_ray.runtime.local.spec_check import check_spec
from bilevel_ray.runtime.tune.capacity import (
    DEFAULT_POPULATION,
    Capacity,
    PeakMemory,
    cluster_capacity,
    machine_capacity,
    population_size,
    trial_memory,
)
from bilevel_ray.runtime.tune.population import POPULATION_SCHEDULERS, population_scheduler
from bilevel_ray.runtime.tune.preflight import check_space_values, describe_space, first_step
from bilevel_ray.runtime.tune.space import check_search_space, default_search_space
from bilevel_ray.runtime.tune.strategy import scheduler_for, search_alg_for

__all__ = ["SweepPlan", "check_population_fits", "plan_sweep", "sweep_capacity"]

# A sweep of more trials than this is a typo: each is a whole run, and Tune holds every
# trial's state in the driver (a billion would exhaust memory before the first finished).
MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: the problem (the factory as the trials receive it), the method, the
    searched space and the fixed settings, each trial's run and placement, the strategy, the
    ranking's gap tolerance, and the sweep's folder with the record it keeps there."""

    factory: Any
    problem_config: dict[str, Any]
    method: str
    space: dict[str, Any]
    base: dict[str, Any]
    run: RunSpec
    placement: Placement
    num_samples: int
    max_concurrent_trials: int | None
    searcher: Any
    tune_scheduler: Any
    milestones: frozenset[int]
    population: bool
    gap_tol: float
    gap_steps: int
    path: Path
    record: dict[str, Any]
    # The fingerprint of the data the driver built (the manifest's) and the trials' run
    # settings as keywords (what a replay of the best trial passes to br.solve).
    fingerprint: dict[str, Any] = field(default_factory=dict)
    run_options: dict[str, Any] = field(default_factory=dict)
    # One trial's estimated memory (bytes), and whether a population was sized before Ray
    # started (False: a cluster not connected to yet, checked once connected).
    trial_memory: int = 0
    population_checked: bool = True


def plan_sweep(
    factory: Any,
    *,
    problem_config: dict[str, Any] | None,
    method: str,
    search_space: dict[str, Any] | None,
    num_samples: int | None,
    steps: int | None,
    run_options: dict[str, Any],
    scheduler: Any,
    search_alg: Any,
    max_concurrent_trials: int | None,
    placement: tuple[int, Any, dict[str, float] | None, int],
    gap: tuple[float, int],
    storage_path: str | os.PathLike[str] | None,
    name: str,
    search_seed: int | None,
    pbt_interval: int | None,
    base_options: dict[str, Any],
    address: str | None = None,
) -> SweepPlan:
    """The plan of ``br.tune``'s arguments (``run_sweep``'s): ``run_options`` are every trial's
    run settings (``take_run_options``), ``placement`` is (num_workers, use_gpu,
    resources_per_worker, max_failures) and ``gap`` (gap_tol, gap_steps). ``num_samples=None``:
    the default (36; a population: as many as fit, at most 36)."""
    problem_config = dict(problem_config or {})
    measured = PeakMemory()  # what the problem takes: its data, then a step of it
    with measured.measure():
        spec, fingerprint = fingerprinted_spec(factory, {**problem_config, "device": "cpu"})
    check_spec(spec, needs_eval=True)
    defaults = SolverConfig.applicable(method, spec.defaults)
    default_steps = defaults.pop("steps", 1000)
    steps = default_steps if steps is None else steps
    gap_tol, gap_steps = gap
    seed = run_options["seed"]
    search_seed = seed if search_seed is None else search_seed
    problems: list[str] = []
    asked = num_samples
    num_samples = DEFAULT_POPULATION if num_samples is None else num_samples
    check_count(
        problems, "num_samples", num_samples, 1, MAX_SAMPLES,
        "each sample is a whole run, and Tune keeps every trial in memory; e.g. num_samples=36",
    )  # fmt: skip
    check_count(problems, "gap_steps", gap_steps, 1)
    check_count(problems, "steps", steps, 1)
    if problems:
        raise ConfigError(problems)
    report_every = run_options["report_every"] or max(steps // 10, 1)
    run = build_run(method, steps, {**run_options, "report_every": report_every})
    check_count(problems, "search_seed", search_seed, 0)
    if problems:
        raise ConfigError(problems)
    where = Placement(*placement)
    name = check_run_name(name)
    if not isinstance(gap_tol, (int, float)) or not gap_tol >= 0:
        raise ConfigError(f"gap_tol={gap_tol!r}: must be a number >= 0")
    space, base = _space_and_base(method, search_space, defaults, base_options)
    if search_alg == "auto" and any(
        isinstance(v, Mapping) and "grid_search" in v for v in space.values()
    ):
        search_alg = None  # a grid is Tune's own variant generator's job; TPE cannot take one
    population = isinstance(scheduler, str) and scheduler in POPULATION_SCHEDULERS
    searcher, tune_scheduler, milestones, run = _strategy(
        scheduler, search_alg, run, space, pbt_interval, where.num_workers,
        (max_concurrent_trials, num_samples, search_seed),
    )  # fmt: skip
    with measured.measure():
        state = first_step(spec, method, base, space, seed)
    per_trial = trial_memory(measured.bytes, state)
    checked = True
    if population:
        num_samples, checked = _size_population(str(scheduler), asked, per_trial, address)
    storage = check_writable(storage_path or Path.home() / "ray_results", "storage_path")
    record = {
        "problem": factory_name(factory),
        "problem_config": problem_config,
        "method": method,
        "search_space": describe_space(space),
        "fixed": base,
        "num_samples": num_samples,
        **_run_record(run, seed, search_seed, where.num_workers),
        "scheduler": str(scheduler),
        "search_alg": str(search_alg),
        "on_unsuitable": run_options["on_unsuitable"],
    }
    return SweepPlan(
        # Resolved here, relative to this process's folder, before Ray can move it (a job's
        # driver connecting with address="auto"): the trials receive the callable itself.
        portable_factory(factory),
        problem_config,
        method,
        space,
        base,
        run,
        where,
        num_samples,
        max_concurrent_trials,
        searcher,
        tune_scheduler,
        milestones,
        population,
        gap_tol,
        gap_steps,
        storage / name,
        record,
        fingerprint,
        {**run_options, "report_every": run.report_every},
        per_trial,
        checked,
    )


def _size_population(
    kind: str, asked: int | None, per_trial: int, address: str | None
) -> tuple[int, bool]:
    """The population's size, checked against where it will run (before Ray starts), and
    whether it was; a cluster not connected to yet is checked once connected."""
    capacity = sweep_capacity(address)
    if capacity is None:
        return (DEFAULT_POPULATION if asked is None else asked), False
    size, note = population_size(kind, asked, per_trial, capacity)
    if note is not None:
        print(f"[tune] {note}", file=sys.stderr, flush=True)
    return size, True


def sweep_capacity(address: str | None) -> Capacity | None:
    """What the sweep's trials will have: this machine (a local Ray, started or not), the Ray
    cluster this process is connected to, or None for a cluster not connected to yet."""
    import ray

    if ray.is_initialized():
        resources = ray.cluster_resources()
        if _local_cluster():
            return machine_capacity(ray_started=True, ray_resources=resources)
        return cluster_capacity(resources)
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return None
    return machine_capacity(ray_started=False)


def _local_cluster() -> bool:
    """Whether the Ray this process is connected to is one node: this machine."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # a client connection (ray://) says less: a cluster, as Ray reports it
        return False
    return len(nodes) == 1 and nodes[0].get("NodeID") == here


def check_population_fits(plan: SweepPlan) -> None:
    """Once connected to a cluster the plan could not see before Ray started: refuse a
    population larger than it holds, before any trial starts."""
    import ray

    if plan.population and not plan.population_checked:
        capacity = cluster_capacity(ray.cluster_resources())
        population_size(plan.record["scheduler"], plan.num_samples, plan.trial_memory, capacity)


def _run_record(run: RunSpec, seed: int, search_seed: int, num_workers: int) -> dict[str, Any]:
    """What the sweep's record keeps of each trial's run."""
    return {
        "steps": run.steps,
        "report_every": run.report_every,
        "seed": seed,
        "search_seed": search_seed,
        "pbt_interval": run.checkpoint_every or None,
        "num_workers": num_workers,
    }


def _space_and_base(
    method: str,
    search_space: dict[str, Any] | None,
    defaults: dict[str, Any],
    base_options: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The searched space and the fixed settings, both checked: the problem's suggested
    settings fill in what the space does not determine (lr_ratio determines lr_x, a ramp
    determines gamma); the user's fixed settings are checked as given."""
    space = (
        default_search_space(method, base_options) if search_space is None else dict(search_space)
    )
    determined = set(space) | ({"lr_x"} if "lr_ratio" in space else set())
    determined |= {"gamma"} if "gamma_init" in space else set()
    base = {**{k: v for k, v in defaults.items() if k not in determined}, **base_options}
    check_search_space(space, method, base)
    check_space_values(space, method, base)
    return space, base


def _strategy(
    scheduler: Any,
    search_alg: Any,
    run: RunSpec,
    space: dict[str, Any],
    pbt_interval: int | None,
    num_workers: int,
    counts: tuple[int | None, int, int],
) -> tuple[Any, Any, frozenset[int], RunSpec]:
    """The searcher, the scheduler, its milestones and the trials' run (a population checkpoints
    every ``pbt_interval`` steps); ``counts`` is (max_concurrent_trials, num_samples,
    search_seed)."""
    max_concurrent_trials, num_samples, search_seed = counts
    if isinstance(scheduler, str) and scheduler in POPULATION_SCHEDULERS:
        _check_population(scheduler, search_alg, max_concurrent_trials, num_samples)
        tune_scheduler, run = population_scheduler(scheduler, run, space, pbt_interval, num_workers)
        return None, tune_scheduler, frozenset(), run
    if pbt_interval is not None:
        raise ConfigError(f"pbt_interval={pbt_interval!r} applies to scheduler='pbt' or 'pb2' only")
    searcher = search_alg_for(search_alg, num_samples, search_seed)
    tune_scheduler, milestones = scheduler_for(scheduler, run, searcher)
    return searcher, tune_scheduler, milestones, run


def _check_population(
    scheduler: str, search_alg: Any, max_concurrent_trials: int | None, num_samples: int
) -> None:
    if search_alg not in ("auto", None):
        raise ConfigError(
            f"scheduler={scheduler!r} draws its population at random and then evolves it; "
            f"search_alg={search_alg!r} cannot be combined with it: leave search_alg unset"
        )
    if max_concurrent_trials not in (None, num_samples):
        raise ConfigError(
            f"max_concurrent_trials={max_concurrent_trials}: a population of "
            f"num_samples={num_samples} trials runs all at once (an exploit needs its "
            "rivals running); leave max_concurrent_trials unset or lower num_samples"
        )


def factory_name(factory: Any) -> str:
    """How a sweep folder remembers its problem: a built-in or module name as given, a file by
    its absolute path, a callable by its module and name."""
    if isinstance(factory, str):
        where, sep, attr = factory.rpartition(":")
        if sep and where.endswith(".py"):
            return f"{Path(where).resolve()}:{attr}"
        return factory
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"
