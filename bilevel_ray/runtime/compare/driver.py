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
what reruns it; :mod:`bilevel_ray.runtime.compare.output`) and ``compare.png``.
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune as ray_tune

from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.errors import ConfigError
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.cluster.session import connect, steady_working_dir
from bilevel_ray.runtime.compare.outcome import CompareResult, comparison_meta, write_outcome
from bilevel_ray.runtime.compare.plan import Heartbeat, estimate_for, plan_line, say
from bilevel_ray.runtime.compare.progress import RunProgress
from bilevel_ray.runtime.compare.rank import POINTS
from bilevel_ray.runtime.compare.trial import ComparePlan, run_compare_trial, start_phi
from bilevel_ray.runtime.local.output_files import check_output_folder, check_writable
from bilevel_ray.runtime.local.run_spec import check_count, check_run_name
from bilevel_ray.runtime.local.spec_check import check_spec
from bilevel_ray.runtime.tune.preflight import first_step
from bilevel_ray.solvers import SOLVERS

__all__ = ["CompareResult", "compare"]


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
    address: str | None = None,
    gap_steps: int = 50,
    rank_by: str | None = None,
    progress: bool = True,
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
        storage_path, name: the comparison's folder ``{storage_path}/{name}`` (a new one).
        address: a Ray cluster; default: the running one, or a new local one.
        gap_steps: the lower-gap solve of each run's final score.
        rank_by: "best" (each run at its best held-out point, chosen on the validation rows) or
            "final" (where the budget ended it); default: "best" where the held-out upper rows
            split in two, else "final". The table has both.
        progress: the plan, then lines on stderr as the comparison goes.
        **fixed: solver settings for every method they apply to (the problem's suggestions
            fill in the rest).
    """
    began = time.monotonic()
    problem_config = dict(problem_config or {})
    problems: list[str] = []
    check_count(problems, "seeds", seeds, 1)
    check_count(problems, "gap_steps", gap_steps, 1)
    if (
        isinstance(budget_s, bool)
        or not isinstance(budget_s, (int, float))
        or not (0 < budget_s < math.inf)
    ):
        problems.append(f"budget_s={budget_s!r}: must be a finite number of seconds > 0")
    if num_workers != 1:
        problems.append(
            f"num_workers={num_workers!r}: compare runs each method in one process; scale the "
            "method it recommends with br.train(num_workers=N) (bilevel-ray train --workers N)"
        )
    if rank_by is not None and rank_by not in POINTS:
        problems.append(
            f"rank_by={rank_by!r}: choose 'best' (each run at its best held-out point) or "
            "'final' (where the budget ended it), or leave it out"
        )
    methods = list(SOLVERS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in SOLVERS]
    if unknown or not methods:
        problems.append(f"methods={methods!r}: choose among {', '.join(SOLVERS)}")
    if problems:
        raise ConfigError(problems)
    name = check_run_name(name)
    spec = build_spec(factory, {**problem_config, "device": "cpu"})
    check_spec(spec, needs_eval=True)
    # The plan needs measurements (each method's first step, the scoring's time): on a large
    # problem they take a while, said every few seconds; on a small one the plan comes first.
    prepared = time.monotonic()
    beat = Heartbeat(
        lambda: f"preparing the plan: {time.monotonic() - prepared:.0f} s", not progress
    )
    with beat:
        settings, failed = _method_settings(spec, methods, fixed)
    storage = check_writable(storage_path or Path.home() / "ray_results", "storage_path")
    # As solve / train check theirs, before Ray starts: the name, no link out of storage_path,
    # a folder if it exists. Its files need no check of their own: the folder must be new or
    # empty, and every file is written with atomic_write (a link is replaced, not followed).
    folder = check_output_folder(storage, name, "name")
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"{str(folder)!r} already holds a comparison: use a new --name (name=...) or "
            "remove the folder"
        )
    with Heartbeat(beat.message, not progress):
        start, score_s, split = start_phi(spec)
        estimate = estimate_for(spec, settings, seeds, float(budget_s), gap_steps, score_s, address)
    ranked = rank_by or ("best" if split else "final")
    free = "pbgd_free" in settings
    planned = estimate.to_dict()
    if progress:
        say(plan_line(sorted(settings), seeds, estimate, ranked))
    took = time.monotonic()
    verdict = _verdict(factory, problem_config, progress) if free else None
    took = time.monotonic() - took
    if progress and free:
        shown = verdict.get("verdict") if verdict else "none"
        say(
            f"diagnostic: done in {took:.0f} s ({shown}); the runs: about "
            f"{estimate.runs_s:.0f} s more (an estimate)"
        )
    steps = int(spec.defaults.get("steps", 1000))
    plan = ComparePlan(
        _shipped(factory),
        problem_config,
        settings,
        float(budget_s),
        max_steps=steps * 1000,  # the budget ends a run, not its step count
        report_every=max(1, steps // 100),
        gap_steps=gap_steps,
        folder=str(folder),
    )
    watch = RunProgress(estimate, start, quiet=not progress)
    runs = _run_all(plan, sorted(settings), seeds, storage, name, address, watch)
    runs += [
        {"method": m, "seed": None, "status": "not applicable", "reason": why}
        for m, why in failed.items()
    ]
    arguments = {
        "methods": methods,
        "budget_s": float(budget_s),
        "seeds": seeds,
        "gap_steps": gap_steps,
        "rank_by": rank_by,
        "storage_path": str(storage),
        "name": name,
    }
    meta = comparison_meta(factory, problem_config, arguments, fixed, settings, split)
    meta["plan"] = {**planned, "diagnostic_took_s": took if free else None}
    label = _problem_label(factory, problem_config)
    result = write_outcome(
        runs, folder, verdict, label, failed, start=start, rank_by=ranked, meta=meta, began=began
    )
    if progress:
        say(f"done in {result.plan['took_s']:.0f} s (estimated {planned['total_s']:.0f} s)")
    return result


def _method_settings(
    spec: Any, methods: list[str], fixed: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each method's keywords (the problem's suggestions, then the user's, where they apply),
    checked with one step; the methods that cannot run, with the reason."""
    specific = {k for knobs in METHOD_OPTIONS.values() for k in knobs}
    settings, failed = {}, {}
    for method in methods:
        suggested = SolverConfig.applicable(method, spec.defaults)
        suggested.pop("steps", None)
        given = {k: v for k, v in fixed.items() if k not in specific or k in METHOD_OPTIONS[method]}
        options = {**suggested, **given}
        try:
            first_step(spec, method, options, {}, seed=0)
        except ConfigError as err:
            failed[method] = "; ".join(err.problems)
            continue
        settings[method] = options
    if not settings:
        raise ConfigError(
            "no method can run on this problem: "
            + "; ".join(f"{m}: {why}" for m, why in failed.items())
        )
    return settings, failed


