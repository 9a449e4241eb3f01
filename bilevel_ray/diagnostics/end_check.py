"""The end-of-run certificate: does dropping the correction cost PBGD-Free the bilevel objective
where its run ends?

An early price of the dropped term is a prediction; this measures the outcome. From PBGD-Free's
end point (x_T, y_T) both methods continue for M = ``check_steps`` steps on the same batches:
PBGD-Free, and a corrected method (``alt_pbgd``, whose x step is the full penalty gradient, with
its two inner loops of K = ``corrected_inner_steps``). The effect is what the correction still
gains in the objective the paper is about, phi(x) = f(x, y*(x)) on f's own rows
(:class:`~bilevel_ray.diagnostics.objective.Objective`), measured at the continuations' later
points (the last on deterministic data; 3M/4, 7M/8 and M on minibatch data, each averaged over
R = ``replicas`` batch orders):

    effect = phi(x_T) - phi(x_corr)          what the correction still gains from the run's end
    growth = max(phi(x_corr(M/2)) - phi(x_corr), 0)     what it gained in the check's second half
    se     = max(hypot(se of phi(x_corr) over the batch orders, sd of phi along PBGD-Free's own
             continuation: how much one end point of the run jitters), phi's rounding)
    tau    = rtol (phi(reference) - min(phi ends)) + atol                  (verdict.tolerance)

* unsuitable if effect - z se > tau: the correction gains beyond the tolerance (the bias proven);
* suitable   if effect + growth + z se <= tau and z se <= tau / 2: it gains nothing that
  matters, to a resolved noise floor, and had stopped gaining;
* uncertain  otherwise, naming the spread, the effect and what would resolve it.

phi needs y*(x): where its solve runs out of iterations still descending (a lower level without
a minimiser), the check stops at that point and is uncertain, naming it.

PBGD-Free's own continuation is the control: what it gains by running on (``end/free_gain``)
is reported (a run that had not converged), and its late points give the run's jitter. Both
continuations start with fresh optimizer states (a finished run's moments are not always kept)
on the same batches. Held-out rows (``eval_data``) are reported beside the verdict as their own
line, never folded into it: whether a method generalises better is another question.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import FullBatch, as_batches
from bilevel_ray.diagnostics.objective import SOLVE_STEPS, Objective
from bilevel_ray.diagnostics.verdict import Verdict, tolerance
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.tree import Params, cuda_devices

__all__ = ["MAX_REPLICAS", "EndCheck", "check_steps_for", "end_check", "end_check_problems"]

REPLICA_SEED = 7919  # batch orders seed + k * 7919: another order for each replica


# Both methods continue ``check_steps`` steps on each of ``replicas`` batch orders: more orders
# than this, or more continued steps in all than a run may have, is a typo, not a check.
MAX_REPLICAS = 100


def end_check_problems(
    check_steps: Any, replicas: Any, least: int = 1, horizon: Any = None
) -> list[str]:
    """Every rule ``check_steps`` (None: the default for the run's ``horizon``) and
    ``replicas`` break, one line each."""
    from bilevel_ray.counts import MAX_STEPS, check_count

    problems: list[str] = []
    if check_steps is not None:
        check_count(
            problems, "check_steps", check_steps, least, MAX_STEPS,
            "the continuation of each method; e.g. check_steps=500, --check-steps 500",
        )  # fmt: skip
    check_count(
        problems, "replicas", replicas, 1, MAX_REPLICAS,
        "batch orders of the end check; e.g. replicas=3, --replicas 3",
    )  # fmt: skip
    if check_steps is None and isinstance(horizon, int) and 1 <= horizon <= MAX_STEPS:
        check_steps = check_steps_for(horizon)
    if not problems and check_steps is not None and check_steps * replicas > MAX_STEPS:
        problems.append(
            f"check_steps={check_steps} x replicas={replicas} = {check_steps * replicas:,} "
            f"continued steps per method, more than the {MAX_STEPS:,} a run may have: lower "
            "check_steps (--check-steps) or replicas (--replicas)"
        )
    return problems


def check_steps_for(horizon: int) -> int:
    """The continuation's default length: a quarter of the run, at least 100 steps (fewer than
    the run where it is shorter)."""
    return max(1, min(horizon, max(100, horizon // 4)))


@dataclass(frozen=True)
class EndCheck:
    """How the end check runs: the run's settings (``settings``: a pbgd_free SolverConfig), the
    continuation's length, the batch orders, the corrected method, and the decision's numbers."""

    settings: SolverConfig
    check_steps: int = 100
    replicas: int = 3
    corrected: str = "alt_pbgd"
    corrected_inner_steps: int = 5
    rtol: float = 0.05
    atol: float = 1e-9
    z: float = 2.0
    seed: int = 0
    solve_steps: int = SOLVE_STEPS  # y*(x)'s L-BFGS budget at each point phi is measured at

    def __post_init__(self) -> None:
        # Checked here too: certify_run builds one from its caller's numbers.
        problems = end_check_problems(self.check_steps, self.replicas)
        if problems:
            raise ConfigError(problems)


def _points(steps: int, fixed: bool) -> list[int]:
    """The continuation steps phi is measured at (module docstring)."""
    marks = [steps // 2, steps]
    if not fixed:
        marks += [(3 * steps) // 4, (7 * steps) // 8]
    return sorted(set(max(1, m) for m in marks))


def _continue(
    solver: Any,
    x: Params,
    y: Params,
    data: Any,
    seed: int,
    points: list[int],
    objective: Objective,
    show: Callable[[str], None],
    label: str,
) -> list[dict[str, float]]:
    """phi (and the held-out value) at each of ``points`` steps of ``solver`` from (x, y) on the
    batches of ``seed``; stops at the first non-finite value (the rest are NaN)."""
    with torch.random.fork_rng(devices=cuda_devices(x, y)):
        torch.manual_seed(seed)  # the same batches for both methods (shuffled DataLoaders too)
        stream = as_batches(data, seed)
        state, out, last = solver.init(x, y), [], points[-1]
        for t in range(1, last + 1):
            state, _ = solver.step(state, next(stream))
            if t % 50 == 0:
                show(f"{label}, step {t} of {last}")
            if t in points:
                if not all(bool(torch.isfinite(v).all()) for v in state.x.values()):
                    return out + [{"phi": math.nan, "held": math.nan}] * (len(points) - len(out))
                where = f"step {t} of the continuation ({label})"
                out.append(_solved(objective.at(state.x, state.y), where))
    return out


class _Unsolved(Exception):
    """y*(x) was not found at a point the certificate measures phi at (Objective.at)."""

    def __init__(self, at: dict[str, float], where: str):
        super().__init__(where)
        self.at, self.where = at, where


def _solved(at: dict[str, float], where: str) -> dict[str, float]:
    """``at`` where its lower-level solve found y*(x); otherwise the check stops here: phi at
    the end of an exhausted budget is not phi (on a lower level without a minimiser it moves
    with the budget), and the points after it would each spend the whole budget again."""
    if not at.get("solved", 1.0):
        raise _Unsolved(at, where)
    return at


def end_check(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    data: Any,
    check: EndCheck,
    *,
    reference: tuple[Params, Params] | None = None,
    eval_data: Any = None,
    show: Callable[[str], None] = lambda what: None,
    end_step: int | None = None,
) -> Verdict:
    """The certificate at PBGD-Free's end point (x, y): the module docstring's rule.
    ``reference`` is (x, y) of the problem's start (the achievable improvement is measured from
    it); ``end_step`` names the run's step in the reason."""
    fixed = data is None or isinstance(data, FullBatch)
    replicas = 1 if fixed else check.replicas
    objective = Objective(problem, data, eval_data, solve_steps=check.solve_steps)
    where = f"PBGD-Free's end (step {end_step})" if end_step is not None else "PBGD-Free's end"
    try:
        at_end = _solved(objective.at(x, y), where)
        start = {"phi": math.nan}
        if reference is not None:
            start = _solved(objective.at(*reference), "the start (the reference point)")
    except _Unsolved as unsolved:
        return _unsolved(unsolved, objective, check, replicas)
    corrected = SolverConfig(
        method=check.corrected,
        lr_x=check.settings.lr_x,
        lr_y=check.settings.lr_y,
        gamma=check.settings.option("gamma"),
        inner_steps=check.corrected_inner_steps,
        optimizer=check.settings.optimizer,
    ).build(problem)
    free = check.settings.build(problem)
    points = _points(check.check_steps, fixed)
    runs: list[tuple[list, list]] = []
    try:
        for r in range(replicas):
            seed = check.seed + REPLICA_SEED * (r + 1)
            tag = f"replica {r + 1} of {replicas}"
            runs.append(
                tuple(
                    _continue(solver, x, y, data, seed, points, objective, show, f"{label}, {tag}")
                    for solver, label in ((free, "pbgd_free"), (corrected, check.corrected))
                )
            )
    except _Unsolved as unsolved:
        return _unsolved(unsolved, objective, check, replicas, f"continuing from {where}, ")
    return _decide(runs, fixed, at_end, start, objective, check, end_step)


