"""``br.tune``: a Ray Tune search over the penalty schedule and the step sizes.

Each trial (:mod:`bilevel_ray.runtime.tune.trial`) runs the solver on the factory's problem
with one sampled configuration, scores every logged row on held-out upper-level data
(``eval/upper_loss``; the rows Tune sees add ``eval/lower_gap``, g(x, y) - min g(x, .)) and
reports to Tune at the end, at a scheduler's milestones and checkpoints, and otherwise at most
every few seconds.

Trials are ranked by :func:`bilevel_ray.runtime.local.ranking.rank_trials` (low held-out upper loss
among trials whose lower gap is within ``gap_tol``); Tune's searcher and scheduler optimise
``search/score``, the same order in one number (:mod:`bilevel_ray.runtime.local.ranking`).
``trials.parquet`` has one row per trial and ``history.parquet`` every logged row of every trial.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune as ray_tune

from bilevel_ray.config import SolverConfig
from bilevel_ray.errors import ConfigError
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.cluster.session import connect, steady_working_dir
from bilevel_ray.runtime.local.checkpoint import check_writable
from bilevel_ray.runtime.local.history import write_parquet
from bilevel_ray.runtime.local.ranking import GAP, METRIC, SCORE
from bilevel_ray.runtime.local.run_spec import (
    REPORT_INTERVAL_S,
    Placement,
    RunSpec,
    check_count,
    check_run_name,
)
from bilevel_ray.runtime.local.watch import watch_settings
from bilevel_ray.runtime.train.driver import portable_factory
from bilevel_ray.runtime.train.judge_actor import start_judge
from bilevel_ray.runtime.tune.folder import claim_sweep_folder
from bilevel_ray.runtime.tune.lineage import write_best_schedule
from bilevel_ray.runtime.tune.outcome import TuneResult, history_table, outcome, trials_table
from bilevel_ray.runtime.tune.population import POPULATION_SCHEDULERS, population_scheduler
from bilevel_ray.runtime.tune.preflight import (
    check_space_values,
    check_spec,
    describe_space,
    first_step,
)
from bilevel_ray.runtime.tune.space import check_search_space, default_search_space
from bilevel_ray.runtime.tune.strategy import scheduler_for, search_alg_for
from bilevel_ray.runtime.tune.trial import TrialPlan, run_trial

__all__ = ["TuneResult", "run_sweep"]


class _Progress(ray_tune.Callback):
    """One line per trial event on stderr (Tune's own tables are off)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        print(f"[tune] {trial.trial_id} started: {shown}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        m = trial.last_result or {}
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1
        status = m.get("status", "done")
        status = "stopped early" if status == "running" else status
        if status == "error":
            shown = f"error: {m.get('error')}"
        else:
            shown = f"{METRIC}={_short(m.get(METRIC))} {GAP}={_short(m.get(GAP))}"
        print(
            f"[tune] {trial.trial_id} {status} at step {m.get('step')}: {shown} "
            f"({ended}/{len(trials)} ended)",
            file=sys.stderr,
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(
            f"[tune] {trial.trial_id} failed: see {trial.local_path}", file=sys.stderr, flush=True
        )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(
    factory: Any,
    *,
    problem_config: dict[str, Any] | None = None,
    method: str = "pbgd_free",
    search_space: dict[str, Any] | None = None,
    num_samples: int = 36,
    steps: int | None = None,
    report_every: int | None = None,
    report_interval_s: float = REPORT_INTERVAL_S,
    scheduler: Any = "auto",
    search_alg: Any = "auto",
    max_concurrent_trials: int | None = None,
    num_workers: int = 1,
    resources_per_worker: dict[str, float] | None = None,
    use_gpu: bool = False,
    gap_tol: float = 0.1,
    gap_steps: int = 50,
    storage_path: str | os.PathLike[str] | None = None,
    name: str = "sweep",
    resume: bool = False,
    seed: int = 0,
    search_seed: int | None = None,
    pbt_interval: int | None = None,
    address: str | None = None,
    on_unsuitable: str | None = None,
    diagnose_window: int = 200,
    diagnose_every: int = 50,
    diagnose_options: dict[str, Any] | None = None,
    max_failures: int = 1,
    progress: bool = True,
    **base_options: Any,
) -> TuneResult:
    """Search the solver settings of ``method`` on the factory's problem with Ray Tune.

    Args:
        factory, problem_config: as in ``br.train``; the factory must return ``eval_data``.
        search_space: Tune distributions keyed by solver settings (see
            :mod:`bilevel_ray.runtime.tune.space`); default :func:`default_search_space`.
        num_samples: trials (default 36: with 600-step trials, 21,600 trial-steps, a tenth of
            the 360-point grid whose best the default comes within 5% of on ``representation``
            and ``regression``, benchmarks/tune_quality.py). steps,
            report_every: per trial (defaults: the problem's steps and steps // 10).
            report_interval_s: a trial reports to Tune at most this often (and at
            its end and the scheduler's milestones); its history keeps every logged row.
        scheduler: ``"auto"`` (default: ASHA with random search, every trial to its end with
            Optuna's TPE, see below), ``"asha"``, ``"pbt"`` / ``"pb2"`` (population-based
            training of gamma, lr_y and lr_ratio every ``pbt_interval`` steps, default a tenth
            of the run; see :mod:`bilevel_ray.runtime.tune.population`), ``None`` (FIFO) or a Tune
            scheduler. Why every TPE trial runs to its end: a model-based searcher learns
            from each trial's final score, and an ASHA-stopped trial reports an early, worse
            one.
        search_alg: ``"auto"`` (default: Optuna's TPE when the optional ``optuna`` package is
            installed, else random), ``None`` (random), ``"optuna"`` (TPE, needs ``optuna``) or
            a Tune searcher. TPE starts with ``num_samples // 2`` random trials (at most 8)
            and then samples where the good ones were; seeded by ``search_seed``.
        max_concurrent_trials: default: as many as the cluster's CPUs hold.
        num_workers, resources_per_worker, use_gpu: per trial; more than one worker launches a
            Train worker group from the trial.
        gap_tol, gap_steps: the ranking's tolerance on the lower-level gap, in the units of g
            (set it to the lower-level accuracy you need); the steps of the gap's lower solve.
        storage_path, name: the sweep lives in ``{storage_path}/{name}``; ``resume=True``
            continues an interrupted sweep there without rerunning finished trials.
        on_unsuitable, diagnose_window, diagnose_every, diagnose_options: the flatness
            diagnostic in every trial, as in ``br.solve``; the trials report to one named judge
            actor per sweep, and each trial's verdict is a column of ``trials.parquet``
            (``flatness/verdict``, ``flatness/reason``); a stopped trial's status is
            ``unsuitable``.
        seed: seeds every trial's run (data order, sampling), so that the trials of one sweep
            differ only in their settings. search_seed: seeds the searcher (default: ``seed``);
            vary it alone to see how much the search's own luck matters.
        max_failures: times a trial whose process dies (a killed worker, a lost node) is
            retried from its start (Tune's ``FailureConfig``); a trial whose code raises is
            not retried: it ends with status ``error`` and its reason.
        progress: a line on stderr as each trial starts and ends.
        **base_options: fixed solver settings (not searched).

    Everything the trials would fail on is checked here first, before Ray starts
    (:mod:`bilevel_ray.runtime.tune.preflight`), and a sweep folder holds one sweep
    (:mod:`bilevel_ray.runtime.tune.folder`).

    Returns:
        :class:`~bilevel_ray.runtime.tune.outcome.TuneResult`; ``trials.parquet``,
        ``history.parquet`` and ``best_schedule.json`` (the best trial's settings as schedules,
        replayable with ``br.solve`` or ``bilevel-ray solve --schedule``) are written to the
        sweep's folder. Its ``best_config`` is None when
        no trial completed (``failure_summary()`` says why).
    """
    problem_config = dict(problem_config or {})
    spec = build_spec(factory, {**problem_config, "device": "cpu"})
    check_spec(spec, needs_eval=True)
    defaults = SolverConfig.applicable(method, spec.defaults)
    default_steps = defaults.pop("steps", 1000)
    steps = default_steps if steps is None else steps
    problems: list[str] = []
    check_count(problems, "num_samples", num_samples, 1)
    check_count(problems, "gap_steps", gap_steps, 1)
    check_count(problems, "steps", steps, 1)
    if problems:
        raise ConfigError(problems)
    watch = watch_settings(on_unsuitable, method, diagnose_window, diagnose_every, diagnose_options)
    run = RunSpec(
        steps,
        seed,
        report_every or max(steps // 10, 1),
        report_interval_s=report_interval_s,
        watch=watch,
    )
    placement = Placement(num_workers, use_gpu, resources_per_worker, max_failures)
    name = check_run_name(name)
    if not isinstance(gap_tol, (int, float)) or not gap_tol >= 0:
        raise ConfigError(f"gap_tol={gap_tol!r}: must be a number >= 0")
    if search_space is None:
        space = default_search_space(method, base_options)
    else:
        space = dict(search_space)
    # The problem's suggested settings fill in what the space does not determine (lr_ratio
    # determines lr_x, a ramp determines gamma); the user's fixed settings are checked as given.
    determined = set(space) | ({"lr_x"} if "lr_ratio" in space else set())
    determined |= {"gamma"} if "gamma_init" in space else set()
    base = {**{k: v for k, v in defaults.items() if k not in determined}, **base_options}
    check_search_space(space, method, base)
    check_space_values(space, method, base)
    if search_alg == "auto" and any(
        isinstance(v, Mapping) and "grid_search" in v for v in space.values()
    ):
        search_alg = None  # a grid is Tune's own variant generator's job; TPE cannot take one
    search_seed = seed if search_seed is None else search_seed
    check_count(problems, "search_seed", search_seed, 0)
    if problems:
        raise ConfigError(problems)
    population = isinstance(scheduler, str) and scheduler in POPULATION_SCHEDULERS
    if population:
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
        searcher, milestones = None, frozenset()
        tune_scheduler, run = population_scheduler(scheduler, run, space, pbt_interval, num_workers)
    else:
        if pbt_interval is not None:
            raise ConfigError(
                f"pbt_interval={pbt_interval!r} applies to scheduler='pbt' or 'pb2' only"
            )
        searcher = search_alg_for(search_alg, num_samples, search_seed)
        tune_scheduler, milestones = scheduler_for(scheduler, run, searcher)
    first_step(spec, method, base, space, seed)
    # Resolved here, relative to this process's folder, before Ray can move it (a job's driver
    # connecting with address="auto"): the trials receive the callable itself.
    shipped = portable_factory(factory)
    storage = check_writable(storage_path or Path.home() / "ray_results", "storage_path")
    path = storage / name
    sweep = {
        "problem": _factory_name(factory),
        "problem_config": problem_config,
        "method": method,
        "search_space": describe_space(space),
        "fixed": base,
        "num_samples": num_samples,
        "steps": run.steps,
        "report_every": run.report_every,
        "seed": seed,
        "search_seed": search_seed,
        "pbt_interval": run.checkpoint_every or None,
        "num_workers": num_workers,
        "scheduler": str(scheduler),
        "search_alg": str(search_alg),
        "on_unsuitable": on_unsuitable,
    }
    claim_sweep_folder(path, sweep, resume)

    # Save the sweep's state at most every second (Tune's default adapts up to minutes; every
    # step would rewrite the whole state after each event: quadratic in the number of trials),
    # so a killed driver loses little more than the trials that were running.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    with steady_working_dir(path):  # all of the sweep's paths are absolute by now
        gpus = connect(address)
        trial_cpus = 1.0 if num_workers == 1 else 0.25
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if population:
            # The whole population at once: PBT pauses a trial at every interval while another
            # waits for CPUs. Ray counts resources in 1e-4 units: round down so that all fit.
            share = (cpus or 1.0) / num_samples
            trial_cpus = min(1.0, max(1e-4, math.floor(share * 1e4) / 1e4))
        worker_cpus = placement.cpus_per_worker if num_workers > 1 else 0.0
        per_trial = trial_cpus + num_workers * worker_cpus
        if per_trial > cpus:
            raise ConfigError(
                f"one trial needs {per_trial:g} CPUs ({num_workers} workers x {worker_cpus:g} + "
                f"{trial_cpus:g} for the trial) and the cluster has {cpus:g}: lower "
                "resources_per_worker (e.g. {'CPU': 0.5}) or num_workers"
            )
        if population:
            max_concurrent_trials = num_samples
        elif max_concurrent_trials is None:
            max_concurrent_trials = max(1, int(cpus // per_trial + 1e-9))
        plan = TrialPlan(
            shipped,
            problem_config,
            method,
            base,
            run,
            placement,
            bool(gpus) if use_gpu == "auto" else bool(use_gpu),
            gap_steps,
            gap_tol,
            str(path),
            milestones,
            None if watch is None else start_judge(name),
        )
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(run_trial, plan=plan), {"cpu": trial_cpus}
        )
        started = time.perf_counter()
        if resume and ray_tune.Tuner.can_restore(str(path)):
            tuner = ray_tune.Tuner.restore(
                str(path), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = ray_tune.Tuner(
                trainable,
                param_space=space,
                tune_config=ray_tune.TuneConfig(
                    metric=SCORE,
                    mode="min",
                    num_samples=num_samples,
                    scheduler=tune_scheduler,
                    search_alg=searcher,
                    max_concurrent_trials=max_concurrent_trials,
                ),
                run_config=ray_tune.RunConfig(
                    name=name,
                    storage_path=str(storage),
                    verbose=0,
                    callbacks=[_Progress()] if progress else [],
                    failure_config=ray_tune.FailureConfig(max_failures=max_failures),
                    # An exploit restores a rival's latest checkpoint, which must still exist
                    # when the exploiting trial's process has started: a fast rival had saved 4
                    # more by then (10 of 36 trials failed on representation), so a population
                    # keeps every checkpoint. Other sweeps save none.
                    checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=None),
                ),
            )
        with warnings.catch_warnings():
            # Tune's advice to PBT users (reuse_actors with a class Trainable's reset_config)
            # does not apply to a function trainable: a user cannot act on it.
            warnings.filterwarnings("ignore", "Consider boosting PBT performance", UserWarning)
            grid = tuner.fit()
    trials = trials_table(grid)
    history = history_table(path, trials)
    write_parquet(trials, path / "trials.parquet")
    write_parquet(history, path / "history.parquet")
    result = outcome(trials, history, path, base, gap_tol)
    lineage = result.best_metrics.get("lineage") if result.best_config is not None else None
    if isinstance(lineage, str):
        write_best_schedule(path, result.best_metrics, json.loads(lineage), sweep)
    took = f"{result.num_trials} trials in {time.perf_counter() - started:.0f} s"
    if result.best_config is None:
        print(f"[tune] {took}; no trial completed", file=sys.stderr, flush=True)
    else:
        print(
            f"[tune] {took}; best {METRIC}={_short(result.best_metrics.get(METRIC))} "
            f"{GAP}={_short(result.best_metrics.get(GAP))}: {result.best_config}",
            file=sys.stderr,
            flush=True,
        )
    if result.failure_summary() is not None:
        print(f"[tune] {result.failure_summary()}", file=sys.stderr, flush=True)
    return result


def _factory_name(factory: Any) -> str:
    """How a sweep folder remembers its problem: a built-in or module name as given, a file by
    its absolute path, a callable by its module and name."""
    if isinstance(factory, str):
        where, sep, attr = factory.rpartition(":")
        if sep and where.endswith(".py"):
            return f"{Path(where).resolve()}:{attr}"
        return factory
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"
