"""Search spaces over the solver settings, and how a sampled point becomes solver keywords.

Keys are :class:`~bilevel_ray.config.SolverConfig` fields plus four that encode structure a flat
space cannot:

* ``lr_ratio``: ``lr_x = lr_y * lr_ratio``. Sampling the ratio in (0, 1] keeps the two-time-scale
  prior ``lr_y >= lr_x`` (the lower level tracks, the upper level drifts) and works with any
  search algorithm, where a conditional ``sample_from`` would not (Optuna).
* ``gamma_init``, ``gamma_max``, ``gamma_argmax_step``: together, a
  ``pbgd_ramp(gamma_init, gamma_max, gamma_argmax_step)`` penalty schedule instead of a constant
  ``gamma``.

Ray is imported only by :func:`default_search_space` (Tune's distributions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.errors import ConfigError
from bilevel_ray.schedules import pbgd_ramp

__all__ = [
    "EXTRA_KEYS",
    "check_search_space",
    "decode",
    "default_search_space",
    "sample_point",
    "space_from_json",
]

RAMP_KEYS = ("gamma_init", "gamma_max", "gamma_argmax_step")
EXTRA_KEYS = ("lr_ratio", *RAMP_KEYS)


def default_search_space(method: str, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """gamma log-uniform on [1, 100] (penalty methods), lr_y log-uniform on [1e-4, 1e-1] with
    lr_x = lr_y * lr_ratio, lr_ratio log-uniform on [1e-2, 1], inner_steps in {1, 2, 3}, with
    Adam; a setting the user ``fixed`` is left out (a fixed lr_x or lr_y drops lr_ratio).

    Why Adam only: on ``representation`` (NLSY79) and ``regression`` every configuration of the
    360-point grid within 5% of its best is an Adam one (3 of 3 and 1 of 1), and a searcher that
    also draws SGD spends half of its trials there: with 36 TPE trials it reached 1.14x the
    grid's best (median of 3 searcher seeds) against 1.01x-1.03x with Adam alone
    (``benchmarks/searcher_study.py``). Search SGD with ``optimizer: choice(["sgd", "adam"])``.
    """
    from ray import tune

    space: dict[str, Any] = {
        "lr_y": tune.loguniform(1e-4, 1e-1),
        "lr_ratio": tune.loguniform(1e-2, 1.0),
        "optimizer": tune.choice(["adam"]),
    }
    knobs = METHOD_OPTIONS.get(method, {})
    if "gamma" in knobs:
        space["gamma"] = tune.loguniform(1.0, 100.0)
    if "inner_steps" in knobs:
        space["inner_steps"] = tune.choice([1, 2, 3])
    fixed = fixed or {}
    if "lr_x" in fixed or "lr_y" in fixed:
        space.pop("lr_ratio")
    return {k: v for k, v in space.items() if k not in fixed}


def check_search_space(space: Any, method: str, fixed: Mapping[str, Any]) -> None:
    """Refuse unknown keys (listing the allowed ones) and conflicting encodings, before launch."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            f"search_space={space!r}: must be a non-empty dict such as "
            "{'gamma': tune.loguniform(1, 100), 'lr_y': tune.loguniform(1e-4, 1e-1)}"
        )
    allowed = sorted({f.name for f in fields(SolverConfig)} - {"method"} | set(EXTRA_KEYS))
    unknown = sorted(set(space) - set(allowed))
    if unknown:
        raise ConfigError(
            f"search_space has unknown key(s) {unknown}; the allowed ones are: {', '.join(allowed)}"
        )
    keys = set(space) | set(fixed)
    ramp = [k for k in RAMP_KEYS if k in keys]
    if ramp and len(ramp) != len(RAMP_KEYS):
        raise ConfigError(
            f"search_space sets {ramp} but a pbgd_ramp needs all of {list(RAMP_KEYS)}"
        )
    if ramp and "gamma" in keys:
        raise ConfigError("search_space sets both gamma and a gamma ramp; keep one of them")
    if "lr_ratio" in keys and "lr_x" in keys:
        raise ConfigError("search_space sets both lr_x and lr_ratio (lr_x = lr_y * lr_ratio)")
    if "lr_ratio" in keys and "lr_y" not in keys:
        raise ConfigError("search_space sets lr_ratio without lr_y (lr_x = lr_y * lr_ratio)")
    method_specific = {k for knobs in METHOD_OPTIONS.values() for k in knobs}
    unused = sorted(
        k
        for k in (*method_specific, *RAMP_KEYS)
        if k in space and (k if k not in RAMP_KEYS else "gamma") not in METHOD_OPTIONS[method]
    )
    if unused:
        raise ConfigError(f"search_space key(s) {unused} do not apply to method={method!r}")


def decode(point: Mapping[str, Any]) -> dict[str, Any]:
    """A sampled point as SolverConfig keywords (lr_ratio and the ramp keys resolved)."""
    options = {k: v for k, v in point.items() if k not in EXTRA_KEYS}
    if "lr_ratio" in point:
        options["lr_x"] = float(point["lr_y"]) * float(point["lr_ratio"])
    if all(k in point for k in RAMP_KEYS):
        options["gamma"] = pbgd_ramp(
            float(point["gamma_init"]), float(point["gamma_max"]), int(point["gamma_argmax_step"])
        )
    return options


_DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")


def space_from_json(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A search space from plain values, e.g. ``{"gamma": {"loguniform": [1, 100]},
    "optimizer": {"choice": ["sgd", "adam"]}, "inner_steps": 1}`` (the CLI's ``--space``)."""
    from ray import tune

    space = {}
    for key, value in spec.items():
        if isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in _DISTRIBUTIONS:
                raise ConfigError(
                    f"--space {key}={value!r}: give one distribution, one of "
                    f'{", ".join(_DISTRIBUTIONS)}, e.g. {key}={{"loguniform": [1, 100]}}'
                )
            kind, args = next(iter(value.items()))
            if kind != "choice" and not (
                isinstance(args, (list, tuple))
                and len(args) == 2
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                and args[0] < args[1]
            ):
                raise ConfigError(
                    f"--space {key}={value!r}: {kind} needs [low, high] with low < high, e.g. "
                    f'{key}={{"{kind}": [1, 100]}}'
                )
            if kind == "choice" and (not isinstance(args, (list, tuple)) or not args):
                raise ConfigError(
                    f"--space {key}={value!r}: choice needs a non-empty list, e.g. "
                    f'{key}={{"choice": [1, 2, 3]}}'
                )
            try:
                space[key] = (
                    tune.choice(list(args)) if kind == "choice" else getattr(tune, kind)(*args)
                )
            except (TypeError, ValueError) as err:
                raise ConfigError(f"--space {key}={value!r}: {err}") from None
        else:
            space[key] = value
    return space


def sample_point(space: Mapping[str, Any]) -> dict[str, Any]:
    """One point of the space (a grid's first value), to validate settings before launch."""
    point = {}
    for key, value in space.items():
        if isinstance(value, Mapping) and "grid_search" in value:
            point[key] = next(iter(value["grid_search"]))
        elif hasattr(value, "sample"):
            point[key] = value.sample()
        else:
            point[key] = value
    return point
