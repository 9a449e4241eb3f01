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

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import FullBatch
from bilevel_ray.diagnostics.end_check import EndCheck, check_steps_for, end_check, held_out_line
from bilevel_ray.diagnostics.flatness import DELTA_PAIRS, estimate_problems
from bilevel_ray.diagnostics.price_rule import THRESHOLDS
from bilevel_ray.diagnostics.trajectory import (
    Horizon,
    Progress,
    count_problems,
    follow,
    prediction_line,
    pricing_for,
)
from bilevel_ray.diagnostics.verdict import (
    Verdict,
    decide_problems,
    rtol_problem,
    threshold_problem,
)
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, check_params, check_problem
from bilevel_ray.tree import Params

__all__ = ["Progress", "diagnose"]  # Progress: the progress line other diagnostics share


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
    rho_ok: float = THRESHOLDS["rho_ok"],
    rho_bad: float = THRESHOLDS["rho_bad"],
    atol: float = THRESHOLDS["atol"],
    max_residual: float = THRESHOLDS["max_residual"],
    rtol: float = THRESHOLDS["rtol"],
    z: float = THRESHOLDS["z"],
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
    reference = _reference(x0, y0, reference)
    problems = count_problems(
        steps=steps,
        check_steps=check_steps,
        replicas=replicas,
        corrected_inner_steps=corrected_inner_steps,
        warmup_steps=warmup_steps,
        every=every,
        seed=seed,
        batches=batches,
        max_steps=max_steps,
        settle=settle,
        max_seconds=max_seconds,
        progress=progress,
        predict_only=predict_only,
    )
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
    settings, solver = _pbgd_free(problem, gamma, lr_x, lr_y, inner_steps, optimizer, problems)

    # A tolerance below the dtype's rounding cannot be met (float32 networks): solve_rtol is
    # floored at sqrt(eps) and max_residual at 100 times that (the run watch's 2e-2 in float32).
    floor = torch.finfo(next(iter(x0.values())).dtype).eps ** 0.5
    solve["solve_rtol"] = opts["solve_rtol"] = max(solve_rtol, floor)
    fixed = data is None or isinstance(data, FullBatch)
    pricing = pricing_for(
        float(gamma), solve, opts, fixed, lr_x, optimizer, seed, batches,
        {"atol": atol, "max_residual": max_residual, "rtol": rtol, "z": z, "rho_ok": rho_ok,
         "rho_bad": rho_bad},
    )  # fmt: skip
    # Beside the certificate the price is a first look: ``batches`` batches, no more; alone
    # (predict_only) it may average up to 4 times as many while it is uncertain.
    pricing = replace(pricing, extend=predict_only)
    report = Progress(progress)
    last = 20 * warmup_steps if max_steps is None else max(max_steps, warmup_steps)
    followed = follow(
        problem, solver, x0, y0, data, pricing, (reference, y0), report,
        Horizon(steps, min(last, steps), warmup_steps, every, settle, max_seconds, lr_x),
        predict_only,
    )  # fmt: skip
    if isinstance(followed, Verdict):
        return followed
    state, predicted = followed
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


def _reference(x0: Params, y0: Params, reference: Params | None) -> Params:
    """The upper-level point the achievable improvement is measured from: x0 by default."""
    if reference is None:
        return x0
    check_params(reference, y0)
    if set(reference) != set(x0) or any(reference[k].shape != x0[k].shape for k in x0):
        raise ConfigError(
            "reference must have x0's names and shapes (an upper-level point, the problem's "
            f"own start); got {_shapes(reference)} for x0's {_shapes(x0)}"
        )
    return reference


def _pbgd_free(
    problem: BilevelProblem,
    gamma: Any,
    lr_x: Any,
    lr_y: Any,
    inner_steps: Any,
    optimizer: Any,
    problems: list[str],
) -> tuple[SolverConfig, Any]:
    """The run's settings and solver; every problem found so far (``problems``) and in the
    settings is raised at once (gamma's own were found with the estimator's)."""
    settings = solver = None
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
        problems = problems + [p for p in err.problems if not p.startswith("gamma=")]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return settings, solver


def _with_prediction(certificate: Verdict, predicted: Verdict | None) -> Verdict:
    stats = {**(predicted.stats if predicted is not None else {}), **certificate.stats}
    return replace(
        certificate,
        stats=stats,
        held_out=held_out_line(certificate.stats),
        prediction=prediction_line(predicted),
    )


def _shapes(p: Params) -> str:
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in p.items()) + "}"
