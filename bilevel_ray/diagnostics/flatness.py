"""Is f flat in y near the lower-level solution? Estimates at one upper-level point x.

Notation (digest §1–2): f upper, g lower, gamma the penalty, and at a given x

    y_g     ~ argmin_y g(x, y)                     (a short solve warm-started at the current y)
    y_gamma ~ argmin_y f(x, y) / gamma + g(x, y)   (a short solve warm-started at y_g)

The penalty gradient is grad F_gamma(x) = kept + dropped, where

    kept    = grad_x f(x, y_gamma)                                  (PBGD-Free's x direction)
    dropped = gamma [grad_x g(x, y_gamma) - grad_x g(x, y_g)]       (the value-function term)

:func:`estimate` returns, under ``flatness/<name>``:

* ``kept``, ``dropped``, ``full`` (norms of kept, dropped, kept + dropped), ``rho`` =
  ||dropped|| / ||kept|| and ``cos`` = cos(kept, kept + dropped) (digest §2.6(b)1);
* ``delta_hat_c{c}_a{alpha}`` = max(|f(x, y_g) - f(x, y_gamma)| - c ||y_g - y_gamma||^alpha, 0),
  the least residual delta of Definition 1 at y = y_gamma (the official notebook: c = 0.5,
  alpha = 1.5), with ``gap`` = ||y_gamma - y_g||, ``f_gap`` and ``grad_y_f`` = ||grad_y f(x, y_g)||
  (the local Lipschitz modulus the notebook plots against it);
* ``alpha_hat``, ``c_hat``: least squares of log|f(x, y_g + s u) - f(x, y_g)| = log c + alpha log s
  over a log grid of s up to ||y_gamma - y_g|| and unit directions u (y_gamma - y_g and seeded
  random ones); alpha_hat ~ 1 is Lipschitz-like (the negative toy: alpha = 1, c = 10);
* ``scaled_gap`` = gamma ||y_gamma - y_g|| and ``dropped`` again at ``gamma_hi`` = factor * gamma,
  with their log-slopes in gamma (``gap_slope``, ``dropped_slope``): ~ 0 for Lipschitz f
  (Proposition 1), about (1 - alpha) / (2 - alpha) < 0 under flatness (Lemma 1);
* ``upper`` = f(x, y_gamma) (the upper loss the run itself sees), ``cost`` = ||dropped||^2 /
  (2 ``curvature``): what the dropped term costs PBGD-Free in units of f where it stops
  (:mod:`~bilevel_ray.diagnostics.cost`), the quantity the verdict is about, with
  ``cost_is_bound`` = 1 where the penalty objective did not curve up along the dropped term as
  far as probed and ``cost`` is only the decrease found up to there (a lower bound);
* ``residual``: the solves' final gradient norm relative to their reference scale (a solve that
  stopped far from its minimizer makes every other number unreliable).

The solves are :mod:`~bilevel_ray.diagnostics.responses`'.

:mod:`bilevel_ray.diagnostics.verdict` turns these into a verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from bilevel_ray.diagnostics.cost import predicted_cost
from bilevel_ray.diagnostics.estimate_options import count_problem, estimate_problems
from bilevel_ray.diagnostics.responses import (
    Responses,
    as_batch,
    level_losses,
    lower_responses,
    minimize,
    norm,
    perturbed_objective,
    solve_scale,
)
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, add_scaled, sub, vdot

# The option rules have their own module; count_problem and estimate_problems stay importable
# from here (in __all__), where they were first defined.
__all__ = [
    "DELTA_PAIRS",
    "Responses",
    "bias_terms",
    "count_problem",
    "delta_hat",
    "estimate",
    "estimate_problems",
    "fit_exponent",
    "lower_grad_x_diff",
    "lower_responses",
    "solve_scale",
]

DELTA_PAIRS = ((0.5, 1.5), (1.0, 1.5))
"""(c, alpha) pairs of delta_hat: the official notebook's and the author's site's."""


