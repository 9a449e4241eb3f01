"""The ``bilevel-ray`` command.

    bilevel-ray solve PROBLEM [--method M] [--steps N] [--set KEY=VALUE ...] [--out DIR]

PROBLEM is a built-in name (toy-negative, toy-positive, quadratic, regression) or
``path/to/file.py:factory`` / ``package.module:factory``. Exit codes: 0 success; 2 bad usage or
bad input (one message on stderr, no traceback); 1 anything else (a diverged run included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.problems import BUILTIN_PROBLEMS, load_factory
from bilevel_ray.runtime.checkpoint import check_writable
from bilevel_ray.runtime.history import write_parquet
from bilevel_ray.runtime.local import solve

__all__ = ["main"]

EXAMPLES = """examples:
  bilevel-ray solve toy-negative
  bilevel-ray solve toy-negative --method alt_pbgd --set inner_steps=10 --out runs/alt
  bilevel-ray solve quadratic --steps 500 --set gamma=40 --set optimizer='"adam"'
  bilevel-ray solve my_problem.py:make --config n=5000 --set 'lr_x={"kind": "linear",
      "init_value": 0.1, "end_value": 0.01, "transition_steps": 1000}'
"""


class _UsageError(Exception):
    """Bad command-line usage: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits 2; keep it one line
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, lists, dicts, quoted strings) and taken
    as a plain string when it is not JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} gamma=20")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bilevel-ray",
        description="Single-loop bilevel optimization (PBGD-Free) and its baselines.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "solve",
        help="solve a problem in this process (no Ray)",
        description="Solve min_x f(x, y*(x)) in this process and print the result.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("problem", help=f"built-in ({', '.join(BUILTIN_PROBLEMS)}) or file.py:factory")
    run.add_argument("--method", default="pbgd_free", help="solver (default: pbgd_free)")
    run.add_argument("--steps", type=int, help="iterations (default: the problem's own)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--report-every", type=int, default=100, help="log every N steps")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a solver setting (lr_x, lr_y, gamma, inner_steps, optimizer, ...); repeatable",
    )
    run.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the problem factory (e.g. seed=3, dtype=float32); repeatable",
    )
    run.add_argument("--out", type=Path, help="write history.parquet, result.pt and run.json here")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _solve(args: argparse.Namespace) -> int:
    settings = _key_values(args.set, "--set")
    problem_config = _key_values(args.config, "--config")
    spec = load_factory(args.problem)(problem_config)
    reserved = sorted(set(settings) & {"steps", "seed", "method", "report_every", "data"})
    if reserved:
        raise ConfigError(
            f"--set {reserved[0]}=...: a run setting, not a solver setting; use --"
            f"{reserved[0].replace('_', '-')} instead"
        )
    options = {**SolverConfig.applicable(args.method, spec.defaults), **settings}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.out is not None:
        check_writable(args.out, "--out")
    result = solve(
        spec.problem,
        spec.x0,
        spec.y0,
        method=args.method,
        data=spec.data,
        seed=args.seed,
        report_every=args.report_every,
        progress=not args.quiet,
        **options,
    )
    last = result.history.to_pylist()[-1]
    print(f"{args.method} on {args.problem}: {last['step']} steps, {last['time/elapsed_s']:.2f} s")
    for key in ("upper/loss", "lower/loss"):
        print(f"  {key} = {last[key]:.6g}")
    for level, params in (("x", result.x), ("y", result.y)):
        for name, value in params.items():
            shown = value.flatten()[:6].tolist()
            more = " ..." if value.numel() > 6 else ""
            print(f"  {level}[{name}] = {[round(v, 6) for v in shown]}{more}")
    if args.out is not None:
        write_parquet(result.history, args.out / "history.parquet")
        torch.save({"x": result.x, "y": result.y}, args.out / "result.pt")
        run = {
            "problem": args.problem,
            "problem_config": problem_config,
            "seed": args.seed,
            "steps": result.state.step,
            "settings": result.config,
        }
        (args.out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
        print(f"  wrote {args.out}/history.parquet, result.pt, run.json")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _solve(args)
    except (_UsageError, ConfigError) as err:
        print(f"error: {err}" if isinstance(err, ConfigError) else str(err), file=sys.stderr)
        return 2
    except DivergenceError as err:
        print(f"diverged: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
