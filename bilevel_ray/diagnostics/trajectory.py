"""PBGD-Free's run inside ``diagnose``: followed from the start to its horizon as ``br.solve``
runs it, priced once where it first settles (the prediction), and the verdicts of a run that
cannot be judged at its end (a blind f, a divergence, the time cap) or was asked for the
prediction alone."""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from bilevel_ray.data import as_batches
from bilevel_ray.diagnostics.flatness import count_problem
from bilevel_ray.diagnostics.prediction import (
    Pricing,
    Settle,
    blind_verdict,
    price,
    terms,
    upper_reaches_x,
)
from bilevel_ray.diagnostics.verdict import Verdict, threshold_problem
from bilevel_ray.problem import BilevelProblem, check_losses
from bilevel_ray.tree import Params, cuda_devices

__all__ = ["Horizon", "Progress", "count_problems", "follow", "prediction_line", "pricing_for"]

PRICE_SEED = 104729  # the early price's extra batches: another order than the run's own


@dataclass(frozen=True)
class Horizon:
    """Where the run goes and when it is looked at: its steps, the latest step of the early
    price, the warm-up, the settle checks' interval and threshold, the time cap, lr_x."""

    steps: int
    last: int
    warmup: int
    every: int
    settle: float
    max_seconds: float | None
    lr_x: float


def follow(
    problem: BilevelProblem,
    solver: Any,
    x0: Params,
    y0: Params,
    data: Any,
    pricing: Pricing,
    reference: tuple[Params, Params],
    report: Progress,
    horizon: Horizon,
    predict_only: bool,
) -> Verdict | tuple[Any, Verdict | None]:
    """PBGD-Free's run from (x0, y0) to its horizon, as ``br.solve`` runs it (the same batches
    for the same seed), priced once where it first settles: its end state and the prediction,
    or a verdict where the run cannot be judged (blind f, divergence, the time cap) or only the
    prediction was asked for."""
    seed, fixed, h = pricing.seed, pricing.fixed, horizon
    with torch.random.fork_rng(devices=cuda_devices(x0, y0)):
        torch.manual_seed(seed)  # as br.solve: a shuffled DataLoader draws from torch's RNG
        stream = as_batches(data, seed)
        first = next(stream)
        check_losses(problem, x0, y0, first)
        if not upper_reaches_x(problem, x0, y0, first):
            return blind_verdict()
        state, watch, predicted = solver.init(x0, y0), Settle(h.settle), None
        for t, batch in enumerate(itertools.chain([first], stream)):
            if predicted is None and (t % h.every == 0 or t >= h.last):
                kept, dropped, _ = terms(
                    problem, state.x, state.y, batch, pricing.gamma, pricing.check
                )
                settled = watch.update(kept, dropped) and (watch.checks > 1 or fixed)
                if t >= h.warmup and (settled or t >= h.last):
                    more = None if fixed else as_batches(data, seed + PRICE_SEED)
                    predicted = price(
                        problem, state.x, state.y, t, batch, more, pricing, reference, watch,
                        settled, report.show,
                    )  # fmt: skip
                    predicted = replace(
                        predicted, stats={**predicted.stats, "flatness/step": float(t)}
                    )
                    if predict_only:
                        return _as_prediction(predicted, t)
            if t >= h.steps:
                break
            if h.max_seconds is not None and report.elapsed() > h.max_seconds:
                return _time_cap(t, h.steps, h.max_seconds, predicted)
            state, _ = solver.step(state, batch)
            if (t + 1) % h.every == 0 and not _finite(state.x):
                return _diverged(t + 1, h.lr_x, predicted)
            report.show(f"PBGD-Free's run, step {t + 1} of {h.steps}")
    if not _finite(state.x):
        return _diverged(h.steps, h.lr_x, predicted)
    return state, predicted


# The price averages this many batches at most (each costs lower-level solves).
MAX_BATCHES = 1_000


