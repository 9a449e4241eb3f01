"""Data-parallel scaling of PBGD-Free on a Ray Train worker group: 1 against 2 workers.

Problem (compute-bound, the representation-learning shape): x = an MLP feature extractor
Linear(21, 200)-ReLU-Linear(200, 200)-ReLU, y = a linear head; upper loss = MSE on group 0,
lower loss = MSE on group 1; synthetic float32 data; Adam (lr 1e-3) at both levels; gamma = 10.
Each worker takes ``--batch`` samples per level and step (weak scaling: W workers process W times
the samples per step), so throughput = W * batch / (time per step).

What is measured, in one run, interleaved over ``--rounds`` rounds (1 worker, 2 workers, ...):
- time per step inside the workers: the median of the history's ``time/step_s`` over the logged
  windows after the first (which holds the warm-up), for a worker group of 1 and of 2 workers
  (both through ``br.train(in_process=False)``, 1 CPU and 1 torch thread each); it excludes the
  ``ray.train.report`` calls (barriers) between windows;
- the fixed cost of a run: the wall time of ``br.train`` minus steps x time per step (worker
  group start-up, the reports and checkpoints, shutdown);
- for reference, the same steps in this process (``br.train`` with one worker takes that path).

Target: 2 workers >= 1.6 x the throughput of 1 worker on 2 cores.

Run from the repository root (about 2-3 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/dp_scaling.py [--rounds 2] [--steps 120] [--batch 4000]
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
import torch
from torch import nn

import bilevel_ray as br

TARGET = 1.6


def representation(config: dict) -> br.ProblemSpec:
    """The benchmark problem; runs on every worker (pickled by value with this script)."""
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Linear(21, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU())
    head = nn.Linear(200, 1)

    def mse(features, predict, batch):
        inputs, targets = batch
        return ((predict(features(inputs)).squeeze(-1) - targets) ** 2).mean()

    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)
    gen = torch.Generator().manual_seed(1)
    n = config["n"]
    groups = []
    for shift in (0.0, 0.5):
        inputs = torch.randn(n, 21, generator=gen)
        targets = inputs[:, :5].sum(-1) + shift + 0.1 * torch.randn(n, generator=gen)
        groups.append((inputs, targets))
    data = br.minibatches(groups[0], groups[1], batch_size=config["batch"])
    return br.ProblemSpec(problem, x0, y0, data)


def run(workers: int, args: argparse.Namespace, storage: Path, tag: str) -> dict:
    settings = dict(
        problem_config={"n": 8 * args.batch, "batch": args.batch},
        steps=args.steps,
        report_every=args.steps // 4,
        optimizer="adam",
        lr_x=1e-3,
        lr_y=1e-3,
        gamma=10.0,
        storage_path=storage,
        name=tag,
    )
    start = time.perf_counter()
    if workers == 0:  # in this process
        torch.set_num_threads(1)
        result = br.train(representation, num_workers=1, **settings)
    else:
        result = br.train(
            representation,
            num_workers=workers,
            in_process=False,
            resources_per_worker={"CPU": 1},
            **settings,
        )
    wall = time.perf_counter() - start
    rows = result.history.to_pylist()
    step_s = statistics.median(r["time/step_s"] for r in rows[1:])
    return {
        "workers": workers,
        "step_ms": 1e3 * step_s,
        "startup_s": wall - args.steps * step_s,
        "throughput": max(workers, 1) * args.batch / step_s,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=4000, help="samples per worker and level")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_scaling.parquet"))
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(
        f"ray {ray.__version__}, torch {torch.__version__}, 2 CPUs; batch {args.batch} per "
        f"worker and level, {args.steps} steps, {args.rounds} rounds"
    )
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.rounds):
            for workers in (0, 1, 2):
                rows.append({"round": r, **run(workers, args, Path(storage), f"w{workers}-r{r}")})
                last = rows[-1]
                label = workers or "in-process"
                print(
                    f"  round {r} workers={label}: {last['step_ms']:.1f} ms/step, "
                    f"start-up {last['startup_s']:.1f} s"
                )
    ray.shutdown()

    def median(workers: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["workers"] == workers)

    print("\nworkers       ms/step   samples/s   fixed cost s")
    for workers, label in ((0, "in-process"), (1, "1"), (2, "2")):
        print(
            f"{label:12s} {median(workers, 'step_ms'):8.1f} {median(workers, 'throughput'):11.0f} "
            f"{median(workers, 'startup_s'):12.1f}"
        )
    ratio = median(2, "throughput") / median(1, "throughput")
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"\nthroughput 2 workers / 1 worker: {ratio:.2f}x (target >= {TARGET}x) {verdict}")
    print(
        f"1-worker group / in-process time per step: "
        f"{median(1, 'step_ms') / median(0, 'step_ms'):.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
