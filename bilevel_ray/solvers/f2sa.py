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
from bilevel_ray.schedules import ScalarOrSchedule, checked_value, nonnegative_schedule
from bilevel_ray.solvers.base import Metrics, Setting, SolverState, gamma_setting, steps_setting
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.solvers.penalty import alternating_penalty_step

__all__ = ["SETTINGS", "f2sa"]

# F2SA's own settings (SolverConfig, the CLI and Tune read them from here); gamma is lam_0.
SETTINGS = {
    "gamma": gamma_setting(),
    "inner_steps": steps_setting(5),
    "multiplier_growth": Setting(
        0.0, lambda v: nonnegative_schedule("multiplier_growth", v), schedule=True
    ),
}


def _initial_multiplier(gamma: Any) -> float:
    """lam_0: gamma, which for f2sa must be a number (and pass gamma's own check)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ConfigError(
            f"gamma={gamma!r}: for f2sa gamma is the initial multiplier lam_0 and must be a "
            "number; schedule its growth with multiplier_growth"
        )
    return SETTINGS["gamma"].check(gamma)(0)


@solver_factory(SETTINGS, gamma=_initial_multiplier)
def f2sa(
    s: Setup,
    *,
    gamma: float,
    multiplier_growth: ScalarOrSchedule = DEFAULT,
    inner_steps: int = DEFAULT,
) -> Plan:
    """Build F2SA; ``gamma`` is the initial multiplier lam_0, ``multiplier_growth`` is delta_t."""

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        lam = state.extra["multiplier"]
        ev = s.compute.at(state.x, batch, state.extra)
        metrics = alternating_penalty_step(ev, state, lam, s.update_x, s.update_y, inner_steps)
        state.extra["multiplier"] = lam + checked_value(
            "multiplier_growth", multiplier_growth, state.step, strict=False
        )
        return state._replace(step=state.step + 1), {**metrics, "penalty/gamma": lam}

    return Plan(step, copies=("y_g",), numbers={"multiplier": gamma})
