"""``br.diagnose`` on a problem named as on the command line (a built-in, ``file.py:factory``
or ``package.module:factory``), with the problem's own suggested settings: what ``bilevel-ray
diagnose`` and ``bilevel-ray compare`` run; and the end-of-run certificate of a finished run's
folder (``bilevel-ray diagnose --at-end RUN_DIR``). No Ray."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from bilevel_ray.config import SolverConfig
from bilevel_ray.diagnostics.diagnose import Progress, diagnose
from bilevel_ray.diagnostics.end_check import EndCheck, check_steps_for, end_check, held_out_line
from bilevel_ray.diagnostics.verdict import Verdict
from bilevel_ray.errors import ConfigError
from bilevel_ray.records.fingerprint import fingerprinted_spec
from bilevel_ray.runtime.local.run_folder import MAX_RECORD_BYTES, read_result, read_run
from bilevel_ray.runtime.local.run_spec import RunSpec
from bilevel_ray.runtime.local.threads import use_work_threads

__all__ = ["certify_run", "diagnose_problem"]

DEFAULT_HORIZON = 2000  # a factory that suggests no steps is judged at br.diagnose's default


def diagnose_problem(
    problem: str,
    problem_config: dict[str, Any],
    gamma: float | None,
    threads: int | None = None,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """``br.diagnose`` on a problem named as on the command line, with the problem's suggested
    settings (its step sizes, optimizer, gamma and steps: the horizon judged) unless given.
    Returns the verdict and the settings it ran with (every option of ``br.diagnose``,
    defaults included, and ``data``: the fingerprint of the problem's data). ``threads``:
    torch's threads (default: from the problem's size,
    :func:`~bilevel_ray.runtime.local.threads.use_work_threads`)."""
    progress = bool(options.pop("progress", False))
    allowed = [
        p.name
        for p in inspect.signature(diagnose).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name != "progress"
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown}; br.diagnose takes: {', '.join(allowed)} (and --gamma)"
        )
    spec, fingerprint = fingerprinted_spec(problem, problem_config)
    used_threads = use_work_threads(spec.x0, spec.y0, threads)
    suggested = SolverConfig.applicable("pbgd_free", spec.defaults)
    run = {
        k: v
        for k, v in suggested.items()
        if k in ("lr_x", "lr_y", "inner_steps", "optimizer") and isinstance(v, (int, float, str))
    }
    steps = spec.defaults.get("steps", DEFAULT_HORIZON)
    if isinstance(steps, int) and not isinstance(steps, bool):
        run["steps"] = steps
    gamma = gamma if gamma is not None else suggested.get("gamma", 10.0)
    chosen = {**run, **{k: v for k, v in options.items() if v is not None}}
    if spec.eval_data is not None:
        chosen.setdefault("eval_data", spec.eval_data)  # the held-out line beside the verdict
    verdict = diagnose(
        spec.problem, spec.x0, spec.y0, gamma, data=spec.data, progress=progress, **chosen
    )
    parameters = inspect.signature(diagnose).parameters
    used: dict[str, Any] = {"gamma": gamma, "threads": used_threads}
    used.update({k: p.default for k in allowed if (p := parameters[k]).default is not p.empty})
    used.update(chosen)
    used.pop("eval_data", None)
    if used.get("check_steps") is None and isinstance(used.get("steps"), int):
        used["check_steps"] = check_steps_for(used["steps"])
    used["data"] = fingerprint  # for a manifest (diagnose --out)
    return verdict, used


def _check_trusted(folder: Path, trust_record: bool) -> None:
    """Refuse to import the code a folder's run names unless this account sealed its manifest
    (before the folder is read: a run.json that cannot be read is :func:`read_run`'s to say)."""
    from bilevel_ray.problems import BUILTIN_PROBLEMS
    from bilevel_ray.records.manifest import read_manifest, sealed

    path = folder / "run.json"
    try:
        if not path.is_file():  # a FIFO or a device is read_run's to refuse, unread
            return
        with open(path, "rb") as f:
            problem = json.loads(f.read(MAX_RECORD_BYTES))["problem"]
    except (OSError, ValueError, RecursionError, TypeError, KeyError):
        return
    if trust_record or not isinstance(problem, str) or problem in BUILTIN_PROBLEMS:
        return
    manifest = read_manifest(folder, f"--at-end {str(folder)!r}", "rerun the run")
    if manifest is None or not sealed(manifest):
        shown = problem if len(problem) <= 200 else problem[:200] + "..."
        raise ConfigError(
            f"--at-end {str(folder)!r}: its run names the code {shown!r}, and its manifest is "
            + ("missing" if manifest is None else "not sealed by this account")
            + " (written elsewhere, or edited): certifying it would import that code. If you "
            "trust who wrote the folder, pass --trust-record"
        )


def certify_run(
    run_dir: str | os.PathLike[str],
    *,
    check_steps: int | None = None,
    replicas: int = 3,
    threads: int | None = None,
    progress: bool = False,
    trust_record: bool = False,
) -> tuple[Verdict, dict[str, Any]]:
    """The end-of-run certificate (:mod:`~bilevel_ray.diagnostics.end_check`) of a finished
    PBGD-Free run's folder (``solve`` or ``train`` with ``--out``: its ``run.json`` and
    ``result.pt``), on the problem and data the run named, once the folder verifies against
    its manifest (:func:`~bilevel_ray.runtime.local.run_folder.read_run`) and its steps and
    seed pass a run's own checks (the continuation's length follows the steps). A run of a
    problem that is code (``file.py:factory``, ``module:factory``) is certified only from a
    folder this account sealed, or with ``trust_record``: certifying imports that code. Returns
    the verdict and the settings it ran with."""
    folder = Path(run_dir)
    _check_trusted(folder, trust_record)
    record = read_run(folder, "--at-end")
    try:  # the checks a command line's --steps and --seed pass
        RunSpec(record.get("steps") or 1, seed=record.get("seed") or 0)
    except ConfigError as err:
        raise ConfigError(
            [
                f"--at-end {str(folder)!r}: its run.json's {p}; give the folder of a run "
                "bilevel_ray finished"
                for p in err.problems
            ]
        ) from None
    method = record.get("method")
    if method != "pbgd_free" or record.get("switched_at_step") is not None:
        raise ConfigError(
            f"--at-end {str(folder)!r}: the run's method is {method!r}"
            + (
                f" (it switched at step {record['switched_at_step']})"
                if record.get("switched_at_step") is not None
                else ""
            )
            + "; the certificate judges a PBGD-Free run's end point: give a pbgd_free run's folder"
        )
    spec, fingerprint = fingerprinted_spec(
        str(record["problem"]), dict(record.get("problem_config") or {})
    )
    x, y = read_result(folder, spec.x0, spec.y0, "--at-end", then="certify")
    settings = SolverConfig.from_dict(record.get("settings") or {})
    steps = int(record.get("steps") or 0)
    used_threads = use_work_threads(spec.x0, spec.y0, threads)
    check = EndCheck(
        settings,
        check_steps=check_steps or check_steps_for(max(steps, 1)),
        replicas=replicas,
        seed=int(record.get("seed") or 0),
    )
    report = Progress(progress)
    verdict = end_check(
        spec.problem, x, y, spec.data, check, reference=(spec.x0, spec.y0),
        eval_data=spec.eval_data, show=report.show, end_step=steps,
    )  # fmt: skip
    verdict = replace(verdict, held_out=held_out_line(verdict.stats))
    used = {
        "problem": record["problem"],
        "problem_config": dict(record.get("problem_config") or {}),
        "at_end": str(folder),
        "steps": steps,
        "check_steps": check.check_steps,
        "replicas": replicas,
        "threads": used_threads,
        **{k: v for k, v in settings.to_dict(strict=False).items() if v is not None},
        "data": fingerprint,
    }
    return verdict, used
