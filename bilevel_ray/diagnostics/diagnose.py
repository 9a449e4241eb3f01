"""From flatness estimates to a verdict: will PBGD-Free end as well as a corrected method?

:func:`decide` judges estimates collected anywhere (a training run's reports, or a warm-up);
:func:`diagnose` follows PBGD-Free from (x0, y0) to where it is heading and prices its dropped
term there (:func:`~bilevel_ray.diagnostics.flatness.estimate`), then decides.

Decision rule (the value form of Definition 1). Where PBGD-Free stops, kept = 0 and the penalty
gradient is the dropped term d alone; a corrected method goes on along -d and gains about
C = ||d||^2 / (2 kappa) in f (kappa: the penalty objective's curvature along d;
:mod:`~bilevel_ray.diagnostics.cost`). C is averaged over the judged points (the later half of
the priced points' steps: the end of diagnose's trajectory, on several batches), with standard
error se. The scale is the achievable improvement: f at the problem's reference point (the
``reference`` argument, default x0: the problem's own start; f = f(x, y_gamma), the loss the run
sees, measured on each priced batch) less the better end, f(end) - C. PBGD-Free is as good when
its shortfall C is at most rtol of that, plus the run's own minibatch jitter and atol:
C <= tau = rtol max(f(reference) - (f(end) - C), 0) + jitter + atol (:func:`tolerance`; with
no reference measured, a hand-built estimate, rtol |f| at the larger end). Unlike rtol |f| it
does not move when a constant is added to f or collapse where f ends near 0 (a DPO loss ends
at ~1e-5 from log 2), and unlike the run's own progress it does not grow with a far start (the
negative toy from x0 = 100 would allow 551 against its 25):

* suitable   if C + z se <= tau: PBGD-Free's result is as good to that precision; "keep
  pbgd_free" (the reason states C, se, f, the start's f, tau and the confidence P(C <= tau));
* unsuitable if C - z se > tau, fallback ``alt_pbgd``: "raise gamma" when ||d|| ~ gamma^slope
  falls fast enough (slope <= -0.25) that C reaches tau by 100 gamma, else "switch to alt_pbgd";
* uncertain  when the interval straddles tau (more batches narrow it), when the verdict hinges on
  points whose solves did not converge (the reason names the solve settings and what to try;
  unconverged points are never dropped silently), or when C is only a lower bound (the penalty
  objective does not curve up along d as far as probed) that does not exceed tau.

Side-by-side branch (minibatch data, when the price cannot decide or the run is still moving):
PBGD-Free and alt_pbgd run ``branch_steps`` steps from the same (x, y) on the same batches, and
the shortfall is their held-out gap (paired over held-out parts, standard error se). The
precision a run can reach is measured, not assumed: a second PBGD-Free run from the same start
on another batch order, as many steps long, differs from the first by d ± se_d (held out, over
the branch's evaluations), and the noise floor |d| + z se_d
(or the evaluations' jitter, if larger) joins the tolerance. A shortfall within it is no more
than what two PBGD-Free runs differ by: suitable; one beyond it by z se: unsuitable. A replica
sees only batch-order noise, so a real bias still shows above it. Deterministic data never
branches (a replica would repeat the run: floor 0).

Why cost and not the ratio ||d|| / ||kept||: both terms can be tiny (a least-squares f and g
sharing their target) or the kept term can dwarf d far from the solution (a far start), and the
ratio then says nothing about the result; C is in the units the user judges the result in, and
does not depend on the start when measured where PBGD-Free settles. Estimates without a cost
(``estimate(..., cost=False)``, or built by hand) get the former ratio rule: D / S with D the
median ||dropped|| and S the largest max(||kept||, ||kept + dropped||), suitable if D <= atol or
D / S <= rho_ok, unsuitable if D / S >= rho_bad, uncertain in between.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import FullBatch, as_batches
from bilevel_ray.diagnostics.cost import pooled_cost
from bilevel_ray.diagnostics.flatness import (
    DELTA_PAIRS,
    count_problem,
    estimate,
    estimate_problems,
    lower_grad_x_diff,
    lower_responses,
)
from bilevel_ray.diagnostics.responses import Responses, as_batch, minimize
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, check_losses, check_params, check_problem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, cuda_devices, vdot

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


def _get(p: Mapping[str, float], name: str) -> float:
    value = p.get(f"flatness/{name}", p.get(name, math.nan))
    return float(value) if isinstance(value, (int, float)) else math.nan


def _mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 from one value; inf when a value is inf)."""
    if not all(math.isfinite(v) for v in values):
        return math.inf, math.inf
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def _settings(points: Sequence[Mapping[str, float]], residual: float) -> str:
    """The solve settings behind ``points`` and what to try instead, for an uncertain reason."""
    steps = _median([_get(p, "solve_steps") for p in points])
    rtol = _median([_get(p, "solve_rtol") for p in points])
    if not math.isfinite(steps):
        return "raise solve_steps or solve_lr"
    return (
        f"the solves ran solve_steps={steps:g} to solve_rtol={rtol:g} and stopped at a relative "
        f"residual of {residual:.3g}: try solve_steps={4 * steps:g} and "
        "solve_optimizer='lbfgs'"
    )


def decide(
    stats: Mapping[str, float] | Sequence[Mapping[str, float]],
    *,
    rho_ok: float = 0.1,
    rho_bad: float = 0.3,
    atol: float = 1e-6,
    max_residual: float = 1e-3,
    rtol: float = 0.05,
    z: float = 2.0,
) -> Verdict:
    """The verdict (module docstring) on one :func:`estimate` or on those of several points."""
    points = [stats] if isinstance(stats, Mapping) else list(stats)
    problems = decide_problems(rho_ok, rho_bad, atol, max_residual)
    _rtol_problem(problems, rtol)
    _threshold(problems, "z", z, 0, "the confidence multiplier of the standard error, e.g. 2.0")
    if not points:
        problems.append("stats is empty: decide needs at least one estimate from estimate()")
    if problems:
        raise ConfigError(problems)
    priced = [p for p in points if not math.isnan(_get(p, "cost"))]
    if priced:
        # Judge where the run is heading: the later half of the priced points' steps.
        steps = [_get(p, "step") for p in priced]
        cut = _median(steps)
        judged = [p for p, s in zip(priced, steps) if not s < cut] if math.isfinite(cut) else priced
        return _decide_cost(points, judged, atol, max_residual, rtol, z)
    return _decide_ratio(points, rho_ok, rho_bad, atol, max_residual)


