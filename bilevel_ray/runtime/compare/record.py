"""A comparison's manifest and what it keeps of what was learned.

The manifest is written as the runs start (a resumed comparison's continued, with the
continuation in its history: :mod:`bilevel_ray.records.continuation`) and ended with the
outcome (the recommendation, the ranking, the methods that failed), the hashes of the
comparison's files and the replay of each method's kept run. Each run leaves its final
parameters in ``params/``; each method's best run (the completed seed with the lowest final
phi: the parameters are the final point's) is kept as ``results/<method>.pt`` (the format of a
run's ``result.pt``), the others are removed.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from bilevel_ray.config import SolverConfig
from bilevel_ray.records.continuation import check_continuation
from bilevel_ray.records.manifest import new_manifest
from bilevel_ray.records.recorder import Recorder
from bilevel_ray.records.run_record import replay_entry, solver_dict
from bilevel_ray.runtime.compare.trial import PARAMS_FOLDER
from bilevel_ray.runtime.local.output_files import atomic_write

__all__ = ["RESULTS", "end_record", "start_record"]

RESULTS = "results"
OUTPUTS = ("compare.parquet", "curves.parquet", "compare.json", "compare.png")
WAY_OUT = (
    "Use a new --name (name=...) for a comparison with these settings, or resume it with the "
    "arguments it was started with (bilevel-ray show lists them)"
)


def start_record(
    folder: Path,
    factory: Any,
    problem_config: dict[str, Any],
    fingerprint: dict[str, Any],
    arguments: dict[str, Any],
    fixed: dict[str, Any],
    settings: dict[str, dict[str, Any]],
    started: str,
    resume: bool = False,
) -> Recorder:
    """The comparison's manifest as its runs start (``settings``: each method's keywords); a
    resumed comparison's continued, once the call is checked against it (every difference
    named, as ``tune --resume``'s)."""
    solver = {m: solver_dict(SolverConfig(method=m, **s)) for m, s in settings.items()}
    manifest = new_manifest(
        "compare",
        problem=factory,
        problem_config=problem_config,
        data=fingerprint,
        settings={
            **{k: v for k, v in arguments.items() if k not in ("storage_path", "name")},
            "fixed": fixed,
            "solver": solver,
        },
        seeds={"runs": list(range(arguments["seeds"])), "problem": problem_config.get("seed")},
        keywords=fixed,
        started=started,
    )
    if resume:
        what = f"comparison {str(folder)!r}"
        manifest = check_continuation(folder, manifest, what=what, way_out=WAY_OUT)
    return Recorder(folder, manifest, OUTPUTS).start()


def end_record(recorder: Recorder, runs: list[dict[str, Any]], result: Any, plan: Any) -> None:
    """Keep each method's best run's parameters, then end the manifest."""
    kept = _keep_best(recorder.folder, runs)
    solver = recorder.manifest["settings"]["solver"]
    recorder.manifest["replay"] = {
        "runs": [
            replay_entry(
                f"{method} (seed {run['seed']})",
                method,
                int(run["steps"]),
                solver[method],
                {"seed": int(run["seed"]), "report_every": plan.report_every},
                f"{RESULTS}/{method}.pt",
                threads=1,  # each run's process holds one CPU
            )
            for method, run in kept.items()
        ]
    }
    advice = result.recommendation or {}
    outcome = {
        "status": "completed",
        "recommended": advice.get("method"),
        "ranking": getattr(result.ranking, "order", None),
        "kept": {m: {"seed": r["seed"], "phi_final": r.get("phi_final")} for m, r in kept.items()},
        "not_completed": {
            f"{r['method']} seed {r['seed']}": r.get("reason")
            for r in runs
            if r.get("status") != "completed"
        },
    }
    recorder.end(outcome, [f"{RESULTS}/{m}.pt" for m in kept])


def _keep_best(folder: Path, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's completed run with the lowest final phi whose parameters were left, as
    ``results/<method>.pt``; the other runs' files removed."""
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        phi = run.get("phi_final")
        source = folder / PARAMS_FOLDER / f"{run['method']}-seed{run['seed']}.pt"
        if run.get("status") != "completed" or not source.is_file():
            continue
        if not isinstance(phi, (int, float)) or not math.isfinite(phi):
            continue
        held = best.get(run["method"])
        if held is None or phi < held["phi_final"]:
            best[run["method"]] = run
    for method, run in best.items():
        source = folder / PARAMS_FOLDER / f"{method}-seed{run['seed']}.pt"
        target = folder / RESULTS / f"{method}.pt"
        atomic_write(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    shutil.rmtree(folder / PARAMS_FOLDER, ignore_errors=True)
    return best
