"""A ``br.train`` run's manifest: checked against the call that continues the run (the same
name again) before any work, written as the run starts, and ended with the outcome, the final
parameters (``result.pt``) and the hashes of the run's result files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bilevel_ray.records.continuation import check_continuation
from bilevel_ray.records.manifest import MANIFEST
from bilevel_ray.records.recorder import Recorder
from bilevel_ray.records.run_record import PARAMS, run_manifest, run_outcome, solver_dict
from bilevel_ray.runtime.local.checkpoint import LOCAL_CHECKPOINT, group_checkpoints
from bilevel_ray.runtime.local.output_files import atomic_write, previous_path
from bilevel_ray.runtime.local.run_spec import Placement, RunSpec

__all__ = ["WAY_OUT", "end_record", "start_record"]

WAY_OUT = (
    "Use a new --name (name=...) for a run with these settings, or rerun the run's own "
    "command with only --steps changed to extend it"
)
# The run's result. Its checkpoints are working state, not outputs: a resume checks them itself
# (and falls back from a damaged one to the one before), and each continuation rewrites them.
OUTPUTS = (PARAMS,)


def start_record(
    folder: Any,
    *,
    factory: Any,
    problem_config: dict[str, Any],
    fingerprint: dict[str, Any],
    settings: Any,
    run: RunSpec,
    run_options: dict[str, Any],
    placement: Placement,
    in_process: bool,
    keywords: dict[str, Any],
) -> Recorder | None:
    """Refuse a call that would change the trajectory of the run in ``folder`` (the differences
    named); else write its manifest (continued, when the run exists) and return its recorder.
    None for a run on remote storage: Train writes that, not this process."""
    if not isinstance(folder, Path):
        return None
    placed = {**placement.to_dict(), "runtime": "in process" if in_process else "worker group"}
    manifest = run_manifest(
        "train",
        problem=factory,
        problem_config=problem_config,
        fingerprint=fingerprint,
        method=settings.method,
        steps=run.steps,
        solver=solver_dict(settings),
        run=run_options,
        placement=placed,
        keywords=keywords,
    )
    if _holds_run(folder):
        what = f"run {str(folder)!r}"
        manifest = check_continuation(folder, manifest, what=what, way_out=WAY_OUT)
    return Recorder(folder, manifest, OUTPUTS).start()


def _holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run to continue (a record, a checkpoint, a result)."""
    names = (MANIFEST, LOCAL_CHECKPOINT, previous_path(LOCAL_CHECKPOINT).name, "run.json")
    return any((folder / n).is_file() for n in names) or bool(group_checkpoints(folder))


def end_record(recorder: Recorder | None, result: Any) -> None:
    """The run's final x and y in ``result.pt`` (as ``solve --out`` writes it), and its
    manifest ended: the outcome and every file's hash."""
    if recorder is None:
        return
    folder = recorder.folder
    params = {"x": result.x, "y": result.y}
    atomic_write(folder / PARAMS, lambda tmp: torch.save(params, tmp))
    recorder.end(run_outcome(result, recorder.manifest["settings"]["method"]))
