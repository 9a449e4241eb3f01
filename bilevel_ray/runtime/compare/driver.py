"""``br.compare``: a proof of concept in one call. Every applicable method runs on the same
problem, data and seeds under the same budget of its own steps' wall time and the same
resources, as Ray Tune trials (a cluster runs them side by side; one CPU runs them in turn),
beside the flatness verdict on the same start; the outcome is a table, curves, a figure and a
recommendation (:mod:`bilevel_ray.runtime.compare.verdict`).

Before anything runs it prints its plan and an estimated wall time
(:mod:`bilevel_ray.runtime.compare.plan`), then progress lines throughout. The budget is the
method's own step time (every method is judged on equal time); the scoring of its curve is not
charged to it, and each run's whole wall time is reported beside the budget (``run_wall_s``).
Each method is ranked at its best held-out point (early stopping on a validation half of the
held-out rows, reported on the other half) or at its final point (``rank_by="final"``, the
default where the held-out rows cannot be split: a best point chosen on the rows it is reported
on would be the minimum of noisy scores); both are in the table
(:mod:`bilevel_ray.runtime.compare.rank`). A run whose phi explodes is "diverged".

Files in ``{storage_path}/{name}``: ``compare.parquet`` (one row per method and seed),
``curves.parquet`` (held-out phi against wall time and step), ``compare.json`` (strict JSON:
the table, the targets, the recommendation, the budget, the seeds, each method's settings and
what reruns it; :mod:`bilevel_ray.runtime.compare.output`) and ``compare.png``; the record
``manifest.json`` and each method's best run's parameters ``results/<method>.pt``
(:mod:`~bilevel_ray.runtime.compare.record`); ``runs/<method>-seed<k>.json``, each finished
run's checkpoint (:mod:`~bilevel_ray.runtime.compare.finished`); ``claim.json`` while a call
writes the folder (:mod:`~bilevel_ray.runtime.compare.claim`). ``resume=True`` continues a
comparison that did not finish (:mod:`~bilevel_ray.runtime.compare.resume`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune as ray_tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from bilevel_ray.records.fingerprint import fingerprinted_spec
from bilevel_ray.records.manifest import MANIFEST, now
from bilevel_ray.runtime.cluster.session import (
    check_can_set_runtime_env,
    connect,
    steady_working_dir,
)
from bilevel_ray.runtime.compare.checks import check_arguments
from bilevel_ray.runtime.compare.claim import claim_folder
from bilevel_ray.runtime.compare.diagnostic import run_diagnostic
from bilevel_ray.runtime.compare.finish import finish
from bilevel_ray.runtime.compare.finished import RUN_COLUMNS, comparison_key, run_row
from bilevel_ray.runtime.compare.outcome import CompareResult
from bilevel_ray.runtime.compare.plan import plan_line, say
from bilevel_ray.runtime.compare.prepare import Ready, method_settings, prepare, read_resumed
from bilevel_ray.runtime.compare.progress import RunProgress
from bilevel_ray.runtime.compare.record import OUTPUTS, end_record, start_record
from bilevel_ray.runtime.compare.resume import Resumed
from bilevel_ray.runtime.compare.trial import ComparePlan, run_compare_trial
from bilevel_ray.runtime.local.run_spec import check_run_name
from bilevel_ray.runtime.local.spec_check import check_spec
from bilevel_ray.runtime.tune.driver import Extras
from bilevel_ray.runtime.tune.plan import factory_name
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

__all__ = ["CompareResult", "compare"]

_method_settings = method_settings  # as tests and older callers import it


def compare(
    factory: Any,
    *,
    problem_config: dict[str, Any] | None = None,
    methods: list[str] | None = None,
    budget_s: float = 60.0,
    seeds: int = 3,
    num_workers: int = 1,
    storage_path: str | None = None,
    name: str = "compare",
    resume: bool = False,
    address: str | None = None,
    gap_steps: int = 50,
    rank_by: str | None = None,
    progress: bool = True,
    mlflow: Any = None,
    tensorboard: str | None = None,
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    stop: Any = None,
    runtime_env: dict[str, Any] | None = None,
    **fixed: Any,
) -> CompareResult:
    """Run ``methods`` (default: every method) for ``budget_s`` seconds of their own steps
    each, with ``seeds`` seeds each, on the factory's problem, and recommend one.

    Args:
        factory, problem_config: as in ``br.tune``; the factory must return ``eval_data``.
        methods: method names; a method that cannot apply (PBGD-Free where x cannot move, a
            setting it refuses) is in the table with the reason, not run.
        budget_s: wall-clock seconds of the method's own steps per run (the same for every
            method); the scoring comes on top, and each run's whole wall time is reported.
        seeds: runs per method (seeds 0, 1, ...), for the spread of each result.
        num_workers: ranks per run; one (the comparison is a proof of concept: scale the chosen
            method with ``br.train``).
        storage_path, name: the comparison's folder ``{storage_path}/{name}`` (a new one),
            claimed by this call before any work (``claim.json``: a second call into it is
            refused).
        resume: continue the unfinished comparison in that folder (one killed or stopped):
            the call must repeat its arguments (every difference is named); the runs it
            finished are read from ``runs/`` and only the others run, then the table, curves,
            figure and manifest are written as a whole comparison's. A finished comparison is
            refused (it stays as it is), and so is an empty folder.
        address: a Ray cluster; default: the running one, or a new local one.
        gap_steps: the lower-gap solve of each run's final score.
        rank_by: "best" (each run at its best held-out point, chosen on the validation rows) or
            "final" (where the budget ended it); default: "best" where the held-out upper rows
            split in two, else "final". The table has both.
        progress: the plan, then lines on stderr as the comparison goes.
        mlflow, tensorboard, experiment, tags: as in ``br.tune``: a parent MLflow run named
            ``name`` (its files, the figure included, as artifacts) and one run per (method,
            seed) nested under it, every logged row as metrics (the scored ones with their
            held-out scores).
        callbacks, stop, runtime_env: as in ``br.tune`` (Tune's callbacks and stopping rule
            for the runs; the Ray job's runtime environment).
        **fixed: solver settings for every method they apply to (the problem's suggestions
            fill in the rest).
    """
    began, started = time.monotonic(), now()
    problem_config = dict(problem_config or {})
    methods = check_arguments(methods, budget_s, seeds, num_workers, gap_steps, rank_by)
    name, budget_s = check_run_name(name), float(budget_s)
    tracking = open_tracking(mlflow, tensorboard, experiment=experiment, tags=tags)
    extra = Extras(
        tracking,
        callbacks=check_tune_callbacks(callbacks, tracking.mlflow if tracking else None),
        stop=check_stop(stop, reported=_reported(stop)),
    )
    runtime_env = check_runtime_env(runtime_env)
    check_can_set_runtime_env(runtime_env)
    # The folder is this call's before any work (claim.py): a second writer is refused here.
    with claim_folder(storage_path, name, resume) as claimed:
        if claimed.took_over is not None and progress:
            held = claimed.took_over
            say(
                f"took over the claim of pid {held.get('pid')} (since {held.get('started')}): "
                "its process is gone"
            )
        spec, fingerprint = fingerprinted_spec(factory, {**problem_config, "device": "cpu"})
        check_spec(spec, needs_eval=True)
        ready = prepare(
            spec, methods, fixed, claimed, seeds, budget_s, gap_steps, address, progress
        )
        ranked = rank_by or ("best" if ready.split else "final")
        arguments = {
            "methods": methods,
            "budget_s": budget_s,
            "seeds": seeds,
            "gap_steps": gap_steps,
            "rank_by": rank_by,
            "storage_path": str(ready.storage),
            "name": name,
        }
        recorder = start_record(
            ready.folder, factory, problem_config, fingerprint, arguments, fixed, ready.settings,
            started, resume,
        )  # fmt: skip
        sweep = None
        if tracking is not None:
            params = {**arguments, "problem": factory_name(factory), "fixed": fixed}
            sweep = open_sweep_run(tracking, name, params)
            extra = dataclasses.replace(extra, parent_run_id=sweep.run_id)
        try:
            with recorder.running():
                ready.key = comparison_key(recorder.manifest)  # what each run's checkpoint names
                resumed = read_resumed(ready, seeds, resume)
                if progress:
                    read = len(resumed.rows) if resumed else 0
                    say(plan_line(sorted(ready.settings), seeds, ready.estimate, ranked, read))
                    if resumed:
                        say(resumed.line())
                verdict, took = None, None
                if "pbgd_free" in ready.settings:
                    verdict, took = run_diagnostic(
                        factory, problem_config, ready.estimate, progress
                    )
                plan, runs = _run_methods(
                    factory, problem_config, spec, ready, budget_s, seeds, gap_steps, name,
                    (address, runtime_env), progress, extra, resumed,
                )  # fmt: skip
                result = finish(
                    factory, problem_config, fixed, arguments, ready, runs, verdict, took,
                    ranked, began, resumed,
                )  # fmt: skip
            end_record(recorder, runs, result, plan)
        except BaseException as err:
            if sweep is not None:
                end_sweep_run(sweep, run_status(err))
            raise
    if sweep is not None:
        for file in (*OUTPUTS, MANIFEST):
            if (ready.folder / file).is_file():
                sweep.log_artifact(ready.folder / file)
        end_sweep_run(sweep, "completed" if result.recommendation.get("method") else "FAILED")
    if progress:
        say(f"done in {result.plan['took_s']:.0f} s (estimated {ready.planned['total_s']:.0f} s)")
    return result


def _run_methods(
    factory: Any,
    problem_config: dict[str, Any],
    spec: Any,
    ready: Ready,
    budget_s: float,
    seeds: int,
    gap_steps: int,
    name: str,
    where: tuple[str | None, Any],
    progress: bool,
    extra: Extras,
    resumed: Resumed | None = None,
) -> tuple[ComparePlan, list[dict[str, Any]]]:
    """The runs' shared plan, and every (method, seed) run's final report (those a resume read
    from the folder and those run now, by method and seed), then a row for each method that
    cannot run; ``where`` is (address, runtime_env)."""
    steps = int(spec.defaults.get("steps", 1000))
    plan = ComparePlan(
        _shipped(factory),
        problem_config,
        ready.settings,
        budget_s,
        max_steps=steps * 1000,  # the budget ends a run, not its step count
        report_every=max(1, steps // 100),
        gap_steps=gap_steps,
        folder=str(ready.folder),
        tracking=extra.tracking,
        tracking_parent=extra.parent_run_id,
        key=ready.key,
        todo=tuple(resumed.todo) if resumed is not None else None,
        start=ready.start,  # phi(x0), measured once here: each run's settle rule needs it
    )
    methods = sorted(ready.settings)
    watch = RunProgress(ready.estimate, ready.start, quiet=not progress)
    runs = _run_all(plan, methods, seeds, ready.storage, name, where, watch, extra)
    runs = [*(resumed.rows if resumed is not None else []), *runs]
    runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    runs += [
        {"method": m, "seed": None, "status": "not applicable", "reason": why}
        for m, why in ready.failed.items()
    ]
    return plan, runs


def _shipped(factory: Any) -> Any:
    from bilevel_ray.runtime.cluster.shipping import portable_factory

    return portable_factory(factory)


def _run_all(plan, methods, seeds, storage, name, where, watch, extra) -> list[dict[str, Any]]:
    """Every (method, seed) of ``plan.todo`` (None: of ``methods`` x ``seeds``) as a Tune
    trial; their final reports (none, and no Ray, when there is nothing to run)."""
    todo = plan.todo if plan.todo is not None else [(m, s) for m in methods for s in range(seeds)]
    if not todo:
        return []
    Path(plan.folder).mkdir(parents=True, exist_ok=True)
    with steady_working_dir(plan.folder):
        connect(*where)
        if extra.tracking is not None:
            extra.tracking.check_cluster(len(ray.nodes()))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if cpus != watch.estimate.concurrent:
            watch.estimate.concurrent, watch.estimate.ray_start_s = cpus, 0.0
            if not watch.quiet:
                left = watch.estimate.runs_s
                say(f"Ray has {cpus} CPU(s): the runs, about {left:.0f} s (revised estimate)")
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(run_compare_trial, plan=plan), {"cpu": 1}
        )
        # The runs as given points (a resume's are not a whole grid of methods x seeds).
        points = [{"method": m, "seed": s} for m, s in todo]
        tuner = ray_tune.Tuner(
            trainable,
            param_space={
                "method": ray_tune.choice(sorted({m for m, _ in todo})),
                "seed": ray_tune.choice(sorted({s for _, s in todo})),
            },
            tune_config=ray_tune.TuneConfig(
                search_alg=BasicVariantGenerator(points_to_evaluate=points),
                num_samples=len(points),
                max_concurrent_trials=cpus,
            ),
            run_config=ray_tune.RunConfig(
                name=name,
                storage_path=str(storage),
                verbose=0,
                callbacks=sweep_callbacks(extra.tracking, [*extra.callbacks, watch]),
                stop=extra.stop,
            ),
        )
        with watch.heartbeat:
            grid = tuner.fit()
    runs = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = result.config or {}
        method, seed = config.get("method"), config.get("seed")
        if result.error is not None and "status" not in metrics:
            reason = str(result.error).strip().splitlines()[0][:500]
            runs.append({"method": method, "seed": seed, "status": "error", "reason": reason})
        else:
            runs.append(run_row(method, seed, metrics))
    return runs


_RUN_COLUMNS = RUN_COLUMNS


def _reported(stop: Any) -> set[str] | None:
    """What a comparison's runs report to Tune (once, at their end), for a stopping rule's
    names: the run's columns, Tune's own keys, and a problem's held-out numbers (``eval/...``,
    known only once it runs)."""
    from ray.tune.result import AUTO_RESULT_KEYS

    if not isinstance(stop, dict):
        return None
    held_out = {k for k in stop if str(k).startswith("eval/")}
    return {*_RUN_COLUMNS, *AUTO_RESULT_KEYS, "trial_id", "done", *held_out}
