"""``bilevel-ray train``: a run as a Ray Train worker group."""

from __future__ import annotations

import argparse
from typing import Any

from bilevel_ray.cli.common import (
    check_run_files,
    output_options,
    progress_enabled,
    read_options,
    run_options,
    show_result,
    status_code,
    watch_options,
)

TRAIN_EXAMPLES = """examples:
  bilevel-ray train regression --workers 2 --steps 500 --out runs
  bilevel-ray train regression --workers 2 --checkpoint-every 100 --max-failures 2 \\
      --out runs --name reg1          # rerun the same command to resume runs/reg1
  bilevel-ray train my_problem.py:make --workers 8 --gpu yes --address auto
"""


def add_parser(commands: Any) -> None:
    """``train``: a data-parallel run on a Ray Train worker group."""
    train_cmd = commands.add_parser(
        "train",
        help="run data-parallel on a Ray Train worker group",
        description="Run on N data-parallel Ray Train workers (GPUs when the cluster has them); "
        "one CPU worker runs in this process. With --out DIR the run lives in DIR/NAME and "
        "the same --out and --name resume it.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_options(
        train_cmd,
        "write the run (history.parquet, result.pt, run.json, checkpoints) to DIR/NAME "
        "(default: ~/ray_results/NAME)",
    )
    train_cmd.add_argument("--workers", type=int, required=True, help="data-parallel workers")
    train_cmd.add_argument(
        "--gpu",
        choices=("auto", "yes", "no"),
        default="auto",
        help="use GPUs: auto (when the cluster has them), yes or no",
    )
    train_cmd.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="K",
        help="checkpoint every K steps (a multiple of --report-every)",
    )
    train_cmd.add_argument(
        "--max-failures", type=int, default=0, help="worker-group restarts allowed"
    )
    train_cmd.add_argument("--name", help="the run's name (default: a timestamped one)")
    output_options(train_cmd)
    train_cmd.add_argument(
        "--cpus-per-worker",
        type=float,
        dest="cpus_per_worker",
        help="CPUs each worker reserves (default 1)",
    )
    train_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.local.output_files import check_inside, check_output_path
    from bilevel_ray.runtime.local.run_spec import check_run_name
    from bilevel_ray.runtime.train.driver import default_run_name, train

    problem_config, options = read_options(args)  # br.train applies the problem's defaults
    name = args.name or default_run_name(args.method)
    if args.out is not None:
        check_output_path(name, "--name", is_file=False)
        check_run_name(name)
        check_inside(args.out / name, args.out, "--name")
        check_run_files(args.out / name)
    result = train(
        args.problem,
        problem_config=problem_config,
        method=args.method,
        num_workers=args.workers,
        use_gpu={"auto": "auto", "yes": True, "no": False}[args.gpu],
        resources_per_worker=None
        if args.cpus_per_worker is None
        else {"CPU": args.cpus_per_worker},
        checkpoint_every=args.checkpoint_every,
        storage_path=args.out,
        name=name,
        max_failures=args.max_failures,
        seed=args.seed,
        report_every=args.report_every,
        address=args.address,
        progress=progress_enabled(args),
        **watch_options(args),
        **options,
    )
    if args.out is not None:
        args.out = args.out / name  # the run's own folder: its files never overwrite another's
    show_result(args, problem_config, result)
    print(f"  run {name!r}: rerun with --name {name} (and the same --out) to resume or extend it")
    return status_code(result)
