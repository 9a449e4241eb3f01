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
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_ray.linear_solve import solve_cg
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import (
    KNOB_CHECKS,
    BilevelSolver,
    GradReduce,
    Metrics,
    SolverState,
    identity_reduce,
    initial_state,
)
from bilevel_ray.solvers.penalty import value_function_steps
from bilevel_ray.tree import Params, leaves, sub
from bilevel_ray.updates import UpdateRule

__all__ = ["implicit_cg", "implicit_hypergradient"]


def implicit_hypergradient(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    batch: Any,
    *,
    cg_steps: int,
    cg_ridge: float = 0.0,
    grad_reduce: GradReduce = identity_reduce,
) -> tuple[Params, Metrics]:
    """grad_x f(x, y) - grad^2_xy g(x, y) v with v from CG; exact at y = y*(x) when CG converges."""
    xl, yl = leaves(x), leaves(y)
    xs, ys = list(xl.values()), list(yl.values())
    with torch.enable_grad():
        f = problem.upper_loss(xl, yl, batch.upper)
        df = torch.autograd.grad(f, xs + ys, allow_unused=True, materialize_grads=True)
        f_x, f_y = dict(zip(xl, df[: len(xs)])), grad_reduce(dict(zip(yl, df[len(xs) :])))
        g = problem.lower_loss(xl, yl, batch.lower)
        g_y = torch.autograd.grad(
            g, ys, create_graph=True, allow_unused=True, materialize_grads=True
        )
        # Entries of grad_y g that do not depend on (x, y) (g linear in them, or unused) have a
        # zero Hessian block: they drop out of every second derivative.
        live = [i for i, d in enumerate(g_y) if d.requires_grad]

        def second(wrt: list[Any], v: Params, **kwargs: Any) -> tuple[Any, ...]:
            if not live:
                return tuple(torch.zeros_like(w) for w in wrt)
            vs = list(v.values())
            return torch.autograd.grad(
                [g_y[i] for i in live],
                wrt,
                grad_outputs=[vs[i] for i in live],
                allow_unused=True,
                materialize_grads=True,
                **kwargs,
            )

        def hvp(v: Params) -> Params:
            return grad_reduce(dict(zip(yl, second(ys, v, retain_graph=True))))

        v = solve_cg(hvp, f_y, maxiter=cg_steps, ridge=cg_ridge)
        cross = second(xs, v)
    hypergrad = grad_reduce(sub(f_x, dict(zip(xl, cross))))
    return hypergrad, {"upper/loss": f.detach(), "lower/loss": g.detach()}


def implicit_cg(
    problem: BilevelProblem,
    *,
    update_x: UpdateRule,
    update_y: UpdateRule,
    inner_steps: int = 20,
    cg_steps: int = 10,
    cg_ridge: float = 0.0,
    grad_reduce: GradReduce | None = None,
) -> BilevelSolver:
    """Build AID-CG; ``inner_steps`` lower steps on y, then ``cg_steps`` CG iterations."""
    inner_steps = KNOB_CHECKS["inner_steps"](inner_steps)
    cg_steps = KNOB_CHECKS["cg_steps"](cg_steps)
    cg_ridge = KNOB_CHECKS["cg_ridge"](cg_ridge)
    reduce = grad_reduce or identity_reduce

    def init(x0: Params, y0: Params) -> SolverState:
        return initial_state(x0, y0, update_x, update_y)

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y = state.step, state.x, state.y
        value_function_steps(problem, x, y, update_y, state.opt["y"], t, inner_steps, batch, reduce)
        hypergrad, metrics = implicit_hypergradient(
            problem, x, y, batch, cg_steps=cg_steps, cg_ridge=cg_ridge, grad_reduce=reduce
        )
        update_x.apply(x, hypergrad, state.opt["x"], t)
        return state._replace(step=t + 1), metrics

    return BilevelSolver("implicit_cg", init, step)
