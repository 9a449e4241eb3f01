"""A comparison's outcome from its runs' reports and curves: the divergence rule applied, the
ranking, the recommendation, and the files (``compare.parquet``, ``curves.parquet``,
``compare.json``, ``compare.png``), each written to a temporary file and renamed (a link
planted at one is replaced, never written through)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bilevel_ray.runtime.compare.output import manifest, run_rows, strict_json
from bilevel_ray.runtime.compare.rank import (
    ATOL,
    EXPLODE,
    POINTS,
    RTOL,
    Ranking,
    Z,
    best_row,
    divergence,
    method_table,
    phi_at,
    time_to_target,
)
from bilevel_ray.runtime.compare.trial import (
    CURVES,
    SCORED_POINTS,
    SETTLE,
    SETTLE_ROUNDS,
    TRACK_STEPS,
)
from bilevel_ray.runtime.compare.verdict import recommend
from bilevel_ray.runtime.local.history import write_parquet
from bilevel_ray.runtime.local.output_files import atomic_write

__all__ = ["CompareResult", "comparison_meta", "write_outcome"]

RULES = {
    "tolerance": "tau = rtol * max(phi(x0) - better end, 0) + z * se + atol: the flatness "
    "verdict's tolerance (bilevel_ray.diagnostics.verdict.tolerance), 5% of the achievable "
    "improvement from the problem's start plus the seeds' noise",
    "as_good": "PBGD-Free is as good when its shortfall against the best corrected method is "
    "within tau",
    "target": "the best method's median phi at the ranked point, plus tau",
    "to_target": "the first scored time from which the run's ranked point stays at or below the "
    "target to the end of the run",
    "scored": "a point's phi is f(x, y_hat) with y_hat solved for its x: warm-started rounds of "
    f"{TRACK_STEPS} lower steps until the move of phi still to come, extrapolated from the "
    f"last round's two halves, is at most {SETTLE:g} * tau (at most {SETTLE_ROUNDS} more "
    "rounds); a point that did not settle is unscored: never the best "
    "point, no value as the final point, and it neither reaches nor leaves a target",
    "divergence": f"final phi or f not finite, or final phi > phi(x0) + {EXPLODE:g} * "
    "max(|phi(x0)|, 1)",
    "rtol": RTOL,
    "atol": ATOL,
    "z": Z,
    "explode": EXPLODE,
}


@dataclass
class CompareResult:
    """The runs (one row per method and seed), the curves, the per-method table, the
    recommendation (``recommendation["text"]`` is the paragraph), the flatness verdict on the
    same start, the folder, the ranking (both points' orders and targets), the budget, the
    plan's estimate with the time taken (``plan["took_s"]``), and what a resume read."""

    runs: pa.Table
    curves: pa.Table
    table: list[dict[str, Any]]
    recommendation: dict[str, Any]
    verdict: dict[str, Any] | None
    path: Path
    ranking: Ranking | None = None
    budget_s: float = math.nan
    plan: dict[str, Any] = field(default_factory=dict)
    # A resume's record: the runs read from the folder, those run, the checkpoints not trusted
    # (None: the comparison ran whole in one call).
    resumed: dict[str, Any] | None = None


def comparison_meta(factory, problem_config, arguments, fixed, settings, split) -> dict:
    """compare.json's record of how the comparison ran: what reruns it (the problem, its
    config, the arguments, the command line, the versions), the budget and what it charges,
    the seeds, each method's settings, and how the runs were scored."""
    import ray
    import torch

    import bilevel_ray

    versions = {"bilevel_ray": bilevel_ray.__version__, "torch": torch.__version__}
    return {
        "rerun": {
            **manifest(factory, problem_config, arguments, fixed),
            "versions": {**versions, "ray": ray.__version__},
        },
        "budget_s": arguments["budget_s"],
        "budget_charges": "the method's own steps; the scoring and a run's start are not "
        "charged to the budget: each run's run_wall_s and scoring_s report them",
        "seeds": list(range(arguments["seeds"])),
        "settings": settings,
        "scoring": {
            "phi": "f(x, y_hat(x)) on the test half of the held-out upper rows (1, 3, 5, ...)"
            if split
            else "f(x, y_hat(x)) on the held-out upper data (it cannot be split)",
            "best_point": "the lowest phi on the validation half (rows 0, 2, 4, ...)"
            if split
            else "the lowest phi on the same data (it cannot be split)",
            "split": split,
            "track_steps": TRACK_STEPS,
            "settle": "a point is solved once phi's move still to come (extrapolated from "
            f"the last round's two halves) is at most {SETTLE:g} * tau; at most "
            f"{SETTLE_ROUNDS} rounds after the first, else unscored",
            "scored_points": SCORED_POINTS,
            "gap_steps": arguments["gap_steps"],
        },
    }


def write_outcome(
    runs: list[dict[str, Any]],
    folder: Path,
    verdict: dict[str, Any] | None,
    problem: str,
    failed: dict[str, str],
    *,
    start: float = math.nan,
    rank_by: str = "best",
    meta: dict[str, Any] | None = None,
    began: float | None = None,
) -> CompareResult:
    """Rank ``runs`` (their curves from ``folder``), recommend, and write the files. ``meta``
    (the budget, seeds, settings, rerun manifest, plan) goes into compare.json as it is."""
    meta = dict(meta or {})
    by_run = _curves(folder)
    curves = by_run.pop(None)
    for run in runs:
        if run["status"] == "completed":
            why = divergence(run, by_run.get((run["method"], run["seed"]), ()), start)
            if why:
                run.update(status="diverged", reason=why)
    reasons = {"not applicable": "not applicable", "error": "failed", "diverged": "diverged"}
    failed = {m: f"not applicable: {why}" for m, why in failed.items()}
    for run in runs:
        if run["status"] in ("error", "diverged") and run["method"] not in failed:
            failed[run["method"]] = f"{reasons[run['status']]}: {run['reason']}"
    ranking = method_table(runs, by_run, start, rank_by)
    for run in runs:
        if run["status"] == "completed":
            _run_points(run, by_run.get((run["method"], run["seed"]), ()), ranking)
    advice = recommend(ranking, verdict, problem, failed)
    write_parquet(pa.Table.from_pylist(run_rows(runs)), folder / "compare.parquet")
    write_parquet(curves, folder / "curves.parquet")
    plan = dict(meta.pop("plan", {}))
    plan["took_s"] = time.monotonic() - began if began is not None else None
    summary = {
        "problem": problem,
        **meta,
        "plan": plan,
        "start_phi": start,
        "rules": RULES,
        "rank_by": rank_by,
        "targets": ranking.targets,
        "ranking": ranking.order,
        "methods": ranking.rows,
        "runs": runs,
        "failed": failed,
        "flatness": verdict,
        "recommendation": advice,
    }
    text = strict_json(summary)
    atomic_write(folder / "compare.json", lambda tmp: tmp.write_text(text))
    from bilevel_ray.runtime.compare.plot import plot_compare

    drawn = {k: v for k, v in by_run.items() if _completed(runs, k)}
    plot_compare(drawn, ranking.targets[rank_by], problem, folder / "compare.png", failed, rank_by)
    runs_table = pa.Table.from_pylist(run_rows(runs))
    return CompareResult(
        runs_table,
        curves,
        ranking.rows,
        advice,
        verdict,
        folder,
        ranking,
        float(meta.get("budget_s", math.nan)),
        plan,
    )


def _curves(folder: Path) -> dict[Any, Any]:
    """Each run's curve rows by (method, seed), and under None the table of them all."""
    tables = [pq.read_table(f) for f in sorted((folder / CURVES).glob("*.parquet"))]
    tables = [t for t in tables if t.num_rows]
    curves = pa.concat_tables(tables, promote_options="default") if tables else None
    if curves is None:
        curves = pa.table({"method": pa.array([], pa.string())})
    by_run: dict[Any, Any] = {None: curves}
    for row in curves.to_pylist():
        by_run.setdefault((row["method"], row["seed"]), []).append(row)
    return by_run


def _completed(runs: list[dict[str, Any]], key: tuple[str, int]) -> bool:
    return any(r["status"] == "completed" and (r["method"], r["seed"]) == key for r in runs)


def _run_points(run: dict[str, Any], curve: list[dict[str, Any]], ranking: Ranking) -> None:
    """The run's phi at each point and its time to each point's target, in its row."""
    if not curve:
        return
    chosen = best_row(curve) or {}
    # Unscored points (a lower solve that did not settle) give NaN, never f at an unsolved y.
    run["phi_final"] = phi_at(max(curve, key=lambda r: r["wall_s"]))
    run["unscored_points"] = sum(1 for r in curve if r.get("eval/solved", True) is False)
    run["phi_best"] = chosen.get("eval/phi", math.nan)
    run["best_at_s"] = chosen.get("wall_s", math.nan)
    run["best_step"] = chosen.get("step")
    for p in POINTS:
        run[f"to_target_{p}_s"] = time_to_target(curve, ranking.targets[p], p)
