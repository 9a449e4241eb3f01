"""A comparison's files and printed table.

``compare.json`` is strict JSON (``json.loads`` of any reader accepts it): a value that is not a
finite number is ``null`` (a method that never reached the target has ``null`` time to target),
and it holds what a rerun needs (``rerun``: the problem, its config, the API arguments and the
command line) beside the budget, the seeds, each method's settings, the rules (tolerance,
divergence, scoring), the plan's estimate and the time the comparison took.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "manifest", "strict", "strict_json"]


def strict(value: Any) -> Any:
    """``value`` with every non-finite float as None, tuples as lists, and anything JSON cannot
    hold as its ``str``."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return strict(value.item())
    return str(value)


def strict_json(value: Any) -> str:
    """Strict JSON text (allow_nan=False: a non-finite number left over would raise)."""
    return json.dumps(strict(value), indent=1, allow_nan=False)


def _factory_name(factory: Any) -> str | None:
    """The problem as ``bilevel-ray compare`` names it: a string as given, an importable
    function as ``module:name``; None for a function defined in a script or another function."""
    if isinstance(factory, str):
        return factory
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        return None
    return f"{module}:{name}"


def manifest(
    factory: Any,
    problem_config: Mapping[str, Any],
    arguments: Mapping[str, Any],
    fixed: Mapping[str, Any],
) -> dict[str, Any]:
    """What reruns this comparison: the problem, its config, the arguments of ``br.compare``
    (its ``fixed`` solver settings apart) and the equivalent command line (None when the
    factory is a function no command can name: rerun it with ``br.compare`` and the same
    arguments)."""
    problem = _factory_name(factory)
    command = None
    if problem is not None:
        words = ["bilevel-ray", "compare", problem]
        words += [w for k, v in problem_config.items() for w in ("--config", f"{k}={v}")]
        words += ["--methods", ",".join(arguments["methods"])]
        words += ["--budget", f"{arguments['budget_s']:g}", "--seeds", str(arguments["seeds"])]
        words += [w for k, v in fixed.items() for w in ("--set", f"{k}={v}")]
        if arguments.get("rank_by") is not None:
            words += ["--rank-by", arguments["rank_by"]]
        words += ["--out", str(arguments["storage_path"]), "--name", f"{arguments['name']}-rerun"]
        command = shlex.join(words)
    return {
        "problem": problem,
        "problem_config": dict(problem_config),
        "arguments": {**arguments, "fixed": dict(fixed)},
        "command": command,
        "working_directory": os.getcwd(),  # a file.py:factory is found from here
    }


def _cell(value: float, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if math.isfinite(value) else f"{'-':>{width}}"


def format_table(result: Any) -> str:
    """The table ``bilevel-ray compare`` prints: each method's median held-out phi (test rows)
    at its best held-out point and at its final point, each with its time to that point's
    target; steps per second; the method's time against the run's whole wall time (the scoring
    is not charged to the budget); solver state and peak memory. ``*`` marks the point the
    ranking uses; methods that did not complete follow with their reason."""
    rank_by = result.recommendation.get("ranked_at", "best")
    marks = {p: "*" if p == rank_by else " " for p in ("best", "final")}
    lines = [
        f"{'method':<12} {marks['best']}{'best phi':>10} {'± std':>8} {'at s':>6} "
        f"{'to target':>9} {marks['final']}{'final phi':>10} {'± std':>8} {'to target':>9} "
        f"{'steps/s':>8} {'method s':>8} {'run s':>6} {'state MiB':>9} {'peak MB':>7}"
    ]
    for row in result.table:
        lines.append(
            f"{row['method']:<12} {_cell(row['phi_best'], '.5g', 11)} "
            f"{_cell(row['std_best'], '.2g', 8)} {_cell(row['best_at_s'], '.3g', 6)} "
            f"{_cell(row['to_target_best_s'], '.3g', 9)} {_cell(row['phi_final'], '.5g', 11)} "
            f"{_cell(row['std_final'], '.2g', 8)} {_cell(row['to_target_final_s'], '.3g', 9)} "
            f"{_cell(row['steps_per_s'], '.4g', 8)} {_cell(row['wall_s'], '.3g', 8)} "
            f"{_cell(row['run_wall_s'], '.3g', 6)} "
            f"{_cell(row['state_bytes'] / 2**20, '.3g', 9)} {_cell(row['peak_rss_mb'], '.0f', 7)}"
            + (f"  ({row['diverged']} seed(s) diverged)" if row["diverged"] else "")
        )
    for run in result.runs.to_pylist():
        if run["status"] != "completed":
            lines.append(
                f"{run['method']:<12} seed {run['seed']}: {run['status']}: {run['reason']}"
            )
    targets = result.recommendation.get("targets") or {}
    lines.append(
        "phi: held-out f(x, y*(x)) on the test half of the held-out rows; best: the point with the "
        "lowest phi on the validation half (early stopping); * ranks. Targets: "
        + ", ".join(
            f"{p} phi <= {_cell(targets.get(p, math.nan), '.6g', 1)}" for p in ("best", "final")
        )
        + f"; budget {result.budget_s:g} s of each method's own steps (method s), run s: the whole "
        "run, scoring included."
    )
    return "\n".join(lines)


def run_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The runs as parquet rows: every row with the same columns."""
    keys = sorted({k for r in runs for k in r})
    return [{k: r.get(k) for k in keys} for r in runs]
