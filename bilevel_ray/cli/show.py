"""``bilevel-ray show DIR``: the manifest of a run, a sweep or a comparison on one screen."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common
from bilevel_ray.errors import ConfigError

ORDER = 9  # its place in ``bilevel-ray --help``

EXAMPLES = """examples:
  bilevel-ray train regression --workers 1 --out runs --name q && bilevel-ray show runs/q
  bilevel-ray show runs/sweep                  # a sweep: its settings, data, best trial
"""

HELP = "what produced a result: its manifest on one screen, verified"

DESCRIPTION = (
    "Print DIR/manifest.json (a solve or train --out folder, a sweep's or a comparison's "
    "folder, a diagnose --out folder): the command, the code and environment, the problem and "
    "a fingerprint of its data, the settings and seeds, the times, the outcome, the outputs "
    "and the continuations; then whether the record verifies (its content matches its digest "
    "and every output its hash) and whether this account sealed it (its key's HMAC of the "
    "record: a record written elsewhere, or edited and its digest recomputed, is not sealed). "
    "Exit 0 when it verifies, 1 when it does not; a record that verifies but is not sealed by "
    "this account (a colleague's folder) exits 0, and rerun asks for --trust-record."
)


def add_parser(commands: Any) -> None:
    """``show``: a result's manifest on one screen."""
    show_cmd = common.new_command(commands, "show", HELP, DESCRIPTION, EXAMPLES)
    show_cmd.add_argument("folder", type=Path, metavar="DIR")


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.records.manifest import MANIFEST, RESTORE_FIX, read_manifest, sealed, verify
    from bilevel_ray.records.show import format_manifest

    if not args.folder.is_dir():
        raise ConfigError(
            f"show {str(args.folder)!r}: not a folder; give the folder of a result (a solve or "
            "train --out folder, a sweep's or a comparison's folder)"
        )
    manifest = read_manifest(args.folder, f"show {str(args.folder)!r}", RESTORE_FIX)
    if manifest is None:
        raise ConfigError(
            f"show {str(args.folder)!r}: the folder holds no {MANIFEST}; give the folder of a "
            "result (results written before manifests have none)"
        )
    problems = verify(args.folder, manifest)
    print(format_manifest(str(args.folder), manifest, problems, sealed(manifest)))
    return 1 if problems else 0
