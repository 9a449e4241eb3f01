"""``br.tune``: a Ray Tune search over the penalty schedule and the step sizes.

Each trial runs the solver on the factory's problem with one sampled configuration and reports,
every ``report_every`` steps, the run's metrics plus ``eval/upper_loss``, the upper loss on
held-out upper-level data; its last report adds ``eval/lower_gap``, g(x, y) - min g(x, .)
(:func:`bilevel_ray.evaluation.evaluate`; the gap needs a lower solve, so it is computed once).
ASHA stops poor trials early on ``eval/upper_loss``.

Trials are ranked by :func:`bilevel_ray.runtime.ranking.rank_trials` (low held-out upper loss
among trials whose lower gap is within ``gap_tol``).

A single-worker trial runs in the trial's own process (the local runtime); a multi-worker trial
launches a Train V2 ``TorchTrainer`` from the trial function (run name from the trial id, the
sweep's storage path) and forwards rank 0's reports through ``TuneReportCallback``. A trial whose
loss goes non-finite ends with status ``diverged`` and its last finite metrics; the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray import tune as ray_tune

from bilevel_ray.config import SolverConfig
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.evaluation import evaluate
from bilevel_ray.runtime.checkpoint import check_writable
from bilevel_ray.runtime.flatness_actor import ActorJudge, start_judge
from bilevel_ray.runtime.flatness_watch import (
    ActiveSolver,
    FlatnessWatch,
    WatchSettings,
    verdict_columns,
    watch_settings,
)
from bilevel_ray.runtime.history import write_parquet
from bilevel_ray.runtime.local import count, run_local, solver_config
from bilevel_ray.runtime.ranking import GAP, METRIC, rank_trials
from bilevel_ray.runtime.ray_session import connect
from bilevel_ray.runtime.search_space import (
    check_search_space,
    decode,
    default_search_space,
    sample_point,
)
from bilevel_ray.runtime.train import (
    build_spec,
    check_resources_spec,
    check_run_name,
    fit_worker_group,
    worker_config,
)

__all__ = ["TuneResult", "run_sweep"]


class TuneResult:
    """The best configuration (as solver keywords), its final metrics, and the sweep's tables."""

    def __init__(
        self,
        best_config: dict[str, Any],
        best_metrics: dict[str, Any],
        trials: pa.Table,
        history: pa.Table,
        path: Path,
    ):
        self.best_config, self.best_metrics = best_config, best_metrics
        self.trials, self.history, self.path = trials, history, path

    def __repr__(self) -> str:
        return f"TuneResult(best_config={self.best_config}, path={str(self.path)!r})"


def _trial(point: dict[str, Any], run: dict[str, Any]) -> None:
    """One trial (a Tune function trainable); ``run`` holds the sweep's fixed settings."""
    options = {**run["base"], **decode(point)}
    if run["num_workers"] > 1:
        _trial_on_worker_group(options, run)
        return
    spec = build_spec(run["factory"], {**run["problem_config"], "device": "cpu"})
    settings = solver_config(run["method"], options)
    eval_batch = spec.eval_data
    last: dict[str, Any] = {}

    def on_row(row: dict[str, Any], state: Any, active: ActiveSolver) -> None:
        # The gap (a lower solve) only at the end: the ranking reads the final one, ASHA the
        # upper loss.
        final = row["step"] == run["steps"]
        scores = evaluate(
            spec.problem, state.x, state.y, eval_batch, gap_steps=run["gap_steps"], with_gap=final
        )
        last.clear()
        last.update({**_numbers(row), **scores, **verdict_columns(active.verdict)})
        # A run stopped by the flatness verdict ends on this row, with its status.
        status = "running" if active.status == "completed" and not final else active.status
        ray_tune.report({**last, "status": status})

    try:
        run_local(
            spec.problem,
            spec.x0,
            spec.y0,
            settings,
            steps=run["steps"],
            data=spec.data,
            seed=run["seed"],
            report_every=run["report_every"],
            on_row=on_row,
            watch=_trial_watch(run, settings),
        )
    except DivergenceError as err:
        ray_tune.report(
            {
                **last,
                **_numbers(err.last_finite),
                METRIC: math.inf,
                GAP: math.inf,
                "status": "diverged",
                "diverged_at_step": err.step,
            }
        )


