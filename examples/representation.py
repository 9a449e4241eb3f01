"""Fair representation learning (the paper's NLSY79 experiment): PBGD-Free against a baseline.

x = a feature extractor Linear(21, 200)-ReLU-Linear(200, 200)-ReLU, y = a linear head;
f = MSE of the head on group 0, g = MSE on group 1 (``bilevel_ray.problems.representation``).
``--data`` takes the processed NLSY79 CSV; without it a synthetic data set of the same shape is
generated. Each method runs for the same number of steps from the same start (Adam, lr 1e-3,
gamma 10, batches of 500 per group, as in the paper); the script prints the held-out test MSE of
group 0 and the wall time. ``benchmarks/compare_methods.py`` compares all methods under equal
wall-clock budgets.

Run:  python examples/representation.py [--data nlsy79.csv] [--steps 1000] [--methods ...]
"""

from __future__ import annotations

import argparse
import time

import bilevel_ray as br
from bilevel_ray.config import SolverConfig
from bilevel_ray.evaluation import evaluate
from bilevel_ray.problems import BUILTIN_PROBLEMS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the processed NLSY79 CSV (default: synthetic data)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["pbgd_free", "pbgd"])
    args = parser.parse_args(argv)
    config = {"seed": args.seed} if args.data is None else {"seed": args.seed, "data": args.data}
    print(f"representation ({args.data or 'synthetic data'}), {args.steps} steps per method")
    for method in args.methods:
        spec = BUILTIN_PROBLEMS["representation"](config)
        options = SolverConfig.applicable(method, spec.defaults)
        options.pop("steps")
        start = evaluate(spec.problem, spec.x0, spec.y0, spec.eval_data, with_gap=False)
        began = time.perf_counter()
        res = br.solve(
            spec.problem,
            spec.x0,
            spec.y0,
            method=method,
            data=spec.data,
            steps=args.steps,
            seed=args.seed,
            report_every=max(args.steps // 10, 1),
            **options,
        )
        seconds = time.perf_counter() - began
        end = evaluate(spec.problem, res.x, res.y, spec.eval_data)
        print(
            f"  {method:<11} test MSE {start['eval/upper_loss']:.4f} -> "
            f"{end['eval/upper_loss']:.4f}, lower gap {end['eval/lower_gap']:.4f}, "
            f"{seconds:.1f} s ({1e3 * seconds / args.steps:.2f} ms/step)"
        )


if __name__ == "__main__":
    main()
