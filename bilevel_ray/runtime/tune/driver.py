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

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune as ray_tune

from bilevel_ray.errors import ConfigError
from bilevel_ray.records.manifest import MANIFEST
from bilevel_ray.runtime.cluster.session import (
    check_can_set_runtime_env,
    connect,
    steady_working_dir,
)
from bilevel_ray.runtime.local.history import HISTORY_SCHEMA, write_parquet
from bilevel_ray.runtime.local.ranking import GAP, METRIC, SCORE
from bilevel_ray.runtime.local.run_spec import declare_run_options, take_run_options
from bilevel_ray.runtime.train.judge_actor import start_judge
from bilevel_ray.runtime.tune.deaths import handle_trial_deaths
from bilevel_ray.runtime.tune.folder import claim_sweep_folder
from bilevel_ray.runtime.tune.lineage import BEST_SCHEDULE, write_best_schedule
from bilevel_ray.runtime.tune.outcome import TuneResult, history_table, outcome, trials_table
from bilevel_ray.runtime.tune.plan import SweepPlan, check_population_fits, plan_sweep
from bilevel_ray.runtime.tune.progress import SweepProgress, short
from bilevel_ray.runtime.tune.record import end_record, start_record
from bilevel_ray.runtime.tune.state_seal import SealCallback, seal_files
from bilevel_ray.runtime.tune.trial import TrialPlan, run_trial
from bilevel_ray.tracking import (
    check_runtime_env,
    check_stop,
    check_tune_callbacks,
    end_sweep_run,
    open_sweep_run,
    open_tracking,
    run_status,
    sweep_callbacks,
)

__all__ = ["TuneResult", "run_sweep"]

# A trial's report_every defaults to a tenth of its steps (the scheduler's rungs); progress is
# the sweep's own lines, not a trial's, and a population sets checkpoint_every itself.
TUNE_RUN_DEFAULTS = {"report_every": None}
TUNE_RUN_EXCLUDED = ("progress", "checkpoint_every")


