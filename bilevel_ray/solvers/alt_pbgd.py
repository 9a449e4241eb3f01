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

from bilevel_ray.schedules import ScalarOrSchedule, positive_value
from bilevel_ray.solvers.base import Metrics, SolverState, gamma_setting, steps_setting
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.solvers.penalty import alternating_penalty_step

__all__ = ["SETTINGS", "alt_pbgd"]

# ALT-PBGD's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(5)}


@solver_factory(SETTINGS)
def alt_pbgd(s: Setup, *, gamma: ScalarOrSchedule, inner_steps: int = DEFAULT) -> Plan:
    """Build ALT-PBGD; ``inner_steps`` is the length K of each of the two inner loops."""

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        gamma_t = positive_value("gamma", gamma, state.step)
        ev = s.compute.at(state.x, batch, state.extra)
        metrics = alternating_penalty_step(ev, state, gamma_t, s.update_x, s.update_y, inner_steps)
        return state._replace(step=state.step + 1), {**metrics, "penalty/gamma": gamma_t}

    return Plan(step, copies=("y_g",))
