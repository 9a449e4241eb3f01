"""Reference problems with known answers, and how the CLI and the runtimes find a problem.

A *problem factory* is a picklable callable ``factory(config: dict) -> ProblemSpec``; Ray workers
call it to build the problem, the initial point and the data locally. One that cannot take one
positional argument is refused before it is called; an error the factory raises itself
propagates unchanged. ``load_factory`` resolves a
built-in name, ``path/to/file.py:factory`` or ``package.module:factory``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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
from bilevel_ray.registry import BUILTIN_FACTORIES

__all__ = [
    "BUILTIN_PROBLEMS",
    "HyperCleaning",
    "LinearRepresentation",
    "NegativeToy",
    "PositiveToy",
    "QuadraticProblem",
    "build_spec",
    "cleaning_scores",
    "fit_classifier",
    "heldout_accuracy",
    "hyperclean",
    "load_factory",
    "make_regression_data",
    "negative_toy",
    "peft_dpo_sft",
    "positive_toy",
    "quadratic",
    "regression",
    "representation",
]

ProblemFactory = Callable[[dict[str, Any]], ProblemSpec]

# The factories of bilevel_ray.registry's names (registered there, torch-free, for the CLI).
BUILTIN_PROBLEMS: dict[str, ProblemFactory] = {
    name: getattr(importlib.import_module(ref.partition(":")[0]), ref.partition(":")[2])
    for name, ref in BUILTIN_FACTORIES.items()
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
        # The file's folder goes on the import path, as for a script run from there, so that
        # it can import a module beside it (``from mydata import load``).
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(f"bilevel_ray_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    return importlib.import_module(where)


def _check_signature(resolved: Any, factory: Any) -> None:
    """Refuse, before calling it, a factory that cannot be called with one positional argument
    (the config dict). A callable whose signature Python cannot read (some C functions) is
    called as it is. The factory's own errors, once called, propagate unchanged."""
    try:
        signature = inspect.signature(resolved)
    except (TypeError, ValueError):
        return
    try:
        signature.bind({})
    except TypeError as err:
        name = getattr(resolved, "__name__", None) or repr(resolved)
        raise ConfigError(
            f"the factory {factory!r} takes {name}{signature} ({err}): a problem factory takes "
            "one positional argument, the config dict; write it as def factory(config): ... "
            "return br.ProblemSpec(...)"
        ) from None


def build_spec(factory: ProblemFactory | str, problem_config: dict[str, Any]) -> ProblemSpec:
    """Resolve ``factory`` (a callable, a built-in name or a ``file.py:factory`` string) and
    call it with ``problem_config``, checking that it returns a ProblemSpec."""
    resolved = load_factory(factory) if isinstance(factory, str) else factory
    if not callable(resolved):
        raise ConfigError(f"factory={factory!r}: must be callable or a 'file.py:factory' string")
    module = getattr(resolved, "__module__", None) or ""
    if module.split(".")[0] in sys.stdlib_module_names or module == "builtins":
        name = getattr(resolved, "__qualname__", repr(resolved))
        raise ConfigError(
            f"factory={factory!r} is {module}.{name}, a function of Python's standard library, "
            "not a problem factory: give path/to/file.py:factory or package.module:factory, a "
            "function that takes the config dict and returns br.ProblemSpec(...)"
        )
    _check_signature(resolved, factory)
    try:
        spec = resolved(dict(problem_config))
    except SystemExit as exit_:
        # The user's own exceptions propagate as they are; an exit would end the caller too.
        raise ConfigError(
            f"the factory {factory!r} called sys.exit({exit_.code!r}): a factory must return "
            "br.ProblemSpec(...) or raise an exception, not exit"
        ) from None
    if not isinstance(spec, ProblemSpec):
        raise ConfigError(
            f"the factory returned a {type(spec).__name__}: it must return "
            "br.ProblemSpec(problem, x0, y0, data, defaults)"
        )
    return spec
