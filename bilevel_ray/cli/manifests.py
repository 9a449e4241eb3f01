"""The manifests the command line writes itself: ``solve --out`` (a run in this process has no
folder of its own) and the files ``train --out`` adds to its run's folder after ``br.train``
recorded it. Imports torch only when called."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = [
    "check_diagnosis_folder",
    "record_diagnosis",
    "record_solve",
    "record_train_files",
]


def record_solve(
    args: argparse.Namespace,
    problem_config: dict[str, Any],
    result: Any,
    run_options: dict[str, Any],
    started: str | None,
    files: tuple[str, ...],
) -> None:
    """``args.out/manifest.json`` of a finished ``solve``: the settings it started with, its
    outcome and the hashes of ``files`` (just written there)."""
    from bilevel_ray.config import SolverConfig
    from bilevel_ray.records.manifest import finish
    from bilevel_ray.records.run_record import run_manifest, run_outcome, solver_dict

    config = SolverConfig.from_dict(result.start_config)
    manifest = run_manifest(
        "solve",
        problem=args.problem,
        problem_config=problem_config,
        fingerprint=result.fingerprint,
        method=config.method,
        steps=result.steps if result.steps is not None else int(result.state.step),
        solver=solver_dict(config),
        run=run_options,
        started=started,
    )
    if args.schedule is not None:
        manifest["settings"]["schedule"] = str(Path(args.schedule).resolve())
    finish(manifest, args.out, run_outcome(result, config.method), files)


def record_train_files(folder: Path, files: tuple[str, ...]) -> None:
    """Hash the files ``train --out`` wrote beside its run's manifest."""
    from bilevel_ray.records.manifest import update_outputs

    update_outputs(folder, files)


DIAGNOSIS_FILES = ("verdict.json", "manifest.json")


def check_diagnosis_folder(folder: Path) -> None:
    """Before the diagnostic: ``diagnose --out DIR`` can write its files there."""
    from bilevel_ray.runtime.local.output_files import check_output_path, check_writable

    check_output_path(folder, "--out", is_file=False)
    check_writable(folder, "--out")
    for name in DIAGNOSIS_FILES:
        check_output_path(Path(folder) / name, "--out file")


def record_diagnosis(
    folder: Path,
    problem: str,
    problem_config: dict[str, Any],
    verdict: Any,
    used: dict[str, Any],
    started: str,
) -> None:
    """``verdict.json`` (the verdict and the settings it was reached with) and the manifest."""
    import json

    from bilevel_ray.records.manifest import finish, new_manifest, plain
    from bilevel_ray.runtime.local.output_files import atomic_write

    settings = {k: v for k, v in used.items() if k not in ("data", "problem", "problem_config")}
    document = {"problem": problem, "problem_config": problem_config, "settings": settings}
    document["verdict"] = verdict.to_dict()
    text = json.dumps(plain(document), indent=1) + "\n"
    atomic_write(Path(folder) / "verdict.json", lambda tmp: tmp.write_text(text))
    manifest = new_manifest(
        "diagnose",
        problem=problem,
        problem_config=problem_config,
        data=used.get("data"),
        settings=settings,
        seeds={"run": used.get("seed", 0), "problem": problem_config.get("seed")},
        started=started,
    )
    outcome = {"status": "completed", "verdict": verdict.verdict, "reason": verdict.reason}
    finish(manifest, Path(folder), outcome, ["verdict.json"])
