"""A trial's lineage, and the schedule it becomes (``best_schedule.json``).

Population-based training changes a trial's settings as it runs: at an exploit the trial takes
a better trial's checkpoint (its x, y, optimizer moments, RNG and step t) and continues from
step t with that trial's settings, perturbed. Its lineage is the list of segments that led to
its final state, each ``{"from_step": t_i, "trial_id": ..., "settings": {...}}``: the settings
in force on steps ``t_i <= t < t_(i+1)``. The checkpoint carries the lineage, so an exploit
inherits the donor's segments and appends its own.

A lineage becomes one solver setting per key: constant where the key never changed, else a
:class:`~bilevel_ray.schedules.piecewise_constant` over the segments::

    gamma_t = gamma_i   for t_i <= t < t_(i+1)

Running ``br.solve`` with those settings, the sweep's seed and steps, from the problem's start
point, replays the trial: the same batches, the same steps, the same final x and y.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel_ray import schedules
from bilevel_ray.errors import ConfigError
from bilevel_ray.handed_files import read_json
from bilevel_ray.runtime.local.output_files import atomic_write
from bilevel_ray.runtime.local.run_spec import RUN_OPTIONS

__all__ = [
    "BEST_SCHEDULE",
    "extend_lineage",
    "lineage_schedule",
    "read_schedule_file",
    "write_best_schedule",
]

BEST_SCHEDULE = "best_schedule.json"
FORMAT = "bilevel_ray.best_schedule/1"
_SEGMENT = frozenset({"from_step", "trial_id", "settings"})  # a lineage entry's fields
_FIELDS = (
    "format",
    "trial_id",
    "eval/upper_loss",
    "eval/lower_gap",
    "problem",
    "problem_config",
    "method",
    "steps",
    "seed",
    "settings",
    "lineage",
)


def extend_lineage(
    lineage: list[dict[str, Any]], step: int, trial_id: str, settings: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The lineage of a trial that continues from ``step`` with ``settings`` (plain dicts, as
    ``SolverConfig.to_dict()``): a segment is added only where the settings change."""
    settings = dict(settings)
    if lineage and lineage[-1]["settings"] == settings:
        return list(lineage)
    # A segment that ran no step (two exploits at one step) leaves no trace in the run.
    kept = [s for s in lineage if s["from_step"] < step]
    return [*kept, {"from_step": int(step), "trial_id": trial_id, "settings": settings}]


def lineage_schedule(lineage: list[dict[str, Any]]) -> dict[str, Any]:
    """The solver settings that replay ``lineage`` (JSON-able; schedules as dicts): a setting
    that changed across segments becomes a ``piecewise_constant`` schedule."""
    if not lineage:
        raise ConfigError("an empty lineage has no settings to replay")
    final = dict(lineage[-1]["settings"])
    boundaries = [int(s["from_step"]) for s in lineage[1:]]
    for key in final:
        values = [s["settings"].get(key) for s in lineage]
        if all(v == values[0] for v in values):
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(
                f"setting {key!r} changed along the lineage ({values}) but is not a number: only "
                "numeric settings can become a schedule (population-based training perturbs "
                "gamma, lr_x and lr_y)"
            )
        schedule = schedules.piecewise_constant(tuple(boundaries), tuple(map(float, values)))
        final[key] = schedules.to_dict(schedule)
    return final


def write_best_schedule(
    folder: str | os.PathLike[str],
    trial: Mapping[str, Any],
    lineage: list[dict[str, Any]],
    sweep: Mapping[str, Any],
) -> Path:
    """``folder/best_schedule.json``: the best trial's settings as schedules, the run that
    replays it (problem, its config, method, steps, seed) and the lineage itself."""
    settings = lineage_schedule(lineage)
    method = settings.pop("method", sweep["method"])
    document = {
        "format": FORMAT,
        "trial_id": trial.get("trial_id"),
        "eval/upper_loss": _finite_or_none(trial.get("eval/upper_loss")),
        "eval/lower_gap": _finite_or_none(trial.get("eval/lower_gap")),
        "problem": sweep["problem"],
        "problem_config": sweep["problem_config"],
        "method": method,
        "steps": sweep["steps"],
        "seed": sweep["seed"],
        "settings": settings,
        "lineage": lineage,
    }
    text = json.dumps(document, indent=2, default=str)
    return atomic_write(Path(folder) / BEST_SCHEDULE, lambda tmp: tmp.write_text(text))


