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
* ``residual``: the solves' final gradient norm relative to their reference scale (a solve that
  stopped far from its minimizer makes every other number unreliable).

:mod:`bilevel_ray.diagnostics.diagnose` turns these into a verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel_ray.data import BilevelBatch
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, add_scaled, clone, sub, vdot
from bilevel_ray.updates import OPTIMIZERS, make_update

__all__ = [
    "DELTA_PAIRS",
    "Responses",
    "bias_terms",
    "delta_hat",
    "estimate",
    "estimate_problems",
    "fit_exponent",
    "lower_responses",
    "solve_scale",
]

DELTA_PAIRS = ((0.5, 1.5), (1.0, 1.5))
"""(c, alpha) pairs of delta_hat: the official notebook's and the author's site's."""


def _norm(p: Params) -> float:
    return math.sqrt(max(float(vdot(p, p)), 0.0))


def _batch(batch: Any) -> Any:
    return BilevelBatch(None, None) if batch is None else batch


def _perturbed(problem: BilevelProblem, x: Params, batch: Any, gamma: float) -> Callable:
    """y -> f(x, y) / gamma + g(x, y)."""
    return lambda y_: (
        problem.upper_loss(x, y_, batch.upper) / gamma + problem.lower_loss(x, y_, batch.lower)
    )


def _solve(
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
        norm = _norm(grad)
        if norm < best_norm:
            best, best_norm = (y if norm <= stop or t == steps else clone(y)), norm
        if t == steps or norm <= stop:
            break
        rule.apply(y, grad, state, t)
    return best, best_norm


def _solve_lbfgs(
    objective: Callable[[Params], Tensor], y: Params, steps: int, stop: float
) -> tuple[Params, float]:
    """As :func:`_solve` with L-BFGS and a strong-Wolfe line search (torch.optim.LBFGS): on a
    smooth lower level it reaches a tight tolerance in tens of gradients where Adam needs
    hundreds, which is what keeps a run's diagnostic cheap. Gradients are taken with respect to
    y only (``autograd.grad``), so frozen parameters of a module problem gain no ``.grad``."""
    y = {k: v.detach().clone().requires_grad_(True) for k, v in y.items()}
    leaves = list(y.values())
    # L-BFGS tests the largest gradient entry; stop / sqrt(n) bounds the norm by ``stop``.
    size = sum(t.numel() for t in leaves)
    opt = torch.optim.LBFGS(
        leaves,
        max_iter=steps,
        tolerance_grad=stop / math.sqrt(size),
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        loss = objective(y)
        for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves)):
            leaf.grad = grad
        return loss.detach()

    opt.step(closure)
    y = {k: v.detach() for k, v in y.items()}
    _, _, (grad,) = grads_of(lambda y_: (objective(y_), {}), [y], identity_reduce)
    return y, _norm(grad)


def solve_scale(problem: BilevelProblem, x: Params, y: Params, batch: Any, gamma: float) -> float:
    """The gradient size the solves are measured against: max(||grad_y g(x, y)||,
    ||grad_y f(x, y)|| / gamma), the first step's size on g and the perturbation separating
    y_gamma from y_g, floored at sqrt(eps) (1 + |g(x, y)|) so that a start at an exact solution
    (both ~0) is not measured against rounding."""
    batch = _batch(batch)
    g, _, (grad_g,) = grads_of(
        lambda y_: (problem.lower_loss(x, y_, batch.lower), {}), [y], identity_reduce
    )
    _, _, (grad_f,) = grads_of(
        lambda y_: (problem.upper_loss(x, y_, batch.upper), {}), [y], identity_reduce
    )
    floor = torch.finfo(g.dtype).eps ** 0.5 * (1 + abs(float(g)))
    return max(_norm(grad_g), _norm(grad_f) / gamma, floor)


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
) -> Responses:
    """y_g from up to ``solve_steps`` steps on g(x, .) from y; y_gamma from as many on
    f(x, .)/gamma + g(x, .) from y_g (O(1/gamma) away). Both stop at gradient norm
    ``solve_rtol * scale``; ``scale`` defaults to :func:`solve_scale` at y (a run passes its
    first point's scale at later points, so that a warm start near y_g does not tighten the
    tolerance). Adam by default: its step length does not depend on g's curvature."""
    batch = _batch(batch)
    scale = solve_scale(problem, x, y, batch, gamma) if scale is None else scale
    settings = (solve_steps, solve_lr, optimizer, solve_rtol * scale)
    y_g, res_g = _solve(lambda y_: problem.lower_loss(x, y_, batch.lower), y, *settings)
    y_gamma, res_gamma = _solve(_perturbed(problem, x, batch, gamma), y_g, *settings)
    worst = max(res_g, res_gamma)
    return Responses(y_g, y_gamma, scale, worst / scale if scale > 0 else worst)


