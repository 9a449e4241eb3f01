"""The two lower-level responses every flatness estimate needs, solved to a stated tolerance.

At an upper-level point x, with penalty gamma::

    y_g     = argmin_y g(x, y)
    y_gamma = argmin_y f(x, y) / gamma + g(x, y)

each solved from a warm start until ||grad|| <= rtol * scale (:func:`solve_scale`), and the
relative residual the solves actually reached is returned with them, so that a caller can say
when a point did not converge instead of trusting it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel_ray.data import BilevelBatch
from bilevel_ray.problem import BilevelProblem, detach_features, has_features
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, clone, vdot
from bilevel_ray.updates import make_update

__all__ = [
    "Responses",
    "Solve",
    "as_batch",
    "lbfgs_solve",
    "level_losses",
    "lower_responses",
    "minimize",
    "norm",
    "perturbed_objective",
    "reference_upper",
    "solve_scale",
]


def norm(p: Params) -> float:
    return math.sqrt(max(float(vdot(p, p)), 0.0))


def as_batch(batch: Any) -> Any:
    return BilevelBatch(None, None) if batch is None else batch


def level_losses(
    problem: BilevelProblem, x: Params, batch: Any
) -> tuple[Callable[[Params], Tensor], Callable[[Params], Tensor]]:
    """(y -> f(x, y), y -> g(x, y)) at this fixed x. Where the problem declares its structure
    (:class:`~bilevel_ray.problem.FeatureProblem`: x computes features, y is a head on them) the
    features of x are computed once per level, without autograd, and each call runs the head
    alone: a solve over y then costs head evaluations, not model passes (on ``peft-dpo-sft``
    about a tenth)."""
    batch = as_batch(batch)
    if not has_features(problem):
        return (
            lambda y_: problem.upper_loss(x, y_, batch.upper),
            lambda y_: problem.lower_loss(x, y_, batch.lower),
        )
    with torch.no_grad():
        up = detach_features(problem.features(x, batch.upper, "upper"))
        low = detach_features(problem.features(x, batch.lower, "lower"))
    return (
        lambda y_: problem.head_loss(y_, up, batch.upper, "upper"),
        lambda y_: problem.head_loss(y_, low, batch.lower, "lower"),
    )


def perturbed_objective(
    problem: BilevelProblem,
    x: Params,
    batch: Any,
    gamma: float,
    losses: tuple[Callable, Callable] | None = None,
) -> Callable:
    """y -> f(x, y) / gamma + g(x, y) (through ``losses``, :func:`level_losses`, when given)."""
    if losses is not None:
        f, g = losses
        return lambda y_: f(y_) / gamma + g(y_)
    return lambda y_: (
        problem.upper_loss(x, y_, batch.upper) / gamma + problem.lower_loss(x, y_, batch.lower)
    )


def minimize(
    objective: Callable[[Params], Tensor],
    y: Params,
    steps: int,
    lr: float,
    optimizer: str,
    stop: float,
) -> tuple[Params, float]:
    """Up to ``steps`` updates of a copy of y on ``objective``, stopping once ||grad|| <= stop;
    returns the iterate with the smallest gradient norm, and that norm. Both guards are for
    Adam: its first step has length lr whatever the gradient, so a solve started at (or
    oscillating around) a minimizer would otherwise end further from it."""
    if optimizer == "lbfgs":
        return _solve_lbfgs(objective, y, steps, stop)
    y = clone(y)
    rule = make_update(optimizer, lr, name="solve_lr")
    state = rule.init(y)
    best, best_norm = y, math.inf
    for t in range(steps + 1):
        _, _, (grad,) = grads_of(lambda y_: (objective(y_), {}), [y], identity_reduce)
        size = norm(grad)
        if size < best_norm:
            best, best_norm = (y if size <= stop or t == steps else clone(y)), size
        if t == steps or size <= stop:
            break
        rule.apply(y, grad, state, t)
    return best, best_norm


def _solve_lbfgs(
    objective: Callable[[Params], Tensor], y: Params, steps: int, stop: float
) -> tuple[Params, float]:
    """As :func:`minimize` with L-BFGS (:func:`lbfgs_solve`)."""
    solved = lbfgs_solve(objective, y, steps, stop)
    return solved.y, solved.residual


class Solve(NamedTuple):
    """An L-BFGS solve's end: the iterate (detached), its gradient norm, the iterations taken,
    and whether it stopped on its budget (``steps`` iterations or their evaluations) with the
    gradient still above ``stop``: then it had neither met the tolerance nor stalled at the
    dtype's rounding, and the iterate is where the budget ran out, not a solution."""

    y: Params
    residual: float
    iterations: int
    exhausted: bool