def bias_terms(
    problem: BilevelProblem, x: Params, y_g: Params, y_gamma: Params, batch: Any, gamma: float
) -> dict[str, float]:
    """Norms of kept = grad_x f(x, y_gamma), dropped = gamma [grad_x g(x, y_gamma) -
    grad_x g(x, y_g)] and their sum, rho = ||dropped|| / ||kept|| and cos(kept, kept + dropped)."""
    batch = as_batch(batch)
    _, _, (kept,) = grads_of(
        lambda x_: (problem.upper_loss(x_, y_gamma, batch.upper), {}), [x], identity_reduce
    )
    diff = lower_grad_x_diff(problem, x, y_g, y_gamma, batch)
    full = add_scaled(kept, diff, gamma)
    k, d, total = norm(kept), gamma * norm(diff), norm(full)
    rho = d / k if k > 0 else (math.inf if d > 0 else 0.0)
    cos = float(vdot(kept, full)) / (k * total) if k * total > 0 else math.nan
    return {"kept": k, "dropped": d, "full": total, "rho": rho, "cos": cos}


def lower_grad_x_diff(
    problem: BilevelProblem, x: Params, y_g: Params, y_gamma: Params, batch: Any
) -> Params:
    """grad_x g(x, y_gamma) - grad_x g(x, y_g): the dropped term is gamma times it."""
    _, _, (diff,) = grads_of(
        lambda x_: (
            problem.lower_loss(x_, y_gamma, batch.lower) - problem.lower_loss(x_, y_g, batch.lower),
            {},
        ),
        [x],
        identity_reduce,
    )
    return diff


def delta_hat(f_gap: float, gap: float, c: float = 0.5, alpha: float = 1.5) -> float:
    """max(f_gap - c gap^alpha, 0) with f_gap = |f(x, y_g) - f(x, y_gamma)| and gap =
    ||y_g - y_gamma||: the least delta for which Definition 1 holds at y = y_gamma."""
    return max(f_gap - c * gap**alpha, 0.0)


def fit_exponent(
    problem: BilevelProblem,
    x: Params,
    y_g: Params,
    batch: Any = None,
    toward: Params | None = None,
    *,
    directions: int = 3,
    points: int = 7,
    span: float = 100.0,
    seed: int = 0,
    upper: Any = None,
) -> tuple[float, float]:
    """(alpha_hat, c_hat): least squares of log|f(x, y_g + s u) - f(x, y_g)| = log c + alpha log s.

    s takes ``points`` log-spaced values in [s_max / span, s_max], s_max = ||toward - y_g|| (the
    flatness scale; toward = y_gamma) floored at eps^(1/4) (1 + ||y_g||), so that a zero gap
    still probes above rounding; u is the unit vector toward - y_g and ``directions`` seeded
    random unit vectors (unit over all tensors of y together). Differences at rounding level are
    left out; NaN when fewer than two remain. ``upper`` (y -> f(x, y), e.g. from
    :func:`~bilevel_ray.diagnostics.responses.level_losses`) replaces ``problem.upper_loss``.
    """
    batch = as_batch(batch)
    f_of = upper or (lambda y_: problem.upper_loss(x, y_, batch.upper))
    ref = next(iter(y_g.values()))
    eps = torch.finfo(ref.dtype).eps
    step = sub(toward, y_g) if toward is not None else None
    length = norm(step) if step is not None else 0.0
    units = [{k: v / length for k, v in step.items()}] if length > 0 else []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        u = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in y_g.items()}
        size = norm(u)
        units.append({k: (v / size).to(ref.device, y_g[k].dtype) for k, v in u.items()})
    s_max = max(length, eps**0.25 * (1 + norm(y_g)))
    grid = [s_max * span ** (-i / max(points - 1, 1)) for i in range(points)]
    with torch.no_grad():
        f0 = float(f_of(y_g))
        moved = [(s, float(f_of(add_scaled(y_g, u, s)))) for u in units for s in grid]
    floor = 100 * eps * max(abs(f0), 1.0)
    kept = [(math.log(s), math.log(abs(f - f0))) for s, f in moved if abs(f - f0) > floor]
    if len({log_s for log_s, _ in kept}) < 2:
        return math.nan, math.nan
    alpha, intercept = statistics.linear_regression(*zip(*kept))
    return alpha, math.exp(intercept)


