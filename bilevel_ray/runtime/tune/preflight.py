"""A sweep's pre-flight: what its trials would fail on, found once on the driver, before Ray
starts (a trial that fails costs a process start each, and a sweep of them says nothing).

* the factory resolves and builds (a ``file.py:factory`` path relative to this process's
  working directory; the trials receive the callable itself);
* every ``ProblemSpec`` field has its type: a problem with both losses, x0 / y0 as dicts of
  floating tensors, data that :func:`~bilevel_ray.data.as_batches` takes, ``eval_data`` a
  ``br.BilevelBatch``, ``defaults`` a dict;
* the checks ``br.solve`` makes (one evaluation of each loss; PBGD-Free needs an f that moves x);
* the whole search space, analytically: every value a distribution can draw (its bounds, every
  category, every grid value) must make valid settings, not one random sample;
* one step of the solver at one point of the space, and one held-out score (its solver state's
  size goes into a population's sizing, :mod:`~bilevel_ray.runtime.tune.capacity`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

from bilevel_ray.data import as_batches
from bilevel_ray.errors import ConfigError
from bilevel_ray.evaluation import evaluate
from bilevel_ray.problem import ProblemSpec, check_losses
from bilevel_ray.runtime.local.solve import solver_config
from bilevel_ray.runtime.local.spec_check import check_spec
from bilevel_ray.runtime.tune.capacity import state_bytes
from bilevel_ray.runtime.tune.space import decode, sample_point

__all__ = ["check_space_values", "check_spec", "describe_space", "first_step", "space_values"]


def space_values(value: Any) -> list[Any]:
    """Every value a search-space entry can draw, as far as validity goes: a range's bounds,
    every category and grid value, a constant itself."""
    if isinstance(value, Mapping) and "grid_search" in value:
        return list(value["grid_search"])
    categories = getattr(value, "categories", None)
    if categories is not None:
        return list(categories)
    if hasattr(value, "lower") and hasattr(value, "upper"):
        kind = type(value).__name__
        upper = value.upper - 1 if kind == "Integer" else value.upper  # randint excludes it
        return [value.lower, upper]
    if hasattr(value, "sample"):  # a distribution we cannot bound: one draw is all we can check
        return [value.sample()]
    return [value]


def check_space_values(space: Mapping[str, Any], method: str, base: Mapping[str, Any]) -> None:
    """Every value of every entry, with the other entries at one of their own values, makes
    valid solver settings; the first bad one is named with its entry."""
    reference = {key: space_values(value)[0] for key, value in space.items()}
    problems = []
    for key, value in space.items():
        for drawn in space_values(value):
            point = {**reference, key: drawn}
            try:
                solver_config(method, {**base, **decode(point)}).to_dict()
            except ConfigError as err:
                problems.append(
                    f"search_space {key}: it can draw {drawn!r}, which makes invalid settings "
                    f"({'; '.join(err.problems)}); narrow its range"
                )
                break
            except (TypeError, ValueError) as err:  # decode's int() / float() of a category
                problems.append(
                    f"search_space {key}: it can draw {drawn!r}, which is not a value for {key} "
                    f"({err}); narrow its range"
                )
                break
    if problems:
        raise ConfigError(problems)


def first_step(
    spec: ProblemSpec, method: str, base: Mapping[str, Any], space: Mapping[str, Any], seed: int
) -> int:
    """One solver step at one point of the space and one held-out score, as a trial starts; the
    caller's RNG is left as it was. Returns the bytes of the solver's state after the step (x,
    y, optimizer moments, the method's copies)."""
    settings = solver_config(method, {**base, **decode(sample_point(space))})
    settings.to_dict()  # trials receive the settings as a dict
    solver = settings.build(spec.problem)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = solver.init(spec.x0, spec.y0)
        batches = as_batches(spec.data, seed)
        first = next(batches)
        check_losses(spec.problem, state.x, state.y, first, upper_needs_x=method == "pbgd_free")
        state, _ = solver.step(state, next(itertools.chain([first], batches)))
        if spec.eval_data is not None:
            evaluate(spec.problem, state.x, state.y, spec.eval_data, gap_steps=1)
    return state_bytes(tuple(state))


def describe_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Plain values naming each entry (a sweep folder remembers the space it was started with)."""
    described = {}
    for key, value in sorted(space.items()):
        if isinstance(value, Mapping) and "grid_search" in value:
            described[key] = {"grid_search": [_plain(v) for v in value["grid_search"]]}
        elif getattr(value, "categories", None) is not None:
            described[key] = {"choice": [_plain(v) for v in value.categories]}
        elif hasattr(value, "lower") and hasattr(value, "upper"):
            sampler = type(getattr(value, "sampler", None)).__name__
            kind = {"_LogUniform": "loguniform", "_Uniform": "uniform"}.get(sampler, sampler)
            if type(value).__name__ == "Integer":
                kind = "randint"
            described[key] = {kind: [_plain(value.lower), _plain(value.upper)]}
        else:
            described[key] = _plain(value)
    return described


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)