def _unsolved(
    unsolved: _Unsolved, objective: Objective, check: EndCheck, replicas: int, prefix: str = ""
) -> Verdict:
    """uncertain: phi could not be measured, since y*(x) was not found at one of its points."""
    at = unsolved.at
    stats = {
        "end/check_steps": float(check.check_steps),
        "end/replicas": float(replicas),
        "end/float64": float(objective.dtype == torch.float64),
        "end/unsolved_phi": at["phi"],
        "end/unsolved_residual": at["residual"],
        "end/unsolved_iterations": at["iterations"],
        "end/unsolved_y_start": at["y_start"],
        "end/unsolved_y_end": at["y_end"],
    }
    reason = (
        f"uncertain: phi = f(x, y*(x)) could not be measured {prefix}at {unsolved.where}: "
        f"y*(x) = argmin_y g(x, y) on g's rows was not found (L-BFGS spent its budget, "
        f"{at['iterations']:.0f} iterations, still descending, its gradient at "
        f"{at['residual']:.2g} of its "
        f"starting size, ||y|| from {at['y_start']:.4g} to {at['y_end']:.4g}); f at the "
        f"budget's end ({at['phi']:.4g}) moves with the budget, so it is not phi. g(x, .) may "
        "have no minimiser on these rows (an output head that can memorise them, whose weights "
        "grow without bound): the certificate needs a lower level with one (more rows for g, "
        "or a penalty on y); meanwhile compare the methods on held-out metrics"
    )
    return Verdict(False, "uncertain", reason, stats, f"compare with {check.corrected}")