def bias_terms(
    problem: BilevelProblem, x: Params, y_g: Params, y_gamma: Params, batch: Any, gamma: float
) -> dict[str, float]:
    """Norms of kept = grad_x f(x, y_gamma), dropped = gamma [grad_x g(x, y_gamma) -
    grad_x g(x, y_g)] and their sum, rho = ||dropped|| / ||kept|| and cos(kept, kept + dropped)."""
    batch = _batch(batch)
    _, _, (kept,) = grads_of(
        lambda x_: (problem.upper_loss(x_, y_gamma, batch.upper), {}), [x], identity_reduce
    )
    diff = _lower_grad_x_diff(problem, x, y_g, y_gamma, batch)
    full = add_scaled(kept, diff, gamma)
    k, d, total = _norm(kept), gamma * _norm(diff), _norm(full)
    rho = d / k if k > 0 else (math.inf if d > 0 else 0.0)
    cos = float(vdot(kept, full)) / (k * total) if k * total > 0 else math.nan
    return {"kept": k, "dropped": d, "full": total, "rho": rho, "cos": cos}


def _lower_grad_x_diff(
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
) -> tuple[float, float]:
    """(alpha_hat, c_hat): least squares of log|f(x, y_g + s u) - f(x, y_g)| = log c + alpha log s.

    s takes ``points`` log-spaced values in [s_max / span, s_max], s_max = ||toward - y_g|| (the
    flatness scale; toward = y_gamma) floored at eps^(1/4) (1 + ||y_g||), so that a zero gap
    still probes above rounding; u is the unit vector toward - y_g and ``directions`` seeded
    random unit vectors (unit over all tensors of y together). Differences at rounding level are
    left out; NaN when fewer than two remain.
    """
    batch = _batch(batch)
    ref = next(iter(y_g.values()))
    eps = torch.finfo(ref.dtype).eps
    step = sub(toward, y_g) if toward is not None else None
    length = _norm(step) if step is not None else 0.0
    units = [{k: v / length for k, v in step.items()}] if length > 0 else []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        u = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in y_g.items()}
        size = _norm(u)
        units.append({k: (v / size).to(ref.device, y_g[k].dtype) for k, v in u.items()})
    s_max = max(length, eps**0.25 * (1 + _norm(y_g)))
    grid = [s_max * span ** (-i / max(points - 1, 1)) for i in range(points)]
    with torch.no_grad():
        f0 = float(problem.upper_loss(x, y_g, batch.upper))
        moved = [
            (s, float(problem.upper_loss(x, add_scaled(y_g, u, s), batch.upper)))
            for u in units
            for s in grid
        ]
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
    seed: int = 0,
    responses: Responses | None = None,
) -> dict[str, float]:
    """Every estimate at x (module docstring) as ``flatness/<name>`` floats; no tensor is kept.

    y is the warm start of the solves (the run's current lower iterate); ``responses`` from
    :func:`lower_responses` replaces the two main solves. One more solve, at ``gamma_factor *
    gamma`` from y_gamma, gives the gamma scaling. Bad options raise ConfigError.
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
    )
    if problems:
        raise ConfigError(problems)
    batch = _batch(batch)
    settings = {"solve_steps": solve_steps, "solve_lr": solve_lr, "optimizer": optimizer}
    r = responses or lower_responses(problem, x, y, batch, gamma, solve_rtol=solve_rtol, **settings)
    gamma_hi = gamma_factor * gamma
    perturbed_hi = _perturbed(problem, x, batch, gamma_hi)
    y_hi, _ = _solve(
        perturbed_hi, r.y_gamma, solve_steps, solve_lr, optimizer, solve_rtol * r.scale
    )
    terms = bias_terms(problem, x, r.y_g, r.y_gamma, batch, gamma)
    dropped_hi = gamma_hi * _norm(_lower_grad_x_diff(problem, x, r.y_g, y_hi, batch))
    gap, gap_hi = _norm(sub(r.y_gamma, r.y_g)), _norm(sub(y_hi, r.y_g))
    f_g, _, (grad_y,) = grads_of(
        lambda y_: (problem.upper_loss(x, y_, batch.upper), {}), [r.y_g], identity_reduce
    )
    with torch.no_grad():
        f_gap = abs(float(f_g) - float(problem.upper_loss(x, r.y_gamma, batch.upper)))
    alpha_hat, c_hat = fit_exponent(
        problem, x, r.y_g, batch, r.y_gamma, directions=directions, seed=seed
    )
    stats = {
        **terms,
        "gamma": gamma,
        "gap": gap,
        "f_gap": f_gap,
        "grad_y_f": _norm(grad_y),
        "alpha_hat": alpha_hat,
        "c_hat": c_hat,
        "gamma_hi": gamma_hi,
        "scaled_gap": gamma * gap,
        "scaled_gap_hi": gamma_hi * gap_hi,
        "gap_slope": _slope(gamma * gap, gamma_hi * gap_hi, gamma_factor),
        "dropped_hi": dropped_hi,
        "dropped_slope": _slope(terms["dropped"], dropped_hi, gamma_factor),
        "residual": r.residual,
        **{f"delta_hat_c{c:g}_a{a:g}": delta_hat(f_gap, gap, c, a) for c, a in delta_pairs},
    }
    return {f"flatness/{k}": float(v) for k, v in stats.items()}


def count_problem(problems: list[str], name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{name}={value!r}: must be an integer >= {minimum}")


def _number(problems: list[str], name: str, value: Any, low: float, high: float, hint: str) -> None:
    """A finite number in (low, high); ``hint`` says what to use instead."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        bounds = f"> {low:g}" if high == math.inf else f"in ({low:g}, {high:g})"
        problems.append(f"{name}={value!r}: must be a finite number {bounds}; {hint}")


