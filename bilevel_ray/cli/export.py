"""``bilevel-ray export RUN_DIR --out DIR``: a finished peft-dpo-sft run's LoRA adapter (peft's
format), trained head and base model, loadable without bilevel_ray."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common

ORDER = 7  # its place in ``bilevel-ray --help``


EXPORT_EXAMPLES = """examples:
  bilevel-ray solve peft-dpo-sft --steps 200 --out runs/lm && bilevel-ray export runs/lm --out lm
  bilevel-ray solve peft-dpo-sft --config model=path/to/llama --out runs/l && \\
      bilevel-ray export runs/l --out adapter
"""


HELP = "write a peft-dpo-sft run's LoRA adapter and head in peft's format"

DESCRIPTION = (
    "Rebuild the model of a finished peft-dpo-sft run (a solve or train --out folder), put its "
    "trained LoRA adapters (x) and output head (y) in place, and write to the new folder DIR: "
    "adapter_config.json and adapter_model.safetensors (peft's format), head.safetensors (the "
    "head, trained apart from the frozen input embeddings), the tokenizer when the run had one, "
    "base_model/ when the run built its model from a config, export.json and README.md (the "
    "lines that load it with transformers and peft)."
)


def add_parser(commands: Any) -> None:
    """``export``: a run's adapter and head, in peft's format."""
    export_cmd = common.new_command(commands, "export", HELP, DESCRIPTION, EXPORT_EXAMPLES)
    export_cmd.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's --out folder")
    export_cmd.add_argument(
        "--out", type=Path, metavar="DIR", required=True, help="a new (or empty) folder"
    )


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.runtime.local.export import EXPORT_FILE, README_FILE, export

    out = export(args.run_dir, args.out)
    summary = json.loads((out / EXPORT_FILE).read_text())
    print(f"exported {args.run_dir} ({summary['method']}, {summary['steps']} steps) to {out}")
    for name, what in summary["files"].items():
        print(f"  wrote {out / name}{'/' if (out / name).is_dir() else ''}: {what}")
    if not summary["base_model_in_export"]:
        print(f"  base model: {summary['base_model']} (the run's model folder)")
    first = next(line for line in summary["load"] if line.startswith("base = "))
    print(f"  load it (all lines in {out / README_FILE}): {first}")
    return 0