def _slope(lo: float, hi: float, factor: float) -> float:
    return math.log(hi / lo) / math.log(factor) if lo > 0 and hi > 0 else math.nan


def estimate(
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
    gamma_factor: float = 4.0,
    directions: int = 3,
    delta_pairs: Sequence[tuple[float, float]] = DELTA_PAIRS,
    cost: bool = True,
    probe: float = 1e-2,
    seed: int = 0,
    responses: Responses | None = None,
) -> dict[str, float]:
    """Every estimate at x (module docstring) as ``flatness/<name>`` floats; no tensor is kept.

    y is the warm start of the solves (the run's current lower iterate); ``responses`` from
    :func:`lower_responses` replaces the two main solves. One more solve, at ``gamma_factor *
    gamma`` from y_gamma, gives the gamma scaling; with ``cost`` two or four more, at ``x - s u``
    along the dropped term, give its cost in units of f (:mod:`~bilevel_ray.diagnostics.cost`,
    first secant over ``probe`` (1 + ||x||)). ``residual`` is the worst relative residual of all
    the solves. Bad options raise ConfigError.
    """
    problems = estimate_problems(
        gamma=gamma,
        solve_steps=solve_steps,
        solve_lr=solve_lr,
        solve_rtol=solve_rtol,
        optimizer=optimizer,
        gamma_factor=gamma_factor,
        directions=directions,
        delta_pairs=delta_pairs,
        cost=cost,
        probe=probe,
    )
    if problems:
        raise ConfigError(problems)
    batch = as_batch(batch)
    settings = {"solve_steps": solve_steps, "solve_lr": solve_lr, "optimizer": optimizer}
    losses = level_losses(problem, x, batch)  # y -> f, g at this x: the head alone if it can
    r = responses or lower_responses(
        problem, x, y, batch, gamma, solve_rtol=solve_rtol, losses=losses, **settings
    )
    y_hi = _y_gamma_at(problem, x, r, batch, gamma_factor * gamma, losses, settings, solve_rtol)
    terms = bias_terms(problem, x, r.y_g, r.y_gamma, batch, gamma)
    scaling = _gamma_scaling(problem, x, r, y_hi, batch, gamma, gamma_factor, terms["dropped"])
    gap = norm(sub(r.y_gamma, r.y_g))
    f_gamma, shape = _upper_shape(problem, x, r, batch, losses[0], directions, seed)
    priced = (
        _priced(problem, x, r, batch, gamma, solve_rtol, settings, probe) if cost else _UNPRICED
    )
    stats = {
        **terms,
        "upper": f_gamma,
        **{k: priced[k] for k in ("cost", "cost_is_bound", "curvature")},
        "gamma": gamma,
        "gap": gap,
        **shape,
        **scaling,
        "residual": max(r.residual, priced["probe_residual"]),
        "solve_steps": solve_steps,
        "solve_rtol": solve_rtol,
        **{
            f"delta_hat_c{c:g}_a{a:g}": delta_hat(shape["f_gap"], gap, c, a) for c, a in delta_pairs
        },
    }
    return {f"flatness/{k}": float(v) for k, v in stats.items()}


def _y_gamma_at(
    problem: BilevelProblem,
    x: Params,
    r: Responses,
    batch: Any,
    gamma_hi: float,
    losses: Any,
    settings: dict[str, Any],
    solve_rtol: float,
) -> Params:
    """y_gamma_hi ~ argmin_y f(x, y) / gamma_hi + g(x, y), warm-started at y_gamma and solved to
    the main solves' tolerance (``solve_rtol`` times their reference scale)."""
    perturbed_hi = perturbed_objective(problem, x, batch, gamma_hi, losses)
    steps, lr, optimizer = settings["solve_steps"], settings["solve_lr"], settings["optimizer"]
    y_hi, _ = minimize(perturbed_hi, r.y_gamma, steps, lr, optimizer, solve_rtol * r.scale)
    return y_hi


