"""Reference problems with known answers, and how the CLI and the runtimes find a problem.

A *problem factory* is a picklable callable ``factory(config: dict) -> ProblemSpec``; Ray workers
call it to build the problem, the initial point and the data locally. ``load_factory`` resolves a
built-in name, ``path/to/file.py:factory`` or ``package.module:factory``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import ProblemSpec
from bilevel_ray.problems.hyperclean import (
    HyperCleaning,
    cleaning_scores,
    fit_classifier,
    heldout_accuracy,
    hyperclean,
)
from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft
from bilevel_ray.problems.quadratic import QuadraticProblem, quadratic
from bilevel_ray.problems.regression import LinearRepresentation, make_regression_data, regression
from bilevel_ray.problems.representation import representation
from bilevel_ray.problems.toys import NegativeToy, PositiveToy, negative_toy, positive_toy

__all__ = [
    "BUILTIN_PROBLEMS",
    "HyperCleaning",
    "LinearRepresentation",
    "NegativeToy",
    "PositiveToy",
    "QuadraticProblem",
    "cleaning_scores",
    "fit_classifier",
    "heldout_accuracy",
    "load_factory",
    "make_regression_data",
]

ProblemFactory = Callable[[dict[str, Any]], ProblemSpec]

BUILTIN_PROBLEMS: dict[str, ProblemFactory] = {
    "toy-negative": negative_toy,
    "toy-positive": positive_toy,
    "quadratic": quadratic,
    "regression": regression,
    "representation": representation,
    "hyperclean": hyperclean,
    "peft-dpo-sft": peft_dpo_sft,
}


def load_factory(ref: str) -> ProblemFactory:
    """A built-in name, ``file.py:factory`` or ``package.module:factory``."""
    if ref in BUILTIN_PROBLEMS:
        return BUILTIN_PROBLEMS[ref]
    if ":" not in ref:
        raise ConfigError(
            f"problem {ref!r}: not a built-in ({', '.join(BUILTIN_PROBLEMS)}) and not of the form "
            "path/to/file.py:factory or package.module:factory"
        )
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise ConfigError(
            f"problem {ref!r}: give both parts, as in path/to/file.py:factory or "
            "package.module:factory"
        )
    try:
        module = _import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # the user's module failed while importing: say which and why
        raise ConfigError(
            f"problem {ref!r}: importing {where!r} failed ({type(err).__name__}: {err})"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"problem {ref!r}: {where!r} has no callable named {attr!r}")
    return factory


def _import_module(where: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"problem file {where!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"bilevel_ray_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    return importlib.import_module(where)