def lbfgs_solve(objective: Callable[[Params], Tensor], y: Params, steps: int, stop: float) -> Solve:
    """Up to ``steps`` L-BFGS iterations on ``objective`` from a copy of y, with a strong-Wolfe
    line search (torch.optim.LBFGS), stopping once ||grad|| <= stop: on a smooth lower level it
    reaches a tight tolerance in tens of gradients where Adam needs hundreds, which is what
    keeps a run's diagnostic cheap. Gradients are taken with respect to y only
    (``autograd.grad``), so frozen parameters of a module problem gain no ``.grad``."""
    y = {k: v.detach().clone().requires_grad_(True) for k, v in y.items()}
    leaves = list(y.values())
    # L-BFGS tests the largest gradient entry; stop / sqrt(n) bounds the norm by ``stop``.
    size = sum(t.numel() for t in leaves)
    eps = torch.finfo(leaves[0].dtype).eps
    stall = float(eps) if eps > 1e-10 else 0.0  # float64 reaches any sensible tolerance
    opt = torch.optim.LBFGS(
        leaves,
        max_iter=steps,
        tolerance_grad=stop / math.sqrt(size),
        # Stop once the loss or the step stalls at the dtype's rounding: a float32 network's
        # gradient cannot fall below its rounding noise, and iterating on is only time.
        tolerance_change=stall,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        loss = objective(y)
        for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves)):
            leaf.grad = grad
        return loss.detach()

    opt.step(closure)
    state, group = opt.state[leaves[0]], opt.param_groups[0]
    iterations = int(state.get("n_iter", 0))
    budget = iterations >= group["max_iter"] or state.get("func_evals", 0) >= group["max_eval"]
    y = {k: v.detach() for k, v in y.items()}
    _, _, (grad,) = grads_of(lambda y_: (objective(y_), {}), [y], identity_reduce)
    residual = norm(grad)
    return Solve(y, residual, iterations, budget and residual > stop)


def solve_scale(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    batch: Any,
    gamma: float,
    losses: tuple[Callable, Callable] | None = None,
) -> float:
    """The gradient size the solves are measured against: max(||grad_y g(x, y)||,
    ||grad_y f(x, y)|| / gamma), the first step's size on g and the perturbation separating
    y_gamma from y_g, floored at sqrt(eps) (1 + |g(x, y)|) so that a start at an exact solution
    (both ~0) is not measured against rounding."""
    f_of, g_of = losses or level_losses(problem, x, batch)
    g, _, (grad_g,) = grads_of(lambda y_: (g_of(y_), {}), [y], identity_reduce)
    _, _, (grad_f,) = grads_of(lambda y_: (f_of(y_), {}), [y], identity_reduce)
    floor = torch.finfo(g.dtype).eps ** 0.5 * (1 + abs(float(g)))
    return max(norm(grad_g), norm(grad_f) / gamma, floor)


class Responses(NamedTuple):
    """y_g and y_gamma (detached), the gradient scale of their solves (:func:`solve_scale`) and
    their worst final gradient norm relative to it."""

    y_g: Params
    y_gamma: Params
    scale: float
    residual: float


def lower_responses(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    batch: Any = None,
    gamma: float = 10.0,
    *,
    solve_steps: int = 300,
    solve_lr: float = 0.05,
    solve_rtol: float = 1e-6,
    optimizer: str = "adam",
    scale: float | None = None,
    losses: tuple[Callable, Callable] | None = None,
) -> Responses:
    """y_g from up to ``solve_steps`` steps on g(x, .) from y; y_gamma from as many on
    f(x, .)/gamma + g(x, .) from y_g (O(1/gamma) away), and from y where y_g is stationary for
    it too (a saddle of a Hoelder-flat f: the lower of the two ends). Both
    stop at gradient norm ``solve_rtol * scale``; ``scale`` defaults to :func:`solve_scale` at
    y (a run passes its first point's scale at later points, so that a warm start near y_g
    does not tighten the tolerance). Adam by default: its step length does not depend on g's
    curvature. ``losses``: :func:`level_losses` at this x and batch, where the caller has them
    already."""
    batch = as_batch(batch)
    losses = losses or level_losses(problem, x, batch)
    scale = solve_scale(problem, x, y, batch, gamma, losses) if scale is None else scale
    settings = (solve_steps, solve_lr, optimizer, solve_rtol * scale)
    y_g, res_g = minimize(losses[1], y, *settings)
    objective = perturbed_objective(problem, x, batch, gamma, losses)
    y_gamma, res_gamma = minimize(objective, y_g, *settings)
    if _same_point(y_gamma, y_g) and not _same_point(y, y_g):
        # The solve stopped at once: y_g is stationary for f/gamma + g too, its minimum (f flat
        # at y_g: y_gamma = y_g) or a saddle (a Hoelder-flat f, where stopping there would price
        # the dropped term at 0). A second solve from the given y (a run's own iterate, which
        # tracks y_gamma) decides: the lower objective is y_gamma.
        other, res_other = minimize(objective, y, *settings)
        with torch.no_grad():
            here = objective(y_gamma)
            # Lower by more than rounding: at a true minimum both ends agree to it.
            margin = torch.finfo(here.dtype).eps ** 0.5 * (1 + abs(float(here)))
            if float(objective(other)) < float(here) - margin:
                y_gamma, res_gamma = other, res_other
    worst = max(res_g, res_gamma)
    return Responses(y_g, y_gamma, scale, worst / scale if scale > 0 else worst)


def _same_point(a: Params, b: Params) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def reference_upper(
    problem: BilevelProblem, x: Params, y: Params, batch: Any, gamma: float, solve: dict
) -> tuple[float, Params]:
    """f(x, y_gamma(x)) at the reference point x on this batch (solves warm-started at y, to the
    trajectory checks' loose tolerance: it only scales the tolerance), and that y_gamma."""
    r = lower_responses(problem, x, y, batch, gamma, **solve)
    with torch.no_grad():
        return float(problem.upper_loss(x, r.y_gamma, as_batch(batch).upper)), r.y_gamma
