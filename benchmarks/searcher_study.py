"""Which searcher finds the good corner of the default space? A study, in process.

``benchmarks/tune_quality.py`` measures ``br.tune`` itself (through Ray, minutes per sweep). This
study asks the question behind it faster and over more seeds: it runs Optuna samplers directly
on the trial objective (``--problem``, PBGD-Free, ``--steps`` steps, the held-out upper loss; a
trial whose lower gap exceeds ``--gap-tol`` or that diverges scores +inf), asking two points at
a time as two concurrent Tune trials on 2 CPUs would. The space is br.tune's default with both
optimizers (sgd, adam). Each sweep's best is divided by ``--reference`` (default: the best of
the 360-point grid, computed once and cached by ``trial_objective.grid``) and counted a pass
when within 5%.

Searchers (``--searchers``):
    random      uniform over the space (Optuna's RandomSampler)
    tpe         br.tune's default: multivariate TPE after min(8, trials // 2) random trials
    gp          Optuna's GPSampler (Gaussian-process BO, expected improvement) after 4 random
    sobol-tpe   8 scrambled Sobol points (even coverage, the categorical axes included), then TPE
    sobol-gp    8 scrambled Sobol points, then GP
    tpe-adam    tpe on the 4-D subspace with the optimizer fixed to Adam

    .venv/bin/python benchmarks/searcher_study.py [--seeds 0 1 2 3 4 5 6 7] [--searchers tpe gp]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SEARCHERS = ("random", "tpe", "gp", "sobol-tpe", "sobol-gp", "tpe-adam")
TARGET = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--searchers", nargs="+", choices=SEARCHERS, default=list(SEARCHERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--gap-tol", type=float, default=0.1)
    parser.add_argument("--problem", default="representation")
    parser.add_argument("--reference", type=float, help="default: the grid's best (cached)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/searcher_study.parquet")
    )
    args = parser.parse_args()
    jobs = [
        {
            "searcher": s,
            "seed": seed,
            "trials": args.trials,
            "steps": args.steps,
            "gap_tol": args.gap_tol,
            "problem": args.problem,
        }
        for s in args.searchers
        for seed in args.seeds
    ]
    if args.reference is None:
        from trial_objective import grid

        args.reference = min(
            grid(args.problem, args.steps, args.gap_tol).column("score").to_pylist()
        )
    rows = []
    with ProcessPoolExecutor(args.processes) as pool:
        for row in pool.map(sweep, jobs):
            row["ratio"] = row["best"] / args.reference
            rows.append(row)
            print(
                f"{row['searcher']:10s} seed {row['seed']}: best {row['best']:.5f} "
                f"({row['ratio']:.2f}x the grid) {row['params']}",
                flush=True,
            )
    print(f"\n{args.trials} trials per sweep; pass: best <= {TARGET} x {args.reference}")
    for searcher in args.searchers:
        ratios = [r["ratio"] for r in rows if r["searcher"] == searcher]
        passes = sum(r <= TARGET for r in ratios)
        print(
            f"{searcher:10s} median {statistics.median(ratios):.2f}x  worst {max(ratios):.2f}x  "
            f"pass {passes}/{len(ratios)}  [{' '.join(f'{r:.2f}' for r in ratios)}]"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist([{**r, "params": json.dumps(r["params"])} for r in rows]), args.out
    )


def sweep(job: dict[str, Any]) -> dict[str, Any]:
    """One searcher, one seed: ``trials`` points asked two at a time; the best finite score."""
    import optuna
    import torch
    from ray.tune.search.optuna import OptunaSearch

    from bilevel_ray.runtime.tune.space import default_search_space

    torch.set_num_threads(1)  # two sweeps share the 2 cores
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # experimental-sampler and GP clipping warnings
    searcher, seed = job["searcher"], job["seed"]
    space = OptunaSearch.convert_search_space(default_search_space("pbgd_free"))
    # The study's space draws both optimizers (br.tune's default before this study: Adam only).
    both = ["adam"] if searcher == "tpe-adam" else ["sgd", "adam"]
    space["optimizer"] = optuna.distributions.CategoricalDistribution(both)
    study = optuna.create_study(sampler=_sampler(searcher, seed, job["trials"]))
    if searcher.startswith("sobol-"):
        for point in sobol_points(space, 8, seed):
            study.enqueue_trial(point)
    best, best_params = math.inf, None
    for _ in range(0, job["trials"], 2):
        asked = [study.ask(space) for _ in range(2)]
        for trial in asked:
            score = objective(trial.params, job["problem"], job["steps"], job["gap_tol"])
            study.tell(trial, score)
            if score < best:
                best, best_params = score, trial.params
    return {"searcher": searcher, "seed": seed, "best": best, "params": best_params}


def _sampler(searcher: str, seed: int, trials: int) -> Any:
    import optuna

    from bilevel_ray.runtime.tune.strategy import tpe_sampler

    if searcher == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if searcher.endswith("gp"):
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=4)
    # br.tune's own sampler; after Sobol points, TPE counts them as its start-up trials.
    return tpe_sampler(seed, trials, startup=8 if searcher.startswith("sobol-") else None)


def sobol_points(space: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` scrambled Sobol points mapped onto the distributions (log axes in log space)."""
    import optuna
    from torch.quasirandom import SobolEngine

    points = []
    for u in SobolEngine(len(space), scramble=True, seed=seed).draw(n).tolist():
        point = {}
        for (name, dist), q in zip(space.items(), u):
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                point[name] = dist.choices[min(int(q * len(dist.choices)), len(dist.choices) - 1)]
            elif dist.log:
                point[name] = dist.low * (dist.high / dist.low) ** q
            else:
                point[name] = dist.low + (dist.high - dist.low) * q
        points.append(point)
    return points


def objective(point: dict[str, Any], problem: str, steps: int, gap_tol: float) -> float:
    """The sweep's trial, scored as the ranking does: held-out upper loss if the gap is ok."""
    from trial_objective import objective as trial

    return trial(point, problem, steps, gap_tol)["score"]


if __name__ == "__main__":
    sys.exit(main())
