"""BOME: bilevel optimization made easy, a value-function method with an adaptive multiplier.

Liu, Ye, Wright, Stone, Liu. *BOME! Bilevel Optimization Made Easy: A Simple First-Order
Approach*. NeurIPS 2022 (digest §4.4). With q(x, y) = g(x, y) - g(x, y_hat), one step is::

    for k = 1..K:   y_hat <- y_hat - lr_y * grad_y g(x, y_hat; zeta_t)          (warm-started)
    phi    = eta * || grad q(x, y) ||^2
    lam    = max( (phi - < grad f(x, y), grad q(x, y) >) / || grad q(x, y) ||^2 , 0 )
    (x, y) <- (x, y) - (lr_x, lr_y) * [ grad f(x, y) + lam * grad q(x, y) ]

where grad = (grad_x, grad_y) over both levels and y_hat is held fixed inside q, so
grad_x q = grad_x g(x, y) - grad_x g(x, y_hat) and grad_y q = grad_y g(x, y). ``eta`` is
``bome_eta`` (0.5 in the official code). When grad q = 0 the multiplier is 0.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_ray.solvers.base import Metrics, Setting, SolverState, check_number, steps_setting
from bilevel_ray.solvers.compute import Losses
from bilevel_ray.solvers.factory import DEFAULT, Plan, Setup, solver_factory
from bilevel_ray.solvers.penalty import value_function_steps
from bilevel_ray.tree import Params, vdot

__all__ = ["SETTINGS", "bome"]

# BOME's own settings (SolverConfig, the CLI and Tune read them from here).
SETTINGS = {
    "inner_steps": steps_setting(5),
    "bome_eta": Setting(
        0.5, lambda v: check_number("bome_eta", v, strict=True, hint="BOME uses 0.5")
    ),
}


@solver_factory(SETTINGS)
def bome(s: Setup, *, bome_eta: float = DEFAULT, inner_steps: int = DEFAULT) -> Plan:
    """Build BOME; ``inner_steps`` is T, the lower-level steps for y_hat per iteration."""

    def step(state: SolverState, batch: Any) -> tuple[SolverState, Metrics]:
        t, x, y, y_hat = state.step, state.x, state.y, state.extra["y_hat"]
        ev = s.compute.at(x, batch, state.extra)
        aux = value_function_steps(ev, y_hat, s.update_y, state.opt["y_hat"], t, inner_steps)
        f, _, (fx, fy) = ev.grads(lambda L, x_, y_: (L.upper(x_, y_), {}), [ev.x, y])

        def gap(L: Losses, x_: Params, y_: Params) -> tuple[Any, Metrics]:
            g = L.lower(x_, y_)
            return g - L.lower(x_, y_hat), {"lower/loss": g.detach()}

        _, gap_aux, (qx, qy) = ev.grads(gap, [ev.x, y])
        q_sq = vdot(qx, qx) + vdot(qy, qy)
        inner = vdot(fx, qx) + vdot(fy, qy)
        safe = torch.where(q_sq > 0, q_sq, torch.ones_like(q_sq))
        lam = torch.where(q_sq > 0, torch.clamp((bome_eta * q_sq - inner) / safe, min=0), 0.0)
        # lam stays a 0-d tensor: a float() here would sync the device every step.
        # grad f + lam grad q, in place on the fresh gradient dicts (lam moved to each tensor's
        # device: a CUDA 0-d tensor cannot scale a CPU tensor).
        step_x, step_y = _add_scaled_(fx, qx, lam), _add_scaled_(fy, qy, lam)
        s.update_x.apply(x, step_x, state.opt["x"], t)
        s.update_y.apply(y, step_y, state.opt["y"], t)
        metrics = {"upper/loss": f, **gap_aux, **aux, "penalty/multiplier": lam}
        return state._replace(step=t + 1), metrics

    return Plan(step, copies=("y_hat",))


def _add_scaled_(a: Params, b: Params, scale: torch.Tensor) -> Params:
    """a += scale * b for every key, in place; returns a."""
    for k in a:
        a[k].add_(b[k] * scale.to(b[k].device))
    return a
