"""``bilevel-ray tune``: a Ray Tune sweep over gamma and the step sizes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bilevel_ray.cli import common

ORDER = 3  # its place in ``bilevel-ray --help``


TUNE_EXAMPLES = """examples:
  bilevel-ray tune representation --max-steps 600 --out runs
  bilevel-ray tune representation --max-steps 600 --scheduler pbt --out runs --name pbt
  bilevel-ray solve representation --schedule runs/pbt/best_schedule.json
  bilevel-ray tune representation --space 'gamma={"loguniform": [5, 50]}' \\
      --space 'lr_y={"loguniform": [1e-4, 1e-2]}' --set optimizer='"adam"' --out runs
  bilevel-ray tune representation --out runs --resume     # finish an interrupted sweep
  bilevel-ray report runs/sweep
"""


HELP = "search gamma and the step sizes with Ray Tune"

DESCRIPTION = (
    "Search the penalty schedule and step sizes with Ray Tune (Optuna's TPE when "
    "optuna is installed, else random search with ASHA): each trial is scored on held-out "
    "data (upper loss, lower-level gap); "
    "writes DIR/NAME/trials.parquet, history.parquet, the best trial's parameters and "
    "manifest.json and prints the best config."
)


def add_parser(commands: Any) -> None:
    """``tune``: a Ray Tune sweep over gamma and the step sizes."""
    tune_cmd = common.new_command(commands, "tune", HELP, DESCRIPTION, TUNE_EXAMPLES)
    common.run_options(
        tune_cmd,
        "write the sweep (trials.parquet, history.parquet, Tune's state) to DIR/NAME "
        "(default: ~/ray_results/NAME); bilevel-ray report DIR/NAME shows it",
        exclude=("checkpoint_every",),  # a population checkpoints every --pbt-interval
    )
    common.output_options(tune_cmd)
    tune_cmd.set_defaults(report_every=None)  # a tenth of the steps: the scheduler's rungs
    tune_cmd.add_argument(
        "--samples",
        type=int,
        help="trials (default 36; with --scheduler pbt/pb2, as many as this machine's memory and "
        "CPUs hold, at most 36: a population runs all at once)",
    )
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
    tune_cmd.add_argument(
        "--trust-state",
        action="store_true",
        help="with --resume: resume a sweep whose pickled Tune state this account did not seal "
        "(one you ran on another machine); it runs any code that state holds",
    )
    tune_cmd.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")
    common.tracking_options(tune_cmd)


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.local.output_files import check_writable
    from bilevel_ray.runtime.tune.driver import run_sweep
    from bilevel_ray.runtime.tune.lineage import BEST_SCHEDULE
    from bilevel_ray.runtime.tune.record import BEST_RESULT
    from bilevel_ray.runtime.tune.space import space_from_json

    settings = common.key_values(args.set, "--set")
    problem_config = common.key_values(args.config, "--config")
    space = (
        space_from_json(common.key_values(args.space, "--space", strict=True))
        if args.space
        else None
    )
    if args.out is not None:
        check_writable(args.out, "--out")
    result = run_sweep(
        args.problem,
        problem_config=problem_config,
        method=args.method,
        search_space=space,
        num_samples=args.samples,
        steps=args.max_steps if args.max_steps is not None else args.steps,
        num_workers=args.workers,
        gap_tol=args.gap_tol,
        search_alg=None if args.search_alg == "random" else args.search_alg,
        scheduler=None if args.scheduler == "fifo" else args.scheduler,
        storage_path=args.out,
        name=args.name,
        resume=args.resume,
        trust_state=args.trust_state,
        search_seed=args.search_seed,
        pbt_interval=args.pbt_interval,
        address=args.address,
        max_failures=args.max_failures,
        progress=not args.quiet,
        **common.tracking_values(args),
        **common.run_flag_values(args),
        **settings,
    )
    failures = result.failure_summary()
    if result.best_config is None:
        # Nothing completed: no "best config" made of failed trials' numbers.
        said = failures or result.status
        print(f"error: no trial of the sweep completed; {said}", file=sys.stderr)
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
    wrote = "trials.parquet, history.parquet, manifest.json"
    if (result.path / BEST_RESULT).is_file():
        wrote += f", {BEST_RESULT} (the best trial's parameters)"
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
