"""``bilevel-ray compare``: every method under one budget, and which to use."""

from __future__ import annotations

import argparse
from typing import Any

from bilevel_ray.cli import common

ORDER = 5  # its place in ``bilevel-ray --help``


HELP = "every method under one time budget, and which to use (a proof of concept)"

DESCRIPTION = (
    "Run every applicable method (or --methods) on the problem for --budget "
    "seconds each, --seeds times, as Ray Tune trials, beside the flatness diagnostic on the "
    "same start; print a table and a recommendation; write compare.parquet, curves.parquet, "
    "compare.json and compare.png to DIR/NAME. Quality is phi = f(x, y*(x)) on the "
    "problem's held-out data. Each finished run is kept in DIR/NAME/runs/ as it ends: "
    "--resume continues a comparison that was killed, running only the runs it lacks."
)


def add_parser(commands: Any) -> None:
    """``compare``: every method under one time budget."""
    compare_cmd = common.new_command(commands, "compare", HELP, DESCRIPTION)
    common.problem_options(
        compare_cmd,
        "a solver setting for every method it applies to (lr_x, lr_y, gamma, optimizer, ...)",
    )
    compare_cmd.add_argument(
        "--methods", help="comma-separated methods (default: every one that applies)"
    )
    compare_cmd.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="wall-clock seconds of each method's own steps per run; scoring and start-up come "
        "on top and are reported (default 60)",
    )
    compare_cmd.add_argument(
        "--rank-by",
        choices=("best", "final"),
        default=None,
        help="rank each run at its best held-out point (early stopping on a validation half of "
        "the held-out rows) or at its final point (default: best where the rows split, else "
        "final)",
    )
    compare_cmd.add_argument("--seeds", type=int, default=3, help="runs per method (default 3)")
    common.out_option(compare_cmd, "write the comparison to DIR/NAME (default: ~/ray_results/NAME)")
    compare_cmd.add_argument("--name", default="compare", help="the comparison's folder name")
    compare_cmd.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished comparison in DIR/NAME (one killed or stopped) with its "
        "own arguments: the runs it finished are read from its runs/ folder, only the others "
        "run; a finished comparison is refused and left as it is",
    )
    compare_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")
    common.output_options(compare_cmd)
    common.tracking_options(compare_cmd)


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.compare.driver import compare
    from bilevel_ray.runtime.compare.output import format_table
    from bilevel_ray.runtime.local.output_files import check_writable

    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    if args.out is not None:
        check_writable(args.out, "--out")
    result = compare(
        args.problem,
        problem_config=common.key_values(args.config, "--config"),
        methods=methods,
        budget_s=args.budget,
        seeds=args.seeds,
        storage_path=args.out,
        name=args.name,
        resume=args.resume,
        address=args.address,
        progress=not args.quiet,
        rank_by=args.rank_by,
        **common.tracking_values(args),
        **common.key_values(args.set, "--set"),
    )
    print(format_table(result))
    print()
    print(result.recommendation["text"])
    if result.resumed is not None:
        read, ran = len(result.resumed["runs_read"]), len(result.resumed["runs_run"])
        print(
            f"  resumed: {read} of {read + ran} runs read from {result.path}/runs, {ran} "
            f"run{'s' if ran != 1 else ''} now"
        )
    print(
        f"  wrote {result.path}/compare.parquet, curves.parquet, compare.json, compare.png, "
        "results/<method>.pt (each method's best run's parameters), manifest.json"
    )
    return 0 if result.recommendation.get("method") is not None else 1
