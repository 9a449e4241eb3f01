"""Does PBGD-Free suit a problem? Flatness estimates at a point, and the verdict they support.

    v = diagnose(problem, x0, y0, gamma=10.0, steps=2000)   # run PBGD-Free, certify its end
    v.suitable, v.reason, v.stats, v.recommendation, v.fallback, v.held_out, v.prediction

A runtime that collects :func:`estimate` dicts during a run calls :func:`decide` on them after
its warm-up window (a prediction); :func:`end_check` certifies a finished run's end point.
Torch only: nothing here imports Ray or the runtimes.
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
from bilevel_ray.diagnostics.end_check import EndCheck, end_check, held_out_line
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
from bilevel_ray.diagnostics.price_rule import decide
from bilevel_ray.diagnostics.verdict import Verdict, decide_problems

__all__ = [
    "DELTA_PAIRS",
    "EndCheck",
    "Responses",
    "Verdict",
    "bias_terms",
    "curvature_along",
    "decide",
    "decide_problems",
    "delta_hat",
    "diagnose",
    "end_check",
    "estimate",
    "estimate_problems",
    "fit_exponent",
    "held_out_line",
    "lower_responses",
    "penalty_gradient",
    "penalty_value",
    "pooled_cost",
    "predicted_cost",
    "solve_scale",
]
