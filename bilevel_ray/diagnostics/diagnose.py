"""``diagnose``: will PBGD-Free on this problem end as well as a corrected method?

It follows PBGD-Free from (x0, y0) to where it is heading, prices the dropped term there
(:func:`~bilevel_ray.diagnostics.flatness.estimate`, on several batches) and decides by the
rule of :mod:`~bilevel_ray.diagnostics.verdict` (which also says why it prices the term in f
rather than comparing norms). On minibatch data, where the price cannot decide or the run is
still moving, PBGD-Free and alt_pbgd run side by side instead
(:mod:`~bilevel_ray.diagnostics.branch`). Deterministic data never branches.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import FullBatch, as_batches
from bilevel_ray.diagnostics.branch import REPLICA_SEED, Branch
from bilevel_ray.diagnostics.flatness import (
    DELTA_PAIRS,
    count_problem,
    estimate,
    estimate_problems,
    lower_grad_x_diff,
    lower_responses,
)
from bilevel_ray.diagnostics.responses import Responses, as_batch, reference_upper
from bilevel_ray.diagnostics.verdict import (
    Verdict,
    decide_priced,
    decide_problems,
    rtol_problem,
    threshold_problem,
)
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, check_losses, check_params, check_problem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, cuda_devices, vdot

__all__ = ["diagnose"]


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
    a loaded machine gets the same verdict). There it prices the dropped term in units of f
    (:mod:`~bilevel_ray.diagnostics.verdict`) on ``batches`` batches of ``data`` (one when
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
    differs by, |d| + z se (:func:`~bilevel_ray.diagnostics.branch.replica_noise`; the
    precision a run can reach). With that
    floor, a shortfall within the tolerance is suitable, one beyond it by z standard errors
    unsuitable.
    The tolerance is ``rtol`` of the achievable improvement measured from ``reference`` (an
    upper-level point, default x0: the problem's own start), so that diagnosing from another
    start with the problem's reference gives the same tolerance. x0 and y0 are not modified.
    ``progress`` prints a line to stderr at once and then every 2 s.

    The ``solve_*`` options set the lower-level solves of each estimate (L-BFGS by default: it
    converges to ``solve_rtol`` in tens of gradients); ``gamma_factor``, ``directions`` and
    ``delta_pairs`` are :func:`estimate`'s; ``rho_ok``, ``rho_bad``, ``atol``,
    ``max_residual``, ``rtol`` and ``z`` are :func:`~bilevel_ray.diagnostics.verdict.decide`'s.

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
    threshold_problem(problems, "settle", settle, 0, "e.g. settle=0.1")
    threshold_problem(problems, "max_seconds", max_seconds, 0, "e.g. max_seconds=20")
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
    rtol_problem(problems, rtol)
    threshold_problem(
        problems, "z", z, 0, "the confidence multiplier of the standard error, e.g. 2.0"
    )
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
            branch = Branch(
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
            if b >= batches and decide_priced(*interim).verdict != "uncertain":
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
            point["flatness/start_upper"], y_ref = reference_upper(
                problem, reference, y_ref, batch, gamma, check
            )
            point["flatness/settled"], point["flatness/settle"] = float(settled), settle
            point["flatness/settle_ratio"] = ratio
            priced.append({**point, "flatness/step": float(t)})
            report.show(f"step {t}, pricing batch {b + 1}")
    priced_verdict = decide_priced(
        priced, vectors, steps_kept, jitter, {**judge, "rho_ok": rho_ok, "rho_bad": rho_bad}
    )
    if priced_verdict.verdict == "uncertain" and not fixed and branch_steps > 0:
        # The price could not decide (a bound, a spread straddling the tolerance, unconverged
        # solves): on minibatch data the outcome itself is compared, as the reason advises.
        return compare(priced_verdict)
    return priced_verdict


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
