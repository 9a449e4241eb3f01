"""PBGD-Free: the fully single-loop, value-function-free penalty method.

Jiang, Xiao, Chen, Chen. *Beyond Value Functions: Single-Loop Bilevel Optimization under Flatness
Conditions*. NeurIPS 2025 (arXiv 2507.20400), Algorithm 1.

With upper objective f, lower objective g, penalty gamma_t, an upper batch xi_t and a lower
batch zeta_t, one step is::

    for k = 1..K:   y <- y - lr_y * grad_y [ f(x, y; xi_t) / gamma_t + g(x, y; zeta_t) ]
    x <- x - lr_x * grad_x f(x, y; xi_t)

(``-lr * grad`` stands for the level's update rule; Adam in the paper's LLM experiments.)
The value-function correction gamma * [grad_x g(x, y_gamma) - grad_x g(x, y_g)] of the penalty
gradient is dropped, so no y_g is computed and only one copy of y is kept. That is exact when f is
flat in y near the lower-level solution (the paper's Definition 1) and biased otherwise: on the
negative toy f = 10y + x^2, g = (y - x + 1)^2 the fixed point is x = 0, not x* = -5, for every
gamma. K = 1 is the case Theorem 3 analyses.
"""

from __future__ import annotations

from typing import Any

from bilevel_ray.problem import BilevelProblem
from bilevel_ray.schedules import ScalarOrSchedule, positive_value
from bilevel_ray.solvers.base import (
    BilevelSolver,
    GradReduce,
    Metrics,
    SolverState,
    gamma_setting,
    identity_reduce,
    steps_setting,
)
from bilevel_ray.solvers.compute import Compute, Losses
from bilevel_ray.tree import Params
from bilevel_ray.updates import UpdateRule

__all__ = ["SETTINGS", "pbgd_free"]

# PBGD-Free's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(1)}


def pbgd_free(
    problem: BilevelProblem,
    *,
    update_x: UpdateRule,
    update_y: UpdateRule,
    gamma: ScalarOrSchedule,
    inner_steps: int = SETTINGS["inner_steps"].default,
    grad_reduce: GradReduce | None = None,
    precision: str = "fp32",
    grad_accumulation: int = 1,
    in_place: bool = False,
) -> BilevelSolver:
    """Build PBGD-Free; ``inner_steps`` is K, the number of y updates per x update;
    ``precision`` and ``grad_accumulation`` as in :mod:`bilevel_ray.solvers.compute`."""
    gamma_t = SETTINGS["gamma"].check(gamma)
    inner_steps = SETTINGS["inner_steps"].check(inner_steps)
    compute = Compute(
        problem, grad_reduce or identity_reduce, precision, grad_accumulation, in_place
    )

    def init(x0: Params, y0: Params) -> SolverState:
        return compute.init(x0, y0, update_x, update_y)

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y = state.step, state.x, state.y
        gamma = positive_value("gamma", gamma_t, t)
        # Only f is differentiated in x: the lower level's features need no graph.
        ev = compute.at(x, batch, state.extra, attach=("upper",))

        def perturbed_lower(L: Losses, y_: Params) -> tuple[Any, Metrics]:
            g = L.lower(ev.x, y_)
            return L.upper(ev.x, y_) / gamma + g, {"lower/loss": g.detach()}

        aux = ev.descend(perturbed_lower, y, update_y, state.opt["y"], t, inner_steps)
        f, _, (grad_x,) = ev.grads(lambda L, x_: (L.upper(x_, y), {}), [ev.x])
        update_x.apply(x, grad_x, state.opt["x"], t)
        return state._replace(step=t + 1), {"upper/loss": f, **aux, "penalty/gamma": gamma}

    return BilevelSolver("pbgd_free", init, step)
