"""The early price: a cheap first look at PBGD-Free's bias, taken where its run settles.

At a point (x, y) of PBGD-Free's run the dropped term is priced in units of f on a few batches
(:func:`~bilevel_ray.diagnostics.flatness.estimate`, pooled by
:func:`~bilevel_ray.diagnostics.verdict.decide_priced`). It is a *prediction*: the run may
still move, a coupling may switch on later, and a price can miss what a lower-level solve does
not see. :mod:`~bilevel_ray.diagnostics.end_check` measures the outcome at the run's end, and
:func:`~bilevel_ray.diagnostics.diagnose.diagnose` reports this beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bilevel_ray.diagnostics.cost import pooled_cost
from bilevel_ray.diagnostics.flatness import estimate, lower_grad_x_diff, lower_responses
from bilevel_ray.diagnostics.price_rule import decide
from bilevel_ray.diagnostics.responses import Responses, as_batch, reference_upper
from bilevel_ray.diagnostics.verdict import Verdict
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params, cuda_devices, vdot

__all__ = [
    "Pricing",
    "Settle",
    "blind_verdict",
    "decide_priced",
    "price",
    "terms",
    "upper_reaches_x",
]


@dataclass
class Settle:
    """Whether PBGD-Free's own step has died out against the dropped term: ||E kept|| <=
    ``settle`` * max(||E dropped||, ``settle`` * its largest value), E over batches by the dot
    product of two successive checks' vectors (a minibatch's own noise does not keep a run from
    settling)."""

    settle: float
    peak: float = 0.0
    ratio: float = math.inf
    checks: int = 0
    previous: tuple[Params, Params] | None = None

    def update(self, kept: Params, dropped: Params) -> bool:
        before = self.previous or (kept, dropped)
        signal = math.sqrt(max(float(vdot(kept, before[0])), 0.0))
        bias = math.sqrt(max(float(vdot(dropped, before[1])), 0.0))
        self.previous, self.checks = (kept, dropped), self.checks + 1
        self.peak = max(self.peak, signal) if math.isfinite(signal) else self.peak
        self.ratio = signal / max(bias, self.settle * self.peak, 1e-300)
        return signal <= self.settle * max(bias, self.settle * self.peak)


@dataclass(frozen=True)
class Pricing:
    """How a point is priced: the solves (``solve``, ``check``: the loose trajectory checks'),
    the estimator's options, the decision's thresholds, and the batches to price on."""

    gamma: float
    solve: dict
    check: dict
    estimator: dict
    judge: dict
    batches: int
    fixed: bool
    jitter: float  # lr_x / 4 for plain SGD on x on minibatch data, else 0
    seed: int
    extend: bool = True  # up to 4 x batches while the verdict is uncertain


def terms(
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


def price(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    step: int,
    first: Any,
    more: Iterator[Any],
    how: Pricing,
    reference: tuple[Params, Params],
    settle: Settle,
    settled: bool,
    show: Callable[[str], None],
) -> Verdict:
    """The dropped term at (x, y) priced on ``first`` and then fresh batches from ``more`` (one
    when the data is deterministic; ``batches``, up to 4 times as many while the verdict is
    uncertain), with f at the reference point on the same batches (the achievable
    improvement, paired) and, for plain SGD on x, its jitter floor lr_x tr(Var kept) / 4."""
    priced, vectors, steps_kept = [], [], []
    y_ref = reference[1]
    with torch.random.fork_rng(devices=cuda_devices(x, y)):  # the run's RNG stays the run's
        for b in range(1 if how.fixed else how.batches * (4 if how.extend else 1)):
            interim = (priced, vectors, steps_kept, how.jitter, how.judge)
            if b >= how.batches and decide_priced(*interim).verdict != "uncertain":
                break
            batch = first if b == 0 else next(more)
            r = lower_responses(problem, x, y, batch, how.gamma, **how.solve)
            diff = lower_grad_x_diff(problem, x, r.y_g, r.y_gamma, batch)
            vectors.append({k: how.gamma * v for k, v in diff.items()})
            _, _, (kept,) = grads_of(
                lambda x_, r=r, batch=batch: (
                    problem.upper_loss(x_, r.y_gamma, as_batch(batch).upper),
                    {},
                ),
                [x],
                identity_reduce,
            )
            steps_kept.append(kept)
            point = estimate(
                problem, x, y, batch, how.gamma, **how.estimator, seed=how.seed + b, responses=r
            )
            point["flatness/start_upper"], y_ref = reference_upper(
                problem, reference[0], y_ref, batch, how.gamma, how.check
            )
            point["flatness/settled"], point["flatness/settle"] = float(settled), settle.settle
            point["flatness/settle_ratio"] = settle.ratio
            priced.append({**point, "flatness/step": float(step)})
            show(f"the early price at step {step}, batch {b + 1}")
    return decide_priced(priced, vectors, steps_kept, how.jitter, how.judge)


def decide_priced(
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


def upper_reaches_x(problem: BilevelProblem, x: Params, y: Params, batch: Any) -> bool:
    """Whether f(x, y) has a gradient in x at all (autograd reaches some tensor of x)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    with torch.enable_grad():
        out = problem.upper_loss(leaves, y, as_batch(batch).upper)
    if not out.requires_grad:
        return False
    grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
    return any(g is not None for g in grads)


def blind_verdict() -> Verdict:
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
