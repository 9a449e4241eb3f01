"""The ``bilevel-ray`` command.

    bilevel-ray solve PROBLEM [--method M] [--steps N] [--set KEY=VALUE ...] [--out DIR]
    bilevel-ray train PROBLEM --workers N [--gpu auto|yes|no] [--checkpoint-every K] [--out DIR]
    bilevel-ray tune PROBLEM [--samples N] [--max-steps N] [--out DIR]
    bilevel-ray diagnose PROBLEM [--gamma G]
    bilevel-ray compare PROBLEM [--methods M,M,...] [--budget SECONDS] [--seeds N] [--out DIR]
    bilevel-ray report DIR

PROBLEM is a built-in name (see ``--help``) or ``path/to/file.py:factory`` /
``package.module:factory``. ``--address`` runs a command on a Ray cluster (``report`` reads files
and needs no Ray). Exit codes: 0 success; 2 bad usage or bad input (one message on stderr, no
traceback); 3 ``diagnose`` (or a run with ``--on-unsuitable stop``) found the problem unsuitable
for PBGD-Free; 1 anything else (a diverged run included).

Progress lines go to stderr every few seconds when stderr is a terminal (``--quiet`` silences
them); ``--verbose`` also shows Ray's own log lines (it sets ``BILEVEL_RAY_VERBOSE=1``). torch's
thread count for work in this process is ``OMP_NUM_THREADS`` when set, else the CPUs this process
may use.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.problems import BUILTIN_PROBLEMS
from bilevel_ray.runtime.local.checkpoint import (
    atomic_write,
    check_inside,
    check_output_path,
    check_writable,
)
from bilevel_ray.runtime.local.diagnose_named import diagnose_problem
from bilevel_ray.runtime.local.history import write_parquet
from bilevel_ray.runtime.local.run_spec import check_run_name
from bilevel_ray.runtime.local.solve import solve
from bilevel_ray.runtime.local.threads import use_process_cpus, use_work_threads
from bilevel_ray.runtime.tune.lineage import BEST_SCHEDULE, read_schedule_file

__all__ = ["main"]

EXAMPLES = """examples:
  bilevel-ray solve toy-negative
  bilevel-ray solve toy-negative --method alt_pbgd --set inner_steps=10 --out runs/alt
  bilevel-ray solve quadratic --steps 500 --set gamma=40 --set optimizer='"adam"'
  bilevel-ray solve my_problem.py:make --config n=5000 --set 'lr_x={"kind": "linear",
      "init_value": 0.1, "end_value": 0.01, "transition_steps": 1000}'
"""


TRAIN_EXAMPLES = """examples:
  bilevel-ray train regression --workers 2 --steps 500 --out runs
  bilevel-ray train regression --workers 2 --checkpoint-every 100 --max-failures 2 \\
      --out runs --name reg1          # rerun the same command to resume runs/reg1
  bilevel-ray train my_problem.py:make --workers 8 --gpu yes --address auto
"""


DIAGNOSE_EXAMPLES = """examples:
  bilevel-ray diagnose toy-negative                  # unsuitable: exit code 3
  bilevel-ray diagnose toy-positive --gamma 16 --set lr_y=0.01 --set inner_steps=2
  bilevel-ray diagnose representation --steps 1000 --address auto
  bilevel-ray diagnose regression --predict-only     # only the early price (a prediction)
  bilevel-ray diagnose --at-end runs/q                # certify a finished pbgd_free run
  bilevel-ray solve toy-negative --on-unsuitable fallback     # switch to alt_pbgd if unsuitable
"""


TUNE_EXAMPLES = """examples:
  bilevel-ray tune representation --max-steps 600 --out runs
  bilevel-ray tune representation --max-steps 600 --scheduler pbt --out runs --name pbt
  bilevel-ray solve representation --schedule runs/pbt/best_schedule.json
  bilevel-ray tune representation --space 'gamma={"loguniform": [5, 50]}' \\
      --space 'lr_y={"loguniform": [1e-4, 1e-2]}' --set optimizer='"adam"' --out runs
  bilevel-ray tune representation --out runs --resume     # finish an interrupted sweep
  bilevel-ray report runs/sweep
