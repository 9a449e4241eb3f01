"""V-PBGD: penalty-based bilevel gradient descent with a value-function inner loop, joint step.

Shen & Chen. *On Penalty-based Bilevel Gradient Descent Method*. ICML 2023 (V-PBGD); the
"PBGD" baseline of the PBGD-Free paper (digest §1.4, §4.1). One step with K inner steps::

    for k = 1..K:   y_g <- y_g - lr_y * grad_y g(x, y_g; zeta_t)                 (warm-started)
    joint step on the penalty F~(x, y) = f(x, y) + gamma_t * [ g(x, y) - g(x, y_g) ], y_g fixed:
        x <- x - lr_x * [ grad_x f(x, y) + gamma_t * ( grad_x g(x, y) - grad_x g(x, y_g) ) ]
        y <- y - lr_y * [ grad_y f(x, y) / gamma_t + grad_y g(x, y) ]

The y direction is grad_y F~ / gamma_t: the joint step on F~ with the step size lr_y / gamma_t
that its O(gamma) smoothness requires, written so that lr_y means the same lower-level step size
as in PBGD-Free. x and y are updated from the same point (a Jacobi step). Memory: two copies of y.
"""

from __future__ import annotations

from typing import Any

import torch

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
from bilevel_ray.solvers.compute import Compute
from bilevel_ray.solvers.penalty import penalty_objective, value_function_steps
from bilevel_ray.tree import Params
from bilevel_ray.updates import UpdateRule

__all__ = ["SETTINGS", "pbgd"]

# V-PBGD's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(5)}


def pbgd(
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
    """Build V-PBGD; ``inner_steps`` is K_g, the value-function steps per joint step."""
    gamma_t = SETTINGS["gamma"].check(gamma)
    inner_steps = SETTINGS["inner_steps"].check(inner_steps)
    compute = Compute(
        problem, grad_reduce or identity_reduce, precision, grad_accumulation, in_place
    )

    def init(x0: Params, y0: Params) -> SolverState:
        return compute.init(x0, y0, update_x, update_y, copies=("y_g",))

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y, y_g = state.step, state.x, state.y, state.extra["y_g"]
        gamma = positive_value("gamma", gamma_t, t)
        ev = compute.at(x, batch, state.extra)
        aux = value_function_steps(ev, y_g, update_y, state.opt["y_g"], t, inner_steps)
        _, metrics, (grad_x, grad_y) = ev.grads(
            lambda L, x_, y_: penalty_objective(L, x_, y_, y_g, gamma), [ev.x, y]
        )
        torch._foreach_mul_(list(grad_y.values()), 1.0 / gamma)  # fresh tensors: scale in place
        update_x.apply(x, grad_x, state.opt["x"], t)
        update_y.apply(y, grad_y, state.opt["y"], t)
        return state._replace(step=t + 1), {**metrics, **aux, "penalty/gamma": gamma}

    return BilevelSolver("pbgd", init, step)
