"""A sweep's trial, in this process: the objective the tuning benchmarks share.

``objective(point, ...)`` runs PBGD-Free with the searched point's settings for ``steps`` steps
(data seed 0, as every trial of a sweep with ``seed=0``) and scores it as the sweep's ranking
does: the held-out upper loss when the final lower gap (``gap_steps`` steps of lower solve) is
within ``gap_tol``, else +inf; a diverged run scores +inf.

``grid(...)`` runs every point of the 360-point grid over the default space, two processes at
a time, and caches the table under ``benchmarks/results/`` (recomputed when the settings differ).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

GRID = {
    "gamma": [1.0, 3.0, 10.0, 30.0, 100.0],
    "lr_y": [1e-4, 1e-3, 1e-2, 1e-1],
    "lr_ratio": [0.01, 0.1, 1.0],
    "inner_steps": [1, 2, 3],
    "optimizer": ["sgd", "adam"],
}
NLSY = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "nlsy79-processed.csv"


def problem_config(problem: str) -> dict[str, Any]:
    """The benchmark's problem settings: ``representation`` on the real NLSY79 file."""
    if problem == "representation":
        if not NLSY.is_file():
            raise SystemExit(f"representation needs the NLSY79 file at {NLSY}")
        return {"data": str(NLSY)}
    return {}


def objective(point: dict[str, Any], problem: str, steps: int, gap_tol: float) -> dict[str, Any]:
    """The trial at ``point``: its score (+inf when outside the gap tolerance or diverged)."""
    import torch

    from bilevel_ray.errors import DivergenceError
    from bilevel_ray.evaluation import evaluate
    from bilevel_ray.problems import build_spec
    from bilevel_ray.runtime.local.run_spec import RunSpec
    from bilevel_ray.runtime.local.solve import run_local, solver_config
    from bilevel_ray.runtime.tune.space import decode

    torch.set_num_threads(1)  # two trials share the 2 cores
    spec = build_spec(problem, {**problem_config(problem), "device": "cpu"})
    settings = solver_config("pbgd_free", decode(point))
    try:
        result = run_local(
            spec.problem,
            spec.x0,
            spec.y0,
            settings,
            RunSpec(steps, seed=0, report_every=max(steps // 6, 1)),
            data=spec.data,
        )
    except DivergenceError:
        return {"score": math.inf, "upper": math.inf, "gap": math.inf}
    scores = evaluate(spec.problem, result.x, result.y, spec.eval_data, gap_steps=50)
    upper, gap = scores["eval/upper_loss"], scores["eval/lower_gap"]
    ok = math.isfinite(upper) and gap <= gap_tol
    return {"score": upper if ok else math.inf, "upper": upper, "gap": gap}


def _grid_job(job: tuple[dict[str, Any], str, int, float]) -> dict[str, Any]:
    point, problem, steps, gap_tol = job
    return {**point, **objective(point, problem, steps, gap_tol)}


def grid(problem: str, steps: int, gap_tol: float, processes: int = 2) -> pa.Table:
    """The 360-point grid's scores (cached; ``trial_steps`` = 360 x steps)."""
    cache = Path(__file__).resolve().parent / "results" / f"grid_{problem}.parquet"
    settings = json.dumps({"steps": steps, "gap_tol": gap_tol, "grid": GRID})
    if cache.is_file():
        table = pq.read_table(cache)
        if (table.schema.metadata or {}).get(b"settings", b"").decode() == settings:
            return table
    points = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(processes) as pool:
        jobs = [(p, problem, steps, gap_tol) for p in points]
        for i, row in enumerate(pool.map(_grid_job, jobs), 1):
            rows.append(row)
            if i % 40 == 0:
                took = time.perf_counter() - start
                print(f"[grid {problem}] {i}/{len(points)} points, {took:.0f} s", flush=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"settings": settings})
    cache.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, cache)
    return table
