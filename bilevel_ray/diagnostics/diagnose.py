"""``diagnose``: does dropping the correction cost PBGD-Free the bilevel objective on this problem?

It runs PBGD-Free from (x0, y0) as ``br.solve`` would (the same batches for the same seed) to
the run's horizon ``steps``, and judges there (:mod:`~bilevel_ray.diagnostics.end_check`: a
corrected method continues from PBGD-Free's end and what it still gains in phi(x) = f(x,
y*(x)) on f's rows is measured against the tolerance and the noise floor). On the way, where the
run first settles, it prices the dropped term (:mod:`~bilevel_ray.diagnostics.prediction`): a
cheap first look, reported beside the verdict as a prediction, or returned alone with
``predict_only=True``. Every decision is bounded by steps and evaluations, not by wall time, so a
loaded machine gets the same verdict.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import FullBatch, as_batches
from bilevel_ray.diagnostics.end_check import EndCheck, check_steps_for, end_check, held_out_line
from bilevel_ray.diagnostics.flatness import DELTA_PAIRS, count_problem, estimate_problems
from bilevel_ray.diagnostics.prediction import (
    Pricing,
    Settle,
    blind_verdict,
    price,
    terms,
    upper_reaches_x,
)
from bilevel_ray.diagnostics.verdict import (
    Verdict,
    decide_problems,
    rtol_problem,
    threshold_problem,
)
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, check_losses, check_params, check_problem
from bilevel_ray.tree import Params, cuda_devices

__all__ = ["Progress", "diagnose"]

PRICE_SEED = 104729  # the early price's extra batches: another order than the run's own


def diagnose(
    problem: BilevelProblem,
    x0: Params,
    y0: Params,
    gamma: float = 10.0,
    *,
    data: Any = None,
    eval_data: Any = None,
    reference: Params | None = None,
    steps: int = 2000,
    check_steps: int | None = None,
    replicas: int = 3,
    corrected_inner_steps: int = 5,
    predict_only: bool = False,
    warmup_steps: int = 100,
    every: int = 25,
    lr_x: float = 0.01,
    lr_y: float = 0.1,
    inner_steps: int = 1,
    optimizer: str | tuple[str, str] = "sgd",
    seed: int = 0,
    max_steps: int | None = None,
    max_seconds: float | None = None,
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
    """Does PBGD-Free on ``problem`` end as well as a corrected method, to this precision?

    Runs PBGD-Free from (x0, y0) for ``steps`` steps (the horizon of the run being judged;
    ``lr_x``, ``lr_y``, ``inner_steps``, ``optimizer``, ``seed`` and ``data`` as in
    ``br.solve``, at this fixed ``gamma``) and certifies its end point
    (:func:`~bilevel_ray.diagnostics.end_check.end_check`): PBGD-Free and alt_pbgd (inner
    loops of ``corrected_inner_steps``) continue from there for ``check_steps`` steps (default a
    quarter of ``steps``, at least 100) on ``replicas`` batch orders (one on deterministic data),
    and what the correction still gains in phi = f(x, y*(x)) on f's rows is judged against
    ``rtol`` of the achievable improvement from ``reference`` (default x0) and the noise floor
    (``z`` standard errors). The verdict is that certificate; ``eval_data`` (held-out rows)
    gives the ``held_out`` line beside it.

    On the way, once the run settles (checked every ``every`` steps after ``warmup_steps``, at
    the latest at ``max_steps``, default 20 * warmup_steps), the dropped term is priced on
    ``batches`` batches (:mod:`~bilevel_ray.diagnostics.prediction`): the ``prediction`` line
    and the ``flatness/*`` statistics. ``predict_only=True`` returns that prediction alone
    (cheap, and labelled as a prediction). ``max_seconds`` (default none) caps the wall time:
    reaching it gives "uncertain (time cap reached at step ...)", never another path to a
    confident verdict. ``progress`` prints a line to stderr at once and then every 2 s.

    The ``solve_*`` options set the price's lower-level solves (L-BFGS by default);
    ``gamma_factor``, ``directions`` and ``delta_pairs`` are the estimator's; ``rho_ok``,
    ``rho_bad``, ``atol`` and ``max_residual`` are the price's decision thresholds.

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
    count_problem(problems, "steps", steps, 1)
    if check_steps is not None:
        count_problem(problems, "check_steps", check_steps, 2)
    count_problem(problems, "replicas", replicas, 1)
    count_problem(problems, "corrected_inner_steps", corrected_inner_steps, 1)
    count_problem(problems, "warmup_steps", warmup_steps, 0)
    count_problem(problems, "every", every, 1)
    count_problem(problems, "seed", seed, 0)
    count_problem(problems, "batches", batches, 1)
    if max_steps is not None:
        count_problem(problems, "max_steps", max_steps, 0)
    threshold_problem(problems, "settle", settle, 0, "e.g. settle=0.1")
    if max_seconds is not None:
        threshold_problem(problems, "max_seconds", max_seconds, 0, "or None for no time cap")
    for name, flag in (("progress", progress), ("predict_only", predict_only)):
        if not isinstance(flag, bool):
            problems.append(f"{name}={flag!r}: must be True or False")
    solve = {
        "solve_steps": solve_steps,
        "solve_lr": solve_lr,
        "solve_rtol": solve_rtol,
        "optimizer": solve_optimizer,
    }
    opts = {**solve, "gamma_factor": gamma_factor, "directions": directions}
    opts["delta_pairs"] = delta_pairs
    problems += estimate_problems(gamma=gamma, **opts, optimizer_name="solve_optimizer")
    problems += decide_problems(rho_ok, rho_bad, atol, max_residual)
    rtol_problem(problems, rtol)
    threshold_problem(
        problems, "z", z, 0, "the confidence multiplier of the standard error, e.g. 2.0"
    )
    settings = None
    try:
        settings = SolverConfig(
            method="pbgd_free",
            lr_x=lr_x,
            lr_y=lr_y,
            gamma=gamma if isinstance(gamma, (int, float)) else None,
            inner_steps=inner_steps,
            optimizer=optimizer,
        )
        solver = settings.build(problem)
    except ConfigError as err:
        problems += [p for p in err.problems if not p.startswith("gamma=")]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))

    # A tolerance below the dtype's rounding cannot be met (float32 networks): solve_rtol is
    # floored at sqrt(eps) and max_residual at 100 times that (the run watch's 2e-2 in float32).
    floor = torch.finfo(next(iter(x0.values())).dtype).eps ** 0.5
    solve["solve_rtol"] = opts["solve_rtol"] = max(solve_rtol, floor)
    fixed = data is None or isinstance(data, FullBatch)
    x_rule = optimizer if isinstance(optimizer, str) else optimizer[0]
    pricing = Pricing(
        gamma=float(gamma),
        solve=solve,
        # The trajectory's settle checks only ask whether the run has settled: looser solves.
        check={
            **solve,
            "solve_rtol": max(solve["solve_rtol"], 1e-2),
            "solve_steps": min(solve_steps, 50),
        },
        estimator=opts,
        judge={
            "atol": atol,
            "max_residual": max(max_residual, 100 * solve["solve_rtol"]),
            "rtol": rtol,
            "z": z,
            "rho_ok": rho_ok,
            "rho_bad": rho_bad,
        },
        batches=batches,
        fixed=fixed,
        # Plain SGD on x jitters around its end point by its batch noise: a quadratic loss sits
        # lr_x tr(Var kept) / 4 above its minimum on average, a floor under any visible gap.
        jitter=lr_x / 4 if x_rule == "sgd" and not fixed else 0.0,
        seed=seed,
    )
    report = Progress(progress)
    last = 20 * warmup_steps if max_steps is None else max(max_steps, warmup_steps)
    last = min(last, steps)
    with torch.random.fork_rng(devices=cuda_devices(x0, y0)):
        torch.manual_seed(seed)  # as br.solve: a shuffled DataLoader draws from torch's RNG
        stream = as_batches(data, seed)
        first = next(stream)
        check_losses(problem, x0, y0, first)
        if not upper_reaches_x(problem, x0, y0, first):
            return blind_verdict()
        state, watch, predicted = solver.init(x0, y0), Settle(settle), None
        for t, batch in enumerate(itertools.chain([first], stream)):
            if predicted is None and (t % every == 0 or t >= last):
                kept, dropped, _ = terms(problem, state.x, state.y, batch, gamma, pricing.check)
                settled = watch.update(kept, dropped)
                if t >= warmup_steps and ((settled and (watch.checks > 1 or fixed)) or t >= last):
                    more = None if fixed else as_batches(data, seed + PRICE_SEED)
                    predicted = price(
                        problem, state.x, state.y, t, batch, more, pricing, (reference, y0),
                        watch, settled and (watch.checks > 1 or fixed), report.show,
                    )  # fmt: skip
                    predicted = replace(
                        predicted, stats={**predicted.stats, "flatness/step": float(t)}
                    )
                    if predict_only:
                        return _as_prediction(predicted, t)
            if t >= steps:
                break
            if max_seconds is not None and report.elapsed() > max_seconds:
                return _time_cap(t, steps, max_seconds, predicted)
            state, _ = solver.step(state, batch)
            if (t + 1) % every == 0 and not _finite(state.x):
                return _diverged(t + 1, lr_x, predicted)
            report.show(f"PBGD-Free's run, step {t + 1} of {steps}")
    if not _finite(state.x):
        return _diverged(steps, lr_x, predicted)
    check = EndCheck(
        settings,
        check_steps=check_steps or check_steps_for(steps),
        replicas=replicas,
        corrected_inner_steps=corrected_inner_steps,
        rtol=rtol,
        z=z,
        seed=seed,
    )
    certificate = end_check(
        problem, state.x, state.y, data, check, reference=(reference, y0),
        eval_data=eval_data, show=report.show, end_step=steps,
    )  # fmt: skip
    return _with_prediction(certificate, predicted)


def _finite(x: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in x.values())


def _prediction_line(predicted: Verdict | None) -> str | None:
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
    return replace(predicted, reason=reason, prediction=_prediction_line(predicted))


def _with_prediction(certificate: Verdict, predicted: Verdict | None) -> Verdict:
    stats = {**(predicted.stats if predicted is not None else {}), **certificate.stats}
    return replace(
        certificate,
        stats=stats,
        held_out=held_out_line(certificate.stats),
        prediction=_prediction_line(predicted),
    )


def _time_cap(step: int, steps: int, cap: float, predicted: Verdict | None) -> Verdict:
    reason = (
        f"uncertain (time cap reached at step {step} of {steps}: max_seconds={cap:g}); the "
        "run's end was not reached, so nothing is certified; raise max_seconds or leave it "
        "unset (the verdict is bounded by steps)"
    )
    stats = {"end/time_capped_at": float(step)}
    return Verdict(
        False, "uncertain", reason, stats, "compare with alt_pbgd",
        prediction=_prediction_line(predicted),
    )  # fmt: skip


def _diverged(step: int, lr_x: float, predicted: Verdict | None) -> Verdict:
    reason = (
        f"uncertain: PBGD-Free diverged by step {step} at lr_x={lr_x:g} (x became non-finite), "
        "so there is no end point to judge; lower lr_x or lr_y and diagnose again"
    )
    stats = {"end/diverged_at": float(step)}
    return Verdict(
        False, "uncertain", reason, stats, "lower the step sizes",
        prediction=_prediction_line(predicted),
    )  # fmt: skip


def _shapes(p: Params) -> str:
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in p.items()) + "}"


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
