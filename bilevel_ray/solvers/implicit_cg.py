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
    GradReduce,
    Metrics,
    Setting,
    SolverState,
    check_number,
    identity_reduce,
    steps_setting,
)
from bilevel_ray.solvers.compute import Compute, StepEval
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.solvers.penalty import value_function_steps
from bilevel_ray.solvers.precision import autocast
from bilevel_ray.tree import Params, leaves, sub

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


def implicit_hypergradient(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    batch: Any,
    *,
    cg_steps: int,
    cg_ridge: float = 0.0,
    grad_reduce: GradReduce = identity_reduce,
    ev: StepEval | None = None,
) -> tuple[Params, Metrics]:
    """grad_x f(x, y) - grad^2_xy g(x, y) v with v from CG; exact at y = y*(x) when CG converges.

    ``ev`` (a solver's step evaluation) brings precision and accumulation: the Hessian-vector
    products sum over the micro-batches, whose graphs of grad_y g are all kept for the CG
    iterations (so accumulation does not lower implicit_cg's memory), and fp16 runs without
    loss scaling here (the second derivatives are taken of the unscaled g).
    """
    ev = ev or Compute(problem, grad_reduce).at(x, batch)
    reduce = ev.compute.reduce
    (f, _, (f_x, f_y)) = ev.grads(
        lambda L, x_, y_: (L.upper(x_, y_), {}), [ev.x, y], reduce=(False, True)
    )
    xl, yl = ev.xl, leaves(y)
    xs, ys = list(xl.values()), list(yl.values())
    g_values: list[Any] = []
    g_ys: list[tuple[Any, ...]] = []
    with torch.enable_grad():
        for L in ev.micro:
            with autocast(ev.compute.precision, ev.device):
                g = L.lower(xl, yl)
            g_ys.append(
                torch.autograd.grad(
                    g, ys, create_graph=True, allow_unused=True, materialize_grads=True
                )
            )
            g_values.append(g.detach())
        # Entries of grad_y g that do not depend on (x, y) (g linear in them, or unused) have a
        # zero Hessian block: they drop out of every second derivative.
        live = [[i for i, d in enumerate(g_y) if d.requires_grad] for g_y in g_ys]

        def second(wrt: list[Any], v: Params, retain: bool) -> list[Any]:
            vs = list(v.values())
            total = [torch.zeros_like(w) for w in wrt]
            for g_y, alive in zip(g_ys, live):
                if not alive:
                    continue
                parts = torch.autograd.grad(
                    [g_y[i] for i in alive],
                    wrt,
                    grad_outputs=[vs[i] for i in alive],
                    allow_unused=True,
                    materialize_grads=True,
                    retain_graph=retain or ev.keep_graph,
                )
                torch._foreach_add_(total, list(parts))
            return total

        def hvp(v: Params) -> Params:
            return reduce(dict(zip(yl, second(ys, v, retain=True))))

        v = solve_cg(hvp, f_y, maxiter=cg_steps, ridge=cg_ridge)
        cross = second(xs, v, retain=False)
    hypergrad = reduce(sub(f_x, dict(zip(xl, cross))))
    g_total = sum(g_values[1:], g_values[0])  # one value per micro-batch, at least one
    return hypergrad, {"upper/loss": f, "lower/loss": g_total}


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
