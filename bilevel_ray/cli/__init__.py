"""The ``bilevel-ray`` command.

    bilevel-ray solve PROBLEM [--method M] [--steps N] [--set KEY=VALUE ...] [--out DIR]
    bilevel-ray train PROBLEM --workers N [--gpu auto|yes|no] [--checkpoint-every K] [--out DIR]
    bilevel-ray tune PROBLEM [--samples N] [--max-steps N] [--out DIR]
    bilevel-ray diagnose PROBLEM [--gamma G]
    bilevel-ray compare PROBLEM [--methods M,M,...] [--budget SECONDS] [--seeds N] [--out DIR]
    bilevel-ray report DIR
    bilevel-ray show DIR
    bilevel-ray rerun DIR [--out NEW]

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
import importlib
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bilevel_ray.cli.common import Parser, UsageError
from bilevel_ray.cli.solve import EXAMPLES
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.records.invocation import command_line

__all__ = ["COMMANDS", "main", "parser"]


def _commands() -> dict[str, Any]:
    """Every module of this package with ``add_parser`` and ``run`` is a command of its name
    (``_`` written ``-``: ``text_samples`` is ``text-samples``), in its ``ORDER``: a new command
    is one new file here."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser") and hasattr(module, "run"):
            name = info.name.replace("_", "-")
            found.append((getattr(module, "ORDER", 99), name, module))
    return {name: module for _, name, module in sorted(found)}


COMMANDS = _commands()


def parser() -> argparse.ArgumentParser:
    """The whole command line: one sub-command per module of this package."""
    top = Parser(
        prog="bilevel-ray",
        description="Single-loop bilevel optimization (PBGD-Free) and its baselines.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--verbose",
        dest="verbose_all",
        action="store_true",
        help="also show Ray's own log lines (sets BILEVEL_RAY_VERBOSE=1); also after a command",
    )
    commands = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return top


_KEPT = "the work stopped where it was; what it had saved (checkpoints, finished runs) is kept"
_signals: list[int] = []  # SIGTERMs received: Ray may re-raise the interrupt as a plain one


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM ends a command as Ctrl-C does: the work stops where it is, its record says
    "interrupted", and the command exits with 128 + 15."""
    _signals.append(signum)
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signals.clear()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_interrupts():
        try:
            return _main(argv)
        except KeyboardInterrupt:
            if _signals:
                print(f"terminated (SIGTERM): {_KEPT}", file=sys.stderr)
                return 128 + signal.SIGTERM
            print(f"interrupted (Ctrl-C): {_KEPT}", file=sys.stderr)
            return 130


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.verbose_all or getattr(args, "verbose", False):
            os.environ["BILEVEL_RAY_VERBOSE"] = "1"  # read when Ray starts: before any Ray work
        if args.command not in ("report", "show"):  # they read files: no torch needed
            from bilevel_ray.runtime.local.threads import use_process_cpus

            use_process_cpus()
        with command_line(argv):  # what the manifests of this command's results record
            return COMMANDS[args.command].run(args)
    except (UsageError, ConfigError) as err:
        print(f"error: {err}" if isinstance(err, ConfigError) else str(err), file=sys.stderr)
        return 2
    except DivergenceError as err:
        print(f"diverged: {err}", file=sys.stderr)
        return 1