def _decide(
    runs: list[tuple[list, list]],
    fixed: bool,
    at_end: dict[str, float],
    start: dict[str, float],
    objective: Objective,
    check: EndCheck,
    end_step: int | None,
) -> Verdict:
    replicas = len(runs)
    late = slice(-1, None) if fixed else slice(-3, None)
    name = check.corrected
    where = f"PBGD-Free's end (step {end_step})" if end_step is not None else "PBGD-Free's end"
    stats = {
        "end/check_steps": float(check.check_steps),
        "end/replicas": float(replicas),
        "end/phi_end": at_end["phi"],
        "end/phi_start": start["phi"],
        "end/float64": float(objective.dtype == torch.float64),
    }
    diverged = [
        label
        for free, corr in runs
        for label, series in (("pbgd_free", free), (name, corr))
        if not all(math.isfinite(p["phi"]) for p in series)
    ]
    if diverged:
        who = sorted(set(diverged))
        reason = (
            f"uncertain: continuing from {where}, {' and '.join(who)} diverged (phi became "
            f"non-finite within {check.check_steps} steps at lr_x={check.settings.lr_x}); lower "
            "the step sizes, or certify with fewer check_steps"
        )
        advice = f"compare with {name} at lower step sizes"
        return Verdict(False, "uncertain", reason, stats, advice)
    stats.update(_measure(runs, late, (at_end, start), objective, check))
    effect, se, growth, tau = (stats[f"end/{k}"] for k in ("effect", "se", "growth", "tolerance"))
    phi_corr, phi_free = stats["end/phi_corrected"], stats["end/phi_free"]
    z = check.z
    measured = (
        f"from {where}, {name} and PBGD-Free continued {check.check_steps} steps on the same "
        f"batches: {name} lowered phi = f(x, y*(x)) on f's rows by {effect:.4g} (± {se:.2g}; "
        f"from {at_end['phi']:.4g} to {phi_corr:.4g}"
        + ("" if replicas == 1 else f", over {replicas} batch orders")
        + f"; PBGD-Free itself reached {phi_free:.4g}), against a tolerance of {tau:.3g} "
        f"({check.rtol:g} of the achievable improvement from phi = {start['phi']:.4g} at the start)"
    )
    if effect - z * se > tau:
        unfinished = (
            f"; PBGD-Free itself gains {stats['end/free_gain']:.3g} by running on, so part of "
            "the shortfall is a run that had not converged (more steps narrow it)"
            if stats["end/free_gain"] > tau
            else ""
        )
        reason = (
            f"unsuitable: {measured}; the correction PBGD-Free drops costs it the bilevel "
            f"objective at this horizon{unfinished}: switch to {name}, or raise gamma"
        )
        return Verdict(False, "unsuitable", reason, stats, f"switch to {name}", name)
    if effect + growth + z * se <= tau and z * se <= tau / 2:
        reason = (
            f"suitable: {measured}; dropping the correction costs nothing that matters at "
            "the run's end: keep pbgd_free"
        )
        return Verdict(True, "suitable", reason, stats, "keep pbgd_free")
    if z * se > tau / 2:
        cure = (
            "more batch orders (replicas), a larger batch, or a longer check (check_steps) "
            "would resolve it"
        )
        why = f"the noise floor {z:g} x {se:.2g} is not small against the tolerance {tau:.3g}"
    else:
        cure = f"a longer check (check_steps, now {check.check_steps}) would resolve it"
        why = f"{name} was still gaining at the check's end ({growth:.3g} in its second half)"
    reason = f"uncertain: {measured}; {why}; {cure}"
    return Verdict(False, "uncertain", reason, stats, f"compare with {name}", name)


