"""Which searcher finds the good corner of the default space in 16 trials? A study, in process.

``benchmarks/tune_quality.py`` measures ``br.tune`` itself (through Ray, 2-3 min per sweep plus a
34-minute grid). This study asks the question behind it faster and over more seeds: it runs
Optuna samplers directly on the trial objective (``representation``, PBGD-Free, ``--steps``
steps, the held-out upper loss; a trial whose lower gap exceeds ``--gap-tol`` or that diverges
scores +inf), asking two points at a time as two concurrent Tune trials on 2 CPUs would. Each
sweep's best is divided by ``--reference`` (the best of the 360-point grid of tune_quality.py,
0.0142) and counted a pass when within 5%.

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
    parser.add_argument("--reference", type=float, default=0.0142)
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
        }
        for s in args.searchers
        for seed in args.seeds
    ]
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

    from bilevel_ray.runtime.search_space import default_search_space

    torch.set_num_threads(1)  # two sweeps share the 2 cores
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # experimental-sampler and GP clipping warnings
    searcher, seed = job["searcher"], job["seed"]
    space = OptunaSearch.convert_search_space(default_search_space("pbgd_free"))
    if searcher == "tpe-adam":
        space["optimizer"] = optuna.distributions.CategoricalDistribution(["adam"])
    study = optuna.create_study(sampler=_sampler(searcher, seed, job["trials"]))
    if searcher.startswith("sobol-"):
        for point in sobol_points(space, 8, seed):
            study.enqueue_trial(point)
    best, best_params = math.inf, None
    for _ in range(0, job["trials"], 2):
        asked = [study.ask(space) for _ in range(2)]
        for trial in asked:
            score = objective(trial.params, job["steps"], job["gap_tol"])
            study.tell(trial, score)
            if score < best:
                best, best_params = score, trial.params
    return {"searcher": searcher, "seed": seed, "best": best, "params": best_params}


def _sampler(searcher: str, seed: int, trials: int) -> Any:
    import optuna

    from bilevel_ray.runtime.search_strategy import tpe_sampler

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


def objective(point: dict[str, Any], steps: int, gap_tol: float) -> float:
    """The sweep's trial, scored as the ranking does: held-out upper loss if the gap is ok."""
    from bilevel_ray.errors import DivergenceError
    from bilevel_ray.evaluation import evaluate
    from bilevel_ray.problems import build_spec
    from bilevel_ray.runtime.local import run_local, solver_config
    from bilevel_ray.runtime.run_spec import RunSpec
    from bilevel_ray.runtime.search_space import decode

    spec = build_spec("representation", {"device": "cpu"})
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
        return math.inf
    scores = evaluate(spec.problem, result.x, result.y, spec.eval_data)
    return scores["eval/upper_loss"] if scores["eval/lower_gap"] <= gap_tol else math.inf


if __name__ == "__main__":
    sys.exit(main())
