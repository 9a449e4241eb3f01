"""The AID hypergradient at a given y: one CG solve on Hessian-vector products, then one cross
derivative (Pedregosa, ICML 2016; Ji, Yang, Liang, ICML 2021; digest §4.6).

With g(x, .) strongly convex and y*(x) = argmin_y g(x, y), phi(x) = f(x, y*(x)) has

    grad phi(x) = grad_x f(x, y*) - grad^2_xy g(x, y*) v,
    v = [grad^2_yy g(x, y*) + ridge I]^{-1} grad_y f(x, y*)       (ridge = 0: the exact v)

:func:`implicit_hypergradient` evaluates it at the y it is given (y ~ y*(x) after the lower
steps of :func:`~bilevel_ray.solvers.implicit_cg.implicit_cg`): v by ``cg_steps`` CG iterations
whose matrix is applied as grad_y < grad_y g, v >, and the cross term as grad_x < grad_y g, v >,
both by double backward through one graph of grad_y g.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_ray.linear_solve import solve_cg
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import GradReduce, Metrics, identity_reduce
from bilevel_ray.solvers.compute import Compute, StepEval
from bilevel_ray.solvers.precision import autocast
from bilevel_ray.tree import Params, leaves, sub

__all__ = ["implicit_hypergradient"]


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