def _trial_watch(run: dict[str, Any], settings: SolverConfig) -> FlatnessWatch | None:
    """The trial's flatness watch, reporting to the sweep's judge actor (or None)."""
    if run["flatness"] is None:
        return None
    return FlatnessWatch(
        WatchSettings(**run["flatness"]["settings"]),
        ActorJudge(run["flatness"]["judge"]),
        ray_tune.get_context().get_trial_id(),
        settings.option("gamma"),
    )


def _trial_on_worker_group(options: dict[str, Any], run: dict[str, Any]) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    settings = solver_config(run["method"], options)
    trial_id = ray_tune.get_context().get_trial_id()
    config = worker_config(
        run["factory"],
        run["problem_config"],
        settings,
        steps=run["steps"],
        seed=run["seed"],
        report_every=run["report_every"],
        checkpoint_every=0,
        use_gpu=run["use_gpu"],
        num_workers=run["num_workers"],
        evaluate={"gap_steps": run["gap_steps"]},
    )
    if run["flatness"] is not None:
        config["flatness"] = {**run["flatness"], "run_id": trial_id}
    fit_worker_group(
        config,
        run["num_workers"],
        run["resources_per_worker"],
        Path(run["storage"]),
        f"train-{trial_id}",
        0,
        None,
        callbacks=[TuneReportCallback()],
    )