"""


REPORT_EXAMPLES = """examples:
  bilevel-ray tune representation --out runs && bilevel-ray report runs/sweep
  bilevel-ray solve toy-negative --out runs/neg && bilevel-ray report runs/neg
  bilevel-ray report runs/sweep --gap-tol 0.01     # rank with a tighter lower-level gap
"""


class _UsageError(Exception):
    """Bad command-line usage: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits 2; keep it one line
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _key_values(pairs: Sequence[str], flag: str, strict: bool = False) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, lists, dicts, quoted strings) and taken
    as a plain string when it is not JSON, unless ``strict`` (then it must be JSON)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} gamma=20")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError as err:
            if strict:
                raise ConfigError(
                    f"{flag} {key}={raw!r}: not valid JSON ({err.msg}); e.g. "
                    f"""{flag} {key}='{{"loguniform": [1, 100]}}'"""
                ) from None
            out[key] = raw
    return out


def _problem_options(
    command: argparse.ArgumentParser, set_help: str, optional: bool = False
) -> None:
    """PROBLEM, its factory's settings (``--config``) and what ``--set`` sets."""
    command.add_argument(
        "problem",
        nargs="?" if optional else None,
        help=f"built-in ({', '.join(BUILTIN_PROBLEMS)}) or file.py:factory",
    )
    for flag, text in (
        ("--set", set_help),
        ("--config", "a setting of the problem factory (e.g. seed=3, dtype=float32)"),
    ):
        command.add_argument(
            flag, action="append", default=[], metavar="KEY=VALUE", help=f"{text}; repeatable"
        )


def _output_options(command: argparse.ArgumentParser, quiet: bool = True) -> None:
    """``--verbose`` (Ray's own log lines) and, where a command has progress lines, ``--quiet``."""
    if quiet:
        command.add_argument(
            "--quiet",
            action="store_true",
            help="no progress lines (they go to stderr only when it is a terminal)",
        )
    command.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own log lines (sets BILEVEL_RAY_VERBOSE=1)",
    )


def _threads_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch's CPU threads in this process (default: 1 for a small problem, else every "
        "CPU this process may use)",
    )


