"""Does PBGD-Free suit a problem? Flatness estimates at a point, and the verdict they support.

    v = diagnose(problem, x0, y0, gamma=10.0)     # follow PBGD-Free, price its bias, decide
    v.suitable, v.reason, v.stats, v.recommendation, v.fallback

A runtime that collects :func:`estimate` dicts during a run calls :func:`decide` on them after
its warm-up window. Torch only: nothing here imports Ray or the runtimes.
"""

from __future__ import annotations

from bilevel_ray.diagnostics.cost import (
    curvature_along,
    penalty_gradient,
    penalty_value,
    pooled_cost,
    predicted_cost,
)
from bilevel_ray.diagnostics.diagnose import diagnose
from bilevel_ray.diagnostics.flatness import (
    DELTA_PAIRS,
    Responses,
    bias_terms,
    delta_hat,
    estimate,
    estimate_problems,
    fit_exponent,
    lower_responses,
    solve_scale,
)
from bilevel_ray.diagnostics.verdict import Verdict, decide, decide_problems

__all__ = [
    "DELTA_PAIRS",
    "Responses",
    "Verdict",
    "bias_terms",
    "curvature_along",
    "decide",
    "decide_problems",
    "delta_hat",
    "diagnose",
    "estimate",
    "estimate_problems",
    "fit_exponent",
    "lower_responses",
    "penalty_gradient",
    "penalty_value",
    "pooled_cost",
    "predicted_cost",
    "solve_scale",
]
