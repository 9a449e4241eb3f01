"""The early price's rule: from flatness estimates to a verdict on PBGD-Free (a prediction).

:func:`decide` judges estimates collected anywhere (a training run's reports, or the points
:func:`~bilevel_ray.diagnostics.diagnose.diagnose` priced at the end of its trajectory).

Decision rule (the value form of Definition 1). Where PBGD-Free stops, kept = 0 and the penalty
gradient is the dropped term d alone; a corrected method goes on along -d and gains about
C = ||d||^2 / (2 kappa) in f (kappa: the penalty objective's curvature along d;
:mod:`~bilevel_ray.diagnostics.cost`), averaged over the judged points (the later half of the
priced points' steps, on several batches) with standard error se. tau is
:func:`~bilevel_ray.diagnostics.verdict.tolerance`: rtol of the achievable improvement from f at
the problem's reference point (f = f(x, y_gamma), measured on each priced batch) to the better
end, f(end) - C, plus the run's minibatch jitter and atol:

* suitable   if C + z se <= tau: PBGD-Free's result is as good to that precision; "keep
  pbgd_free" (the reason states C, se, f, the start's f, tau and the confidence P(C <= tau));
* unsuitable if C - z se > tau, fallback ``alt_pbgd``: "raise gamma" when ||d|| ~ gamma^slope
  falls fast enough (slope <= -0.25) that C reaches tau by 100 gamma, else "switch to alt_pbgd";
* uncertain  when the interval straddles tau (more batches narrow it), when the verdict hinges on
  points whose solves did not converge (the reason names the solve settings and what to try;
  unconverged points are never dropped silently), or when C is only a lower bound (the penalty
  objective does not curve up along d as far as probed) that does not exceed tau.

Why cost and not the ratio ||d|| / ||kept||: both can be tiny (f and g sharing their target) or
the kept term can dwarf d far from the solution, and the ratio then says nothing about the
result; C is in the units the user judges the result in. Estimates without a cost
(``estimate(..., cost=False)``, or built by hand) get the former ratio rule: D / S with D the
median ||dropped|| and S the largest max(||kept||, ||kept + dropped||), suitable if D <= atol or
D / S <= rho_ok, unsuitable if D / S >= rho_bad, uncertain in between.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Mapping, Sequence

from bilevel_ray.diagnostics.verdict import (
    Verdict,
    decide_problems,
    rtol_problem,
    threshold_problem,
    tolerance,
)
from bilevel_ray.errors import ConfigError

__all__ = ["THRESHOLDS", "decide"]


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
    rtol_problem(problems, rtol)
    threshold_problem(
        problems, "z", z, 0, "the confidence multiplier of the standard error, e.g. 2.0"
    )
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


# The rule's thresholds as decide declares them: diagnose takes the same defaults.
THRESHOLDS = {
    name: p.default
    for name, p in inspect.signature(decide).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}


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


def _cost_verdict(
    points: Sequence[Mapping[str, float]],
    judged: list,
    group: list,
    tol_args: tuple[float, float, float],
) -> tuple[str, dict[str, float]]:
    """The verdict's name and numbers on ``group`` of the ``judged`` points (their cost, its
    standard error, f, f at the reference, the tolerance); ``tol_args`` is (rtol, atol, z)."""
    rtol, atol, z = tol_args
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


def _confidence(cost: float, se: float, tol: float) -> float:
    """P(C <= tau) under a normal error of the mean: the confidence the reason reports."""
    if se == 0 or not math.isfinite(cost):
        return 1.0 if cost <= tol else 0.0
    return 0.5 * (1 + math.erf((tol - cost) / (se * math.sqrt(2))))


def _against(numbers: Mapping[str, float], rtol: float) -> str:
    """The tolerance and what it is measured from, as the reason states it."""
    tol, noise, start = numbers["tolerance"], numbers["noise_floor"], numbers["start_upper"]
    jitter = f" plus its own minibatch jitter {noise:.2g}" if noise > 0 else ""
    if math.isfinite(start):
        return (
            f"a tolerance of {tol:.3g} ({100 * rtol:g}% of the achievable improvement from "
            f"f = {start:.4g} at the problem's reference point{jitter})"
        )
    return (
        f"a tolerance of {tol:.3g} ({100 * rtol:g}% of |f| at the ends{jitter}; no reference "
        "point was measured)"
    )


def _uncertain(reason: str, out: dict[str, float]) -> Verdict:
    return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")


def _unsettled(unsettled: list, out: dict[str, float], at: str, measured: str) -> Verdict:
    """ "uncertain": the run was still moving where it was priced."""
    ratio = _median([_get(p, "settle_ratio") for p in unsettled])
    below = _get(unsettled[0], "settle")
    out["flatness/settle_ratio"] = ratio
    reason = (
        f"PBGD-Free had not settled when the time ran out{at}: its own direction is still "
        f"{ratio:.3g} times the dropped term (settled below {below:g}), so what the dropped "
        f"term costs there ({measured}) may not be what it costs at the run's end; diagnose a "
        "longer run (warmup_steps, max_seconds) or compare with alt_pbgd on a short run."
    )
    return _uncertain(reason, out)


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
        return _uncertain(reason, out)

    name, numbers = _cost_verdict(points, judged, used, (rtol, atol, z))
    out.update({f"flatness/{k}": v for k, v in numbers.items()})
    cost, se, upper, tol = (numbers[k] for k in ("cost", "cost_se", "upper", "tolerance"))
    bound = numbers["cost_is_bound"]
    dropped = _median([_get(p, "dropped") for p in used])
    out["flatness/dropped"] = dropped
    out["flatness/kept"] = _median([_get(p, "kept") for p in used])
    out["flatness/judged"] = float(len(used))
    confidence = _confidence(cost, se, tol)
    out["flatness/confidence"] = confidence
    about = "at least" if bound else "about"
    measured = (
        f"its dropped term (norm {dropped:.3g}) costs {about} {cost:.3g} ± {se:.2g} in the upper "
        f"objective where the run is heading{at} (f = {upper:.4g}, over {len(used)} batch(es)), "
        f"against {_against(numbers, rtol)}"
    )
    if stuck:
        alt, _ = _cost_verdict(points, judged, used + stuck, (rtol, atol, z))
        if alt != name:
            reason = (
                f"PBGD-Free's verdict depends on {len(stuck)} point(s) whose solves did not "
                f"converge{at}: {_settings(stuck, worst)}, then diagnose again."
            )
            return _uncertain(reason, out)
        measured += f"; {len(stuck)} unconverged point(s) agree"
    # Before the run settles its kept term still moves it: a cost clearly under the tolerance
    # (whose progress only grows) stands, a larger one may still change.
    unsettled = [p for p in used if _get(p, "settled") == 0]
    if unsettled and name != "suitable":
        return _unsettled(unsettled, out, at, measured)
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
        return _uncertain(reason, out)
    if name == "uncertain":
        n = len(used)
        reason = (
            f"PBGD-Free may or may not do as well: {measured}, and the spread over batches "
            f"leaves {100 * confidence:.3g}% confidence; average more batches (batches={4 * n}) "
            "or compare with alt_pbgd on a short run."
        )
        return _uncertain(reason, out)
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
        return _uncertain(reason, out)
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
        return _uncertain(reason, out)
    head = f"PBGD-Free is biased: its dropped term (median norm {dropped:.3g}) is {share} {where}"
    return _unsuitable(out, head, ratio / rho_ok, 1.0)
