"""A finished result's folder checked against its manifest before a command reads its files
(``export``, ``diagnose --at-end``): a file edited after the run (``run.json``'s settings, its
steps, ``result.pt``) would otherwise steer the command unseen.

A folder without a manifest is read, with a one-line note on stderr, not refused: folders written
before manifests have none and are still the user's results, and what reads them bounds and
checks every value it takes (a size bound, JSON, tensors only, shapes, the counts' ranges). The
note says that nothing vouches for the files."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.records.manifest import MANIFEST, read_manifest, verify

__all__ = ["check_folder"]


def check_folder(
    folder: str | os.PathLike[str], what: str, reads: Iterable[str] = ()
) -> Mapping[str, Any] | None:
    """The manifest of ``folder``, refused unless the folder verifies against it (its digest,
    every recorded output's hash) and records each of ``reads`` present (the files the command
    will read) among its outputs; None, said on stderr, for a folder without one. ``what``
    starts the messages (e.g. ``export 'runs/lm'``)."""
    fix = "restore the folder from the run's own copy, or rerun the run"
    manifest = read_manifest(folder, what, fix)
    if manifest is None:
        print(
            f"note: {what} has no {MANIFEST} (it predates manifests): its files could not be "
            "checked against the record of the run that wrote them",
            file=sys.stderr,
        )
        return None
    problems = verify(folder, manifest)
    outputs = manifest.get("outputs") or {}
    problems += [
        f"{name} is not among the outputs it records (the run did not finish as recorded, or "
        "the file was put there later)"
        for name in reads
        if name not in outputs and os.path.lexists(Path(folder) / name)
    ]
    if problems:
        raise ConfigError(
            f"{what} does not match its manifest ({'; '.join(problems)}): its files are not "
            f"the ones its run wrote; {fix} (bilevel-ray show says more)"
        )
    return manifest