def _verdict(factory: Any, problem_config: dict[str, Any], progress: bool) -> dict[str, Any] | None:
    """The flatness diagnostic on the same start (None, with a note, when it cannot run), with
    its own progress lines, or ours every few seconds where br.diagnose has none."""
    from bilevel_ray.diagnostics import diagnose
    from bilevel_ray.runtime.local.diagnose_named import diagnose_problem

    own = "progress" in inspect.signature(diagnose).parameters
    began = time.monotonic()
    beat = Heartbeat(
        lambda: f"diagnostic: running, {time.monotonic() - began:.0f} s", own or not progress
    )
    try:
        with beat:
            verdict, _ = diagnose_problem(factory, problem_config, None, progress=progress)
    except Exception as err:  # the verdict is an aside: the comparison goes on without it
        if progress:
            say(f"no flatness verdict: {err}")
        return None
    return verdict.to_dict()


def _shipped(factory: Any) -> Any:
    from bilevel_ray.runtime.train.driver import portable_factory

    return portable_factory(factory)


def _problem_label(factory: Any, problem_config: dict[str, Any]) -> str:
    """The problem as the next command names it: PROBLEM [--config KEY=VALUE ...]."""
    label = factory if isinstance(factory, str) else getattr(factory, "__name__", "PROBLEM")
    return " ".join([label, *(f"--config {k}={v}" for k, v in problem_config.items())])


def _run_all(plan, methods, seeds, storage, name, address, watch) -> list[dict[str, Any]]:
    """Every (method, seed) as a Tune trial; their final reports."""
    Path(plan.folder).mkdir(parents=True, exist_ok=True)
    with steady_working_dir(plan.folder):
        connect(address)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if cpus != watch.estimate.concurrent:
            watch.estimate.concurrent, watch.estimate.ray_start_s = cpus, 0.0
            if not watch.quiet:
                left = watch.estimate.runs_s
                say(f"Ray has {cpus} CPU(s): the runs, about {left:.0f} s (revised estimate)")
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(run_compare_trial, plan=plan), {"cpu": 1}
        )
        tuner = ray_tune.Tuner(
            trainable,
            param_space={
                "method": ray_tune.grid_search(methods),
                "seed": ray_tune.grid_search(list(range(seeds))),
            },
            tune_config=ray_tune.TuneConfig(num_samples=1, max_concurrent_trials=cpus),
            run_config=ray_tune.RunConfig(
                name=name, storage_path=str(storage), verbose=0, callbacks=[watch]
            ),
        )
        with watch.heartbeat:
            grid = tuner.fit()
    runs = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = result.config or {}
        row = {"method": config.get("method"), "seed": config.get("seed")}
        if result.error is not None and "status" not in metrics:
            row.update(status="error", reason=str(result.error).strip().splitlines()[0][:500])
        else:
            row.update({k: v for k, v in metrics.items() if k in _RUN_COLUMNS})
        runs.append(row)
    return runs


_RUN_COLUMNS = (
    "status",
    "reason",
    "steps",
    "wall_s",
    "run_wall_s",
    "scoring_s",
    "final_phi",
    "final_upper_loss",
    "lower_gap",
    "state_bytes",
    "peak_rss_mb",
    "rss_growth_mb",
)
