"""``bilevel-ray report DIR``: the runs of a folder as a table and a picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common

ORDER = 6  # its place in ``bilevel-ray --help``


REPORT_EXAMPLES = """examples:
  bilevel-ray tune representation --out runs && bilevel-ray report runs/sweep
  bilevel-ray solve toy-negative --out runs/neg && bilevel-ray report runs/neg
  bilevel-ray report runs/sweep --gap-tol 0.01     # rank with a tighter lower-level gap
"""


HELP = "table and plot of the runs in a folder"

DESCRIPTION = (
    "Print a table of the runs in DIR (a tune sweep's folder, or a solve / "
    "train --out folder) and write DIR/report.png (needs matplotlib)."
)


def add_parser(commands: Any) -> None:
    """``report``: the table and plot of a folder's runs."""
    report_cmd = common.new_command(commands, "report", HELP, DESCRIPTION, REPORT_EXAMPLES)
    report_cmd.add_argument("folder", type=Path, metavar="DIR")
    report_cmd.add_argument("--gap-tol", type=float, default=0.1, help="ranking's gap tolerance")


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.report.folder import report

    table, plot, note = report(args.folder, args.gap_tol)
    print(table)
    if plot is not None:
        print(f"wrote {plot}")
    if note is not None:
        print(note, file=sys.stderr)
    return 0
