"""Does a sweep find what an exhaustive grid finds, for a tenth of its compute?

Compute is counted in trial-steps (a 600-step trial is 600; a trial stopped early counts the
steps it ran; a population-based trial counts every step it computed, restarts included, from
its history's ``restart`` / ``from_step`` columns). The reference is the 360-point grid over
the default space (gamma x lr_y x lr_ratio x inner_steps x optimizer, every run to its end,
``trial_objective.grid``: 360 x 600 = 216,000 trial-steps), scored as the sweep ranks: the
held-out upper loss of runs whose final lower gap is within ``--gap-tol``.

Each strategy is a real ``br.tune`` sweep (Ray, 2 CPUs), run once per searcher seed
(``search_seed``; every trial's data seed stays 0, as in the grid):

    default   ``br.tune(problem, steps=600)``: what ``bilevel-ray tune`` does without options
    pbt       population-based training of as many trials: the same trial-steps
    pb2       the same population, with PB2's Gaussian-process explore (needs scikit-learn)
    pbt180    PBT exploiting every 180 steps instead of a tenth of the run (60)
    tpe16     the previous default (16 trials of TPE), for reference

Target (per problem, for ``default``): best held-out upper loss within 5% of the grid's best,
median over the seeds, none worse than 1.15x, spending at most 10% of the grid's trial-steps.

    .venv/bin/python benchmarks/tune_quality.py [--problems representation regression]
        [--strategies default pbt pb2 pbt180 tpe16] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from trial_objective import GRID, grid, problem_config

import bilevel_ray as br

TARGET, WORST, BUDGET = 1.05, 1.15, 0.10


def strategy_options(strategy: str, budget_trials: int) -> dict[str, Any]:
    if strategy == "default":
        return {}
    if strategy in ("pbt", "pb2"):  # the default's number of trials: the same trial-steps
        return {"scheduler": strategy}
    if strategy == "pbt180":  # exploits at steps 180, 360 and 540 only
        return {"scheduler": "pbt", "pbt_interval": 180}
    if strategy == "tpe16":
        return {"num_samples": 16, "scheduler": None, "search_alg": "optuna"}
    raise SystemExit(f"unknown strategy {strategy!r}")


def trial_steps(history: list[dict[str, Any]]) -> int:
    """Steps computed: per trial and run (``restart``), its last step less its first."""
    runs: dict[tuple[Any, Any], tuple[int, int]] = {}
    for row in history:
        key = (row.get("trial_id"), row.get("restart", 0))
        start, last = runs.get(key, (int(row.get("from_step", 0) or 0), 0))
        runs[key] = (start, max(last, int(row["step"])))
    return sum(last - start for start, last in runs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=["representation", "regression"])
    parser.add_argument("--strategies", nargs="+", default=["default", "pbt", "tpe16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--gap-tol", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_quality.parquet"))
    parser.add_argument("--keep", type=Path, help="keep the sweeps' folders here (report.png)")
    args = parser.parse_args()
    grid_points = math.prod(len(v) for v in GRID.values())
    grid_steps = grid_points * args.steps
    budget_trials = int(BUDGET * grid_steps) // args.steps
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for problem in args.problems:
        start = time.perf_counter()
        reference = grid(problem, args.steps, args.gap_tol)
        grid_best = min(reference.column("score").to_pylist())
        print(
            f"{problem}: grid of {grid_points} runs ({grid_steps} trial-steps), best held-out "
            f"upper loss {grid_best:.5g} ({time.perf_counter() - start:.0f} s, cached)",
            flush=True,
        )
        for strategy in args.strategies:
            for seed in args.seeds:
                rows.append(
                    sweep(problem, strategy, seed, args, budget_trials, grid_best, grid_steps)
                )
    print(f"\ntarget: median <= {TARGET}x the grid's best, worst <= {WORST}x, <= {BUDGET:.0%} of")
    print("the grid's trial-steps")
    for problem in args.problems:
        for strategy in args.strategies:
            mine = [r for r in rows if r["problem"] == problem and r["strategy"] == strategy]
            ratios = [r["ratio"] for r in mine]
            spent = max(r["compute"] for r in mine)
            ok = statistics.median(ratios) <= TARGET and max(ratios) <= WORST and spent <= BUDGET
            print(
                f"{problem:15s} {strategy:8s} median {statistics.median(ratios):.3f}x  worst "
                f"{max(ratios):.3f}x  compute <= {spent:.1%}  {'MEETS' if ok else 'misses'}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    ray.shutdown()


def sweep(
    problem: str,
    strategy: str,
    seed: int,
    args: argparse.Namespace,
    budget_trials: int,
    grid_best: float,
    grid_steps: int,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as temporary:
        storage = args.keep or temporary
        start = time.perf_counter()
        result = br.tune(
            problem,
            problem_config=problem_config(problem),
            steps=args.steps,
            gap_tol=args.gap_tol,
            storage_path=storage,
            name=f"{problem}-{strategy}{seed}",
            seed=0,
            search_seed=seed,
            progress=False,
            **strategy_options(strategy, budget_trials),
        )
        wall = time.perf_counter() - start
    best = math.inf
    if result.best_config is not None:
        best = float(result.best_metrics.get("eval/upper_loss", math.inf))
    spent = trial_steps(result.history.to_pylist())
    row = {
        "problem": problem,
        "strategy": strategy,
        "search_seed": seed,
        "trials": result.num_trials,
        "trial_steps": spent,
        "compute": spent / grid_steps,
        "best_upper_loss": best,
        "ratio": best / grid_best,
        "wall_s": wall,
        "counts": str(result.counts),
        "best_config": str(result.best_config),
    }
    print(
        f"{problem:15s} {strategy:8s} seed {seed}: {row['trials']:3d} trials, {spent:6d} "
        f"trial-steps ({row['compute']:.1%} of the grid), best {best:.5g} "
        f"({row['ratio']:.3f}x the grid), {wall:.0f} s",
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