def _common(command: argparse.ArgumentParser, out_help: str) -> None:
    """The options ``solve``, ``train`` and ``tune`` share."""
    _problem_options(command, "a solver setting (lr_x, lr_y, gamma, inner_steps, optimizer, ...)")
    command.add_argument("--method", default="pbgd_free", help="solver (default: pbgd_free)")
    command.add_argument("--steps", type=int, help="iterations (default: the problem's own)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--report-every", type=int, default=100, help="log every N steps")
    command.add_argument("--out", type=Path, metavar="DIR", help=out_help)
    command.add_argument(
        "--on-unsuitable",
        choices=("fallback", "stop", "warn"),
        help="run the flatness diagnostic during the first --diagnose-window steps and, if "
        "PBGD-Free is unsuitable, switch to alt_pbgd (fallback), stop, or warn",
    )
    command.add_argument(
        "--diagnose-window", type=int, default=200, metavar="W", help="warm-up window (steps)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bilevel-ray",
        description="Single-loop bilevel optimization (PBGD-Free) and its baselines.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--verbose",
        dest="verbose_all",
        action="store_true",
        help="also show Ray's own log lines (sets BILEVEL_RAY_VERBOSE=1); also after a command",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (
        _solve_command,
        _train_command,
        _tune_command,
        _diagnose_command,
        _compare_command,
        _report_command,
    ):
        add(commands)
    return parser


def _solve_command(commands: Any) -> None:
    """``solve``: one run in this process (or as a task on a cluster)."""
    solve_cmd = commands.add_parser(
        "solve",
        help="solve a problem in this process (no Ray)",
        description="Solve min_x f(x, y*(x)) in this process and print the result.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(solve_cmd, "write history.parquet, result.pt and run.json to DIR")
    _output_options(solve_cmd)
    _threads_option(solve_cmd)
    solve_cmd.add_argument(
        "--address", help="run the solve as a task on this Ray cluster (default: here, no Ray)"
    )
    solve_cmd.add_argument(
        "--schedule",
        type=Path,
        metavar="FILE",
        help="replay a sweep's best_schedule.json: its method, steps, seed, problem config and "
        "settings (gamma, lr_x, lr_y as learned schedules); --set, --config, --steps and "
        "--seed given here take precedence",
    )
    solve_cmd.set_defaults(seed=None)  # 0, or the --schedule file's


def _train_command(commands: Any) -> None:
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
    _common(
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
    _output_options(train_cmd)
    train_cmd.add_argument(
        "--cpus-per-worker",
        type=float,
        dest="cpus_per_worker",
        help="CPUs each worker reserves (default 1)",
    )
    train_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")


def _tune_command(commands: Any) -> None:
    """``tune``: a Ray Tune sweep over gamma and the step sizes."""
    tune_cmd = commands.add_parser(
        "tune",
        help="search gamma and the step sizes with Ray Tune",
        description="Search the penalty schedule and step sizes with Ray Tune (Optuna's TPE when "
        "optuna is installed, else random search with ASHA): each trial is scored on held-out "
        "data (upper loss, lower-level gap); "
        "writes DIR/NAME/trials.parquet and history.parquet and prints the best config.",
        epilog=TUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(
        tune_cmd,
        "write the sweep (trials.parquet, history.parquet, Tune's state) to DIR/NAME "
        "(default: ~/ray_results/NAME); bilevel-ray report DIR/NAME shows it",
    )
    _output_options(tune_cmd)
    tune_cmd.set_defaults(report_every=None)  # a tenth of the steps: the scheduler's rungs
    tune_cmd.add_argument("--samples", type=int, default=36, help="trials (default 36)")
    tune_cmd.add_argument(
        "--max-steps",
        type=int,
        dest="max_steps",
        help="steps per trial (default: the problem's own)",
    )
    tune_cmd.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=DIST",
        help="a searched setting, e.g. gamma='{\"loguniform\": [1, 100]}' (default: gamma, "
        "lr_y, lr_ratio, inner_steps, optimizer); --set fixes a setting",
    )
    tune_cmd.add_argument("--workers", type=int, default=1, help="workers per trial")
    tune_cmd.add_argument("--gap-tol", type=float, default=0.1, help="ranking's gap tolerance")
    tune_cmd.add_argument(
        "--search-alg",
        choices=("auto", "random", "optuna"),
        default="auto",
        help="auto (default): Optuna's TPE when optuna is installed, else random",
    )
    tune_cmd.add_argument(
        "--scheduler",
        choices=("auto", "asha", "fifo", "pbt", "pb2"),
        default="auto",
        help="asha stops poor trials early; fifo runs every trial to the end; pbt / pb2 evolve "
        "gamma, lr_y and lr_ratio as the trials run (population-based training; the best "
        "trial's schedule goes to best_schedule.json); auto (default): asha with random "
        "search, fifo with optuna",
    )
    tune_cmd.add_argument(
        "--pbt-interval",
        type=int,
        metavar="K",
        help="with --scheduler pbt/pb2: exploit and explore every K steps (default: a tenth of "
        "the steps, a multiple of --report-every)",
    )
    tune_cmd.add_argument(
        "--search-seed",
        type=int,
        help="the searcher's seed (default: --seed, which also seeds every trial's data)",
    )
    tune_cmd.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="retries of a trial whose process dies (default 1)",
    )
    tune_cmd.add_argument("--name", default="sweep", help="the sweep's folder name in --out")
    tune_cmd.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep without rerunning finished trials",
    )
    tune_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")


def _diagnose_command(commands: Any) -> None:
    """``diagnose``: the flatness diagnostic's verdict on a problem."""
    diagnose_cmd = commands.add_parser(
        "diagnose",
        help="is PBGD-Free suitable for a problem? (the flatness diagnostic)",
        description="Run PBGD-Free from the problem's start for the run's horizon (--steps, "
        "default the problem's suggested steps), then certify its end point: PBGD-Free and "
        "alt_pbgd continue from there on the same batches, and what the correction still gains "
        "in phi(x) = f(x, y*(x)) on f's rows is judged against 5%% of the achievable improvement "
        "and the run-to-run noise. Prints the verdict: suitable (exit 0), unsuitable (exit 3) or "
        "uncertain (exit 0), the held-out comparison on its own line, and the early price's "
        "prediction. --at-end RUN_DIR certifies a finished run instead.",
        epilog=DIAGNOSE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _problem_options(
        diagnose_cmd,
        "a run setting (lr_x, lr_y, inner_steps, optimizer) or an option of br.diagnose "
        "(solve_steps, rho_ok, ...)",
        optional=True,
    )
    diagnose_cmd.add_argument(
        "--gamma", type=float, help="the penalty to diagnose at (default: the problem's, or 10)"
    )
    diagnose_cmd.add_argument(
        "--steps",
        type=int,
        help="the horizon of the run being judged (default: the problem's suggested steps)",
    )
    diagnose_cmd.add_argument(
        "--check-steps",
        type=int,
        help="how far both methods continue from PBGD-Free's end (default: a quarter of "
        "--steps, at least 100)",
    )
    diagnose_cmd.add_argument(
        "--replicas", type=int, help="batch orders of the end check (default 3; 1 on full batches)"
    )
    diagnose_cmd.add_argument(
        "--warmup", type=int, default=100, help="steps before the early price (default 100)"
    )
    diagnose_cmd.add_argument(
        "--every", type=int, default=25, help="settle checks every N steps (default 25)"
    )
    diagnose_cmd.add_argument(
        "--predict-only",
        action="store_true",
        help="only the early price (cheap; a prediction, not checked at the run's end)",
    )
    diagnose_cmd.add_argument(
        "--at-end",
        type=Path,
        metavar="RUN_DIR",
        help="certify a finished run (a solve or train --out folder) at its end point",
    )
    _threads_option(diagnose_cmd)
    diagnose_cmd.add_argument("--seed", type=int, default=0)
    _output_options(diagnose_cmd)
    diagnose_cmd.add_argument(
        "--address", help="run the diagnostic as a task on this Ray cluster (default: here)"
    )


def _compare_command(commands: Any) -> None:
    """``compare``: every method under one time budget."""
    compare_cmd = commands.add_parser(
        "compare",
        help="every method under one time budget, and which to use (a proof of concept)",
        description="Run every applicable method (or --methods) on the problem for --budget "
        "seconds each, --seeds times, as Ray Tune trials, beside the flatness diagnostic on the "
        "same start; print a table and a recommendation; write compare.parquet, curves.parquet, "
        "compare.json and compare.png to DIR/NAME. Quality is phi = f(x, y*(x)) on the "
        "problem's held-out data.",
    )
    _problem_options(
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
    compare_cmd.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write the comparison to DIR/NAME (default: ~/ray_results/NAME)",
    )
    compare_cmd.add_argument("--name", default="compare", help="the comparison's folder name")
    compare_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")
    _output_options(compare_cmd)


def _report_command(commands: Any) -> None:
    """``report``: the table and plot of a folder's runs."""
    report_cmd = commands.add_parser(
        "report",
        help="table and plot of the runs in a folder",
        description="Print a table of the runs in DIR (a tune sweep's folder, or a solve / "
        "train --out folder) and write DIR/report.png (needs matplotlib).",
        epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report_cmd.add_argument("folder", type=Path, metavar="DIR")
    report_cmd.add_argument("--gap-tol", type=float, default=0.1, help="ranking's gap tolerance")


def _options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The factory config and the user's solver options (``--set``, ``--steps``)."""
    settings = _key_values(args.set, "--set")
    problem_config = _key_values(args.config, "--config")
    reserved = sorted(set(settings) & {"steps", "seed", "method", "report_every", "data"})
    if reserved:
        raise ConfigError(
            f"--set {reserved[0]}=...: a run setting, not a solver setting; use --"
            f"{reserved[0].replace('_', '-')} instead"
        )
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.out is not None:
        check_output_path(args.out, "--out", is_file=False)
        check_writable(args.out, "--out")
        if args.command == "solve":
            check_run_files(args.out)
    return problem_config, settings


RUN_FILES = ("history.parquet", "result.pt", "run.json")


def check_run_files(folder: Path) -> None:
    """Before the run: every file it will write into ``folder`` can be written there (not a
    folder, FIFO or device in its place); a link there is replaced, never written through."""
    for name in RUN_FILES:
        check_output_path(Path(folder) / name, "--out file")


def _watch_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"on_unsuitable": args.on_unsuitable, "diagnose_window": args.diagnose_window}


def solve_problem(
    problem: str,
    problem_config: dict[str, Any],
    method: str,
    threads: int | None = None,
    **options: Any,
) -> Any:
    """``br.solve`` on a problem named as on the command line (also run as a Ray task), with
    torch's threads from the problem's size unless ``threads`` is given."""
    from bilevel_ray.runtime.train.driver import build_spec

    spec = build_spec(problem, problem_config)
    use_work_threads(spec.x0, spec.y0, threads)
    settings = {**SolverConfig.applicable(method, spec.defaults), **options}
    return solve(spec.problem, spec.x0, spec.y0, method=method, data=spec.data, **settings)


def _solve(args: argparse.Namespace) -> int:
    problem_config, settings = _options(args)
    if args.schedule is not None:
        problem_config, settings = _replay(args, problem_config, settings)
    args.seed = 0 if args.seed is None else args.seed
    run = dict(
        seed=args.seed,
        report_every=args.report_every,
        progress=_progress(args),
        **_watch_options(args),
        **settings,
    )
    if args.address is not None:
        from bilevel_ray.runtime.cluster.remote import on_cluster

        result = on_cluster(
            args.address,
            solve_problem,
            args.problem,
            problem_config,
            args.method,
            args.threads,
            **run,
        )
    else:
        result = solve_problem(args.problem, problem_config, args.method, args.threads, **run)
    _show(args, problem_config, result)
    return _status_code(result)


def _replay(
    args: argparse.Namespace, problem_config: dict[str, Any], settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run a ``best_schedule.json`` describes, under what the command line sets."""
    schedule = read_schedule_file(args.schedule)
    learned_on = str(schedule.get("problem"))
    if learned_on != args.problem and ":" not in learned_on + args.problem:
        raise ConfigError(
            f"--schedule {str(args.schedule)!r} was learned on {learned_on!r}, not "
            f"{args.problem!r}: run bilevel-ray solve {learned_on} --schedule {args.schedule}"
        )
    if args.method not in ("pbgd_free", schedule["method"]):
        raise ConfigError(
            f"--method {args.method}: --schedule {str(args.schedule)!r} holds settings of "
            f"{schedule['method']}; leave --method out"
        )
    args.method = schedule["method"]
    args.seed = schedule["seed"] if args.seed is None else args.seed
    settings = {"steps": schedule["steps"], **schedule["settings"], **settings}
    return {**schedule.get("problem_config", {}), **problem_config}, settings


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _progress(args: argparse.Namespace) -> bool:
    """Progress lines on stderr: unless --quiet, and only when stderr is a terminal (a log file
    or a pipe gets the results only)."""
    return not getattr(args, "quiet", False) and _stderr_is_terminal()


def _status_code(result: Any) -> int:
    """3 when the flatness diagnostic stopped the run, else 0."""
    if result.verdict is not None:
        print(f"  flatness: {result.verdict['verdict']}: {result.verdict['reason']}")
    if result.status == "unsuitable":
        print("  stopped: PBGD-Free is unsuitable here (--on-unsuitable stop)", file=sys.stderr)
        return 3
    return 0


# What `diagnose` prints of the settings it ran with: the run's, the check's, then the price's.
DIAGNOSE_SHOWN = (
    "gamma",
    "steps",
    "check_steps",
    "replicas",
    "threads",
    "warmup_steps",
    "every",
    "lr_x",
    "lr_y",
    "inner_steps",
    "optimizer",
    "solve_steps",
    "solve_lr",
    "solve_rtol",
    "solve_optimizer",
    "max_residual",
)


def _diagnose(args: argparse.Namespace) -> int:
    options = _key_values(args.set, "--set")
    if "progress" in options:
        raise ConfigError(
            "--set progress=...: not a setting; progress lines are on by default "
            "(on a terminal), --quiet turns them off"
        )
    if args.at_end is not None:
        return _certify(args, options)
    if args.problem is None:
        raise _UsageError(
            "diagnose needs PROBLEM (a built-in name or file.py:factory), or --at-end RUN_DIR "
            "to certify a finished run"
        )
    options.update(
        {
            "steps": args.steps,
            "check_steps": args.check_steps,
            "replicas": args.replicas,
            "warmup_steps": args.warmup,
            "every": args.every,
            "seed": args.seed,
            "predict_only": args.predict_only,
        }
    )
    options["progress"] = _progress(args)
    problem_config = _key_values(args.config, "--config")
    if args.address is not None:
        from bilevel_ray.runtime.cluster.remote import on_cluster

        verdict, used = on_cluster(
            args.address,
            diagnose_problem,
            args.problem,
            problem_config,
            args.gamma,
            args.threads,
            **options,
        )
    else:
        verdict, used = diagnose_problem(
            args.problem, problem_config, args.gamma, args.threads, **options
        )
    _print_verdict(args.problem, verdict, used)
    for key in ("dropped", "kept", "alpha_hat", "c_hat", "dropped_slope"):
        value = verdict.stats.get(f"flatness/{key}")
        if value is not None and value == value:  # NaN: no usable estimate of it
            print(f"  {key} = {value:.4g}")
    return 3 if verdict.verdict == "unsuitable" else 0


def _certify(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``diagnose --at-end RUN_DIR``: the end-of-run certificate of a finished run."""
    from bilevel_ray.runtime.local.diagnose_named import certify_run

    given = [
        flag
        for flag, value in (
            ("PROBLEM", args.problem),
            ("--set", options),
            ("--config", args.config),
            ("--predict-only", args.predict_only),
            ("--steps", args.steps),
            ("--gamma", args.gamma),
        )
        if value
    ]
    if given:
        raise ConfigError(
            "--at-end certifies a finished run with the problem, data and settings its run.json "
            "records; it takes --check-steps, --replicas, --threads and --quiet only (drop "
            + ", ".join(given)
            + ")"
        )
    verdict, used = certify_run(
        args.at_end,
        check_steps=args.check_steps,
        replicas=3 if args.replicas is None else args.replicas,
        threads=args.threads,
        progress=_progress(args),
    )
    _print_verdict(f"{args.at_end} (run of {used['problem']})", verdict, used)
    return 3 if verdict.verdict == "unsuitable" else 0


def _print_verdict(title: str, verdict: Any, used: dict[str, Any]) -> None:
    print(f"{title}: {verdict.verdict}")
    print(f"  {verdict.reason}")
    if verdict.held_out:
        print(f"  {verdict.held_out}")
    if verdict.prediction:
        print(f"  prediction: {verdict.prediction}")
    print(f"  recommendation: {verdict.recommendation}")
    shown = ", ".join(f"{k}={_value(used[k])}" for k in DIAGNOSE_SHOWN if k in used)
    print(f"  settings: {shown} (change any with --set KEY=VALUE, gamma with --gamma)")


def _train(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.train.driver import default_run_name, train

    problem_config, options = _options(args)  # br.train applies the problem's defaults
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
        progress=_progress(args),
        **_watch_options(args),
        **options,
    )
    if args.out is not None:
        args.out = args.out / name  # the run's own folder: its files never overwrite another's
    _show(args, problem_config, result)
    print(f"  run {name!r}: rerun with --name {name} (and the same --out) to resume or extend it")
    return _status_code(result)


def _tune(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.tune.driver import run_sweep
    from bilevel_ray.runtime.tune.space import space_from_json

    settings = _key_values(args.set, "--set")
    problem_config = _key_values(args.config, "--config")
    space = space_from_json(_key_values(args.space, "--space", strict=True)) if args.space else None
    if args.out is not None:
        check_writable(args.out, "--out")
    result = run_sweep(
        args.problem,
        problem_config=problem_config,
        method=args.method,
        search_space=space,
        num_samples=args.samples,
        steps=args.max_steps if args.max_steps is not None else args.steps,
        report_every=args.report_every,
        num_workers=args.workers,
        gap_tol=args.gap_tol,
        search_alg=None if args.search_alg == "random" else args.search_alg,
        scheduler=None if args.scheduler == "fifo" else args.scheduler,
        storage_path=args.out,
        name=args.name,
        resume=args.resume,
        seed=args.seed,
        search_seed=args.search_seed,
        pbt_interval=args.pbt_interval,
        address=args.address,
        max_failures=args.max_failures,
        progress=not args.quiet,
        **_watch_options(args),
        **settings,
    )
    failures = result.failure_summary()
    if result.best_config is None:
        # Nothing completed: no "best config" made of failed trials' numbers.
        print(f"error: no trial of the sweep completed; {failures}", file=sys.stderr)
        print(f"  wrote {result.path}/trials.parquet (each trial's reason in its error column)")
        return 1
    print(f"best config: {json.dumps(result.best_config, default=str)}")
    print(f"  eval/upper_loss = {result.best_metrics.get('eval/upper_loss')}")
    print(f"  eval/lower_gap = {result.best_metrics.get('eval/lower_gap')}")
    if failures is not None:
        print(f"  {failures}")
    note = flatness_note(result.trials.to_pylist(), result.best_metrics, args.on_unsuitable)
    if note is not None:
        print(f"  flatness: {note}")
    wrote = "trials.parquet, history.parquet"
    if (result.path / BEST_SCHEDULE).is_file():
        wrote += f", {BEST_SCHEDULE} (replay: bilevel-ray solve ... --schedule FILE)"
    print(f"  wrote {result.path}/{wrote}")
    return 0


def flatness_note(
    trials: list[dict[str, Any]], best: dict[str, Any], on_unsuitable: str | None
) -> str | None:
    """One sentence on what the flatness verdicts of a sweep's trials mean for its best config
    (None when the sweep ran without the watch or no trial was found unsuitable)."""
    verdicts = [t.get("flatness/verdict") for t in trials]
    flagged = sum(v == "unsuitable" for v in verdicts)
    if not flagged:
        return None
    judged = sum(v in ("suitable", "unsuitable", "uncertain") for v in verdicts)
    count = f"{flagged} of {judged} judged trials found PBGD-Free unsuitable"
    if best.get("flatness/verdict") != "unsuitable":
        return (
            f"{count}, but not the best one ({best.get('flatness/verdict') or 'not judged'}); "
            "its score is PBGD-Free's own."
        )
    meaning = {
        "fallback": "its score comes from the alt_pbgd fallback it switched to, so the best "
        "config is a good start for that switch, not for PBGD-Free alone",
        "stop": "it was stopped at the end of the diagnostic window, so its score is that of a "
        "short run",
        "warn": "its held-out loss is measured, but it is the best point PBGD-Free's biased "
        "updates reached, not the bilevel optimum; --method alt_pbgd (or --on-unsuitable "
        "fallback) may reach a lower one",
    }.get(on_unsuitable or "warn")
    return f"{count}, the best one included: {meaning}."


def _compare(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.compare.driver import compare
    from bilevel_ray.runtime.compare.output import format_table

    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    if args.out is not None:
        check_writable(args.out, "--out")
    result = compare(
        args.problem,
        problem_config=_key_values(args.config, "--config"),
        methods=methods,
        budget_s=args.budget,
        seeds=args.seeds,
        storage_path=args.out,
        name=args.name,
        address=args.address,
        progress=not args.quiet,
        rank_by=args.rank_by,
        **_key_values(args.set, "--set"),
    )
    print(format_table(result))
    print()
    print(result.recommendation["text"])
    print(f"  wrote {result.path}/compare.parquet, curves.parquet, compare.json, compare.png")
    return 0 if result.recommendation.get("method") is not None else 1


def _report(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.report.folder import report

    table, plot, note = report(args.folder, args.gap_tol)
    print(table)
    if plot is not None:
        print(f"wrote {plot}")
    if note is not None:
        print(note, file=sys.stderr)
    return 0


def switch_step(history: list[dict[str, Any]], method: str) -> int | None:
    """The step after which a run that started with ``method`` continued with another one (the
    last row logged with ``method`` is the switch's), or None when it never switched."""
    for before, row in itertools.pairwise(history):
        if before.get("method") == method and row.get("method") != method:
            return int(before["step"])
    return None


def _show(args: argparse.Namespace, problem_config: dict[str, Any], result: Any) -> None:
    """Print the final losses and iterates; with --out, write the run's files."""
    rows = result.history.to_pylist()
    last = rows[-1]
    used = last.get("method") or result.config.get("method", args.method)
    print(f"{used} on {args.problem}: {last['step']} steps, {last['time/elapsed_s']:.2f} s")
    switched = switch_step(rows, args.method) if used != args.method else None
    if switched is not None:
        print(
            f"  switched from {args.method} to {used} at step {switched} (--on-unsuitable "
            f"{args.on_unsuitable}: the flatness diagnostic found {args.method} unsuitable)"
        )
    for key in ("upper/loss", "lower/loss"):
        print(f"  {key} = {last[key]:.6g}")
    for level, params in (("x", result.x), ("y", result.y)):
        for name, value in params.items():
            shown = value.flatten()[:6].tolist()
            more = " ..." if value.numel() > 6 else ""
            print(f"  {level}[{name}] = {[round(v, 6) for v in shown]}{more}")
    if args.out is not None:
        write_parquet(result.history, args.out / "history.parquet")
        params = {"x": result.x, "y": result.y}
        atomic_write(args.out / "result.pt", lambda tmp: torch.save(params, tmp))
        run = {
            "command": args.command,
            "problem": args.problem,
            "problem_config": problem_config,
            "seed": args.seed,
            "steps": result.state.step,
            "method": used,
            "switched_at_step": switched,
            "settings": result.config,
        }
        text = json.dumps(run, indent=2, default=str) + "\n"
        atomic_write(args.out / "run.json", lambda tmp: tmp.write_text(text))
        print(f"  wrote {args.out}/history.parquet, result.pt, run.json")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.verbose_all or getattr(args, "verbose", False):
            os.environ["BILEVEL_RAY_VERBOSE"] = "1"  # read when Ray starts: before any Ray work
        if args.command != "report":
            use_process_cpus()
        commands = {
            "solve": _solve,
            "train": _train,
            "tune": _tune,
            "diagnose": _diagnose,
            "report": _report,
            "compare": _compare,
        }
        return commands[args.command](args)
    except (_UsageError, ConfigError) as err:
        print(f"error: {err}" if isinstance(err, ConfigError) else str(err), file=sys.stderr)
        return 2
    except DivergenceError as err:
        print(f"diverged: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
