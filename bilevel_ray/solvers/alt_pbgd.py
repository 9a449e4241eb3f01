"""ALT-PBGD: alternating penalty method with both lower-level responses.

Jiang, Xiao, Chen, Chen. *Efficient Penalty-Based Bilevel Methods: Improved Analysis, Novel
Updates, and Flatness Condition*. arXiv 2511.16796 (digest §1.4, §4.2). One step::

    for k = 1..K:   y_g <- y_g - lr_y * grad_y g(x, y_g; zeta_t)                        (value copy)
    for k = 1..K:   y   <- y   - lr_y * grad_y [ f(x, y; xi_t) / gamma_t + g(x, y; zeta_t) ]
    x <- x - lr_x * [ grad_x f(x, y) + gamma_t * ( grad_x g(x, y) - grad_x g(x, y_g) ) ]

With both inner loops solved, the x direction is the exact penalty gradient grad F_gamma(x), whose
smoothness is O(1) in gamma, so lr_x need not shrink as gamma grows. This is PBGD-Free plus the
value-function correction and its inner loop; the official code calls it "F2SA".
"""

from __future__ import annotations

from typing import Any

from bilevel_ray.problem import BilevelProblem
from bilevel_ray.schedules import ScalarOrSchedule, positive_value
from bilevel_ray.solvers.base import (
    BilevelSolver,
    GradReduce,
    Metrics,
    SolverState,
    gamma_setting,
    identity_reduce,
    steps_setting,
)
from bilevel_ray.solvers.compute import Compute
from bilevel_ray.solvers.penalty import alternating_penalty_step
from bilevel_ray.tree import Params
from bilevel_ray.updates import UpdateRule

__all__ = ["SETTINGS", "alt_pbgd"]

# ALT-PBGD's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(5)}


def alt_pbgd(
    problem: BilevelProblem,
    *,
    update_x: UpdateRule,
    update_y: UpdateRule,
    gamma: ScalarOrSchedule,
    inner_steps: int = SETTINGS["inner_steps"].default,
    grad_reduce: GradReduce | None = None,
    precision: str = "fp32",
    grad_accumulation: int = 1,
    in_place: bool = False,
) -> BilevelSolver:
    """Build ALT-PBGD; ``inner_steps`` is the length K of each of the two inner loops."""
    gamma_t = SETTINGS["gamma"].check(gamma)
    inner_steps = SETTINGS["inner_steps"].check(inner_steps)
    compute = Compute(
        problem, grad_reduce or identity_reduce, precision, grad_accumulation, in_place
    )

    def init(x0: Params, y0: Params) -> SolverState:
        return compute.init(x0, y0, update_x, update_y, copies=("y_g",))

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        gamma = positive_value("gamma", gamma_t, state.step)
        ev = compute.at(state.x, batch, state.extra)
        metrics = alternating_penalty_step(ev, state, gamma, update_x, update_y, inner_steps)
        return state._replace(step=state.step + 1), {**metrics, "penalty/gamma": gamma}

    return BilevelSolver("alt_pbgd", init, step)
