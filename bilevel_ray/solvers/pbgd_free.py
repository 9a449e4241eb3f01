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

from bilevel_ray.schedules import ScalarOrSchedule, positive_value
from bilevel_ray.solvers.base import Metrics, SolverState, gamma_setting, steps_setting
from bilevel_ray.solvers.compute import Losses
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.tree import Params

__all__ = ["SETTINGS", "pbgd_free"]

# PBGD-Free's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(1)}


@solver_factory(SETTINGS)
def pbgd_free(s: Setup, *, gamma: ScalarOrSchedule, inner_steps: int = DEFAULT) -> Plan:
    """Build PBGD-Free; ``inner_steps`` is K, the number of y updates per x update;
    ``precision`` and ``grad_accumulation`` as in :mod:`bilevel_ray.solvers.compute`."""

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y = state.step, state.x, state.y
        gamma_t = positive_value("gamma", gamma, t)
        # Only f is differentiated in x: the lower level's features need no graph.
        ev = s.compute.at(x, batch, state.extra, attach=("upper",))

        def perturbed_lower(L: Losses, y_: Params) -> tuple[Any, Metrics]:
            g = L.lower(ev.x, y_)
            return L.upper(ev.x, y_) / gamma_t + g, {"lower/loss": g.detach()}

        aux = ev.descend(perturbed_lower, y, s.update_y, state.opt["y"], t, inner_steps)
        f, _, (grad_x,) = ev.grads(lambda L, x_: (L.upper(x_, y), {}), [ev.x])
        s.update_x.apply(x, grad_x, state.opt["x"], t)
        return state._replace(step=t + 1), {"upper/loss": f, **aux, "penalty/gamma": gamma_t}

    return Plan(step)