def _numbers(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k == "step" or "/" in k}


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
        print(
            f"[tune] {trial.trial_id} {status} at step {m.get('step')}: "
            f"{METRIC}={_short(m.get(METRIC))} {GAP}={_short(m.get(GAP))} "
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
    num_samples: int = 16,
    steps: int | None = None,
    report_every: int | None = None,
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
    address: str | None = None,
    on_unsuitable: str | None = None,
    diagnose_window: int = 200,
    diagnose_every: int = 50,
    diagnose_options: dict[str, Any] | None = None,
    max_failures: int = 1,
    **base_options: Any,
) -> TuneResult:
    """Search the solver settings of ``method`` on the factory's problem with Ray Tune.

    Args:
        factory, problem_config: as in ``br.train``; the factory must return ``eval_data``.
        search_space: Tune distributions keyed by solver settings (see
            :mod:`bilevel_ray.runtime.search_space`); default :func:`default_search_space`.
        num_samples: trials. steps, report_every: per trial (defaults: the problem's steps and
            steps // 10).
        scheduler: ``"auto"`` (default: ASHA with random search, every trial to its end with
            Optuna's TPE, see below), ``"asha"``, ``None`` (FIFO) or a Tune scheduler. Why: a
            model-based searcher learns from each trial's final score, and an ASHA-stopped
            trial reports an early, worse one; on ``representation`` (16 trials) TPE with ASHA
            found 0.018-0.024 held-out loss, TPE alone 0.014-0.033 (benchmarks/tune_quality.py).
        search_alg: ``"auto"`` (default: Optuna's TPE when the optional ``optuna`` package is
            installed, else random), ``None`` (random), ``"optuna"`` (TPE, needs ``optuna``) or
            a Tune searcher. TPE starts with ``num_samples // 2`` random trials (at most 8)
            and then samples where the good ones were; seeded by ``seed``.
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
        seed: seeds the searcher and every trial's run (data order, sampling), so that the
            trials of one sweep differ only in their settings.
        max_failures: times a trial whose process dies (a killed worker, a lost node) is
            retried from its start (Tune's ``FailureConfig``).
        **base_options: fixed solver settings (not searched).

    Returns:
        :class:`TuneResult`; ``trials.parquet`` and ``history.parquet`` are written to the
        sweep's folder.
    """
    problem_config = dict(problem_config or {})
    spec = build_spec(factory, problem_config)
    if spec.eval_data is None:
        raise ConfigError(
            "tune scores trials on held-out data: the factory must return eval_data="
            "br.BilevelBatch(upper_heldout, lower_sample) in its ProblemSpec"
        )
    defaults = SolverConfig.applicable(method, spec.defaults)
    default_steps = defaults.pop("steps", 1000)
    steps = count("steps", default_steps if steps is None else steps, 1)
    report_every = count("report_every", report_every or max(steps // 10, 1), 1)
    num_samples = count("num_samples", num_samples, 1)
    num_workers = count("num_workers", num_workers, 1)
    gap_steps = count("gap_steps", gap_steps, 1)
    max_failures = count("max_failures", max_failures, 0)
    name = check_run_name(name)
    check_resources_spec(resources_per_worker)
    watch = watch_settings(
        on_unsuitable, method, diagnose_window, diagnose_every, diagnose_options, steps
    )
    if not isinstance(gap_tol, (int, float)) or not gap_tol >= 0:
        raise ConfigError(f"gap_tol={gap_tol!r}: must be a number >= 0")
    space = default_search_space(method) if search_space is None else dict(search_space)
    # The problem's suggested settings fill in what the space does not determine (lr_ratio
    # determines lr_x, a ramp determines gamma); the user's fixed settings are checked as given.
    determined = set(space) | ({"lr_x"} if "lr_ratio" in space else set())
    determined |= {"gamma"} if "gamma_init" in space else set()
    base = {**{k: v for k, v in defaults.items() if k not in determined}, **base_options}
    check_search_space(space, method, base)
    if search_alg == "auto" and any(
        isinstance(v, Mapping) and "grid_search" in v for v in space.values()
    ):
        search_alg = None  # a grid is Tune's own variant generator's job; TPE cannot take one
    searcher = _search_alg(search_alg, num_samples, seed)
    tune_scheduler = _scheduler(scheduler, steps // report_every, searcher)
    # One sampled point must make valid settings: bad ranges fail here, not in every trial.
    solver_config(method, {**base, **decode(sample_point(space))}).to_dict()
    storage = check_writable(storage_path or Path.home() / "ray_results", "storage_path")

    # Save the sweep's state at most every second (Tune's default adapts up to minutes; every
    # step would rewrite the whole state after each event: quadratic in the number of trials),
    # so a killed driver loses little more than the trials that were running.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    connect(address)
    trial_cpus = 1.0 if num_workers == 1 else 0.25
    worker_cpus = (resources_per_worker or {}).get("CPU", 1.0) if num_workers > 1 else 0.0
    cpus = ray.cluster_resources().get("CPU", 0.0)
    per_trial = trial_cpus + num_workers * worker_cpus
    if per_trial > cpus:
        raise ConfigError(
            f"one trial needs {per_trial:g} CPUs ({num_workers} workers x {worker_cpus:g} + "
            f"{trial_cpus:g} for the trial) and the cluster has {cpus:g}: lower "
            "resources_per_worker (e.g. {'CPU': 0.5}) or num_workers"
        )
    if max_concurrent_trials is None:
        max_concurrent_trials = max(1, int(cpus // per_trial))
    run = {
        "factory": factory,
        "problem_config": problem_config,
        "method": method,
        "base": base,
        "steps": steps,
        "report_every": report_every,
        "seed": seed,
        "gap_steps": gap_steps,
        "num_workers": num_workers,
        "resources_per_worker": resources_per_worker,
        "use_gpu": use_gpu,
        "storage": str(storage),
        "flatness": None
        if watch is None
        else {"settings": dataclasses.asdict(watch), "judge": start_judge(name)},
    }
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, run=run), {"cpu": trial_cpus}
    )
    path = storage / name
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
                metric=METRIC,
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
                callbacks=[_Progress()],
                failure_config=ray_tune.FailureConfig(max_failures=max_failures),
            ),
        )
    grid = tuner.fit()
    trials, history = _tables(grid, steps)
    write_parquet(trials, path / "trials.parquet")
    write_parquet(history, path / "history.parquet")
    ranked = rank_trials(trials.to_pylist(), gap_tol)
    best = ranked[0] if ranked else {}
    best_config = {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")}
    best_options = {**base, **decode(best_config)}
    print(
        f"[tune] {len(ranked)} trials in {time.perf_counter() - started:.0f} s; best "
        f"{METRIC}={_short(best.get(METRIC))} {GAP}={_short(best.get(GAP))}: {best_options}",
        file=sys.stderr,
        flush=True,
    )
    return TuneResult(best_options, best, trials, history, path)


def _scheduler(scheduler: Any, rungs: int, searcher: Any) -> Any:
    if scheduler == "auto":
        scheduler = "asha" if searcher is None else None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            max_t=max(rungs, 1), grace_period=max(1, rungs // 4), reduction_factor=2
        )
    if scheduler is None or not isinstance(scheduler, str):
        return scheduler
    raise ConfigError(f"scheduler={scheduler!r}: use 'auto', 'asha', None or a ray.tune scheduler")


def _search_alg(search_alg: Any, num_samples: int, seed: int) -> Any:
    """The searcher: Optuna's TPE for "optuna" (and "auto" when optuna is installed).

    Why TPE by default: on ``representation`` (benchmarks/tune_quality.py) 16 random trials
    (with ASHA) miss the good corner of the space (Adam, lr_y ~ 1e-2, lr_x ~ lr_y, K >= 2) by
    3x; TPE's guided trials after its random start come closer (1.1x to 2.3x the best of a
    360-point grid over three seeds), though not reliably into it. benchmarks/searcher_study.py
    found no clearly better sampler (GP, Sobol start-up points; median 1.2x to 1.3x over eight
    seeds, within 5% in at most 2 of 8).
    """
    if search_alg in ("optuna", "auto"):
        try:
            import optuna  # noqa: F401 (whether it is installed decides "auto")
            from ray.tune.search.optuna import OptunaSearch
        except (ImportError, AssertionError):
            if search_alg == "auto":
                return None
            raise ConfigError(
                "search_alg='optuna' needs the optuna package: pip install 'bilevel_ray[optuna]'"
            ) from None
        return OptunaSearch(sampler=tpe_sampler(seed, num_samples))
    if search_alg is None or not isinstance(search_alg, str):
        return search_alg
    raise ConfigError(
        f"search_alg={search_alg!r}: use 'auto', None (random), 'optuna' or a searcher"
    )


def tpe_sampler(seed: int, num_samples: int, startup: int | None = None) -> Any:
    """The default searcher's sampler: multivariate TPE after ``startup`` trials (by default
    ``num_samples // 2``, at most 8) sampled at random."""
    import optuna

    if startup is None:
        startup = max(1, min(8, num_samples // 2))
    with warnings.catch_warnings():  # multivariate TPE is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


def _tables(grid: Any, steps: int) -> tuple[pa.Table, pa.Table]:
    """One row per trial (config, final metrics, status, wall time) and every report."""
    trials, history = [], []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        status = metrics.get("status", "error" if result.error else "unknown")
        if status == "running":
            status = "stopped"  # ended by the scheduler before its last step
        row = {
            "trial_id": trial_id,
            "status": status,
            "wall_s": float(metrics.get("time_total_s", math.nan)),
            METRIC: float(metrics.get(METRIC, math.nan)),
            GAP: float(metrics.get(GAP, math.nan)),
            "step": int(metrics.get("step", 0) or 0),
        }
        for key in ("flatness/verdict", "flatness/reason"):
            if key in metrics:
                row[key] = metrics[key]
        row.update({f"config/{k}": _plain(v) for k, v in (result.config or {}).items()})
        trials.append(row)
        frame = result.metrics_dataframe
        if frame is not None:
            for record in frame.to_dict("records"):
                history.append(
                    {
                        "trial_id": trial_id,
                        **{
                            k: _plain(v)
                            for k, v in record.items()
                            # the verdict is per trial: trials.parquet has it
                            if (k == "step" or "/" in k or k == "status")
                            and not k.startswith("flatness/")
                        },
                    }
                )
    return pa.Table.from_pylist(trials), pa.Table.from_pylist(history)


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)
