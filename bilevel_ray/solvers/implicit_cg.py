"""Approximate implicit differentiation (AID) with conjugate gradients on Hessian-vector products.

Pedregosa, *Hyperparameter optimization with approximate gradient*, ICML 2016; Ji, Yang, Liang,
*Bilevel Optimization: Convergence Analysis and Enhanced Design*, ICML 2021 (digest §4.6). With a
strongly convex g(x, .), the hypergradient of phi(x) = f(x, y*(x)) is

    grad phi(x) = grad_x f(x, y*) - grad^2_xy g(x, y*) v,
    v = [grad^2_yy g(x, y*)]^{-1} grad_y f(x, y*)

One step::

    for k = 1..K:   y <- y - lr_y * grad_y g(x, y; zeta_t)                     (warm-started)
    v  = CG(cg_steps) on (grad^2_yy g + ridge I) v = grad_y f(x, y; xi_t)    (by HVPs)
    x <- x - lr_x * [ grad_x f(x, y) - grad_x < grad_y g(x, y), v > ]

It needs second derivatives (double backward) but no penalty: the baseline that is exact when
the inner problem is solved, at the price of K + cg_steps lower-level gradient evaluations.
The x direction is :func:`~bilevel_ray.solvers.hypergradient.implicit_hypergradient`.
"""

from __future__ import annotations

from typing import Any

from bilevel_ray.solvers.base import Metrics, Setting, SolverState, check_number, steps_setting
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.solvers.hypergradient import implicit_hypergradient
from bilevel_ray.solvers.penalty import value_function_steps

# implicit_hypergradient (the x direction) has its own module; it is re-exported here, where it
# was first defined, so that imports from bilevel_ray.solvers.implicit_cg keep working.
__all__ = ["SETTINGS", "implicit_cg", "implicit_hypergradient"]

# implicit_cg's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {
    "inner_steps": steps_setting(20),
    "cg_steps": steps_setting(10, "cg_steps"),
    "cg_ridge": Setting(
        0.0,
        lambda v: check_number(
            "cg_ridge",
            v,
            strict=False,
            hint="it is added to the Hessian's diagonal; use 0 for a strongly convex lower level",
        ),
    ),
}


@solver_factory(SETTINGS)
def implicit_cg(
    s: Setup, *, inner_steps: int = DEFAULT, cg_steps: int = DEFAULT, cg_ridge: float = DEFAULT
) -> Plan:
    """Build AID-CG; ``inner_steps`` lower steps on y, then ``cg_steps`` CG iterations."""

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y = state.step, state.x, state.y
        ev = s.compute.at(x, batch, state.extra)
        value_function_steps(ev, y, s.update_y, state.opt["y"], t, inner_steps)
        hypergrad, metrics = implicit_hypergradient(
            s.compute.problem, x, y, batch, cg_steps=cg_steps, cg_ridge=cg_ridge, ev=ev
        )
        s.update_x.apply(x, hypergrad, state.opt["x"], t)
        return state._replace(step=t + 1), metrics

    return Plan(step)
