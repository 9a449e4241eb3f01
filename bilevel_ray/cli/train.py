"""``bilevel-ray train``: a run as a Ray Train worker group."""

from __future__ import annotations

import argparse
from typing import Any

from bilevel_ray.cli import common

ORDER = 2  # its place in ``bilevel-ray --help``


TRAIN_EXAMPLES = """examples:
  bilevel-ray train regression --workers 2 --steps 500 --out runs
  bilevel-ray train regression --workers 2 --checkpoint-every 100 --max-failures 2 \\
      --out runs --name reg1          # rerun the same command to resume runs/reg1
  bilevel-ray train my_problem.py:make --workers 8 --gpu yes --address auto
"""


HELP = "run data-parallel on a Ray Train worker group"

DESCRIPTION = (
    "Run on N data-parallel Ray Train workers (GPUs when the cluster has them); "
    "one CPU worker runs in this process. With --out DIR the run lives in DIR/NAME and "
    "the same --out and --name resume it."
)


def add_parser(commands: Any) -> None:
    """``train``: a data-parallel run on a Ray Train worker group."""
    train_cmd = common.new_command(commands, "train", HELP, DESCRIPTION, TRAIN_EXAMPLES)
    common.run_options(
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
        "--max-failures", type=int, default=0, help="worker-group restarts allowed"
    )
    train_cmd.add_argument("--name", help="the run's name (default: a timestamped one)")
    common.output_options(train_cmd)
    train_cmd.add_argument(
        "--cpus-per-worker",
        type=float,
        dest="cpus_per_worker",
        help="CPUs each worker reserves (default 1)",
    )
    train_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")
    common.tracking_options(train_cmd)


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.local.output_files import check_inside, check_output_path
    from bilevel_ray.runtime.local.run_spec import check_run_name
    from bilevel_ray.runtime.train.driver import default_run_name, train

    problem_config, options = common.read_options(args)  # br.train applies the problem's defaults
    # An empty --name is refused, not replaced by a timestamped one.
    name = default_run_name(args.method) if args.name is None else args.name
    if args.out is not None:
        check_output_path(name, "--name", is_file=False)  # a NUL byte, a name too long
    check_run_name(name)
    if args.out is not None:
        check_inside(args.out / name, args.out, "--name")
        common.check_run_files(args.out / name)
    result = train(
        args.problem,
        problem_config=problem_config,
        method=args.method,
        num_workers=args.workers,
        use_gpu={"auto": "auto", "yes": True, "no": False}[args.gpu],
        resources_per_worker=None
        if args.cpus_per_worker is None
        else {"CPU": args.cpus_per_worker},
        storage_path=args.out,
        name=name,
        max_failures=args.max_failures,
        address=args.address,
        progress=common.progress_enabled(args),
        **common.tracking_values(args),
        **common.run_flag_values(args),
        **options,
    )
    if args.out is not None:
        args.out = args.out / name  # the run's own folder: its files never overwrite another's
    common.show_result(args, problem_config, result)
    if args.out is not None and result.tracking is not None:
        _attach_run_files(args, result)
    print(f"  run {name!r}: rerun with --name {name} (and the same --out) to resume or extend it")
    return common.status_code(result)


def _attach_run_files(args: argparse.Namespace, result: Any) -> None:
    """The files written after ``br.train`` returned, attached to its MLflow run (the
    manifest again: the command line added these files' hashes to it)."""
    from bilevel_ray.tracking import attach_files, open_tracking

    tracking = open_tracking(**common.tracking_values(args))
    files = ("history.parquet", "run.json", "manifest.json")
    attach_files(tracking, result.tracking.get("mlflow_run_id"), [args.out / f for f in files])