def read_schedule_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``best_schedule.json``, checked: its settings are rebuilt into schedules (a bad one is
    a ConfigError naming the file), ready for ``br.solve(..., **doc["settings"])``."""
    where = f"schedule file {str(path)!r}"
    document = read_json(path, where, f"give the {BEST_SCHEDULE} a sweep wrote")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(
            f"{where} is not a {BEST_SCHEDULE} (no 'format': {FORMAT!r}); give the file a "
            "sweep wrote into its folder"
        )
    missing = [k for k in ("method", "steps", "seed", "settings") if k not in document]
    if missing or not isinstance(document["settings"], dict):
        raise ConfigError(f"{where} lacks {missing or ['settings']}; write it again with a sweep")
    if not isinstance(document.get("problem_config", {}), dict):
        raise ConfigError(
            f"{where}: its problem_config is a {type(document['problem_config']).__name__}, not "
            "a dict of the factory's settings; write it again with a sweep"
        )
    unknown = sorted(set(document) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: {unknown} are not fields of a {BEST_SCHEDULE} (it has "
            f"{', '.join(_FIELDS)}); give the file a sweep wrote, unedited"
        )
    _check_lineage(document, where)
    # A schedule replays what its sweep learned: the solver settings. A run setting in it would
    # steer the run by another way (and is the command line's to set).
    steering = sorted(
        set(document["settings"]) & set(RUN_OPTIONS)
        | {k for k in document["settings"] if k in ("steps", "data", "method")}
    )
    if steering:
        raise ConfigError(
            f"{where}: its settings name {steering}, which are not solver settings a sweep "
            "learns; a schedule replays gamma, the step sizes and the solver's own settings "
            "only: remove them, or set them on the command line"
        )
    settings = {}
    for key, value in document["settings"].items():
        settings[key] = schedules.from_dict(value, name=key) if isinstance(value, dict) else value
    return {**document, "settings": settings}


def _check_lineage(document: dict[str, Any], where: str) -> None:
    """A schedule's settings are what its lineage gives (:func:`lineage_schedule`): one edited
    without the other would replay something no trial ran, saying nothing."""
    lineage = document.get("lineage")
    if lineage is None:
        return
    steps = document.get("steps")
    shapes = isinstance(lineage, list) and all(
        isinstance(s, dict)
        and set(s) == _SEGMENT
        and isinstance(s["from_step"], int)
        and not isinstance(s["from_step"], bool)
        and 0 <= s["from_step"] < (steps if isinstance(steps, int) else s["from_step"] + 1)
        and isinstance(s["settings"], dict)
        for s in lineage
    )
    if (
        not shapes
        or not lineage
        or lineage[0]["from_step"] != 0
        or any(a["from_step"] >= b["from_step"] for a, b in itertools.pairwise(lineage))
    ):
        raise ConfigError(
            f"{where}: its lineage is not one a sweep writes (segments of {sorted(_SEGMENT)}, the "
            f"first from step 0, then at increasing steps below steps={steps!r}); give the file a "
            "sweep wrote, unedited"
        )
    method = lineage[-1]["settings"].get("method", document.get("method"))
    if method != document.get("method"):
        raise ConfigError(
            f"{where}: its method {document.get('method')!r} is not its lineage's {method!r}: the "
            "file was edited; give the file a sweep wrote, unedited"
        )
    try:
        expected = lineage_schedule(lineage)
    except (ConfigError, TypeError, KeyError, ValueError, AttributeError, IndexError) as err:
        raise ConfigError(
            f"{where}: its lineage is not one a sweep writes ({type(err).__name__}); give the "
            "file a sweep wrote, unedited"
        ) from None
    expected.pop("method", None)
    differ = sorted(
        key
        for key in set(expected) | set(document["settings"])
        if _canonical(expected.get(key)) != _canonical(document["settings"].get(key))
    )
    if differ:
        raise ConfigError(
            f"{where}: its settings {differ} are not what its lineage gives: the file was "
            "edited; give the file a sweep wrote, unedited"
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
