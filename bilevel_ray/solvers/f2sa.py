"""F2SA: fully first-order stochastic approximation with a growing Lagrange multiplier.

Kwon, Kwon, Wright, Nowak. *A Fully First-Order Method for Stochastic Bilevel Optimization*.
ICML 2023 (digest §4.3). With the Lagrangian L_lam(x, y, z) = f(x, y) + lam * [g(x, y) - g(x, z)],
one step is::

    for k = 1..K:   z <- z - lr_y * grad_z g(x, z; zeta_t)
    for k = 1..K:   y <- y - lr_y * [ grad_y f(x, y; xi_t) / lam_t + grad_y g(x, y; zeta_t) ]
    x <- x - lr_x * [ grad_x f(x, y) + lam_t * ( grad_x g(x, y) - grad_x g(x, z) ) ]
    lam_{t+1} = lam_t + delta_t

The y step is Kwon et al.'s ``y - alpha (grad_y f + lam grad_y g)`` with alpha = lr_y / lam_t, so
lr_y keeps its lower-level meaning. The multiplier starts at ``gamma`` and grows by the schedule
``multiplier_growth`` (delta_t >= 0); it lives in the state, so it is checkpointed and resumed.
z is stored as ``y_g`` (it is the value-function copy). With delta = 0 this is ALT-PBGD at a
fixed penalty, which is what the official PBGD-Free code calls F2SA.
"""

from __future__ import annotations

from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.schedules import (
    ScalarOrSchedule,
    checked_value,
    nonnegative_schedule,
)
from bilevel_ray.solvers.base import (
    BilevelSolver,
    GradReduce,
    Metrics,
    Setting,
    SolverState,
    gamma_setting,
    identity_reduce,
    steps_setting,
)
from bilevel_ray.solvers.compute import Compute
from bilevel_ray.solvers.penalty import alternating_penalty_step
from bilevel_ray.tree import Params
from bilevel_ray.updates import UpdateRule

__all__ = ["SETTINGS", "f2sa"]

# F2SA's own settings (SolverConfig, the CLI and Tune read them from here); gamma is lam_0.
SETTINGS = {
    "gamma": gamma_setting(),
    "inner_steps": steps_setting(5),
    "multiplier_growth": Setting(
        0.0, lambda v: nonnegative_schedule("multiplier_growth", v), schedule=True
    ),
}


def f2sa(
    problem: BilevelProblem,
    *,
    update_x: UpdateRule,
    update_y: UpdateRule,
    gamma: float,
    multiplier_growth: ScalarOrSchedule = SETTINGS["multiplier_growth"].default,
    inner_steps: int = SETTINGS["inner_steps"].default,
    grad_reduce: GradReduce | None = None,
    precision: str = "fp32",
    grad_accumulation: int = 1,
    in_place: bool = False,
) -> BilevelSolver:
    """Build F2SA; ``gamma`` is the initial multiplier lam_0, ``multiplier_growth`` is delta_t."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ConfigError(
            f"gamma={gamma!r}: for f2sa gamma is the initial multiplier lam_0 and must be a "
            "number; schedule its growth with multiplier_growth"
        )
    lam0 = SETTINGS["gamma"].check(gamma)(0)
    growth = SETTINGS["multiplier_growth"].check(multiplier_growth)
    inner_steps = SETTINGS["inner_steps"].check(inner_steps)
    compute = Compute(
        problem, grad_reduce or identity_reduce, precision, grad_accumulation, in_place
    )

    def init(x0: Params, y0: Params) -> SolverState:
        return compute.init(x0, y0, update_x, update_y, copies=("y_g",), multiplier=lam0)

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        lam = state.extra["multiplier"]
        ev = compute.at(state.x, batch, state.extra)
        metrics = alternating_penalty_step(ev, state, lam, update_x, update_y, inner_steps)
        state.extra["multiplier"] = lam + checked_value(
            "multiplier_growth", growth, state.step, strict=False
        )
        return state._replace(step=state.step + 1), {**metrics, "penalty/gamma": lam}

    return BilevelSolver("f2sa", init, step)
