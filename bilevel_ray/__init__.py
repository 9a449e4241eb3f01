"""bilevel_ray: single-loop bilevel optimization (PBGD-Free) and its baselines.

Solve ``min_x f(x, y*(x))`` with ``y*(x) in argmin_y g(x, y)``::

    import bilevel_ray as br
    res = br.solve(problem, x0, y0, method="pbgd_free", steps=3000, lr_x=0.01, lr_y=0.1, gamma=10.0)

The names below load on first use (PEP 562): ``import bilevel_ray`` imports neither torch nor
Ray, so that ``bilevel-ray --help`` answers at once; ``br.train`` loads Ray Train's room,
``br.tune`` and ``br.compare`` load Ray Tune when they are first touched.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "SOLVERS": "bilevel_ray.solvers",
    "SolverState": "bilevel_ray.solvers",
    "state_from_dict": "bilevel_ray.solvers",
    "state_to_dict": "bilevel_ray.solvers",
    "BilevelBatch": "bilevel_ray.data",
    "full_batch": "bilevel_ray.data",
    "minibatches": "bilevel_ray.data",
    "BilevelProblem": "bilevel_ray.problem",
    "FeatureProblem": "bilevel_ray.problem",
    "ProblemSpec": "bilevel_ray.problem",
    "module_problem": "bilevel_ray.module_problems",
    "split_module_problem": "bilevel_ray.module_problems",
    "BilevelRayError": "bilevel_ray.errors",
    "ConfigError": "bilevel_ray.errors",
    "DivergenceError": "bilevel_ray.errors",
    "SolverConfig": "bilevel_ray.config",
    "Verdict": "bilevel_ray.diagnostics",
    "diagnose": "bilevel_ray.diagnostics",
    "SolveResult": "bilevel_ray.runtime.local.solve",
    "solve": "bilevel_ray.runtime.local.solve",
    "train": "bilevel_ray.runtime.train.driver",
    "tune": "bilevel_ray.runtime.tune.driver",
    "compare": "bilevel_ray.runtime.compare.driver",
    "export": "bilevel_ray.runtime.local.export",
    "table_minibatches": "bilevel_ray.tables",
    "Params": "bilevel_ray.tree",
    "adam": "bilevel_ray.updates",
    "sgd": "bilevel_ray.updates",
    "declare_inputs": "bilevel_ray.inputs",
}
_SUBMODULES = ("problems", "schedules")
_SOURCE_NAMES = {"tune": "run_sweep"}  # defined under another name

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"bilevel_ray.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bilevel_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _SOURCE_NAMES.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
