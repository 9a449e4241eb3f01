"""From flatness estimates to a verdict: does PBGD-Free suit this problem?

:func:`decide` judges estimates collected anywhere (a training run's reports, or a warm-up);
:func:`diagnose` runs a short PBGD-Free warm-up from (x0, y0), estimates at its start and every
``every`` steps (:func:`~bilevel_ray.diagnostics.flatness.estimate`) and decides.

Decision rule. Points whose solves stopped with a relative residual above ``max_residual``
(1e-3) or with non-finite estimates are left out. Over the rest, with D the median of
||dropped|| and S the largest max(||kept||, ||kept + dropped||), the bias ratio is D / S:

* suitable   if D <= atol (1e-6) or D / S <= rho_ok (0.1): PBGD-Free can shrink the penalty
  gradient about S / D-fold before its bias, of size D, dominates; "keep pbgd_free";
* unsuitable if D / S >= rho_bad (0.3), fallback ``alt_pbgd`` (it keeps the dropped term): the
  recommendation is "raise gamma" when ||dropped|| ~ gamma^slope falls (slope <= -0.25) to
  rho_ok S by 100 gamma, else "switch to alt_pbgd";
* uncertain  in between, or when no point is usable: "compare with alt_pbgd".

Why rho first and not the gamma scaling: for any smooth f with grad_y f(x, y_g) != 0,
gamma ||y_gamma - y_g|| tends to a constant, so the scaling alone does not separate the paper's
positive toy from its negative toy; the size of the dropped term against the kept one does. The
scaling says whether raising gamma would help, and alpha_hat ~ 1 with a large c_hat confirms a
Lipschitz-like (non-flat) f. Near a stationary point the kept term -> 0 and the pointwise rho
blows up (digest §2.6(b)), so the scale S is the largest gradient seen over the points, and
``atol`` is the size below which the bias is negligible whatever the ratio (the stationarity
level a user targets).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import as_batches
from bilevel_ray.diagnostics.flatness import (
    DELTA_PAIRS,
    count_problem,
    estimate,
    estimate_problems,
    lower_responses,
)
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, check_losses, check_params, check_problem
from bilevel_ray.tree import Params, cuda_devices

__all__ = ["Verdict", "decide", "decide_problems", "diagnose"]


@dataclass(frozen=True)
class Verdict:
    """Whether PBGD-Free's dropped term is negligible, why (one sentence with the numbers), the
    aggregated estimates, what to do, and the method to switch to when unsuitable."""

    suitable: bool
    verdict: str
    reason: str
    stats: dict[str, float]
    recommendation: str
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; a non-finite statistic becomes None."""
        return {
            "suitable": self.suitable,
            "verdict": self.verdict,
            "reason": self.reason,
            "recommendation": self.recommendation,
            "fallback": self.fallback,
            "stats": {k: (float(v) if math.isfinite(v) else None) for k, v in self.stats.items()},
        }


def _threshold(problems: list[str], name: str, value: Any, low: float, hint: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not low <= value < math.inf
    ):
        problems.append(f"{name}={value!r}: must be a finite number >= {low:g}; {hint}")


