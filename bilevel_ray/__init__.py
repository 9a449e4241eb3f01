"""bilevel_ray: single-loop bilevel optimization (PBGD-Free) and its baselines.

Solve ``min_x f(x, y*(x))`` with ``y*(x) in argmin_y g(x, y)``::

    import bilevel_ray as br
    res = br.solve(problem, x0, y0, method="pbgd_free", steps=3000, lr_x=0.01, lr_y=0.1, gamma=10.0)

Importing this package does not import Ray; the Ray runtimes load it when they are used.
"""

from __future__ import annotations

from bilevel_ray import problems, schedules
from bilevel_ray.config import SolverConfig
from bilevel_ray.data import BilevelBatch, full_batch, minibatches
from bilevel_ray.diagnostics import Verdict, diagnose
from bilevel_ray.errors import BilevelRayError, ConfigError, DivergenceError
from bilevel_ray.problem import (
    BilevelProblem,
    FeatureProblem,
    ProblemSpec,
    module_problem,
    split_module_problem,
)
from bilevel_ray.runtime.entry import compare, tune
from bilevel_ray.runtime.local.solve import SolveResult, solve
from bilevel_ray.runtime.train.driver import train
from bilevel_ray.solvers import SOLVERS, SolverState, state_from_dict, state_to_dict
from bilevel_ray.tables import table_minibatches
from bilevel_ray.tree import Params
from bilevel_ray.updates import adam, sgd

__version__ = "0.1.0"

__all__ = [
    "SOLVERS",
    "BilevelBatch",
    "BilevelProblem",
    "BilevelRayError",
    "ConfigError",
    "DivergenceError",
    "FeatureProblem",
    "Params",
    "ProblemSpec",
    "SolveResult",
    "SolverConfig",
    "SolverState",
    "Verdict",
    "adam",
    "compare",
    "diagnose",
    "full_batch",
    "minibatches",
    "module_problem",
    "problems",
    "schedules",
    "sgd",
    "solve",
    "split_module_problem",
    "state_from_dict",
    "state_to_dict",
    "table_minibatches",
    "train",
    "tune",
]
