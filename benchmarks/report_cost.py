"""What logging often costs a worker-group run: ``report_every=10`` against ``report_every=300``.

``br.train("representation", num_workers=2, steps=300)`` on the local Ray it starts (1 CPU and
one torch thread per worker), both settings interleaved over ``--rounds`` rounds, in one process.
Printed per setting (medians over the rounds):

- run time without start-up: the history's last ``time/elapsed_s``, the wall time from the
  workers' first step to their last, every report and checkpoint included;
- the whole ``br.train`` call as the user waits for it (worker-group start and shutdown too);
- the number of history rows (every logged row is kept whatever Train is told).

Target (issue 13): the run time without start-up of ``report_every=10`` at most 1.2x that of
``report_every=300`` (it was about 20x when every logged row was a ``ray.train.report``).

Run from the repository root (about 3-4 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/report_cost.py [--rounds 2] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import bilevel_ray as br


def one_run(steps: int, report_every: int, storage: str, name: str) -> dict[str, float]:
    started = time.perf_counter()
    result = br.train(
        "representation",
        num_workers=2,
        steps=steps,
        report_every=report_every,
        resources_per_worker={"CPU": 1},
        in_process=False,
        storage_path=storage,
        name=name,
    )
    wall = time.perf_counter() - started
    run_s = result.history.column("time/elapsed_s").to_pylist()[-1]
    return {"run_s": run_s, "wall_s": wall, "rows": result.history.num_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    settings = (10, args.steps)
    seen: dict[int, list[dict[str, float]]] = {every: [] for every in settings}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            for every in settings:
                seen[every].append(one_run(args.steps, every, storage, f"r{round_}-{every}"))
                print(f"round {round_} report_every={every}: {seen[every][-1]}", flush=True)
    medians = {
        every: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for every, runs in seen.items()
    }
    print(f"\ntrain representation --workers 2, {args.steps} steps, medians of {args.rounds}:")
    print(f"{'report_every':>12} {'run s (no start-up)':>20} {'whole call s':>13} {'rows':>5}")
    for every, m in medians.items():
        print(f"{every:>12} {m['run_s']:>20.2f} {m['wall_s']:>13.2f} {m['rows']:>5.0f}")
    often, rarely = medians[10], medians[args.steps]
    ratio = often["run_s"] / rarely["run_s"]
    print(f"run time ratio (report_every 10 / {args.steps}): {ratio:.2f} (target <= 1.2)")
    print(f"whole-call ratio: {often['wall_s'] / rarely['wall_s']:.2f}")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
