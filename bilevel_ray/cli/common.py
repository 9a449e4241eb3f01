"""What the commands share: the one-line usage error, KEY=VALUE options, the option groups,
progress on a terminal, and a run's printed result and files. Nothing here imports torch or Ray
at import time (``bilevel-ray --help`` answers at once); the helpers that need them import them
when called."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.registry import BUILTIN_FACTORIES
from bilevel_ray.runtime.local.run_spec import RUN_OPTIONS

# The built-in problems' names, for the help text without importing them (and torch).
BUILTIN_NAMES = tuple(BUILTIN_FACTORIES)


class UsageError(Exception):
    """Bad command-line usage: reported in one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits 2; keep it one line
        raise UsageError(f"{self.prog}: {message} (see --help)")


# A KEY=VALUE's JSON is a number, a schedule or a search space: a few hundred characters, a few
# levels. Longer or deeper is no setting (and deep enough, a RecursionError in the parser).
MAX_VALUE_CHARS = 65_536
MAX_VALUE_DEPTH = 64


class _DuplicateKey(Exception):
    """A JSON object that names one key twice (json keeps the last one silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """How many objects and arrays deep ``value`` nests (a loop: the depth is the data's)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)) and depth <= MAX_VALUE_DEPTH + 1:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in _children(item))
    return deepest


def _children(item: dict | list) -> Any:
    return item.values() if isinstance(item, dict) else item


def parse_value(raw: str, where: str) -> Any:
    """``raw`` as JSON, refused (naming ``where``, e.g. ``--set gamma``) when it is longer than
    :data:`MAX_VALUE_CHARS`, nests deeper than :data:`MAX_VALUE_DEPTH` levels or names a key
    of one object twice; raises ``json.JSONDecodeError`` when it is not JSON."""
    if len(raw) > MAX_VALUE_CHARS:
        raise ConfigError(
            f"{where}: the value is {len(raw):,} characters, over the {MAX_VALUE_CHARS:,} a "
            "setting can be; give a shorter value"
        )
    deep = (
        f"{where}: the value nests deeper than {MAX_VALUE_DEPTH} levels of lists or objects; "
        "give a flatter value"
    )
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ConfigError(deep) from None
    except _DuplicateKey as err:
        raise ConfigError(
            f"{where}: the JSON object names the key {err.args[0]!r} twice (only the last "
            "would count); give each key once"
        ) from None
    if _depth(value) > MAX_VALUE_DEPTH:
        raise ConfigError(deep)
    return value


def key_values(pairs: Sequence[str], flag: str, strict: bool = False) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, lists, dicts, quoted strings) and taken
    as a plain string when it is not JSON, unless ``strict`` (then it must be JSON). A key
    given twice is refused (the last would silently win)."""
    out: dict[str, Any] = {}
    raws: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} gamma=20")
        if key in raws:
            raise ConfigError(
                f"{flag} {key}=...: given twice ({key}={_short(raws[key])} and "
                f"{key}={_short(raw)}); give each key once"
            )
        raws[key] = raw
        try:
            out[key] = parse_value(raw, f"{flag} {key}")
        except json.JSONDecodeError as err:
            if strict:
                raise ConfigError(
                    f"{flag} {key}={_short(raw)}: not valid JSON ({err.msg}); e.g. "
                    f"""{flag} {key}='{{"loguniform": [1, 100]}}'"""
                ) from None
            out[key] = raw
    return out


def _short(raw: str, limit: int = 60) -> str:
    """``raw`` quoted, cut to ``limit`` characters: a message shows it on one line."""
    return repr(raw if len(raw) <= limit else raw[: limit - 3] + "...")


def new_command(
    commands: Any, name: str, help: str, description: str, examples: str | None = None
) -> argparse.ArgumentParser:
    """The sub-command ``name``: its one-line ``help``, its ``description`` and its
    ``examples`` (printed as written, after the options)."""
    return commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def problem_options(
    command: argparse.ArgumentParser, set_help: str, optional: bool = False
) -> None:
    """PROBLEM, its factory's settings (``--config``) and what ``--set`` sets."""
    command.add_argument(
        "problem",
        nargs="?" if optional else None,
        help=f"built-in ({', '.join(BUILTIN_NAMES)}) or file.py:factory",
    )
    for flag, text in (
        ("--set", set_help),
        ("--config", "a setting of the problem factory (e.g. seed=3, dtype=float32)"),
    ):
        command.add_argument(
            flag, action="append", default=[], metavar="KEY=VALUE", help=f"{text}; repeatable"
        )


def output_options(command: argparse.ArgumentParser, quiet: bool = True) -> None:
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


def threads_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch's CPU threads in this process (default: 1 for a small problem, else every "
        "CPU this process may use)",
    )