@declare_run_options(defaults=TUNE_RUN_DEFAULTS, exclude=TUNE_RUN_EXCLUDED)
def run_sweep(
    factory: Any,
    *,
    problem_config: dict[str, Any] | None = None,
    method: str = "pbgd_free",
    search_space: dict[str, Any] | None = None,
    num_samples: int | None = None,
    steps: int | None = None,
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
    trust_state: bool = False,
    search_seed: int | None = None,
    pbt_interval: int | None = None,
    address: str | None = None,
    max_failures: int = 1,
    progress: bool = True,
    mlflow: Any = None,
    tensorboard: str | os.PathLike[str] | None = None,
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    stop: Any = None,
    runtime_env: dict[str, Any] | None = None,
    **base_options: Any,
) -> TuneResult:
    """Search the solver settings of ``method`` on the factory's problem with Ray Tune.

    Args:
        factory, problem_config: as in ``br.train``; the factory must return ``eval_data``.
        search_space: Tune distributions keyed by solver settings (see
            :mod:`bilevel_ray.runtime.tune.space`); default :func:`default_search_space`.
        num_samples: trials (default 36: with 600-step trials, 21,600 trial-steps, a tenth of
            the 360-point grid whose best the default comes within 5% of on ``representation``
            and ``regression``, benchmarks/tune_quality.py; a population: as many as fit, at
            most 36, :mod:`bilevel_ray.runtime.tune.capacity`). steps: per trial (default: the
            problem's steps); the run settings below apply to every trial (``report_every``
            defaults to steps // 10; ``report_interval_s``: a trial reports to Tune at most
            this often, and at its end and the scheduler's milestones).
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
            continues an interrupted sweep there without rerunning finished trials, once
            Tune's pickled state there is found sealed by a sweep of this account
            (:mod:`bilevel_ray.runtime.tune.state_seal`); ``trust_state=True`` resumes a
            folder whose state you wrote elsewhere (another machine's key).
        on_unsuitable (a run setting): the flatness diagnostic in every trial, as in
            ``br.solve``; the trials report to one named judge actor per sweep, and each
            trial's verdict is a column of ``trials.parquet`` (``flatness/verdict``,
            ``flatness/reason``); a stopped trial's status is ``unsuitable``.
        seed (a run setting): seeds every trial's run (data order, sampling), so that the
            trials of one sweep differ only in their settings. search_seed: seeds the searcher
            (default: ``seed``); vary it alone to see how much the search's own luck matters.
        max_failures: times a trial whose process dies (a killed worker, a lost node) is
            retried from its start (Tune's ``FailureConfig``); a trial whose code raises is
            not retried: it ends with status ``error`` and its reason.
        progress: a line on stderr as each trial starts and ends.
        mlflow, tensorboard, experiment, tags: as in ``br.solve``: a parent MLflow run named
            ``name`` (the sweep's settings; its files as artifacts) and one run per trial
            nested under it, opened in the trial by Ray's ``setup_mlflow`` (the sampled
            settings as parameters, every logged row, scores included, as metrics); with
            ``tensorboard`` each trial's rows as event files too, and Tune's own logger's.
        callbacks: ``ray.tune.Callback`` objects for Tune's ``RunConfig``, e.g.
            ``[WandbLoggerCallback(project=...)]`` (with ``runtime_env`` for its key).
        stop: Tune's stopping rule: ``{"step": 500}``, a function ``(trial_id, result) ->
            bool`` or a ``ray.tune.Stopper``; it sees the trials' reports.
        runtime_env: the Ray job's runtime environment (every trial's), passed to
            ``ray.init``; refused when Ray is already initialised in this process.
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
    run_options = take_run_options(base_options, TUNE_RUN_DEFAULTS, TUNE_RUN_EXCLUDED)
    tracking = open_tracking(mlflow, tensorboard, experiment=experiment, tags=tags)
    callbacks = check_tune_callbacks(callbacks, tracking.mlflow if tracking else None)
    stop = check_stop(stop, reported=reported_metrics(stop))
    runtime_env = check_runtime_env(runtime_env)
    check_can_set_runtime_env(runtime_env)
    plan = plan_sweep(
        factory,
        problem_config=problem_config,
        method=method,
        search_space=search_space,
        num_samples=num_samples,
        steps=steps,
        run_options=run_options,
        scheduler=scheduler,
        search_alg=search_alg,
        max_concurrent_trials=max_concurrent_trials,
        placement=(num_workers, use_gpu, resources_per_worker, max_failures),
        gap=(gap_tol, gap_steps),
        storage_path=storage_path,
        name=name,
        search_seed=search_seed,
        pbt_interval=pbt_interval,
        base_options=base_options,
        address=address,
    )
    lock = claim_sweep_folder(plan.path, plan.record, resume, trust_state)
    try:
        extra = Extras(tracking, None, callbacks, stop)
        return _sweep(plan, resume, base_options, (address, runtime_env), progress, extra)
    finally:
        lock.release()  # the folder is another process's to write from here


def _sweep(
    plan: SweepPlan,
    resume: bool,
    base_options: dict[str, Any],
    where: tuple[str | None, Any],
    progress: bool,
    extra: Extras,
) -> TuneResult:
    """The sweep in its claimed folder: recorded, tracked, run and written; ``where`` is
    (address, runtime_env)."""
    recorder = start_record(plan, resume, base_options)
    # Save the sweep's state at most every second (Tune's default adapts up to minutes; every
    # step would rewrite the whole state after each event: quadratic in the number of trials),
    # so a killed driver loses little more than the trials that were running.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    handle_trial_deaths()  # a dead trial fails alone, and is said once, by the sweep
    started = time.perf_counter()
    tracking, sweep = extra.tracking, None
    if tracking is not None:
        sweep = open_sweep_run(tracking, plan.path.name, sweep_params(plan))
        extra = dataclasses.replace(extra, parent_run_id=sweep.run_id)
    try:
        with recorder.running():
            with steady_working_dir(plan.path):  # all of the sweep's paths are absolute by now
                gpus = connect(*where)
                check_population_fits(plan)  # a cluster the pre-flight could not see
                if tracking is not None:
                    tracking.check_cluster(len(ray.nodes()))
                trial_cpus, concurrent = _place(plan, ray.cluster_resources().get("CPU", 0.0))
                grid = _execute(plan, trial_cpus, concurrent, bool(gpus), resume, progress, extra)
            result = _write(plan, grid, started)
        end_record(recorder, plan, result)
    except BaseException as err:
        if sweep is not None:
            end_sweep_run(sweep, run_status(err))
        raise
    if sweep is not None:
        end_tracked_sweep(sweep, plan.path, result)
    return result


def reported_metrics(stop: Any) -> set[str] | None:
    """What the trials report, for a stopping rule's names: every history column, the
    scores, the status, Tune's own keys, and a problem's held-out numbers (``eval/...``,
    known only once it runs)."""
    from ray.tune.result import AUTO_RESULT_KEYS

    if not isinstance(stop, dict):
        return None
    own = {*HISTORY_SCHEMA.names, METRIC, GAP, SCORE, "status", "trial_id", "done"}
    return own | set(AUTO_RESULT_KEYS) | {k for k in stop if str(k).startswith("eval/")}


def sweep_params(plan: SweepPlan) -> dict[str, Any]:
    """The sweep's parameters in its parent run: what every trial shares."""
    record = plan.record
    return {
        "problem": record["problem"],
        "method": plan.method,
        "num_samples": plan.num_samples,
        "steps": plan.run.steps,
        "seed": plan.run.seed,
        "scheduler": record["scheduler"],
        "search_alg": record["search_alg"],
        "gap_tol": plan.gap_tol,
        "search_space": record["search_space"],
        "fixed": plan.base,
    }