def _common(points: Sequence[Mapping[str, float]], used: list) -> dict[str, float]:
    residual = max((_get(p, "residual") for p in points), default=math.nan)
    out = {"flatness/points": float(len(points)), "flatness/used": float(len(used))}
    out["flatness/gamma"] = _median([_get(p, "gamma") for p in points])
    out["flatness/residual"] = residual
    for name in ("rho", "cos", "alpha_hat", "c_hat", "gap_slope", "dropped_slope", "f_gap"):
        out[f"flatness/{name}"] = _median([_get(p, name) for p in used])
    return out


def _shape(out: Mapping[str, float]) -> str:
    return f"alpha_hat={out['flatness/alpha_hat']:.3g}, c_hat={out['flatness/c_hat']:.3g}"


def _unsuitable(out: dict[str, float], head: str, ratio: float, power: float) -> Verdict:
    """'raise gamma' when the dropped term shrinks fast enough in gamma that ``ratio`` (the
    measure against its threshold, ~ gamma^(power * slope)) falls to 1 by 100 gamma; else
    'switch to alt_pbgd'."""
    gamma, slope = out["flatness/gamma"], out["flatness/dropped_slope"]
    shown = round(slope, 2) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.00" in the reason
    target = gamma * ratio ** (-1.0 / (power * slope)) if slope <= -0.25 else math.inf
    if target <= 100 * gamma:
        out["flatness/suggested_gamma"] = target
        reason = (
            f"{head}, but it shrinks like gamma^{shown:.2f} ({_shape(out)}), so raise gamma to "
            f"about {target:.3g} or switch to alt_pbgd."
        )
        return Verdict(False, "unsuitable", reason, out, "raise gamma", "alt_pbgd")
    shape_says = (
        "f is Lipschitz-like in y near y_g"
        if out["flatness/alpha_hat"] < 1.25
        else "f is flat near y_g only up to a residual"
    )
    reason = (
        f"{head}, raising gamma does not shrink it (slope {shown:.2f}) and {shape_says} "
        f"({_shape(out)}), so switch to alt_pbgd."
    )
    return Verdict(False, "unsuitable", reason, out, "switch to alt_pbgd", "alt_pbgd")


def _rtol_problem(problems: list[str], rtol: Any) -> None:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        problems.append(
            f"rtol={rtol!r}: must be a finite number in [0, 1), the tolerated share of the "
            "achievable improvement, e.g. 0.05"
        )


def tolerance(
    reference: float,
    upper: float,
    gap: float,
    rtol: float,
    atol: float,
    noise: float = 0.0,
) -> float:
    """The tolerance of a shortfall ``gap`` below PBGD-Free's end value ``upper``: rtol times the
    achievable improvement, f at the problem's reference point (``reference``: its own start)
    less the better end (min(upper, upper - gap): the corrected method's when gap > 0), plus the
    run's own jitter ``noise`` and ``atol``. It does not change when a constant is added to f,
    nor with the start a run takes (the reference is the problem's, not the run's), and it does
    not collapse where f ends near 0 (a DPO loss). Without a reference (NaN: a hand-built
    estimate) the scale is |f| at the larger end. diagnose_panel's truth uses this function."""
    best = min(upper, upper - gap) if math.isfinite(gap) else upper
    if math.isfinite(reference) and math.isfinite(best):
        scale = max(reference - best, 0.0)
    else:
        scale = max((abs(v) for v in (upper, upper - gap) if math.isfinite(v)), default=0.0)
    return rtol * scale + max(noise, 0.0) + atol


def _start_upper(points: Sequence[Mapping[str, float]], used: list) -> float:
    """f at the reference point: the priced points' own ``start_upper`` (diagnose's
    f(reference, y_gamma(reference)) on their batches) or else the earliest point's ``upper``
    (a run's reports: its start); NaN when every point has one step."""
    paired = [_get(p, "start_upper") for p in used]
    if paired and all(math.isfinite(v) for v in paired):
        return statistics.fmean(paired)
    timed = [(_get(p, "step"), _get(p, "upper")) for p in points]
    timed = [(s, f) for s, f in timed if math.isfinite(s) and math.isfinite(f)]
    if len({s for s, _ in timed}) < 2:
        return math.nan
    first = min(s for s, _ in timed)
    return statistics.fmean(f for s, f in timed if s == first)


