"""What the flatness diagnostic costs a PBGD-Free run, during its warm-up window and after it.

Setting: the ``representation`` problem (synthetic NLSY79-shaped data; x = MLP 21->200->200
features, y = linear head; minibatches of 500 per level), PBGD-Free with the problem's defaults
(Adam, lr 1e-3, gamma 10), ``--window`` W steps of warm-up window with an estimate every
``--every`` steps, then as many steps again. Each round runs the same ``br.solve`` twice, with
``on_unsuitable="warn"`` and without (order alternating), and reads the wall time of the first W
steps and of the rest from the history's ``time/elapsed_s`` column; the figures are medians over
rounds. Torch runs on 1 thread.

Targets: <= 10% extra time during the window, <= 1% after it.

    .venv/bin/python benchmarks/flatness_overhead.py [--window 2000] [--every 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import bilevel_ray as br
from bilevel_ray.config import SolverConfig
from bilevel_ray.problems import BUILTIN_PROBLEMS

WINDOW_TARGET, AFTER_TARGET = 1.10, 1.01


def timed_run(window: int, every: int, watched: bool) -> tuple[float, float, dict | None]:
    """(seconds of the first ``window`` steps, seconds of the next ``window``, the verdict)."""
    spec = BUILTIN_PROBLEMS["representation"]({})
    options = SolverConfig.applicable("pbgd_free", spec.defaults)
    options.pop("steps")
    if watched:
        options.update(on_unsuitable="warn", diagnose_window=window, diagnose_every=every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an "unsuitable" verdict warns; the figures say it
        res = br.solve(
            spec.problem,
            spec.x0,
            spec.y0,
            data=spec.data,
            steps=2 * window,
            report_every=window,
            **options,
        )
    elapsed = dict(zip(res.history["step"].to_pylist(), res.history["time/elapsed_s"].to_pylist()))
    return elapsed[window], elapsed[2 * window] - elapsed[window], res.verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/flatness_overhead.parquet")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    timed_run(args.window // 5, args.every // 5, True)  # warm-up: imports, allocator, caches
    rows = []
    for r in range(args.rounds):
        for watched in (r % 2 == 0, r % 2 == 1):
            window_s, after_s, verdict = timed_run(args.window, args.every, watched)
            rows.append({"round": r, "watched": watched, "window_s": window_s, "after_s": after_s})
            label = "watched" if watched else "plain  "
            print(f"round {r} {label}: window {window_s:.2f} s, after {after_s:.2f} s")
            if verdict is not None:
                print(f"  verdict: {verdict['verdict']}: {verdict['reason']}")

    def median(watched: bool, key: str) -> float:
        return statistics.median(row[key] for row in rows if row["watched"] == watched)

    window = median(True, "window_s") / median(False, "window_s")
    after = median(True, "after_s") / median(False, "after_s")
    print(
        f"\nwindow ({args.window} steps, an estimate every {args.every}): {window:.3f}x plain "
        f"(target <= {WINDOW_TARGET}) {'PASS' if window <= WINDOW_TARGET else 'MISS'}"
    )
    print(
        f"after the window ({args.window} steps): {after:.3f}x plain (target <= "
        f"{AFTER_TARGET}) {'PASS' if after <= AFTER_TARGET else 'MISS'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)


if __name__ == "__main__":
    main()