def end_tracked_sweep(sweep: Any, folder: Any, result: TuneResult) -> None:
    """The sweep's files as artifacts of its parent run, the best trial's scores as its
    metrics, then its end (and every trial run a dead process left RUNNING, KILLED)."""
    for name in ("trials.parquet", "history.parquet", BEST_SCHEDULE, MANIFEST):
        if (folder / name).is_file():
            sweep.log_artifact(folder / name)
    best = result.best_metrics if result.best_config is not None else {}
    if best:
        scores = {f"best/{k}": v for k, v in best.items() if k.startswith(("eval/", "search/"))}
        sweep.log_row({"step": best.get("step", 0), **scores})
    end_sweep_run(sweep, "completed" if best else "FAILED")


def _place(plan: SweepPlan, cpus: float) -> tuple[float, int]:
    """The CPUs of one trial's own process and how many trials run at once on ``cpus``."""
    workers = plan.placement.num_workers
    trial_cpus = 1.0 if workers == 1 else 0.25
    if plan.population:
        # The whole population at once: PBT pauses a trial at every interval while another
        # waits for CPUs. Ray counts resources in 1e-4 units: round down so that all fit.
        share = (cpus or 1.0) / plan.num_samples
        trial_cpus = min(1.0, max(1e-4, math.floor(share * 1e4) / 1e4))
    worker_cpus = plan.placement.cpus_per_worker if workers > 1 else 0.0
    per_trial = trial_cpus + workers * worker_cpus
    if per_trial > cpus:
        raise ConfigError(
            f"one trial needs {per_trial:g} CPUs ({workers} workers x {worker_cpus:g} + "
            f"{trial_cpus:g} for the trial) and the cluster has {cpus:g}: lower "
            "resources_per_worker (e.g. {'CPU': 0.5}) or num_workers"
        )
    if plan.population:
        return trial_cpus, plan.num_samples
    if plan.max_concurrent_trials is not None:
        return trial_cpus, plan.max_concurrent_trials
    return trial_cpus, max(1, int(cpus // per_trial + 1e-9))


@dataclass(frozen=True)
class Extras:
    """What a sweep (or a comparison) passes through to Ray: the tracking settings and the
    parent run's id (every trial tracks its own rows), the user's Tune callbacks and stopping
    rule."""

    tracking: Any = None
    parent_run_id: str | None = None
    callbacks: list[Any] = field(default_factory=list)
    stop: Any = None


def _execute(
    plan: SweepPlan,
    trial_cpus: float,
    concurrent: int,
    gpus: bool,
    resume: bool,
    progress: bool,
    extra: Extras | None = None,
) -> Any:
    """Tune's run of the trials (a new Tuner, or the interrupted one restored): its result grid."""
    extra = extra or Extras()
    use_gpu = plan.placement.use_gpu
    trial_plan = TrialPlan(
        plan.factory,
        plan.problem_config,
        plan.method,
        plan.base,
        plan.run,
        plan.placement,
        gpus if use_gpu == "auto" else bool(use_gpu),
        plan.gap_steps,
        plan.gap_tol,
        str(plan.path),
        plan.milestones,
        None if plan.run.watch is None else start_judge(plan.path.name),
        extra.tracking,
        extra.parent_run_id,
    )
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, plan=trial_plan), {"cpu": trial_cpus}
    )
    if resume and ray_tune.Tuner.can_restore(str(plan.path)):
        tuner = ray_tune.Tuner.restore(
            str(plan.path), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = ray_tune.Tuner(
            trainable,
            param_space=plan.space,
            tune_config=ray_tune.TuneConfig(
                metric=SCORE,
                mode="min",
                num_samples=plan.num_samples,
                scheduler=plan.tune_scheduler,
                search_alg=plan.searcher,
                max_concurrent_trials=concurrent,
            ),
            run_config=ray_tune.RunConfig(
                name=plan.path.name,
                storage_path=str(plan.path.parent),
                verbose=0,
                callbacks=sweep_callbacks(
                    extra.tracking,
                    [
                        *extra.callbacks,
                        *([SweepProgress()] if progress else []),
                        # Last: it seals what Tune saved once every callback's state is in.
                        SealCallback(plan.path),
                    ],
                ),
                stop=extra.stop,
                failure_config=ray_tune.FailureConfig(max_failures=plan.placement.max_failures),
                # An exploit restores a rival's latest checkpoint, which must still exist when
                # the exploiting trial's process has started: a fast rival had saved 4 more by
                # then (10 of 36 trials failed on representation), so a population keeps every
                # checkpoint. Other sweeps save none.
                checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=None),
            ),
        )
    with warnings.catch_warnings():
        # Tune's advice to PBT users (reuse_actors with a class Trainable's reset_config)
        # does not apply to a function trainable: a user cannot act on it.
        warnings.filterwarnings("ignore", "Consider boosting PBT performance", UserWarning)
        # The Tuner writes tuner.pkl to the sweep's folder itself; the rest Tune saves as it
        # runs is sealed where it saves it (SealCallback), never what lay in the folder before.
        seal_files(plan.path, only="tuner.pkl")
        return tuner.fit()


def _write(plan: SweepPlan, grid: Any, started: float) -> TuneResult:
    """The sweep's files (trials, history, the best schedule) and its closing lines."""
    path = plan.path
    trials = trials_table(grid)
    history = history_table(path, trials)
    write_parquet(trials, path / "trials.parquet")
    write_parquet(history, path / "history.parquet")
    result = outcome(trials, history, path, plan.base, plan.gap_tol)
    lineage = result.best_metrics.get("lineage") if result.best_config is not None else None
    if isinstance(lineage, str):
        write_best_schedule(path, result.best_metrics, json.loads(lineage), plan.record)
    took = f"{result.num_trials} trials in {time.perf_counter() - started:.0f} s"
    if result.best_config is None:
        print(f"[tune] {took}; no trial completed", file=sys.stderr, flush=True)
    else:
        print(
            f"[tune] {took}; best {METRIC}={short(result.best_metrics.get(METRIC))} "
            f"{GAP}={short(result.best_metrics.get(GAP))}: {result.best_config}",
            file=sys.stderr,
            flush=True,
        )
    if result.failure_summary() is not None:
        print(f"[tune] {result.failure_summary()}", file=sys.stderr, flush=True)
    return result
