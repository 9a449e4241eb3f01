"""``bilevel-ray solve``: one run in this process (or as a task on a cluster with ``--address``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common
from bilevel_ray.errors import ConfigError

ORDER = 1  # its place in ``bilevel-ray --help``


EXAMPLES = """examples:
  bilevel-ray solve toy-negative
  bilevel-ray solve toy-negative --method alt_pbgd --set inner_steps=10 --out runs/alt
  bilevel-ray solve quadratic --steps 500 --set gamma=40 --set optimizer='"adam"'
  bilevel-ray solve my_problem.py:make --config n=5000 --set 'lr_x={"kind": "linear",
      "init_value": 0.1, "end_value": 0.01, "transition_steps": 1000}'
"""


HELP = "solve a problem in this process (no Ray)"

DESCRIPTION = "Solve min_x f(x, y*(x)) in this process and print the result."


def add_parser(commands: Any) -> None:
    """``solve``: one run in this process (or as a task on a cluster)."""
    solve_cmd = common.new_command(commands, "solve", HELP, DESCRIPTION, EXAMPLES)
    common.run_options(
        solve_cmd,
        "write history.parquet, result.pt and run.json to DIR",
        exclude=("checkpoint_every", "report_interval_s"),  # in process: no reports, no resume
    )
    common.output_options(solve_cmd)
    common.threads_option(solve_cmd)
    common.tracking_options(solve_cmd)
    solve_cmd.add_argument(
        "--address", help="run the solve as a task on this Ray cluster (default: here, no Ray)"
    )
    solve_cmd.add_argument(
        "--schedule",
        type=Path,
        metavar="FILE",
        help="replay a sweep's best_schedule.json: its method, steps, seed and solver settings "
        "(gamma, lr_x, lr_y as learned schedules); --set, --config, --steps and "
        "--seed given here take precedence",
    )
    solve_cmd.add_argument(
        "--schedule-config",
        action="store_true",
        help="with --schedule: also take the problem config the schedule was learned with "
        "(it may name data files or a model folder; without this flag a different one is "
        "refused and shown)",
    )
    solve_cmd.set_defaults(seed=None)  # 0, or the --schedule file's


def solve_problem(
    problem: str,
    problem_config: dict[str, Any],
    method: str,
    threads: int | None = None,
    expect_data: dict[str, Any] | None = None,
    out_folder: Path | None = None,
    **options: Any,
) -> Any:
    """``br.solve`` on a problem named as on the command line (also run as a Ray task), with
    torch's threads from the problem's size unless ``threads`` is given; the result carries
    the fingerprint of the data. ``expect_data``: the fingerprint the data must have (a
    schedule's sweep's), refused before the run when it differs. ``out_folder``: the local
    folder the run's files go to, checked for room before the run (as ``history_path`` is)."""
    from bilevel_ray.config import SolverConfig
    from bilevel_ray.records.continuation import data_difference
    from bilevel_ray.records.fingerprint import fingerprinted_spec
    from bilevel_ray.runtime.local.solve import solve, with_held_out
    from bilevel_ray.runtime.local.threads import use_work_threads

    spec, fingerprint = fingerprinted_spec(problem, problem_config)
    if expect_data is not None and expect_data.get("sha256") != fingerprint["sha256"]:
        raise ConfigError(
            f"the schedule was learned on other data than this run's "
            f"({data_difference(expect_data, fingerprint)}): replay it on the sweep's data, or "
            "tune again on this data"
        )
    use_work_threads(spec.x0, spec.y0, threads)
    settings = {**SolverConfig.applicable(method, spec.defaults), **options}
    if out_folder is not None:
        _check_room(out_folder, spec, settings)
    result = solve(spec.problem, spec.x0, spec.y0, method=method, data=spec.data, **settings)
    result.fingerprint = fingerprint
    return with_held_out(result, spec.problem, spec.eval_data)


