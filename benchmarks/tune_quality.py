"""How good is a 16-trial sweep? br.tune against a dense hand grid over the same space.

Problem: ``representation`` (synthetic NLSY79-shaped data, MLP 21->200->200 features, linear head;
upper = MSE on group 0, lower = MSE on group 1), PBGD-Free, ``--steps`` steps per trial.
Space: gamma log-uniform [1, 100], lr_y log-uniform [1e-4, 1e-1], lr_x = lr_y * lr_ratio with
lr_ratio log-uniform [1e-2, 1], inner_steps in {1, 2, 3}, optimizer in {sgd, adam} (the default).
Grid: gamma {1, 3, 10, 30, 100} x lr_y {1e-4, 1e-3, 1e-2, 1e-1} x lr_ratio {0.01, 0.1, 1} x
inner_steps {1, 2, 3} x optimizer {sgd, adam} = 360 runs, every one to the end (no scheduler).
Both are ranked by the same rule (held-out upper loss among runs whose lower gap <= gap_tol).

The sweep uses br.tune's defaults (Optuna's TPE with every trial run to its end when optuna is
installed, else random search with ASHA), once per ``--seeds`` value (the sweep's seed: the
searcher's and the trials' data order), so that the figure is not one lucky draw.
``benchmarks/searcher_study.py`` compares other searchers on the same objective, in process.

Target: each sweep's best held-out upper loss within 5% of the grid's best.

    .venv/bin/python benchmarks/tune_quality.py [--steps 600] [--samples 16] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune

import bilevel_ray as br
from bilevel_ray.runtime.ranking import rank_trials

GRID = {
    "gamma": [1.0, 3.0, 10.0, 30.0, 100.0],
    "lr_y": [1e-4, 1e-3, 1e-2, 1e-1],
    "lr_ratio": [0.01, 0.1, 1.0],
    "inner_steps": [1, 2, 3],
    "optimizer": ["sgd", "adam"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--gap-tol", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_quality.parquet"))
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = dict(steps=args.steps, report_every=args.steps // 6, gap_tol=args.gap_tol)
    rows = []
    searches = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            start = time.perf_counter()
            sweep = br.tune(
                "representation",
                num_samples=args.samples,
                storage_path=storage,
                name=f"sweep{seed}",
                seed=seed,
                **common,
            )
            searches.append((f"sweep{seed}", sweep, time.perf_counter() - start))
        start = time.perf_counter()
        grid = br.tune(
            "representation",
            search_space={k: tune.grid_search(v) for k, v in GRID.items()},
            num_samples=1,
            scheduler=None,
            storage_path=storage,
            name="grid",
            **common,
        )
        searches.append(("grid", grid, time.perf_counter() - start))
    for label, result, seconds in searches:
        best = rank_trials(result.trials.to_pylist(), args.gap_tol)[0]
        rows.append(
            {
                "search": label,
                "trials": result.trials.num_rows,
                "wall_s": seconds,
                "best_upper_loss": best["eval/upper_loss"],
                "best_lower_gap": best["eval/lower_gap"],
                "best": str(result.best_config),
            }
        )
        print(
            f"{label:7s} {result.trials.num_rows:4d} trials {seconds:7.1f} s  best held-out "
            f"upper loss {best['eval/upper_loss']:.5f} (gap {best['eval/lower_gap']:.4f}): "
            f"{result.best_config}"
        )
    grid_best = rows[-1]["best_upper_loss"]
    print()
    for row in rows[:-1]:
        ratio = row["best_upper_loss"] / grid_best
        row["ratio_to_grid"] = ratio
        print(
            f"{row['search']} best / grid best: {ratio:.3f} (target <= 1.05) "
            f"{'PASS' if ratio <= 1.05 else 'MISS'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
