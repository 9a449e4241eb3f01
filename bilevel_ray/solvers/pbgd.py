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

from bilevel_ray.schedules import ScalarOrSchedule, positive_value
from bilevel_ray.solvers.base import Metrics, SolverState, gamma_setting, steps_setting
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.solvers.penalty import penalty_objective, value_function_steps

__all__ = ["SETTINGS", "pbgd"]

# V-PBGD's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(5)}


@solver_factory(SETTINGS)
def pbgd(s: Setup, *, gamma: ScalarOrSchedule, inner_steps: int = DEFAULT) -> Plan:
    """Build V-PBGD; ``inner_steps`` is K_g, the value-function steps per joint step."""

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y, y_g = state.step, state.x, state.y, state.extra["y_g"]
        gamma_t = positive_value("gamma", gamma, t)
        ev = s.compute.at(x, batch, state.extra)
        aux = value_function_steps(ev, y_g, s.update_y, state.opt["y_g"], t, inner_steps)
        _, metrics, (grad_x, grad_y) = ev.grads(
            lambda L, x_, y_: penalty_objective(L, x_, y_, y_g, gamma_t), [ev.x, y]
        )
        torch._foreach_mul_(list(grad_y.values()), 1.0 / gamma_t)  # fresh tensors: scale in place
        s.update_x.apply(x, grad_x, state.opt["x"], t)
        s.update_y.apply(y, grad_y, state.opt["y"], t)
        return state._replace(step=t + 1), {**metrics, **aux, "penalty/gamma": gamma_t}

    return Plan(step, copies=("y_g",))
