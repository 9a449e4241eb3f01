"""A sweep's manifest and what it keeps of what was learned.

The manifest is checked against a resumed sweep (the data, the settings, the record itself)
and written before Ray starts; at the end it records the trials' outcome, the hashes of the
sweep's files and the replay of its best trial. Each trial keeps its parameters as of its
latest report (``params/<trial id>.pt``); the best trial's become ``best_result.pt`` (the
format of a run's ``result.pt``) and the others are removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bilevel_ray.records.continuation import check_continuation
from bilevel_ray.records.manifest import new_manifest
from bilevel_ray.records.recorder import Recorder
from bilevel_ray.records.run_record import replay_entry
from bilevel_ray.runtime.local.output_files import atomic_write
from bilevel_ray.runtime.tune.folder import SWEEP_FILE
from bilevel_ray.runtime.tune.lineage import BEST_SCHEDULE
from bilevel_ray.runtime.tune.plan import SweepPlan
from bilevel_ray.runtime.tune.trial import PARAMS_FOLDER

__all__ = ["BEST_RESULT", "end_record", "start_record"]

BEST_RESULT = "best_result.pt"
OUTPUTS = (SWEEP_FILE, "trials.parquet", "history.parquet", BEST_SCHEDULE, BEST_RESULT)
WAY_OUT = (
    "Use a new --name (name=...) for a sweep of this problem, data and settings, or resume the "
    "sweep with its own"
)


def start_record(plan: SweepPlan, resume: bool, keywords: dict[str, Any]) -> Recorder:
    """The sweep's manifest, written before Ray starts: a resumed sweep's continued once the
    call is checked against it (the differences named)."""
    record = plan.record
    manifest = new_manifest(
        "tune",
        problem=record["problem"],
        problem_config=plan.problem_config,
        data=plan.fingerprint,
        settings={
            "method": plan.method,
            "sweep": {
                k: v for k, v in record.items() if k not in ("problem", "problem_config", "method")
            },
            "run": plan.run_options,
            "gap_tol": plan.gap_tol,
            "gap_steps": plan.gap_steps,
            "placement": plan.placement.to_dict(),
        },
        seeds={
            "run": record["seed"],
            "search": record["search_seed"],
            "problem": plan.problem_config.get("seed"),
        },
        keywords=keywords,
    )
    if resume and plan.path.exists():
        what = f"sweep {str(plan.path)!r}"
        manifest = check_continuation(plan.path, manifest, what=what, way_out=WAY_OUT)
    return Recorder(plan.path, manifest, OUTPUTS).start()


def end_record(recorder: Recorder, plan: SweepPlan, result: Any) -> None:
    """Keep the best trial's parameters, then end the manifest: the trials' outcome, the
    replay of the best trial, every file's hash."""
    best = result.best_metrics if result.best_config is not None else {}
    kept = _keep_best(plan.path, best.get("trial_id"), recorder.manifest)
    outcome: dict[str, Any] = {
        "status": "completed" if best else "failed",
        "trials": dict(result.counts),
        "failures": result.failure_summary(),
    }
    if best:
        outcome["best"] = {
            "trial_id": best.get("trial_id"),
            "step": best.get("step"),
            **{k: v for k, v in best.items() if k.startswith(("eval/", "flatness/"))},
        }
        outcome["best_parameters"] = BEST_RESULT if kept else None
    recorder.manifest["replay"] = _replay(plan, best) if kept else None
    recorder.end(outcome)


def _keep_best(folder: Path, trial_id: str | None, manifest: dict[str, Any]) -> bool:
    """``best_result.pt`` from the best trial's parameters (the others removed); True when it
    holds that trial's."""
    source = folder / PARAMS_FOLDER / f"{trial_id}.pt"
    kept = False
    if trial_id is not None and source.is_file():
        atomic_write(folder / BEST_RESULT, lambda tmp: shutil.copyfile(source, tmp))
        kept = True
    elif trial_id is not None and (folder / BEST_RESULT).is_file():
        # A finished sweep resumed: its best trial's file was kept before, its own removed.
        history = manifest.get("continuations") or [{}]
        before = ((history[-1].get("previous_outcome") or {}).get("best") or {}).get("trial_id")
        kept = before == trial_id
    shutil.rmtree(folder / PARAMS_FOLDER, ignore_errors=True)
    if not kept:
        (folder / BEST_RESULT).unlink(missing_ok=True)
    return kept


def _replay(plan: SweepPlan, best: dict[str, Any]) -> dict[str, Any] | None:
    """The best trial as a run from scratch: its settings as the schedule replays them, the
    sweep's seed, its steps up to its last report."""
    path = plan.path / BEST_SCHEDULE
    if not path.is_file():
        return None
    schedule = json.loads(path.read_text())
    run = {**plan.run_options, "checkpoint_every": 0}  # a population's saves do not steer it
    entry = replay_entry(
        f"best trial {best.get('trial_id')}",
        schedule["method"],
        int(best.get("step") or schedule["steps"]),
        schedule["settings"],
        run,
        BEST_RESULT,
        threads=1,  # a one-worker trial's process holds one CPU
    )
    return {"runs": [entry]}
