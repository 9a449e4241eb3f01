"""Scoring a run on held-out data: what a sweep compares trials by.

Two numbers, at the current (x, y):

* ``eval/upper_loss`` = f(x, y) on held-out upper-level data (the run's quality);
* ``eval/lower_gap``  = g(x, y) - min_y' g(x, y'), the lower-level optimality gap (the run's
  feasibility: a low upper loss reached with a y far from argmin g is not a bilevel solution).
  min_y' g(x, y') is estimated by ``gap_steps`` Adam steps on g(x, .) warm-started at y (Adam,
  because a fixed step size would need g's curvature); the estimate only underestimates the
  decrease available, so the gap is a lower bound that tightens with ``gap_steps``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import descend
from bilevel_ray.tree import Params, clone
from bilevel_ray.updates import adam

__all__ = ["evaluate"]


def evaluate(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    eval_batch: Any,
    *,
    gap_steps: int = 50,
    gap_lr: float = 1e-2,
    with_gap: bool = True,
) -> dict[str, float]:
    """``{"eval/upper_loss", "eval/lower_gap"}`` at (x, y) on ``eval_batch`` (a BilevelBatch);
    ``with_gap=False`` skips the gap's lower solve (NaN), the costly part."""
    with torch.no_grad():
        upper = float(problem.upper_loss(x, y, eval_batch.upper))
        lower = float(problem.lower_loss(x, y, eval_batch.lower))
    if not with_gap:
        return {"eval/upper_loss": upper, "eval/lower_gap": math.nan}
    y_best = clone(y)
    rule = adam(gap_lr)
    state = rule.init(y_best)

    def lower_loss(y_: Params) -> tuple[Any, dict]:
        return problem.lower_loss(x, y_, eval_batch.lower), {}

    descend(lower_loss, y_best, rule, state, 0, gap_steps, lambda g: g)
    with torch.no_grad():
        best = float(problem.lower_loss(x, y_best, eval_batch.lower))
    return {"eval/upper_loss": upper, "eval/lower_gap": max(lower - min(best, lower), 0.0)}
