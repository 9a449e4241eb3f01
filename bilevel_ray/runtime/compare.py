"""``br.compare``: a proof of concept in one call. Every applicable method runs on the same
problem, data and seeds under the same wall-clock budget and resources, as Ray Tune trials (a
cluster runs them side by side; one CPU runs them in turn), beside the flatness verdict on the
same start; the outcome is a table, curves, a figure and a recommendation
(:mod:`bilevel_ray.runtime.compare_verdict`).

Files in ``{storage_path}/{name}``: ``compare.parquet`` (one row per method and seed),
``curves.parquet`` (held-out loss against wall time and step), ``compare.json`` (the per-method
table, the target and the recommendation) and ``compare.png``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune as ray_tune

from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.errors import ConfigError
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.checkpoint import atomic_write, check_output_folder, check_writable
from bilevel_ray.runtime.compare_trial import CURVES, ComparePlan, run_compare_trial
from bilevel_ray.runtime.compare_verdict import method_table, recommend, time_to_target
from bilevel_ray.runtime.history import write_parquet
from bilevel_ray.runtime.preflight import check_spec, first_step
from bilevel_ray.runtime.ray_session import connect, steady_working_dir
from bilevel_ray.runtime.run_spec import check_count, check_run_name
from bilevel_ray.solvers import SOLVERS

__all__ = ["CompareResult", "compare"]


@dataclass
class CompareResult:
    """The runs (one row per method and seed), the curves, the per-method table, the
    recommendation (``recommendation["text"]`` is the paragraph), the flatness verdict on the
    same start, and the folder."""

    runs: pa.Table
    curves: pa.Table
    table: list[dict[str, Any]]
    recommendation: dict[str, Any]
    verdict: dict[str, Any] | None
    path: Path


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
    progress: bool = True,
    **fixed: Any,
) -> CompareResult:
    """Run ``methods`` (default: every method) for ``budget_s`` seconds each, with ``seeds``
    seeds each, on the factory's problem, and recommend one.

    Args:
        factory, problem_config: as in ``br.tune``; the factory must return ``eval_data``.
        methods: method names; a method that cannot apply (PBGD-Free where x cannot move, a
            setting it refuses) is in the table with the reason, not run.
        budget_s: wall-clock seconds per run (the same for every method).
        seeds: runs per method (seeds 0, 1, ...), for the spread of each result.
        num_workers: ranks per run; one (the comparison is a proof of concept: scale the chosen
            method with ``br.train``).
        storage_path, name: the comparison's folder ``{storage_path}/{name}`` (a new one).
        address: a Ray cluster; default: the running one, or a new local one.
        gap_steps: the lower-gap solve of each run's final score.
        progress: a line on stderr as each run starts and ends.
        **fixed: solver settings for every method they apply to (the problem's suggestions
            fill in the rest).
    """
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
    methods = list(SOLVERS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in SOLVERS]
    if unknown or not methods:
        problems.append(f"methods={methods!r}: choose among {', '.join(SOLVERS)}")
    if problems:
        raise ConfigError(problems)
    name = check_run_name(name)
    spec = build_spec(factory, {**problem_config, "device": "cpu"})
    check_spec(spec, needs_eval=True)
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
    verdict = _verdict(factory, problem_config) if "pbgd_free" in settings else None
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
    runs = _run_all(plan, sorted(settings), seeds, storage, name, address, progress)
    runs += [
        {"method": m, "seed": None, "status": "not applicable", "reason": why}
        for m, why in failed.items()
    ]
    return _outcome(runs, folder, verdict, _problem_label(factory, problem_config), failed)


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


def _verdict(factory: Any, problem_config: dict[str, Any]) -> dict[str, Any] | None:
    """The flatness diagnostic on the same start (None, with a note, when it cannot run)."""
    from bilevel_ray.runtime.diagnose_named import diagnose_problem

    try:
        verdict, _ = diagnose_problem(factory, problem_config, None)
    except ConfigError as err:
        print(f"[compare] no flatness verdict: {err}", file=sys.stderr, flush=True)
        return None
    return verdict.to_dict()


def _shipped(factory: Any) -> Any:
    from bilevel_ray.runtime.train import portable_factory

    return portable_factory(factory)


def _problem_label(factory: Any, problem_config: dict[str, Any]) -> str:
    """The problem as the next command names it: PROBLEM [--config KEY=VALUE ...]."""
    label = factory if isinstance(factory, str) else getattr(factory, "__name__", "PROBLEM")
    return " ".join([label, *(f"--config {k}={v}" for k, v in problem_config.items())])


def _run_all(plan, methods, seeds, storage, name, address, progress) -> list[dict[str, Any]]:
    """Every (method, seed) as a Tune trial; their final reports."""
    Path(plan.folder).mkdir(parents=True, exist_ok=True)
    with steady_working_dir(plan.folder):
        connect(address)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
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
                name=name,
                storage_path=str(storage),
                verbose=0,
                callbacks=[_Progress(len(methods) * seeds)] if progress else [],
            ),
        )
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
    "final_phi",
    "best_phi",
    "final_upper_loss",
    "lower_gap",
    "state_bytes",
    "peak_rss_mb",
    "rss_growth_mb",
)


class _Progress(ray_tune.Callback):
    """One line per run as it ends."""

    def __init__(self, total: int):
        self.total, self.ended = total, 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended += 1
        m, c = trial.last_result or {}, trial.config
        shown = (
            f"final held-out phi {m.get('final_phi', math.nan):.5g} after {m.get('steps')} steps"
            if m.get("status") == "completed"
            else f"{m.get('status')}: {m.get('reason')}"
        )
        print(
            f"[compare] {c.get('method')} seed {c.get('seed')}: {shown} "
            f"({self.ended}/{self.total})",
            file=sys.stderr,
            flush=True,
        )


def _outcome(runs, folder, verdict, problem, failed) -> CompareResult:
    failed = dict(failed)
    curves_folder = folder / CURVES
    tables = [pq.read_table(f) for f in sorted(curves_folder.glob("*.parquet"))]
    tables = [t for t in tables if t.num_rows]
    curves = pa.concat_tables(tables) if tables else pa.table({"method": pa.array([], pa.string())})
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in curves.to_pylist():
        by_run.setdefault((row["method"], row["seed"]), []).append(row)
    failed = {
        **failed,
        **{
            r["method"]: r["reason"]
            for r in runs
            if r["status"] in ("error", "diverged") and r["method"] not in failed
        },
    }
    table, target = method_table(runs, by_run)
    for run in runs:
        if run["status"] == "completed":
            run["time_to_target_s"] = time_to_target(
                by_run.get((run["method"], run["seed"]), ()), target
            )
        run["target"] = target
    advice = recommend(table, target, verdict, problem, failed)
    runs_table = pa.Table.from_pylist(runs)
    write_parquet(runs_table, folder / "compare.parquet")
    write_parquet(curves, folder / "curves.parquet")
    summary = {
        "problem": problem,
        "target": target,
        "methods": table,
        "failed": failed,
        "flatness": verdict,
        "recommendation": advice,
    }
    atomic_write(
        folder / "compare.json",
        lambda tmp: tmp.write_text(json.dumps(summary, indent=1, default=_json_number)),
    )
    from bilevel_ray.runtime.compare_plot import plot_compare

    plot_compare(by_run, target, problem, folder / "compare.png")
    return CompareResult(runs_table, curves, table, advice, verdict, folder)


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)