def _is_pair(p: Any) -> bool:
    numbers = isinstance(p, Sequence) and len(p) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
    return numbers and 0 <= p[0] < math.inf and 0 < p[1] < math.inf


def estimate_problems(
    *,
    gamma: Any,
    solve_steps: Any,
    solve_lr: Any,
    solve_rtol: Any,
    optimizer: Any,
    gamma_factor: Any,
    directions: Any,
    delta_pairs: Any,
    optimizer_name: str = "optimizer",
) -> list[str]:
    """Every rule the options of :func:`estimate` break, one message each (empty if none);
    ``optimizer_name`` is what the caller calls the solves' optimizer."""
    problems: list[str] = []
    _number(problems, "gamma", gamma, 0, math.inf, "the penalty to diagnose at, e.g. 10.0")
    count_problem(problems, "solve_steps", solve_steps, 1)
    _number(problems, "solve_lr", solve_lr, 0, math.inf, "e.g. solve_lr=0.05 with Adam")
    _number(problems, "solve_rtol", solve_rtol, 0, 1, "e.g. solve_rtol=1e-6")
    if not isinstance(optimizer, str) or optimizer not in (*OPTIMIZERS, "lbfgs"):
        problems.append(
            f"{optimizer_name}={optimizer!r}: unknown; choose one of "
            f"{sorted([*OPTIMIZERS, 'lbfgs'])}"
        )
    _number(problems, "gamma_factor", gamma_factor, 1, math.inf, "the second gamma, e.g. 4.0")
    count_problem(problems, "directions", directions, 0)
    if not isinstance(delta_pairs, Sequence) or not all(_is_pair(p) for p in delta_pairs):
        problems.append(
            f"delta_pairs={delta_pairs!r}: must be (c, alpha) pairs with c >= 0 and alpha > 0, "
            "e.g. ((0.5, 1.5),)"
        )
    return problems