def _decide_cost(
    points: Sequence[Mapping[str, float]],
    judged: list,
    atol: float,
    max_residual: float,
    rtol: float,
    z: float,
) -> Verdict:
    """Cost C (mean over the judged points, standard error se) against the tolerance tau (module
    docstring): suitable if C + z se <= tau, unsuitable if C - z se > tau."""
    used = [p for p in judged if not _get(p, "residual") > max_residual]
    stuck = [p for p in judged if _get(p, "residual") > max_residual]
    out = _common(points, used)
    step = _get(judged[0], "step")
    at = f" at step {step:g}" if math.isfinite(step) else ""
    worst = max((_get(p, "residual") for p in stuck), default=0.0)
    if not used:
        reason = (
            f"The lower-level solves did not converge at the {len(judged)} point(s) judged{at}: "
            f"{_settings(stuck, worst)}, then diagnose again."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")

    def verdict_of(group: list) -> tuple[str, dict[str, float]]:
        cost, se = _mean_se([_get(p, "cost") for p in group])
        pooled, pooled_se = _get(group[0], "pooled_cost"), _get(group[0], "pooled_se")
        bounds = [_get(p, "cost_is_bound") > 0 for p in group]
        bound = any(bounds)
        if len(group) == len(judged) and math.isfinite(pooled) and math.isfinite(pooled_se):
            cost, se = pooled, pooled_se  # diagnose's noise-free pairs estimate (cost.py)
            # Priced with the curvature of the batches that bracketed: a bound only if none did.
            bound = all(bounds)
        upper = statistics.fmean(_get(p, "upper") for p in group)
        start = _start_upper(points, group)
        progress = start - upper
        noise = max(_get(group[0], "noise_floor"), 0.0) if group else 0.0
        noise = noise if math.isfinite(noise) else 0.0
        tol = tolerance(start, upper, cost, rtol, atol, noise)
        numbers = {
            "cost": cost,
            "cost_se": se,
            "upper": upper,
            "start_upper": start,
            "progress": progress,
            "tolerance": tol,
            "noise_floor": noise,
            "cost_is_bound": float(bound),
        }
        if math.isinf(cost):
            return "unsuitable", numbers
        low, high = cost - z * se, cost + z * se
        name = "suitable" if high <= tol else "unsuitable" if low > tol else "uncertain"
        if bound and name == "suitable":  # a lower bound cannot clear PBGD-Free
            name = "uncertain"
        return name, numbers

    name, numbers = verdict_of(used)
    out.update({f"flatness/{k}": v for k, v in numbers.items()})
    cost, se, upper, tol = (numbers[k] for k in ("cost", "cost_se", "upper", "tolerance"))
    bound = numbers["cost_is_bound"]
    dropped = _median([_get(p, "dropped") for p in used])
    out["flatness/dropped"] = dropped
    out["flatness/kept"] = _median([_get(p, "kept") for p in used])
    out["flatness/judged"] = float(len(used))
    # P(C <= tau) under a normal error of the mean: the confidence the reason reports.
    confidence = (
        (1.0 if cost <= tol else 0.0)
        if se == 0 or not math.isfinite(cost)
        else 0.5 * (1 + math.erf((tol - cost) / (se * math.sqrt(2))))
    )
    out["flatness/confidence"] = confidence
    noise = numbers["noise_floor"]
    jitter = f" plus its own minibatch jitter {noise:.2g}" if noise > 0 else ""
    start = numbers["start_upper"]
    against = (
        f"a tolerance of {tol:.3g} ({100 * rtol:g}% of the achievable improvement from "
        f"f = {start:.4g} at the problem's reference point{jitter})"
        if math.isfinite(start)
        else f"a tolerance of {tol:.3g} ({100 * rtol:g}% of |f| at the ends{jitter}; no "
        "reference point was measured)"
    )
    about = "at least" if bound else "about"
    measured = (
        f"its dropped term (norm {dropped:.3g}) costs {about} {cost:.3g} ± {se:.2g} in the upper "
        f"objective where the run is heading{at} (f = {upper:.4g}, over {len(used)} batch(es)), "
        f"against {against}"
    )
    if stuck:
        alt, _ = verdict_of(used + stuck)
        if alt != name:
            reason = (
                f"PBGD-Free's verdict depends on {len(stuck)} point(s) whose solves did not "
                f"converge{at}: {_settings(stuck, worst)}, then diagnose again."
            )
            return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
        measured += f"; {len(stuck)} unconverged point(s) agree"
    # Before the run settles its kept term still moves it: a cost clearly under the tolerance
    # (whose progress only grows) stands, a larger one may still change.
    unsettled = [p for p in used if _get(p, "settled") == 0]
    if unsettled and name != "suitable":
        ratio = _median([_get(p, "settle_ratio") for p in unsettled])
        below = _get(unsettled[0], "settle")
        out["flatness/settle_ratio"] = ratio
        reason = (
            f"PBGD-Free had not settled when the time ran out{at}: its own direction is still "
            f"{ratio:.3g} times the dropped term (settled below {below:g}), so what the dropped "
            f"term costs there ({measured}) may not be what it costs at the run's end; diagnose a "
            "longer run (warmup_steps, max_seconds) or compare with alt_pbgd on a short run."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    if name == "suitable":
        reason = (
            f"PBGD-Free will do as well as the corrected methods: {measured}, with "
            f"{100 * confidence:.3g}% confidence, so keep pbgd_free."
        )
        return Verdict(True, "suitable", reason, out, "keep pbgd_free")
    if name == "uncertain" and bound:
        reason = (
            f"PBGD-Free may or may not do as well: {measured}, and the penalty objective does not "
            "curve up along the dropped term as far as probed, so only that lower bound is known; "
            "compare with alt_pbgd on a short run, or diagnose a longer run (warmup_steps) "
            "nearer its end."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    if name == "uncertain":
        n = len(used)
        reason = (
            f"PBGD-Free may or may not do as well: {measured}, and the spread over batches "
            f"leaves {100 * confidence:.3g}% confidence; average more batches (batches={4 * n}) "
            "or compare with alt_pbgd on a short run."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    head = f"PBGD-Free is biased: {measured}"
    # cost ~ dropped^2 ~ gamma^(2 slope): the ratio cost / tol falls as gamma^(2 slope).
    return _unsuitable(out, head, cost / tol if tol > 0 else math.inf, 2.0)


def _decide_ratio(
    points: Sequence[Mapping[str, float]],
    rho_ok: float,
    rho_bad: float,
    atol: float,
    max_residual: float,
) -> Verdict:
    """The ratio rule, for estimates without a cost (``estimate(..., cost=False)`` or built by
    hand): D / S, D the median ||dropped||, S the largest max(||kept||, ||kept + dropped||)."""
    finite = [p for p in points if all(math.isfinite(_get(p, k)) for k in ("kept", "dropped"))]
    used = [p for p in finite if not _get(p, "residual") > max_residual]
    stuck = [p for p in finite if _get(p, "residual") > max_residual]
    out = _common(points, used)
    gamma, residual = out["flatness/gamma"], out["flatness/residual"]
    where = f"over {len(used)} of {len(points)} point(s) at gamma={gamma:g}"
    if not used:
        reason = (
            f"The flatness estimates are not finite {where}: lower lr_x / lr_y or solve_lr, or "
            "check f and g at the start point, then diagnose again."
            if len(finite) < len(points)
            else f"The lower-level solves did not converge {where}: "
            f"{_settings(stuck, residual)}, then diagnose again."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    dropped = _median([_get(p, "dropped") for p in used])
    # A hand-built estimate may lack "full" (NaN): its kept term is the scale then.
    scale = max(
        max(_get(p, "kept"), _get(p, "full") if math.isfinite(_get(p, "full")) else 0.0)
        for p in used
    )
    ratio = dropped / scale if scale > 0 else (math.inf if dropped > 0 else 0.0)
    out.update(
        {"flatness/dropped": dropped, "flatness/grad_scale": scale, "flatness/bias_ratio": ratio}
    )
    share = f"{100 * ratio:.3g}% of the gradient scale {scale:.3g}"
    if stuck:
        where += f" ({len(stuck)} left out: {_settings(stuck, residual)})"
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
            f"{100 * rho_bad:g}% ({_shape(out)}), so compare pbgd_free with alt_pbgd on a short "
            "run."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
    head = f"PBGD-Free is biased: its dropped term (median norm {dropped:.3g}) is {share} {where}"
    return _unsuitable(out, head, ratio / rho_ok, 1.0)


def diagnose(
    problem: BilevelProblem,
    x0: Params,
    y0: Params,
    gamma: float = 10.0,
    *,
    data: Any = None,
    eval_data: Any = None,
    reference: Params | None = None,
    warmup_steps: int = 100,
    every: int = 25,
    lr_x: float = 0.01,
    lr_y: float = 0.1,
    inner_steps: int = 1,
    optimizer: str | tuple[str, str] = "sgd",
    seed: int = 0,
    max_steps: int | None = None,
    max_seconds: float = 60.0,
    branch_steps: int = 200,
    settle: float = 0.1,
    batches: int = 4,
    solve_steps: int = 300,
    solve_lr: float = 0.05,
    solve_rtol: float = 1e-6,
    solve_optimizer: str = "lbfgs",
    gamma_factor: float = 4.0,
    directions: int = 3,
    delta_pairs: Sequence[tuple[float, float]] = DELTA_PAIRS,
    rho_ok: float = 0.1,
    rho_bad: float = 0.3,
    atol: float = 1e-6,
    max_residual: float = 1e-3,
    rtol: float = 0.05,
    z: float = 2.0,
    progress: bool = False,
) -> Verdict:
    """Will PBGD-Free on ``problem`` end as well as a corrected method, to this precision?

    Follows PBGD-Free's own trajectory from (x0, y0) (``lr_x``, ``lr_y``, ``inner_steps``,
    ``optimizer`` as in ``br.solve``, at this fixed ``gamma``), with a cheap check every
    ``every`` steps (solves warm-started at the run's current y, to 1e-2 in at most 50 steps),
    for at least ``warmup_steps`` and until it settles (||E kept|| <= ``settle`` *
    max(||E dropped||, ``settle`` * its largest value), E over batches by the dot product of
    two successive checks' vectors: what is left to move is the dropped term's),
    ``max_steps`` (default 20 * warmup_steps; ``max_seconds`` only caps a far slower run, so
    a loaded machine gets the same verdict). There it prices the
    dropped term in units of f (module docstring) on ``batches`` batches of ``data`` (one when
    the data is deterministic; at least two, up to 4 * ``batches`` while the verdict is
    uncertain, none more once ``max_seconds`` is spent), measures f where the run started on
    the same batches (its progress) and, for plain SGD on x, its own jitter floor
    lr_x tr(Var kept) / 4, and applies :func:`decide`. A run that has not settled when the
    time runs out is judged suitable only if its cost clears the tolerance, else uncertain.
    On minibatch data, a run still moving at the trajectory's end, or whose price cannot decide
    (uncertain), is compared with alt_pbgd from there for ``branch_steps`` steps on the same
    batches (a step count, not a time budget), judged on ``eval_data`` (split into 32 strided
    parts: the paired per-part differences give the shortfall's standard error) or on
    held-back batches, averaged over 4 evaluations in the branch's second half, against the
    tolerance plus the runs' own noise: the larger of the evaluations' jitter and what a second
    PBGD-Free run from (x0, y0) on another batch order (seed + 7919), as many steps long,
    differs by, |d| + z se (:func:`replica_noise`; the precision a run can reach). With that
    floor, a shortfall within the tolerance is suitable, one beyond it by z standard errors
    unsuitable.
    The tolerance is ``rtol`` of the achievable improvement measured from ``reference`` (an
    upper-level point, default x0: the problem's own start), so that diagnosing from another
    start with the problem's reference gives the same tolerance. x0 and y0 are not modified.
    ``progress`` prints a line to stderr at once and then every 2 s.

    The ``solve_*`` options set the lower-level solves of each estimate (L-BFGS by default: it
    converges to ``solve_rtol`` in tens of gradients); ``gamma_factor``, ``directions`` and
    ``delta_pairs`` are :func:`estimate`'s; ``rho_ok``, ``rho_bad``, ``atol``,
    ``max_residual``, ``rtol`` and ``z`` are :func:`decide`'s.

    Raises:
        ConfigError: bad input, before any step runs (every problem found, at once).
    """
    check_problem(problem)
    check_params(x0, y0)
    if reference is not None:
        check_params(reference, y0)
        if set(reference) != set(x0) or any(reference[k].shape != x0[k].shape for k in x0):
            raise ConfigError(
                "reference must have x0's names and shapes (an upper-level point, the problem's "
                f"own start); got {_shapes(reference)} for x0's {_shapes(x0)}"
            )
    reference = x0 if reference is None else reference
    problems: list[str] = []
    count_problem(problems, "warmup_steps", warmup_steps, 0)
    count_problem(problems, "every", every, 1)
    count_problem(problems, "seed", seed, 0)
    count_problem(problems, "batches", batches, 1)
    count_problem(problems, "branch_steps", branch_steps, 0)
    if max_steps is not None:
        count_problem(problems, "max_steps", max_steps, 0)
    _threshold(problems, "settle", settle, 0, "e.g. settle=0.1")
    _threshold(problems, "max_seconds", max_seconds, 0, "e.g. max_seconds=20")
    if not isinstance(progress, bool):
        problems.append(f"progress={progress!r}: must be True or False")
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
    _rtol_problem(problems, rtol)
    _threshold(problems, "z", z, 0, "the confidence multiplier of the standard error, e.g. 2.0")
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

    last = 20 * warmup_steps if max_steps is None else max(max_steps, warmup_steps)
    # A tolerance below the dtype's rounding cannot be met (float32 networks): solve_rtol is
    # floored at sqrt(eps) and max_residual at 100 times that (the run watch's 2e-2 in float32);
    # the verdict's reason names the tolerance used.
    floor = torch.finfo(next(iter(x0.values())).dtype).eps ** 0.5
    solve["solve_rtol"] = opts["solve_rtol"] = max(solve_rtol, floor)
    max_residual = max(max_residual, 100 * solve["solve_rtol"])
    # The trajectory's checks only ask whether the run has settled: looser, cheaper solves.
    check = {
        **solve,
        "solve_rtol": max(solve["solve_rtol"], 1e-2),
        "solve_steps": min(solve["solve_steps"], 50),
    }
    # Deterministic data gives the same batch every step: one priced batch says it all.
    fixed = data is None or isinstance(data, FullBatch)
    report = _Progress(progress)
    with torch.random.fork_rng(devices=cuda_devices(x0, y0)):
        torch.manual_seed(seed)  # a shuffled DataLoader draws from torch's RNG when iterated
        stream = as_batches(data, seed)
        first = next(stream)
        check_losses(problem, x0, y0, first)
        if not _upper_reaches_x(problem, x0, y0, first):
            return _blind(x0)
        state, peak, previous, checks = solver.init(x0, y0), 0.0, None, 0
        for t, batch in enumerate(itertools.chain([first], stream)):
            if t % every == 0 or t >= last:
                kept, dropped, _ = _terms(problem, state.x, state.y, batch, gamma, check)
                # ||E kept|| and ||E dropped|| from two successive batches (their dot product),
                # so that a minibatch's own noise does not keep the run from settling.
                before = previous or (kept, dropped)
                signal = math.sqrt(max(float(vdot(kept, before[0])), 0.0))
                bias = math.sqrt(max(float(vdot(dropped, before[1])), 0.0))
                previous, checks = (kept, dropped), checks + 1
                peak = max(peak, signal) if math.isfinite(signal) else peak
                settled = signal <= settle * max(bias, settle * peak)
                # Steps, not seconds, end the trajectory (a loaded machine gets the same
                # verdict); max_seconds only caps a run far slower than its steps suggest.
                late = t >= last or report.elapsed() > max_seconds
                if t >= warmup_steps and (settled or late) and (checks > 1 or fixed or late):
                    settled = settled and (checks > 1 or fixed)
                    break
                report.show(f"step {t}, check {checks}")
            state, _ = solver.step(state, batch)
        judge = {"atol": atol, "max_residual": max_residual, "rtol": rtol, "z": z}
        ratio = signal / max(bias, settle * peak, 1e-300)

        def compare(priced_verdict: Verdict | None = None) -> Verdict:
            # PBGD-Free against alt_pbgd from here, on the same batches, for branch_steps steps.
            branch = _Branch(
                problem, solver, lr_x, lr_y, gamma, optimizer, state, t, ratio, eval_data
            )
            branch.reference = (reference, y0)
            branch.settled, branch.priced = settled, priced_verdict
            # A second PBGD-Free run from the same start on another batch order, as far as
            # this one: what two runs differ by, the precision a run can reach (deterministic
            # data would repeat the run exactly: skipped).
            replica = None if fixed else as_batches(data, seed + REPLICA_SEED)
            if replica is not None:
                again = solver.init(x0, y0)
                for m in range(t):
                    again, _ = solver.step(again, next(replica))
                    if m % 25 == 0:
                        report.show(f"step {t}, a second PBGD-Free run, step {m} of {t}")
                branch.again = again
            return branch.verdict(stream, batches, branch_steps, report, judge, replica)

        if not settled and not fixed:
            # Pricing assumes PBGD-Free's own step has died out (kept ~ 0); a minibatch network
            # that is still moving at the trajectory's end is compared with alt_pbgd instead.
            return compare()
        priced, vectors, steps_kept = [], [], []
        # Plain SGD on x jitters around its end point by its batch noise: a quadratic loss sits
        # lr_x tr(Var kept) / 4 above its minimum on average, a floor under any visible gap.
        x_rule = optimizer if isinstance(optimizer, str) else optimizer[0]
        jitter = lr_x / 4 if x_rule == "sgd" and not fixed else 0.0
        y_ref = y0
        for b in range(1 if fixed else 4 * batches):
            # The end point, priced: on this step's batch, then on fresh ones (two at least, the
            # fewest that give a noise-free pair; ``batches``, and up to 4 times as many while
            # the verdict is uncertain, while max_seconds allows).
            if b >= 2 and report.elapsed() > max_seconds:
                break
            interim = (priced, vectors, steps_kept, jitter, judge)
            if b >= batches and _decide_priced(*interim).verdict != "uncertain":
                break
            batch = batch if b == 0 else next(stream)
            r = lower_responses(problem, state.x, state.y, batch, gamma, **solve)
            diff = lower_grad_x_diff(problem, state.x, r.y_g, r.y_gamma, batch)
            vectors.append({k: gamma * v for k, v in diff.items()})
            _, _, (kept,) = grads_of(
                lambda x_, r=r, batch=batch: (
                    problem.upper_loss(x_, r.y_gamma, as_batch(batch).upper),
                    {},
                ),
                [state.x],
                identity_reduce,
            )
            steps_kept.append(kept)
            point = estimate(
                problem, state.x, state.y, batch, gamma, **opts, seed=seed + b, responses=r
            )
            # f at the reference point on the same batch: the achievable improvement, paired.
            point["flatness/start_upper"], y_ref = _reference_upper(
                problem, reference, y_ref, batch, gamma, check
            )
            point["flatness/settled"], point["flatness/settle"] = float(settled), settle
            point["flatness/settle_ratio"] = signal / max(bias, settle * peak, 1e-300)
            priced.append({**point, "flatness/step": float(t)})
            report.show(f"step {t}, pricing batch {b + 1}")
    priced_verdict = _decide_priced(
        priced, vectors, steps_kept, jitter, {**judge, "rho_ok": rho_ok, "rho_bad": rho_bad}
    )
    if priced_verdict.verdict == "uncertain" and not fixed and branch_steps > 0:
        # The price could not decide (a bound, a spread straddling the tolerance, unconverged
        # solves): on minibatch data the outcome itself is compared, as the reason advises.
        return compare(priced_verdict)
    return priced_verdict


PARTS = 32  # the held-out data is split into this many strided parts for the paired spread
EVALS = 4  # held-out evaluations over the branch's second half, averaged
REPLICA_SEED = 7919  # offset of the replica's batch-order seed from diagnose's own


def replica_noise(
    free: Sequence[Sequence[float]], replica: Sequence[Sequence[float]], z: float
) -> tuple[float, float, float]:
    """What two PBGD-Free runs from the same start, on different batch orders, differ by: the
    noise floor |d| + z se, with d the time-averaged held-out difference of ``free`` and
    ``replica`` and se its standard error over the held-out parts (:func:`paired_gap`, values
    ``[e][k]`` as there), and d and se themselves. No evaluation gives 0 (no replica ran); a
    non-finite value gives inf; one part (no spread) gives |d|. A shortfall within the floor
    is one the run's own batch order could produce: within the precision a run can reach."""
    if not free or not replica:
        return 0.0, 0.0, 0.0
    diff, se, _ = paired_gap(free, replica)
    if not math.isfinite(diff):
        return math.inf, diff, se
    return abs(diff) + (z * se if math.isfinite(se) else 0.0), diff, se


def paired_gap(free: Sequence[Sequence[float]], alt: Sequence[Sequence[float]]) -> tuple:
    """The mean shortfall f(PBGD-Free) - f(alt_pbgd), its standard error and the runs' own
    jitter, from values ``free[e][k]`` and ``alt[e][k]`` at evaluation e on held-out part k
    (or held-back batch k). The gap of part k is averaged over the evaluations, so the
    standard error (over the parts: the paired differences of the same samples) is that of
    the time-averaged gap; one part gives NaN, never a falsely exact 0. The jitter is how far
    a single end value wanders: the standard deviation over the evaluations of each method's
    mean (pooled; 0 from one evaluation)."""
    parts = len(free[0])
    gaps = [statistics.fmean(f[k] - a[k] for f, a in zip(free, alt)) for k in range(parts)]
    if not all(math.isfinite(g) for g in gaps):
        return math.inf, math.inf, 0.0
    gap = statistics.fmean(gaps)
    se = statistics.stdev(gaps) / math.sqrt(parts) if parts > 1 else math.nan
    jitter = 0.0
    if len(free) > 1:
        spreads = [statistics.variance([statistics.fmean(v) for v in run]) for run in (free, alt)]
        jitter = math.sqrt(statistics.fmean(spreads))
    return gap, se, jitter


def _split(batch: Any, parts: int) -> list | None:
    """``batch`` cut into ``parts`` strided parts along its first dimension (every leaf a
    tensor with the same length, at least ``parts``), or None where it cannot be cut."""
    leaves: list[torch.Tensor] = []

    def walk(b: Any) -> bool:
        if isinstance(b, torch.Tensor):
            leaves.append(b)
            return b.dim() > 0
        if isinstance(b, (tuple, list)):
            return all(walk(v) for v in b)
        if isinstance(b, dict):
            return all(walk(v) for v in b.values())
        return False

    if not walk(batch) or not leaves or len({len(v) for v in leaves}) != 1:
        return None
    if len(leaves[0]) < parts:
        return None

    def cut(b: Any, k: int) -> Any:
        if isinstance(b, torch.Tensor):
            return b[k::parts]
        if isinstance(b, dict):
            return {n: cut(v, k) for n, v in b.items()}
        return type(b)(cut(v, k) for v in b)

    return [cut(batch, k) for k in range(parts)]


class _Branch:
    """PBGD-Free against alt_pbgd from the same (x, y), on the same batches, for a fixed number
    of steps: the verdict on a minibatch run whose price of the dropped term cannot decide (it
    is still moving at the trajectory's end, or the price is a bound or straddles the
    tolerance). A fixed step count, not a time budget: the verdict does not depend on load."""

    def __init__(self, problem, solver, lr_x, lr_y, gamma, optimizer, state, step, ratio, held):
        self.problem, self.step, self.ratio, self.eval_data = problem, step, ratio, held
        self.reference: tuple[Params, Params] = (state.x, state.y)  # diagnose sets its own
        self.settled, self.priced = False, None
        self.gamma = gamma
        alt = SolverConfig(
            method="alt_pbgd", lr_x=lr_x, lr_y=lr_y, gamma=gamma, optimizer=optimizer
        ).build(problem)
        # Both branches start afresh (optimizer states too), so neither has a head start.
        self.free = (solver, solver.init(state.x, state.y)._replace(step=state.step))
        # The replica's own state (diagnose sets a second run's), made before any branch step
        # (a step may update in place).
        self.again = solver.init(state.x, state.y)._replace(step=state.step)
        self.alt = (alt, alt.init(state.x, state.y)._replace(step=state.step))
        self.parts = None if held is None else _split(as_batch(held).upper, PARTS)

    def _upper(self, x: Params, y: Params, held: list) -> list[float]:
        """f at (x, .) on each held-out part (or held-back batch)."""
        if self.eval_data is not None:
            # The outcome the user judges: phi(x) = f(x, y_g(x)) on the held-out data, y_g(x)
            # solved there (warm-started at the branch's y).
            batch = as_batch(self.eval_data)
            floor = torch.finfo(next(iter(x.values())).dtype).eps ** 0.5
            y, _ = minimize(
                lambda y_: self.problem.lower_loss(x, y_, batch.lower), y, 300, 0.05, "lbfgs", floor
            )
            with torch.no_grad():
                return [
                    float(self.problem.upper_loss(x, y, part))
                    for part in (self.parts or [batch.upper])
                ]
        with torch.no_grad():
            return [float(self.problem.upper_loss(x, y, as_batch(b).upper)) for b in held]

    def verdict(
        self,
        stream: Any,
        batches: int,
        steps: int,
        report: Any,
        judge: dict,
        replica: Any = None,
    ) -> Verdict:
        """``steps`` steps of each; f at both ends evaluated EVALS times over the second half
        (on the held-out data's PARTS parts, or on 2 ``batches`` held-back batches) and
        :func:`paired_gap`'s shortfall against :func:`tolerance` plus the runs' noise: the
        larger of their jitter and, with a ``replica`` batch stream (minibatch data), what a
        second PBGD-Free run (diagnose's: from the same start) on those batches differs by
        (:func:`replica_noise`)."""
        rtol, atol, z = judge["rtol"], judge["atol"], judge["z"]
        held = [self.eval_data] if self.eval_data is not None else []
        held = held or [next(stream) for _ in range(2 * batches)]
        if self.eval_data is None:
            where = f"{len(held)} held-back batches"
        elif self.parts:
            where = f"the held-out data, paired over {len(self.parts)} parts"
        else:
            where = "the held-out data (one part: no spread)"
        (free, a), (alt, c) = self.free, self.alt
        r = self.again if replica is not None else None  # the replica: PBGD-Free's start
        start = self._upper(a.x, a.y, held)
        ref_x, ref_y = self.reference
        if self.eval_data is None:  # f(reference, y_gamma(reference)) on the held-back batches
            loose = {"solve_steps": 50, "solve_lr": 0.05, "solve_rtol": 1e-2, "optimizer": "lbfgs"}
            f_ref = statistics.fmean(
                _reference_upper(self.problem, ref_x, ref_y, b, self.gamma, loose)[0] for b in held
            )
        else:
            f_ref = statistics.fmean(self._upper(ref_x, ref_y, held))
        at = sorted({steps - (steps // 2) * e // EVALS for e in range(EVALS)} - {0})
        ends_free: list[list[float]] = []
        ends_alt: list[list[float]] = []
        ends_rep: list[list[float]] = []
        for m in range(1, steps + 1):
            batch = next(stream)
            (a, _), (c, _) = free.step(a, batch), alt.step(c, batch)
            if r is not None:
                r, _ = free.step(r, next(replica))
            if m in at:
                ends_free.append(self._upper(a.x, a.y, held))
                ends_alt.append(self._upper(c.x, c.y, held))
                if r is not None:
                    ends_rep.append(self._upper(r.x, r.y, held))
            if m % 25 == 0:
                report.show(f"step {self.step}, comparing with alt_pbgd, step {m} of {steps}")
        if not ends_free:  # steps = 0: the start alone
            ends_free, ends_alt = [start], [start]
        gap, se, jitter = paired_gap(ends_free, ends_alt)
        runs, r_diff, r_se = replica_noise(ends_free, ends_rep, z)
        noise = max(jitter, runs)
        f_free = statistics.fmean(statistics.fmean(v) for v in ends_free)
        f_alt = statistics.fmean(statistics.fmean(v) for v in ends_alt)
        tol = tolerance(f_ref, f_free, gap, rtol, atol, noise)
        f_start = statistics.fmean(start)
        out = {
            "flatness/cost": gap,
            "flatness/cost_se": se,
            "flatness/tolerance": tol,
            "flatness/noise_floor": noise,
            "flatness/jitter": jitter,
            "flatness/replica_gap": r_diff if replica is not None else math.nan,
            "flatness/replica_se": r_se if replica is not None else math.nan,
            "flatness/upper": f_free,
            "flatness/alt_upper": f_alt,
            "flatness/start_upper": f_ref,
            "flatness/branch_start_upper": f_start,
            "flatness/progress": f_ref - f_free,
            "flatness/branch_steps": float(steps),
            "flatness/step": float(self.step),
            "flatness/settled": float(self.settled),
            "flatness/settle_ratio": self.ratio,
        }
        if self.priced is not None:
            out["flatness/priced_cost"] = self.priced.stats.get("flatness/cost", math.nan)
        if not math.isfinite(f_free) or not math.isfinite(f_alt):
            name = "unsuitable" if math.isfinite(f_alt) else "uncertain"
        elif math.isnan(se):  # one value: its spread is unknown, so only a clear gap decides
            name = "uncertain"
        else:
            # With a replica the floor already holds the spread of a difference between two
            # runs (its z se), so the shortfall itself is held to the tolerance: a shortfall
            # within what two PBGD-Free runs differ by is as good to the run's precision.
            # (A replica that repeated the run exactly measured no spread: the usual rule.)
            measured_floor = bool(ends_rep) and runs > 0 and math.isfinite(r_se)
            low, high = gap - z * se, gap if measured_floor else gap + z * se
            name = "suitable" if high <= tol else "unsuitable" if low > tol else "uncertain"
        confidence = (
            (1.0 if gap <= tol else 0.0)
            if not se > 0 or not math.isfinite(gap)
            else 0.5 * (1 + math.erf((tol - gap) / (se * math.sqrt(2))))
        )
        out["flatness/confidence"] = confidence
        why = (
            f"PBGD-Free was still moving at step {self.step} (its own direction {self.ratio:.3g} "
            "times the dropped term)"
            if not self.settled
            else f"the price of PBGD-Free's dropped term at step {self.step} could not decide"
        )
        spread = f"{se:.2g}" if math.isfinite(se) else "an unknown spread"
        replicated = bool(ends_rep) and runs >= jitter
        if replicated:
            r_spread = f" + {z:g} x {r_se:.2g}" if math.isfinite(r_se) else ""
            jitters = (
                f" plus the {runs:.2g} two PBGD-Free runs from the start on different batch orders "
                f"differ by: {abs(r_diff):.2g}{r_spread}"
            )
        else:
            jitters = f" plus the runs' own jitter {jitter:.2g}" if jitter > 0 else ""
        measured = (
            f"{why}, so it was compared with alt_pbgd from there over {steps} steps on the same "
            f"batches: averaged over the last {len(ends_free)} evaluation(s), PBGD-Free ended at "
            f"f = {f_free:.4g} and alt_pbgd at {f_alt:.4g} (shortfall {gap:.3g} ± {spread} on "
            f"{where}, from f = {f_start:.4g}), against a tolerance of {tol:.3g} "
            f"({100 * rtol:g}% of the achievable improvement from f = {f_ref:.4g} at the "
            f"problem's reference point{jitters})"
        )
        if name == "suitable" and replicated:
            within = (
                f"within the {runs:.2g} two PBGD-Free runs differ by"
                if gap <= runs
                else f"within the tolerance {tol:.3g}"
            )
            reason = (
                f"{measured}: the shortfall {gap:.3g} is {within} ({100 * confidence:.3g}% "
                "confidence), as good to the precision a run can reach, so keep pbgd_free."
            )
            return Verdict(True, "suitable", reason, out, "keep pbgd_free")
        if name == "suitable":
            reason = f"{measured}, with {100 * confidence:.3g}% confidence, so keep pbgd_free."
            return Verdict(True, "suitable", reason, out, "keep pbgd_free")
        if name == "unsuitable":
            reason = f"PBGD-Free falls behind: {measured}, so switch to alt_pbgd."
            return Verdict(False, "unsuitable", reason, out, "switch to alt_pbgd", "alt_pbgd")
        reason = (
            f"PBGD-Free may or may not do as well: {measured}; the difference is within its "
            f"spread, so diagnose with a larger branch_steps (now {steps}) or compare with "
            "alt_pbgd on a longer run."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")


def _decide_priced(
    priced: list[dict], vectors: list[Params], kept: list[Params], jitter: float, options: dict
) -> Verdict:
    """:func:`decide` on the priced end points, with their pooled cost (cost.py) and the noise
    floor ``jitter`` tr(Var kept) (the trace from the batches' kept vectors: the mean of
    ||k_b||^2 less that of k_a . k_b, a != b)."""
    curvatures = [
        math.nan if p["flatness/cost_is_bound"] else p["flatness/curvature"] for p in priced
    ]
    pooled, pooled_se = pooled_cost(vectors, curvatures)
    n, floor = len(kept), 0.0
    if jitter > 0 and n >= 2:
        dots = [[float(vdot(a, b)) for b in kept] for a in kept]
        own = sum(dots[i][i] for i in range(n)) / n
        pairs = (sum(map(sum, dots)) - own * n) / (n * (n - 1))
        floor = jitter * max(own - pairs, 0.0)
    for point in priced:
        point.update({"flatness/pooled_cost": pooled, "flatness/pooled_se": pooled_se})
        point["flatness/noise_floor"] = floor
    return decide(priced, **options)


def _upper_reaches_x(problem: BilevelProblem, x: Params, y: Params, batch: Any) -> bool:
    """Whether f(x, y) has a gradient in x at all (autograd reaches some tensor of x)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    with torch.enable_grad():
        out = problem.upper_loss(leaves, y, as_batch(batch).upper)
    if not out.requires_grad:
        return False
    grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
    return any(g is not None for g in grads)


def _blind(x0: Params) -> Verdict:
    """The verdict where f does not depend on x directly (it reaches x only through y*(x), as in
    hyperparameter tuning or data cleaning): PBGD-Free's x step grad_x f is 0."""
    reason = (
        "upper_loss does not depend on x directly (it reaches x only through the lower-level "
        "solution, as in hyperparameter tuning, or from .detach()ed copies): PBGD-Free's x "
        "step grad_x f is 0, so x stays at its start and the dropped term is the whole "
        "hypergradient; switch to alt_pbgd (or pbgd, implicit_cg)."
    )
    stats = {"flatness/kept": 0.0, "flatness/points": 0.0}
    return Verdict(False, "unsuitable", reason, stats, "switch to alt_pbgd", "alt_pbgd")


def _shapes(p: Params) -> str:
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in p.items()) + "}"


def _reference_upper(
    problem: BilevelProblem, x: Params, y: Params, batch: Any, gamma: float, solve: dict
) -> tuple[float, Params]:
    """f(x, y_gamma(x)) at the reference point x on this batch (solves warm-started at y, to the
    trajectory checks' loose tolerance: it only scales the tolerance), and that y_gamma."""
    r = lower_responses(problem, x, y, batch, gamma, **solve)
    with torch.no_grad():
        return float(problem.upper_loss(x, r.y_gamma, as_batch(batch).upper)), r.y_gamma


def _terms(
    problem: BilevelProblem, x: Params, y: Params, batch: Any, gamma: float, solve: dict
) -> tuple[Params, Params, Responses]:
    """The kept and dropped vectors at (x, y) on this batch (solves warm-started at y), and the
    responses."""
    r = lower_responses(problem, x, y, batch, gamma, **solve)
    batch = as_batch(batch)
    _, _, (kept,) = grads_of(
        lambda x_: (problem.upper_loss(x_, r.y_gamma, batch.upper), {}), [x], identity_reduce
    )
    diff = lower_grad_x_diff(problem, x, r.y_g, r.y_gamma, batch)
    return kept, {k: gamma * v for k, v in diff.items()}, r


class _Progress:
    """'[diagnose] <what>, <seconds> s' on stderr: the first at once, then at most every
    ``interval`` seconds."""

    def __init__(self, on: bool, interval: float = 2.0):
        self.on, self.interval = on, interval
        self.start, self.shown = time.monotonic(), -math.inf  # the first line at once

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def show(self, what: str) -> None:
        now = time.monotonic()
        if self.on and now - self.shown >= self.interval:
            self.shown = now
            print(f"[diagnose] {what}, {now - self.start:.1f} s", file=sys.stderr, flush=True)