def count_problems(
    *,
    steps: Any,
    check_steps: Any,
    replicas: Any,
    corrected_inner_steps: Any,
    warmup_steps: Any,
    every: Any,
    seed: Any,
    batches: Any,
    max_steps: Any,
    settle: Any,
    max_seconds: Any,
    progress: Any,
    predict_only: Any,
) -> list[str]:
    """Every rule the counts, thresholds and switches of :func:`diagnose` break."""
    from bilevel_ray.counts import MAX_STEPS, check_count
    from bilevel_ray.diagnostics.end_check import end_check_problems
    from bilevel_ray.solvers.base import MAX_INNER_STEPS

    problems: list[str] = []
    # Every count that sizes the work is bounded: a run's steps at most a run's, the rest by
    # what a diagnosis can use (a typo of 10**12 would otherwise run for years).
    check_count(problems, "steps", steps, 1, MAX_STEPS, "the horizon judged; e.g. steps=2000")
    check_count(
        problems, "corrected_inner_steps", corrected_inner_steps, 1, MAX_INNER_STEPS,
        "the corrected method's inner loop; e.g. corrected_inner_steps=5",
    )  # fmt: skip
    for name, value, least in (("warmup_steps", warmup_steps, 0), ("every", every, 1)):
        check_count(problems, name, value, least, MAX_STEPS, f"steps of the run; e.g. {name}=100")
    count_problem(problems, "seed", seed, 0)
    check_count(
        problems, "batches", batches, 1, MAX_BATCHES, "batches the price averages; e.g. batches=4"
    )
    if max_steps is not None:
        check_count(problems, "max_steps", max_steps, 0, MAX_STEPS, "e.g. max_steps=2000")
    problems += end_check_problems(check_steps, replicas, least=2, horizon=steps)
    threshold_problem(problems, "settle", settle, 0, "e.g. settle=0.1")
    if max_seconds is not None:
        threshold_problem(problems, "max_seconds", max_seconds, 0, "or None for no time cap")
    for name, flag in (("progress", progress), ("predict_only", predict_only)):
        if not isinstance(flag, bool):
            problems.append(f"{name}={flag!r}: must be True or False")
    return problems


def pricing_for(
    gamma: float,
    solve: dict,
    estimator: dict,
    fixed: bool,
    lr_x: float,
    optimizer: Any,
    seed: int,
    batches: int,
    judge: dict,
) -> Pricing:
    """How the early price is taken (:class:`~bilevel_ray.diagnostics.prediction.Pricing`)."""
    x_rule = optimizer if isinstance(optimizer, str) else optimizer[0]
    return Pricing(
        gamma=gamma,
        solve=solve,
        # The trajectory's settle checks only ask whether the run has settled: looser solves.
        check={
            **solve,
            "solve_rtol": max(solve["solve_rtol"], 1e-2),
            "solve_steps": min(solve["solve_steps"], 50),
        },
        estimator=estimator,
        judge={**judge, "max_residual": max(judge["max_residual"], 100 * solve["solve_rtol"])},
        batches=batches,
        fixed=fixed,
        # Plain SGD on x jitters around its end point by its batch noise: a quadratic loss sits
        # lr_x tr(Var kept) / 4 above its minimum on average, a floor under any visible gap.
        jitter=lr_x / 4 if x_rule == "sgd" and not fixed else 0.0,
        seed=seed,
    )


def _finite(x: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in x.values())


def prediction_line(predicted: Verdict | None) -> str | None:
    if predicted is None:
        return None
    step = predicted.stats.get("flatness/step", math.nan)
    where = f"step {step:.0f}" if math.isfinite(step) else "the run's settle point"
    return f"the early price at {where} predicted {predicted.verdict}: {predicted.reason}"


def _as_prediction(predicted: Verdict, step: int) -> Verdict:
    """The early price returned alone, labelled as what it is."""
    reason = (
        f"prediction (the early price at step {step}, not checked at the run's end): "
        f"{predicted.reason}"
    )
    return replace(predicted, reason=reason, prediction=None)  # the reason is the prediction


def _time_cap(step: int, steps: int, cap: float, predicted: Verdict | None) -> Verdict:
    reason = (
        f"uncertain (time cap reached at step {step} of {steps}: max_seconds={cap:g}); the "
        "run's end was not reached, so nothing is certified; raise max_seconds or leave it "
        "unset (the verdict is bounded by steps)"
    )
    return _unjudged(
        reason, {"end/time_capped_at": float(step)}, "compare with alt_pbgd", predicted
    )


def _diverged(step: int, lr_x: float, predicted: Verdict | None) -> Verdict:
    reason = (
        f"uncertain: PBGD-Free diverged by step {step} at lr_x={lr_x:g} (x became non-finite), "
        "so there is no end point to judge; lower lr_x or lr_y and diagnose again"
    )
    return _unjudged(reason, {"end/diverged_at": float(step)}, "lower the step sizes", predicted)


def _unjudged(reason: str, stats: dict, advice: str, predicted: Verdict | None) -> Verdict:
    """ "uncertain" where the run's end cannot be judged, with the prediction where one was made."""
    line = prediction_line(predicted)
    return Verdict(False, "uncertain", reason, stats, advice, prediction=line)


class Progress:
    """'[diagnose] <what>, <threads> thread(s), <seconds> s' on stderr: the first at once, then
    at most every ``interval`` seconds."""

    def __init__(self, on: bool, interval: float = 2.0):
        self.on, self.interval = on, interval
        self.start, self.shown = time.monotonic(), -math.inf  # the first line at once

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def show(self, what: str) -> None:
        now = time.monotonic()
        if self.on and now - self.shown >= self.interval:
            self.shown = now
            threads = torch.get_num_threads()
            print(
                f"[diagnose] {what}, {threads} thread{'s' if threads > 1 else ''}, "
                f"{now - self.start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