def _check_room(out: Path, spec: Any, settings: dict[str, Any]) -> None:
    """Refuse a run whose files (the history, result.pt, each written to a temporary name
    first) cannot fit in ``out``: a full disk found at the end loses the run. Steps out of
    range are left to the run's own checks, which name them."""
    from bilevel_ray.counts import MAX_STEPS
    from bilevel_ray.runtime.local.checkpoint import history_bytes, tensor_bytes
    from bilevel_ray.runtime.local.output_files import check_free_space
    from bilevel_ray.runtime.local.run_spec import RUN_OPTIONS

    steps = settings.get("steps", 1000)
    every = settings.get("report_every", RUN_OPTIONS["report_every"].default)
    counts = (steps, every)
    if all(type(n) is int and 1 <= n <= MAX_STEPS for n in counts):
        need = 2 * (history_bytes(steps, every) + tensor_bytes((spec.x0, spec.y0)))
        check_free_space(out, need, "--out")


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.records.manifest import now
    from bilevel_ray.tracking import attach_files, open_tracking

    started = now()
    problem_config, settings = common.read_options(args)
    # Checked, and the experiment opened, here: a task on a cluster receives the settings.
    tracking = open_tracking(**common.tracking_values(args))
    expect_data = None
    if args.schedule is not None:
        problem_config, settings = _replay(args, problem_config, settings)
        expect_data = _sweep_data(args.schedule)
    args.seed = 0 if args.seed is None else args.seed
    run = dict(
        progress=common.progress_enabled(args),
        **common.run_flag_values(args),  # args.seed: 0, or the --schedule file's
        **settings,
    )
    if tracking is not None:
        run["mlflow"] = tracking
    if args.address is not None:
        from bilevel_ray.runtime.cluster.remote import on_cluster

        result = on_cluster(
            args.address,
            solve_problem,
            args.problem,
            problem_config,
            args.method,
            args.threads,
            expect_data=expect_data,
            **run,
        )
    else:
        result = solve_problem(
            args.problem, problem_config, args.method, args.threads, expect_data, args.out, **run
        )
    common.show_result(args, problem_config, result, started)
    if args.out is not None and result.tracking is not None:
        # Written after the run ended: attached to its MLflow run now (not result.pt: a
        # model's parameters can be gigabytes, and the manifest names its hash).
        files = ("history.parquet", "run.json", "manifest.json")
        attach_files(tracking, result.tracking.get("mlflow_run_id"), [args.out / f for f in files])
    return common.status_code(result)


def _sweep_data(schedule: Path) -> dict[str, Any] | None:
    """The data fingerprint of the sweep that wrote ``schedule`` (from its manifest, checked
    first: an edited manifest or schedule is refused), or None for a sweep from before
    manifests."""
    from bilevel_ray.records.continuation import code_change
    from bilevel_ray.records.environment import code_identity
    from bilevel_ray.records.manifest import read_manifest, verify

    folder = schedule.parent
    what = f"--schedule {str(schedule)!r}: its sweep {str(folder)!r}"
    manifest = read_manifest(folder, what)
    if manifest is None:
        print(
            f"note: {what} has no manifest.json (it predates manifests): the replay could not be "
            "checked against the data the schedule was learned on",
            file=sys.stderr,
        )
        return None
    problems = verify(folder, manifest)
    if problems:
        raise ConfigError(
            f"{what} does not match its manifest ({'; '.join(problems)}): the schedule is not "
            "the one the sweep wrote; restore it, or run the sweep again"
        )
    if code_change(manifest, {"code": code_identity()}) is not None:
        print(
            f"warning: {what} ran other code (bilevel_ray {manifest['code']['bilevel_ray']}); "
            "replaying its schedule with this one",
            file=sys.stderr,
        )
    return manifest.get("data")


def _replay(
    args: argparse.Namespace, problem_config: dict[str, Any], settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run a ``best_schedule.json`` describes, under what the command line sets."""
    from bilevel_ray.runtime.tune.lineage import read_schedule_file
    from bilevel_ray.runtime.tune.plan import factory_name

    schedule = read_schedule_file(args.schedule)
    learned_on = str(schedule.get("problem"))
    if factory_name(learned_on) != factory_name(args.problem):
        raise ConfigError(
            f"--schedule {str(args.schedule)!r} was learned on {learned_on!r}, not "
            f"{args.problem!r}: run bilevel-ray solve {learned_on} --schedule {args.schedule}"
        )
    learned_config = schedule.get("problem_config") or {}
    if not args.schedule_config and any(
        problem_config.get(key, object()) != value for key, value in learned_config.items()
    ):
        # The file may name data files or a model folder: it does not choose them unseen.
        shown = ", ".join(f"{k}={v!r}" for k, v in learned_config.items())
        raise ConfigError(
            f"--schedule {str(args.schedule)!r} was learned with the problem config {{{shown}}},"
            f" and this run's is {problem_config!r}: give the same with --config KEY=VALUE, or "
            "pass --schedule-config to take it from the file"
        )
    if args.method not in ("pbgd_free", schedule["method"]):
        raise ConfigError(
            f"--method {args.method}: --schedule {str(args.schedule)!r} holds settings of "
            f"{schedule['method']}; leave --method out"
        )
    args.method = schedule["method"]
    args.seed = schedule["seed"] if args.seed is None else args.seed
    settings = {"steps": schedule["steps"], **schedule["settings"], **settings}
    return {**learned_config, **problem_config}, settings
