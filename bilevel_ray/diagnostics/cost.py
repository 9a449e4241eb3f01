"""What PBGD-Free's dropped term costs in units of the upper objective.

PBGD-Free stops where its direction kept = grad_x f(x, y_gamma) vanishes; there the penalty
gradient grad F_gamma(x) = kept + dropped is the dropped term d alone, and the corrected method
(alt_pbgd) goes on along -d. With psi(s) = F_gamma(x - s u), u = d / ||d||, and kappa = psi'' the
curvature of the penalty objective along u, the decrease it still makes is

    cost = ||d||^2 / (2 kappa)                 (exact when F_gamma is quadratic along u)

the value form of the bias, as in Definition 1 and Theorem 3 (its floor delta^(2(alpha-1)/alpha)
is a squared gradient; divided by a curvature it is a loss). On the negative toy d = 10 and
F_gamma'' = 2 at every x, so cost = 25 = phi(0) - phi(-5) minus the penalty's own 1/gamma shift.

kappa comes from secants of psi' = -grad F_gamma . u between s = 0 and the step s* at which
psi' has risen by ||d|| (where the corrected method's line search along -d would stop), and the
cost is the area those secants enclose (:func:`predicted_cost`); where psi' does not rise that far
within the probes (F_gamma not convex along d), the area up to the last probe is a lower bound
and is reported as one. Each grad F_gamma needs the two lower-level responses at its x
(:func:`penalty_gradient`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from bilevel_ray.diagnostics.responses import Responses, lower_responses, norm, perturbed_objective
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, add_scaled, vdot

__all__ = [
    "curvature_along",
    "penalty_gradient",
    "penalty_value",
    "pooled_cost",
    "predicted_cost",
]


def penalty_gradient(
    problem: BilevelProblem, x: Params, r: Responses, batch: Any, gamma: float
) -> Params:
    """grad F_gamma(x) = grad_x [f(x, y_gamma) + gamma (g(x, y_gamma) - g(x, y_g))] at the
    responses ``r`` of this x (Danskin: the responses' own dependence on x drops out)."""
    _, _, (grad,) = grads_of(
        lambda x_: (
            gamma * perturbed_objective(problem, x_, batch, gamma)(r.y_gamma)
            - gamma * problem.lower_loss(x_, r.y_g, batch.lower),
            {},
        ),
        [x],
        identity_reduce,
    )
    return grad


def penalty_value(
    problem: BilevelProblem, x: Params, r: Responses, batch: Any, gamma: float
) -> float:
    """F_gamma(x) = f(x, y_gamma) + gamma (g(x, y_gamma) - g(x, y_g)) at the responses ``r``."""
    with torch.no_grad():
        f = problem.upper_loss(x, r.y_gamma, batch.upper)
        gap = problem.lower_loss(x, r.y_gamma, batch.lower) - problem.lower_loss(
            x, r.y_g, batch.lower
        )
        return float(f) + gamma * float(gap)


def curvature_along(
    problem: BilevelProblem,
    x: Params,
    r: Responses,
    grad: Params,
    u: Params,
    s: float,
    batch: Any,
    gamma: float,
    solve: dict[str, Any],
) -> tuple[float, float]:
    """(kappa, residual, F_gamma(x - s u)): the secant (grad F_gamma(x) - grad F_gamma(x - s u))
    . u / s, with the responses at x - s u warm-started at ``r``; residual is those solves'
    relative residual."""
    moved = add_scaled(x, u, -s)
    # Measured against the moved point's own scale: a long probe on a network changes it.
    r_s = lower_responses(problem, moved, r.y_gamma, batch, gamma, **solve)
    grad_s = penalty_gradient(problem, moved, r_s, batch, gamma)
    kappa = (float(vdot(grad, u)) - float(vdot(grad_s, u))) / s
    return kappa, r_s.residual, penalty_value(problem, moved, r_s, batch, gamma)


def predicted_cost(
    problem: BilevelProblem,
    x: Params,
    r: Responses,
    dropped: Params,
    batch: Any,
    gamma: float,
    solve: dict[str, Any],
    probe: float = 1e-2,
    tries: int = 4,
) -> dict[str, float]:
    """``cost``: the decrease of the penalty objective that the dropped term d still buys along
    -d, ``curvature`` kappa = ||d|| / s*, ``cost_is_bound`` and the probe solves' worst
    ``probe_residual``. With h(s) = (grad F_gamma(x) - grad F_gamma(x - s u)) . u the secant rise
    (u = d / ||d||), the part of the slope along u that d still contributes at x - s u is
    ||d|| - h(s), so the decrease up to the line minimum s* (where h(s*) = ||d||, where the
    corrected method's line search along -d would stop) is the integral of ||d|| - h over
    [0, s*], with h linear between the probes: ||d||^2 / (2 kappa) on a quadratic. The first
    probe spans ``probe`` (1 + ||x||); then secant steps (at most 8-fold) until h brackets ||d||.
    Where F_gamma does not curve up enough along d within ``tries`` probes (a non-convex penalty
    objective, as on a network far from its minimum), ``cost`` is the decrease up to the last
    probe, a lower bound (``cost_is_bound`` = 1), and ``curvature`` the first probe's secant."""
    size = norm(dropped)
    if size == 0:
        return {"curvature": math.nan, "cost": 0.0, "cost_is_bound": 0.0, "probe_residual": 0.0}
    u = {k: v / size for k, v in dropped.items()}
    grad = penalty_gradient(problem, x, r, batch, gamma)
    knots, s, worst, first = [(0.0, 0.0)], probe * (1 + norm(x)), 0.0, math.nan
    here, value = penalty_value(problem, x, r, batch, gamma), math.nan
    for _ in range(tries):
        kappa, residual, value = curvature_along(problem, x, r, grad, u, s, batch, gamma, solve)
        worst, h = max(worst, residual), kappa * s
        first = kappa if math.isnan(first) else first
        lo, h_lo = knots[-1]
        # Bracketed: h(lo) < ||d|| <= h(s), up to rounding (a secant step lands on s* itself).
        if h >= size * (1 - 1e-9):
            star = lo + (size - h_lo) * (s - lo) / (h - h_lo)
            cost = _decrease([*knots, (star, size)], size)
            return {
                "curvature": size / star,
                "cost": cost,
                "cost_is_bound": 0.0,
                "probe_residual": worst,
            }
        knots.append((s, h))
        s = s * min(max(size / h, 2.0), 8.0) if h > 0 else 4 * s
    # The secants' area is a model between sparse probes; the decrease F_gamma actually made
    # there is measured: the bound is the smaller of the two (and no less than 0).
    return {
        "curvature": first,
        "cost": max(min(_decrease(knots, size), here - value), 0.0),
        "cost_is_bound": 1.0,
        "probe_residual": worst,
    }


def _decrease(knots: list[tuple[float, float]], size: float) -> float:
    """The integral of size - h(s) over the knots' span, h linear between them (trapezoids)."""
    return sum(
        (s1 - s0) * (size - (h0 + h1) / 2) for (s0, h0), (s1, h1) in itertools.pairwise(knots)
    )


def pooled_cost(dropped: list[Params], curvatures: list[float]) -> tuple[float, float]:
    """(cost, standard error) of the dropped term over n >= 2 batches, without their noise:
    ||E d||^2 is estimated by the mean of d_a . d_b over pairs a != b (unbiased, where the mean
    of ||d_b||^2 carries the batch variance too), divided by twice the mean positive curvature;
    the standard error is the jackknife's. Each minibatch's own d_b makes a small batch look
    biased when the population term is zero; the pairs cancel that."""
    n = len(dropped)
    kappas = [k for k in curvatures if math.isfinite(k) and k > 0]
    if n < 2 or not kappas:
        return math.nan, math.nan
    dots = [[float(vdot(a, b)) for b in dropped] for a in dropped]
    total = sum(map(sum, dots))
    diagonal = sum(dots[i][i] for i in range(n))

    def cost(skip: int | None) -> float:
        keep = [i for i in range(n) if i != skip]
        pairs = total - diagonal
        if skip is not None:
            pairs -= 2 * sum(dots[skip][j] for j in range(n) if j != skip)
        m = len(keep)
        kappa = sum(k for i, k in enumerate(curvatures) if i in keep and k > 0 and math.isfinite(k))
        count = sum(1 for i, k in enumerate(curvatures) if i in keep and k > 0 and math.isfinite(k))
        if m < 2 or count == 0:
            return math.nan
        return max(pairs / (m * (m - 1)), 0.0) / (2 * kappa / count)

    whole = cost(None)
    if n < 3:
        return whole, math.nan
    leave = [cost(i) for i in range(n)]
    mean = sum(leave) / n
    se = math.sqrt((n - 1) / n * sum((c - mean) ** 2 for c in leave))
    return whole, se
