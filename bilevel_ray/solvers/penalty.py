"""Pieces shared by the value-function penalty methods (PBGD, ALT-PBGD, F2SA).

With y_g ~ argmin_y g(x, y) (the value-function copy) the penalty gradient in x is
(digest §1.3, Eq. 5 of the PBGD-Free paper)::

    grad_x F = grad_x f(x, y) + gamma * [ grad_x g(x, y) - grad_x g(x, y_g) ]

computed here in one backward pass and reduced once.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel_ray.solvers.base import Metrics
from bilevel_ray.solvers.compute import Losses, StepEval
from bilevel_ray.tree import Params
from bilevel_ray.updates import UpdateRule

__all__ = ["alternating_penalty_step", "penalty_objective", "value_function_steps"]


def value_function_steps(
    ev: StepEval, y_g: Params, rule: UpdateRule, opt_state: Any, t: int, steps: int
) -> Metrics:
    """Warm-started inner loop ``y_g <- y_g - lr * grad_y g(x, y_g)``, in place, x fixed."""

    def lower(L: Losses, y_: Params) -> tuple[Tensor, Metrics]:
        g = L.lower(ev.x, y_)
        return g, {"value/loss": g.detach()}

    return ev.descend(lower, y_g, rule, opt_state, t, steps)


def penalty_objective(
    L: Losses, x: Params, y: Params, y_g: Params, gamma: float
) -> tuple[Tensor, Metrics]:
    """f(x, y) + gamma * [g(x, y) - g(x, y_g)], whose x-gradient is the penalty gradient."""
    f = L.upper(x, y)
    g = L.lower(x, y)
    g_value = L.lower(x, y_g)
    return f + gamma * (g - g_value), {"upper/loss": f.detach(), "lower/loss": g.detach()}


def alternating_penalty_step(
    ev: StepEval,
    state: Any,
    gamma: float,
    update_x: UpdateRule,
    update_y: UpdateRule,
    inner_steps: int,
) -> Metrics:
    """The ALT-PBGD / F2SA iteration body, updating ``state``'s tensors in place::

    K steps on g for y_g;  K steps on f / gamma + g for y;  one x step on the penalty gradient.
    """
    t, x, y, y_g = state.step, state.x, state.y, state.extra["y_g"]
    value_aux = value_function_steps(ev, y_g, update_y, state.opt["y_g"], t, inner_steps)

    def perturbed_lower(L: Losses, y_: Params) -> tuple[Tensor, Metrics]:
        return L.upper(ev.x, y_) / gamma + L.lower(ev.x, y_), {}

    ev.descend(perturbed_lower, y, update_y, state.opt["y"], t, inner_steps)
    _, metrics, (grad_x,) = ev.grads(lambda L, x_: penalty_objective(L, x_, y, y_g, gamma), [ev.x])
    update_x.apply(x, grad_x, state.opt["x"], t)
    return {**metrics, **value_aux}
