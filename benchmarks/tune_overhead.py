"""Per-trial overhead of br.tune's trials against a plain Tune function trainable.

Both run the same PBGD-Free steps on ``representation`` (one fixed configuration, ``--steps``
steps, a report every ``--steps // 6``), ``--trials`` trials one at a time (no scheduler):
- ``plain``: a hand-written Tune function trainable: build the problem, step the solver, report
  the upper loss;
- ``br.tune``: our single-worker trial (the local runtime, history rows, held-out scores with a
  50-step lower solve at each report, results exported to Parquet).
Figures: the median of Tune's ``time_total_s`` per trial and the wall time of each whole sweep,
measured in alternation (plain, ours, plain, ours). Target: ours <= 1.5 x plain per trial.
Then one 2-worker trial (a Train worker group launched from the trial) against one
single-worker trial of the same steps: the fixed cost of a multi-worker trial.

    .venv/bin/python benchmarks/tune_overhead.py [--trials 6] [--steps 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune

import bilevel_ray as br
from bilevel_ray.data import as_batches

FIXED = {"gamma": 10.0, "lr_y": 1e-3, "lr_ratio": 1.0, "inner_steps": 1, "optimizer": "adam"}


def plain_trainable(config: dict) -> None:
    spec = br.problems.BUILTIN_PROBLEMS["representation"]({})
    solver = br.SolverConfig(optimizer="adam", lr_x=1e-3, lr_y=1e-3, gamma=10.0).build(spec.problem)
    state = solver.init(spec.x0, spec.y0)
    batches = as_batches(spec.data, 0)
    for t in range(config["steps"]):
        state, metrics = solver.step(state, next(batches))
        if (t + 1) % config["every"] == 0:
            tune.report({"loss": float(metrics["upper/loss"])})


def run_plain(args: argparse.Namespace, storage: str, name: str) -> tuple[list[float], float]:
    start = time.perf_counter()
    grid = tune.Tuner(
        tune.with_resources(plain_trainable, {"cpu": 1}),
        param_space={
            "i": tune.grid_search(list(range(args.trials))),
            "steps": args.steps,
            "every": args.steps // 6,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    ).fit()
    return [r.metrics["time_total_s"] for r in grid], time.perf_counter() - start


def run_ours(
    args: argparse.Namespace, storage: str, name: str, workers: int = 1
) -> tuple[list[float], float]:
    start = time.perf_counter()
    result = br.tune(
        "representation",
        search_space={k: tune.grid_search([v]) for k, v in FIXED.items()},
        num_samples=args.trials if workers == 1 else 1,
        steps=args.steps,
        report_every=args.steps // 6,
        scheduler=None,
        max_concurrent_trials=1,
        num_workers=workers,
        resources_per_worker={"CPU": 0.75} if workers > 1 else None,
        storage_path=storage,
        name=name,
    )
    return result.trials["wall_s"].to_pylist(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/tune_overhead.parquet")
    )
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.rounds):
            for label, fn in (("plain", run_plain), ("br.tune", run_ours)):
                per_trial, wall = fn(args, storage, f"{label}-{r}".replace(".", "_"))
                rows.append(
                    {
                        "search": label,
                        "round": r,
                        "trial_s": statistics.median(per_trial),
                        "sweep_s": wall,
                    }
                )
                print(
                    f"  round {r} {label:8s}: {statistics.median(per_trial):.2f} s per trial, "
                    f"sweep {wall:.1f} s"
                )
        multi, multi_wall = run_ours(args, storage, "multi", workers=2)
        rows.append(
            {"search": "br.tune 2 workers", "round": 0, "trial_s": multi[0], "sweep_s": multi_wall}
        )
    ray.shutdown()

    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["search"] == label)

    ratio = median("br.tune", "trial_s") / median("plain", "trial_s")
    print(
        f"\nper trial: br.tune {median('br.tune', 'trial_s'):.2f} s, plain "
        f"{median('plain', 'trial_s'):.2f} s -> {ratio:.2f}x (target <= 1.5x) "
        f"{'PASS' if ratio <= 1.5 else 'MISS'}"
    )
    print(
        f"whole sweeps of {args.trials}: br.tune {median('br.tune', 'sweep_s'):.1f} s, plain "
        f"{median('plain', 'sweep_s'):.1f} s"
    )
    print(
        f"one 2-worker trial: {multi[0]:.1f} s inside the trial ({multi_wall:.1f} s with the "
        f"sweep's start and export) against {median('br.tune', 'trial_s'):.2f} s for a "
        "single-worker trial"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)


if __name__ == "__main__":
    main()
