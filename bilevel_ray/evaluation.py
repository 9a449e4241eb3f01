"""Scoring a run on held-out data: what a sweep compares trials by.

Two numbers, at the current (x, y):

* ``eval/upper_loss`` = f(x, y) on held-out upper-level data (the run's quality);
* ``eval/lower_gap``  = g(x, y) - min_y' g(x, y'), the lower-level optimality gap (the run's
  feasibility: a low upper loss reached with a y far from argmin g is not a bilevel solution).
  min_y' g(x, y') is estimated by ``gap_steps`` Adam steps on g(x, .) warm-started at y (Adam,
  because a fixed step size would need g's curvature); the estimate only underestimates the
  decrease available, so the gap is a lower bound that tightens with ``gap_steps``.

A problem may add its own held-out numbers with a method ``eval_metrics(x, y, eval_batch)``
returning a dict of floats (the language-model problem: DPO reward accuracy and margin, SFT
loss and perplexity); they are logged as ``eval/<name>`` beside the two above
(:func:`held_out_metrics`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import descend
from bilevel_ray.tree import Params, clone
from bilevel_ray.updates import adam

__all__ = ["evaluate", "held_out_metrics"]


def held_out_metrics(problem: Any, x: Params, y: Params, eval_batch: Any) -> dict[str, float]:
    """The problem's own held-out numbers as ``{"eval/<name>": value}``; empty when the problem
    has no ``eval_metrics`` or no held-out data is given."""
    metrics = getattr(problem, "eval_metrics", None)
    if metrics is None or eval_batch is None:
        return {}
    with torch.no_grad():
        return {f"eval/{k}": float(v) for k, v in metrics(x, y, eval_batch).items()}


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
    extra = held_out_metrics(problem, x, y, eval_batch)
    if not with_gap:
        return {"eval/upper_loss": upper, "eval/lower_gap": math.nan, **extra}
    y_best = clone(y)
    rule = adam(gap_lr)
    state = rule.init(y_best)

    def lower_loss(y_: Params) -> tuple[Any, dict]:
        return problem.lower_loss(x, y_, eval_batch.lower), {}

    descend(lower_loss, y_best, rule, state, 0, gap_steps, lambda g: g)
    with torch.no_grad():
        best = float(problem.lower_loss(x, y_best, eval_batch.lower))
    gap = max(lower - min(best, lower), 0.0)
    return {"eval/upper_loss": upper, "eval/lower_gap": gap, **extra}
