"""``bilevel-ray diagnose``: the flatness verdict on a problem, or ``--at-end`` on a finished
run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common
from bilevel_ray.errors import ConfigError

ORDER = 4  # its place in ``bilevel-ray --help``


DIAGNOSE_EXAMPLES = """examples:
  bilevel-ray diagnose toy-negative                  # unsuitable: exit code 3
  bilevel-ray diagnose toy-positive --gamma 16 --set lr_y=0.01 --set inner_steps=2
  bilevel-ray diagnose representation --steps 1000 --address auto
  bilevel-ray diagnose regression --predict-only     # only the early price (a prediction)
  bilevel-ray diagnose --at-end runs/q                # certify a finished pbgd_free run
  bilevel-ray solve toy-negative --on-unsuitable fallback     # switch to alt_pbgd if unsuitable
"""


HELP = "is PBGD-Free suitable for a problem? (the flatness diagnostic)"

DESCRIPTION = (
    "Run PBGD-Free from the problem's start for the run's horizon (--steps, "
    "default the problem's suggested steps), then certify its end point: PBGD-Free and "
    "alt_pbgd continue from there on the same batches, and what the correction still gains "
    "in phi(x) = f(x, y*(x)) on f's rows is judged against 5% of the achievable improvement "
    "and the run-to-run noise. Prints the verdict: suitable (exit 0), unsuitable (exit 3) or "
    "uncertain (exit 0), the held-out comparison on its own line, and the early price's "
    "prediction. --at-end RUN_DIR certifies a finished run instead."
)


def add_parser(commands: Any) -> None:
    """``diagnose``: the flatness diagnostic's verdict on a problem."""
    diagnose_cmd = common.new_command(commands, "diagnose", HELP, DESCRIPTION, DIAGNOSE_EXAMPLES)
    common.problem_options(
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
    common.threads_option(diagnose_cmd)
    common.out_option(
        diagnose_cmd, "write verdict.json (the verdict and its settings) and manifest.json to DIR"
    )
    diagnose_cmd.add_argument("--seed", type=int, default=0)
    diagnose_cmd.add_argument(
        "--trust-record",
        action="store_true",
        help="with --at-end: certify a run folder this account did not seal whose problem is "
        "code (file.py:factory); certifying imports that code",
    )
    common.output_options(diagnose_cmd)
    diagnose_cmd.add_argument(
        "--address", help="run the diagnostic as a task on this Ray cluster (default: here)"
    )


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


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.records.manifest import now

    started = now()
    options = common.key_values(args.set, "--set")
    if "progress" in options:
        raise ConfigError(
            "--set progress=...: not a setting; progress lines are on by default "
            "(on a terminal), --quiet turns them off"
        )
    if args.out is not None:
        from bilevel_ray.cli.manifests import check_diagnosis_folder

        check_diagnosis_folder(args.out)
    if args.at_end is not None:
        return _certify(args, options, started)
    if args.trust_record:
        raise ConfigError(
            "--trust-record goes with --at-end RUN_DIR (a run folder another account wrote); "
            "drop it"
        )
    if args.problem is None:
        raise ConfigError(
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
    options["progress"] = common.progress_enabled(args)
    from bilevel_ray.runtime.local.diagnose_named import diagnose_problem

    problem_config = common.key_values(args.config, "--config")
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
    _write(args, args.problem, problem_config, verdict, used, started)
    return 3 if verdict.verdict == "unsuitable" else 0


def _write(
    args: argparse.Namespace,
    problem: str,
    problem_config: dict[str, Any],
    verdict: Any,
    used: dict[str, Any],
    started: str,
) -> None:
    if args.out is not None:
        from bilevel_ray.cli.manifests import record_diagnosis

        record_diagnosis(args.out, problem, problem_config, verdict, used, started)
        print(f"  wrote {args.out}/verdict.json, manifest.json")


def _certify(args: argparse.Namespace, options: dict[str, Any], started: str) -> int:
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
    # Checked before the run's folder is read and its problem built (certify_run checks again).
    from bilevel_ray.diagnostics.end_check import end_check_problems

    replicas = 3 if args.replicas is None else args.replicas
    problems = end_check_problems(args.check_steps, replicas)
    if problems:
        raise ConfigError(problems)
    verdict, used = certify_run(
        args.at_end,
        check_steps=args.check_steps,
        replicas=replicas,
        threads=args.threads,
        progress=common.progress_enabled(args),
        trust_record=args.trust_record,
    )
    _print_verdict(f"{args.at_end} (run of {used['problem']})", verdict, used)
    _write(args, used["problem"], used.get("problem_config") or {}, verdict, used, started)
    return 3 if verdict.verdict == "unsuitable" else 0


def _print_verdict(title: str, verdict: Any, used: dict[str, Any]) -> None:
    print(f"{title}: {verdict.verdict}")
    print(f"  {verdict.reason}")
    if verdict.held_out:
        print(f"  {verdict.held_out}")
    if verdict.prediction:
        print(f"  prediction: {verdict.prediction}")
    print(f"  recommendation: {verdict.recommendation}")
    shown = ", ".join(f"{k}={common.shown_value(used[k])}" for k in DIAGNOSE_SHOWN if k in used)
    print(f"  settings: {shown} (change any with --set KEY=VALUE, gamma with --gamma)")