def decide_problems(rho_ok: Any, rho_bad: Any, atol: Any, max_residual: Any) -> list[str]:
    """Every rule the thresholds of :func:`decide` break, one message each (empty if none)."""
    problems: list[str] = []
    _threshold(problems, "rho_ok", rho_ok, 0, "e.g. rho_ok=0.1")
    _threshold(problems, "rho_bad", rho_bad, 0, "e.g. rho_bad=0.3")
    if not problems and rho_ok >= rho_bad:
        problems.append(f"rho_ok={rho_ok!r} must be < rho_bad={rho_bad!r}; e.g. 0.1 and 0.3")
    _threshold(problems, "atol", atol, 0, "e.g. atol=1e-6")
    _threshold(problems, "max_residual", max_residual, 0, "e.g. max_residual=1e-3")
    return problems


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def decide(
    stats: Mapping[str, float] | Sequence[Mapping[str, float]],
    *,
    rho_ok: float = 0.1,
    rho_bad: float = 0.3,
    atol: float = 1e-6,
    max_residual: float = 1e-3,
) -> Verdict:
    """The verdict (module docstring) on one :func:`estimate` or on those of several points."""
    points = [stats] if isinstance(stats, Mapping) else list(stats)
    problems = decide_problems(rho_ok, rho_bad, atol, max_residual)
    if not points:
        problems.append("stats is empty: decide needs at least one estimate from estimate()")
    if problems:
        raise ConfigError(problems)

    def get(p: Mapping[str, float], name: str) -> float:
        return float(p.get(f"flatness/{name}", math.nan))

    finite = [p for p in points if all(math.isfinite(get(p, k)) for k in ("kept", "dropped"))]
    used = [p for p in finite if not get(p, "residual") > max_residual]
    residual = max((get(p, "residual") for p in points), default=math.nan)
    gamma = _median([get(p, "gamma") for p in points])
    out = {"flatness/points": float(len(points)), "flatness/used": float(len(used))}
    out.update({"flatness/gamma": gamma, "flatness/residual": residual})
    where = f"over {len(used)} of {len(points)} point(s) at gamma={gamma:g}"
    if not used:
        reason = (
            f"The flatness estimates are not finite {where}: lower lr_x / lr_y or solve_lr, or "
            "check f and g at the start point, then diagnose again."
            if len(finite) < len(points)
            else f"The lower-level solves did not converge (relative residual {residual:.3g} > "
            f"{max_residual:g}) {where}: raise solve_steps or solve_lr and diagnose again."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    dropped = _median([get(p, "dropped") for p in used])
    # A hand-built estimate may lack "full" (NaN): its kept term is the scale then.
    scale = max(
        max(get(p, "kept"), get(p, "full") if math.isfinite(get(p, "full")) else 0.0) for p in used
    )
    ratio = dropped / scale if scale > 0 else (math.inf if dropped > 0 else 0.0)
    out.update(
        {"flatness/dropped": dropped, "flatness/grad_scale": scale, "flatness/bias_ratio": ratio}
    )
    for name in ("rho", "cos", "alpha_hat", "c_hat", "gap_slope", "dropped_slope"):
        out[f"flatness/{name}"] = _median([get(p, name) for p in used])
    share = f"{100 * ratio:.3g}% of the gradient scale {scale:.3g}"
    shape = f"alpha_hat={out['flatness/alpha_hat']:.3g}, c_hat={out['flatness/c_hat']:.3g}"
    if dropped <= atol or ratio <= rho_ok:
        reason = (
            f"PBGD-Free's dropped value-function term is negligible {where}: its median norm "
            f"{dropped:.3g} is {share} (suitable below {100 * rho_ok:g}% or {atol:g}), so keep "
            "pbgd_free."
        )
        return Verdict(True, "suitable", reason, out, "keep pbgd_free")
    if ratio < rho_bad:
        reason = (
            f"PBGD-Free's dropped term is {share} {where}, between {100 * rho_ok:g}% and "
            f"{100 * rho_bad:g}% ({shape}), so compare pbgd_free with alt_pbgd on a short run."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    slope = out["flatness/dropped_slope"]
    shown = round(slope, 2) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.00" in the reason
    # ||dropped|| ~ gamma^slope reaches rho_ok * scale at gamma * (ratio / rho_ok)^(-1/slope).
    target = gamma * (ratio / rho_ok) ** (-1.0 / slope) if slope <= -0.25 else math.inf
    head = f"PBGD-Free is biased: its dropped term (median norm {dropped:.3g}) is {share} {where}"
    if target <= 100 * gamma:
        out["flatness/suggested_gamma"] = target
        reason = (
            f"{head}, but it shrinks like gamma^{shown:.2f} ({shape}), so raise gamma to about "
            f"{target:.3g} or switch to alt_pbgd."
        )
        return Verdict(False, "unsuitable", reason, out, "raise gamma", "alt_pbgd")
    shape_says = (
        "f is Lipschitz-like in y near y_g"
        if out["flatness/alpha_hat"] < 1.25
        else "f is flat near y_g only up to a residual"
    )
    reason = (
        f"{head}, raising gamma does not shrink it (slope {shown:.2f}) and {shape_says} "
        f"({shape}), so switch to alt_pbgd."
    )
    return Verdict(False, "unsuitable", reason, out, "switch to alt_pbgd", "alt_pbgd")


def diagnose(
    problem: BilevelProblem,
    x0: Params,
    y0: Params,
    gamma: float = 10.0,
    *,
    data: Any = None,
    warmup_steps: int = 100,
    every: int = 25,
    lr_x: float = 0.01,
    lr_y: float = 0.1,
    inner_steps: int = 1,
    optimizer: str | tuple[str, str] = "sgd",
    seed: int = 0,
    solve_steps: int = 300,
    solve_lr: float = 0.05,
    solve_rtol: float = 1e-6,
    solve_optimizer: str = "adam",
    gamma_factor: float = 4.0,
    directions: int = 3,
    delta_pairs: Sequence[tuple[float, float]] = DELTA_PAIRS,
    rho_ok: float = 0.1,
    rho_bad: float = 0.3,
    atol: float = 1e-6,
    max_residual: float = 1e-3,
) -> Verdict:
    """Is PBGD-Free's dropped value-function term negligible on ``problem`` from (x0, y0)?

    Runs ``warmup_steps`` PBGD-Free steps (``lr_x``, ``lr_y``, ``inner_steps``, ``optimizer``
    as in ``br.solve``, at this fixed ``gamma``), estimates at step 0 and every ``every`` steps
    and at the last, on that step's batch of ``data``, then applies :func:`decide`. x0 and y0 are
    not modified.

    The ``solve_*`` options set the short lower-level solves of each estimate (the first starts
    at y0, each later one at the previous point's y_g, whose x is nearby);
    ``gamma_factor``, ``directions`` and ``delta_pairs`` are :func:`estimate`'s; ``rho_ok``,
    ``rho_bad``, ``atol`` and ``max_residual`` are :func:`decide`'s.

    Raises:
        ConfigError: bad input, before any step runs (every problem found, at once).
    """
    check_problem(problem)
    check_params(x0, y0)
    problems: list[str] = []
    count_problem(problems, "warmup_steps", warmup_steps, 0)
    count_problem(problems, "every", every, 1)
    count_problem(problems, "seed", seed, 0)
    solve = {
        "solve_steps": solve_steps,
        "solve_lr": solve_lr,
        "solve_rtol": solve_rtol,
        "optimizer": solve_optimizer,
    }
    opts = {
        **solve,
        "gamma_factor": gamma_factor,
        "directions": directions,
        "delta_pairs": delta_pairs,
    }
    problems += estimate_problems(gamma=gamma, **opts, optimizer_name="solve_optimizer")
    problems += decide_problems(rho_ok, rho_bad, atol, max_residual)
    try:
        solver = SolverConfig(
            method="pbgd_free",
            lr_x=lr_x,
            lr_y=lr_y,
            gamma=gamma if isinstance(gamma, (int, float)) else None,
            inner_steps=inner_steps,
            optimizer=optimizer,
        ).build(problem)
    except ConfigError as err:
        problems += [p for p in err.problems if not p.startswith("gamma=")]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))

    stats = []
    with torch.random.fork_rng(devices=cuda_devices(x0, y0)):
        torch.manual_seed(seed)  # a shuffled DataLoader draws from torch's RNG when iterated
        batches = as_batches(data, seed)
        first = next(batches)
        check_losses(problem, x0, y0, first, upper_needs_x=True)
        state = solver.init(x0, y0)
        warm, scale = state.y, None
        for t, batch in enumerate(itertools.chain([first], batches)):
            if t % every == 0 or t == warmup_steps:
                r = lower_responses(problem, state.x, warm, batch, gamma, scale=scale, **solve)
                stats.append(
                    estimate(problem, state.x, warm, batch, gamma, **opts, seed=seed, responses=r)
                )
                # The next point's x is close: its solves start at this y_g, to this tolerance.
                warm, scale = r.y_g, r.scale
            if t == warmup_steps:
                break
            state, _ = solver.step(state, batch)
    return decide(stats, rho_ok=rho_ok, rho_bad=rho_bad, atol=atol, max_residual=max_residual)