def run_options(
    command: argparse.ArgumentParser, out_help: str, exclude: tuple[str, ...] = ()
) -> None:
    """The options ``solve``, ``train`` and ``tune`` share: the problem, the method, the steps,
    the output folder, and a flag for each run setting declared in
    :data:`~bilevel_ray.runtime.local.run_spec.RUN_OPTIONS` (but ``exclude``)."""
    problem_options(command, "a solver setting (lr_x, lr_y, gamma, inner_steps, optimizer, ...)")
    command.add_argument("--method", default="pbgd_free", help="solver (default: pbgd_free)")
    command.add_argument("--steps", type=int, help="iterations (default: the problem's own)")
    out_option(command, out_help)
    for name, option in RUN_OPTIONS.items():
        if not option.flag or name in exclude:
            continue
        default = option.default if option.cli_default is None else option.cli_default
        command.add_argument(
            "--" + name.replace("_", "-"),
            type=None if option.choices else type(default) if default is not None else str,
            choices=option.choices,
            default=default,
            metavar=None if option.choices else "S" if isinstance(default, float) else "N",
            help=f"{option.help} (default: {default})",
        )


def tracking_options(command: argparse.ArgumentParser) -> None:
    """``--mlflow``, ``--tensorboard`` and ``--experiment``: where the run's rows go besides
    its own files (Ray's callbacks, stoppers and runtime_env are Python keywords only)."""
    group = command.add_argument_group("tracking")
    group.add_argument(
        "--mlflow",
        metavar="URI",
        help="log the settings as parameters and every history row as metrics to this MLflow "
        "store: sqlite:///mlflow.db, a folder, or a tracking server's http://host:5000 "
        "(needs pip install 'bilevel_ray[mlflow]')",
    )
    group.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write every history row as TensorBoard event files to DIR/EXPERIMENT/RUN "
        "(needs pip install 'bilevel_ray[tensorboard]'); view: tensorboard --logdir DIR",
    )
    group.add_argument(
        "--experiment",
        metavar="NAME",
        help="the MLflow experiment, and TensorBoard's first folder (default: bilevel_ray)",
    )


def tracking_values(args: argparse.Namespace) -> dict[str, Any]:
    """The tracking flags as the entry points' keywords."""
    return {
        "mlflow": getattr(args, "mlflow", None),
        "tensorboard": getattr(args, "tensorboard", None),
        "experiment": getattr(args, "experiment", None),
    }


def out_option(command: argparse.ArgumentParser, help: str) -> None:
    command.add_argument("--out", type=Path, metavar="DIR", help=help)


def run_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings the command line set (or defaulted), by their keyword names."""
    return {
        name: getattr(args, name)
        for name, option in RUN_OPTIONS.items()
        if option.flag and hasattr(args, name)
    }


def read_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The factory config and the user's solver options (``--set``, ``--steps``)."""
    from bilevel_ray.runtime.local.output_files import check_output_path, check_writable

    settings = key_values(args.set, "--set")
    problem_config = key_values(args.config, "--config")
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


RUN_FILES = ("history.parquet", "result.pt", "run.json")  # and manifest.json


def check_run_files(folder: Path) -> None:
    """Before the run: every file it will write into ``folder`` can be written there (not a
    folder, FIFO or device in its place); a link there is replaced, never written through."""
    from bilevel_ray.runtime.local.output_files import check_output_path

    for name in (*RUN_FILES, "manifest.json"):
        check_output_path(Path(folder) / name, "--out file")


def shown_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress lines on stderr: unless --quiet, and only when stderr is a terminal (a log file
    or a pipe gets the results only)."""
    return not getattr(args, "quiet", False) and stderr_is_terminal()


def status_code(result: Any) -> int:
    """3 when the flatness diagnostic stopped the run, else 0."""
    if result.verdict is not None:
        print(f"  flatness: {result.verdict['verdict']}: {result.verdict['reason']}")
    if result.status == "unsuitable":
        print("  stopped: PBGD-Free is unsuitable here (--on-unsuitable stop)", file=sys.stderr)
        return 3
    return 0


def switch_step(history: list[dict[str, Any]], method: str) -> int | None:
    """The step after which a run that started with ``method`` continued with another one (the
    last row logged with ``method`` is the switch's), or None when it never switched."""
    for before, row in itertools.pairwise(history):
        if before.get("method") == method and row.get("method") != method:
            return int(before["step"])
    return None


def show_result(
    args: argparse.Namespace,
    problem_config: dict[str, Any],
    result: Any,
    started: str | None = None,
) -> None:
    """Print the final losses and iterates; with --out, write the run's files and its
    manifest (``solve``; ``train``'s run folder has its own, to which the files are added)."""
    import torch

    from bilevel_ray.runtime.local.history import write_parquet
    from bilevel_ray.runtime.local.output_files import atomic_write

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
    held_out = getattr(result, "held_out", None) or {}
    if held_out:
        print("  held-out: " + ", ".join(f"{k[5:]}={v:.5g}" for k, v in held_out.items()))
    tokens = last.get("time/tokens_per_s")
    if tokens is not None and tokens == tokens:
        print(f"  {tokens:,.0f} tokens/s over the last logged steps")
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
            "held_out": held_out,
        }
        text = json.dumps(run, indent=2, default=str) + "\n"
        atomic_write(args.out / "run.json", lambda tmp: tmp.write_text(text))
        from bilevel_ray.cli.manifests import record_solve, record_train_files

        if args.command == "solve":
            options = {**run_flag_values(args), "progress": progress_enabled(args)}
            record_solve(args, problem_config, result, options, started, RUN_FILES)
        else:
            record_train_files(args.out, RUN_FILES)
        print(f"  wrote {args.out}/history.parquet, result.pt, run.json, manifest.json")