def _measure(
    runs: list[tuple[list, list]], late: slice, ends: tuple, objective: Objective, check: EndCheck
) -> dict[str, float]:
    """The effect, its standard error, the corrected method's late growth, the tolerance, the
    ends of both continuations and the held-out values (module docstring); ``ends`` is phi at
    PBGD-Free's end and at the start."""
    at_end, start = ends
    corr_means, corr_sds, growths, free_means, free_sds, held_free, held_corr = (
        [] for _ in range(7)
    )
    for free, corr in runs:
        corr_late = [p["phi"] for p in corr[late]]
        free_late = [p["phi"] for p in free[late]]
        corr_means.append(statistics.fmean(corr_late))
        free_means.append(statistics.fmean(free_late))
        corr_sds.append(statistics.stdev(corr_late) if len(corr_late) > 1 else 0.0)
        free_sds.append(statistics.stdev(free_late) if len(free_late) > 1 else 0.0)
        growths.append(corr[0]["phi"] - corr_means[-1])
        held_free.append(statistics.fmean(p["held"] for p in free[late]))
        held_corr.append(statistics.fmean(p["held"] for p in corr[late]))
    phi_corr, phi_free = statistics.fmean(corr_means), statistics.fmean(free_means)
    # The corrected end's uncertainty: its spread over batch orders (or, from one order, its
    # jitter over the late points); PBGD-Free's end is one point of a run that jitters as its
    # own continuation's late points do.
    if len(corr_means) > 1:
        se_corr = statistics.stdev(corr_means) / math.sqrt(len(corr_means))
    else:
        se_corr = corr_sds[0] / math.sqrt(max(len(runs[0][1][late]), 1))
    jitter = statistics.fmean(free_sds)
    best = min(phi_corr, phi_free, at_end["phi"])
    return {
        "end/effect": at_end["phi"] - phi_corr,
        "end/se": max(math.hypot(se_corr, jitter), objective.rounding(at_end["phi"])),
        "end/spread": se_corr,
        "end/jitter": jitter,
        "end/growth": max(statistics.fmean(growths), 0.0),
        "end/free_gain": at_end["phi"] - phi_free,
        "end/tolerance": tolerance(
            start["phi"], at_end["phi"], at_end["phi"] - best, check.rtol, check.atol
        ),
        "end/phi_free": phi_free,
        "end/phi_corrected": phi_corr,
        "end/held_free": statistics.fmean(held_free),
        "end/held_corrected": statistics.fmean(held_corr),
        "end/held_spread": _spread(held_free, held_corr),
    }


def _spread(*groups: list[float]) -> float:
    """The larger run-to-run spread (sample sd over batch orders) of the groups; 0 from one."""
    spreads = [statistics.stdev(g) for g in groups if len(g) > 1 and all(map(math.isfinite, g))]
    return max(spreads, default=0.0)


def held_out_line(stats: dict[str, float], corrected: str = "alt_pbgd") -> str | None:
    """The held-out comparison, its own line beside the verdict (None without held-out rows)."""
    free, corr = stats.get("end/held_free", math.nan), stats.get("end/held_corrected", math.nan)
    if not (math.isfinite(free) and math.isfinite(corr)):
        return None
    spread = stats.get("end/held_spread", 0.0)
    better = "PBGD-Free" if free < corr else corrected
    return (
        f"held-out rows (not part of the verdict): f = {free:.4g} after PBGD-Free's "
        f"continuation, {corr:.4g} after {corrected}'s (run-to-run spread {spread:.2g}); "
        f"{better} generalises better here"
        + (" by less than the spread" if abs(free - corr) <= spread else "")
    )
