"""``bilevel-ray text-samples DIR``: a small text data set, tokenizer and Llama to fine-tune on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common

ORDER = 8  # its place in ``bilevel-ray --help``

EXAMPLES = """examples:
  bilevel-ray text-samples data/text
  bilevel-ray text-samples data/text --rows 2000 --hidden 128 --layers 4
"""

HELP = "write sample text data, a tokenizer and a small model (no download)"

DESCRIPTION = (
    "Write a preference set and an instruction set in words (every format the peft-dpo-sft "
    "problem reads), a tokenizer trained on them and a small random Llama into DIR, then print "
    "the command that fine-tunes on them. DIR must be new, empty or an earlier text-samples DIR."
)


def add_parser(commands: Any) -> None:
    """``text-samples``: the sample files."""
    cmd = common.new_command(commands, "text-samples", HELP, DESCRIPTION, EXAMPLES)
    cmd.add_argument("folder", type=Path, metavar="DIR")
    cmd.add_argument("--rows", type=int, default=600, help="rows per set (default 600)")
    cmd.add_argument("--seed", type=int, default=0, help="draws the rows and the weights")
    cmd.add_argument("--hidden", type=int, default=64, help="model width (default 64)")
    cmd.add_argument("--layers", type=int, default=2, help="model layers (default 2)")
    cmd.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.text.samples import write_samples, written_lines

    files = write_samples(
        args.folder,
        rows=args.rows,
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
    )
    for line in written_lines(files, args.layers, args.hidden):
        print(line)
    return 0