# estimate's cost fields when cost=False (read, never written).
_UNPRICED = {"curvature": math.nan, "cost": math.nan, "cost_is_bound": 0.0, "probe_residual": 0.0}


def _gamma_scaling(
    problem: BilevelProblem,
    x: Params,
    r: Responses,
    y_hi: Params,
    batch: Any,
    gamma: float,
    factor: float,
    dropped: float,
) -> dict[str, float]:
    """gamma ||y_gamma - y_g|| and ||dropped|| at gamma and at gamma_hi = factor * gamma (y_hi ~
    y_gamma_hi), with their log-slopes in gamma: ~ 0 where f is Lipschitz in y (Proposition 1),
    about (1 - alpha) / (2 - alpha) < 0 under flatness (Lemma 1)."""
    gamma_hi = factor * gamma
    dropped_hi = gamma_hi * norm(lower_grad_x_diff(problem, x, r.y_g, y_hi, batch))
    gap, gap_hi = norm(sub(r.y_gamma, r.y_g)), norm(sub(y_hi, r.y_g))
    return {
        "gamma_hi": gamma_hi,
        "scaled_gap": gamma * gap,
        "scaled_gap_hi": gamma_hi * gap_hi,
        "gap_slope": _slope(gamma * gap, gamma_hi * gap_hi, factor),
        "dropped_hi": dropped_hi,
        "dropped_slope": _slope(dropped, dropped_hi, factor),
    }


def _upper_shape(
    problem: BilevelProblem,
    x: Params,
    r: Responses,
    batch: Any,
    upper: Any,
    directions: int,
    seed: int,
) -> tuple[float, dict[str, float]]:
    """f(x, y_gamma), and how f(x, .) rises away from y_g: ``f_gap`` = |f(x, y_g) - f(x,
    y_gamma)|, ``grad_y_f`` = ||grad_y f(x, y_g)|| and the fitted (alpha_hat, c_hat) of
    |f(x, y_g + s u) - f(x, y_g)| ~ c s^alpha (:func:`fit_exponent`). ``upper`` is y -> f(x, y)."""
    f_g, _, (grad_y,) = grads_of(lambda y_: (upper(y_), {}), [r.y_g], identity_reduce)
    with torch.no_grad():
        f_gamma = float(upper(r.y_gamma))
    alpha_hat, c_hat = fit_exponent(
        problem, x, r.y_g, batch, r.y_gamma, directions=directions, seed=seed, upper=upper
    )
    shape = {"f_gap": abs(float(f_g) - f_gamma), "grad_y_f": norm(grad_y)}
    return f_gamma, {**shape, "alpha_hat": alpha_hat, "c_hat": c_hat}


def _priced(
    problem: BilevelProblem,
    x: Params,
    r: Responses,
    batch: Any,
    gamma: float,
    solve_rtol: float,
    settings: dict[str, Any],
    probe: float,
) -> dict[str, float]:
    """What the dropped term gamma [grad_x g(x, y_gamma) - grad_x g(x, y_g)] costs PBGD-Free in
    units of f (:func:`~bilevel_ray.diagnostics.cost.predicted_cost`)."""
    # The probes' solves start near their answer but must reach the same tolerance at a new x:
    # L-BFGS does that in a few gradients whatever the main solves used.
    solve = {"solve_rtol": solve_rtol, **settings, "optimizer": "lbfgs"}
    dropped = lower_grad_x_diff(problem, x, r.y_g, r.y_gamma, batch)
    dropped = {k: gamma * v for k, v in dropped.items()}
    return predicted_cost(problem, x, r, dropped, batch, gamma, solve, probe)
