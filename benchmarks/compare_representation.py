"""``br.compare`` on ``representation`` with the NLSY79 data: every method, 3 seeds, one budget.

The same problem as ``benchmarks/compare_methods.py`` (x = an MLP 21-200-200, y = a linear head,
f = MSE on group 0, g = MSE on group 1, Adam at lr 1e-3 for both levels, gamma 10, each method's
own inner steps), through the user-facing command instead of a hand-driven loop. Differences
from that benchmark, so its figures are not the same numbers:

* quality is phi = f(x, y*(x)) on the held-out rows (f at a tracked solution of the lower level,
  see ``bilevel_ray/runtime/compare/trial.py``), where compare_methods scores f(x, y) at the
  run's own y;
* runs are Tune trials side by side (two at a time on 2 CPUs), each with its own wall-clock
  budget of the method's steps (scoring excluded), not subprocesses one after another;
* the time to target is against the best *median* phi of any method (x 1.05), not per seed.

Prints the command's table and recommendation, and where ``compare.png`` is.

Run from the repository root (about ``methods x seeds x budget / 2`` seconds plus start-up)::

    .venv/bin/python benchmarks/compare_representation.py --data PATH/nlsy79-processed.csv \\
        [--budget 20] [--seeds 3] [--out runs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bilevel_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="the processed NLSY79 CSV (else synthetic)")
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args(argv)
    command = ["compare", "representation", "--budget", str(args.budget)]
    command += ["--seeds", str(args.seeds), "--out", args.out, "--name", f"cmp-{int(time.time())}"]
    if args.data is not None:
        command += ["--config", f"data={args.data}"]
    started = time.perf_counter()
    code = cli_main(command)
    print(f"whole command: {time.perf_counter() - started:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
