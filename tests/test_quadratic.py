"""Exact answers on the strongly convex quadratic family (float64).

Theory used for the bounds: at a fixed penalty gamma the penalty methods (PBGD, ALT-PBGD, F2SA)
converge to the minimiser x_gamma of F_gamma, and ||x_gamma - x*|| = O(1/gamma) (Proposition 1
of the PBGD-Free paper; here x_gamma is computed in closed form). Implicit differentiation with
an exact inner solve and exact CG converges to x* itself. BOME behaves as a penalty method at its
own adaptive multiplier lam, so it lands within the O(1/lam) penalty error at its final lam.
"""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch
from bilevel_ray.solvers import implicit_hypergradient

GAMMA = 10.0


def _distance(a, b):
    return float((a["x"] - b["x"]).norm())


def test_closed_forms_are_consistent(quadratic):
    """grad_y g = 0 at y*(x); the hypergradient matches finite differences; grad phi(x*) = 0."""
    x = {"x": torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)}
    y_star = quadratic.lower_solution(x)
    y_leaf = {"y": y_star["y"].clone().requires_grad_(True)}
    (grad_y,) = torch.autograd.grad(quadratic.lower_loss(x, y_leaf, None), [y_leaf["y"]])
    assert grad_y.abs().max() < 1e-12

    def phi(v):
        xv = {"x": v}
        return float(quadratic.upper_loss(xv, quadratic.lower_solution(xv), None))

    eps = 1e-6
    fd = torch.tensor(
        [
            (phi(x["x"] + eps * e) - phi(x["x"] - eps * e)) / (2 * eps)
            for e in torch.eye(3, dtype=torch.float64)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(quadratic.hypergradient(x)["x"], fd, atol=1e-6, rtol=0)
    assert quadratic.hypergradient(quadratic.solution())["x"].abs().max() < 1e-10


def test_penalty_error_is_order_one_over_gamma(quadratic):
    x_star = quadratic.solution()
    scaled = [g * _distance(quadratic.penalty_solution(g), x_star) for g in (10.0, 40.0, 160.0)]
    assert max(scaled) / min(scaled) < 1.5, scaled  # gamma * ||x_gamma - x*|| is about constant


def test_one_pbgd_free_step_equals_the_hand_computed_step(quadratic):
    q = quadratic
    x0 = {"x": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    y0 = {"y": torch.tensor([0.2, 0.1, -0.3, 1.0], dtype=torch.float64)}
    lr_x, lr_y, gamma = 0.05, 0.2, 4.0
    solver = br.SolverConfig(lr_x=lr_x, lr_y=lr_y, gamma=gamma).build(q)
    state, metrics = solver.step(solver.init(x0, y0), BilevelBatch(None, None))

    x, y = x0["x"], y0["y"]
    grad_y_f = q.Q.T @ x + q.R @ y + q.r
    grad_y_g = q.A @ y - q.B @ x - q.b
    y1 = y - lr_y * (grad_y_f / gamma + grad_y_g)
    x1 = x - lr_x * (q.P @ x + q.Q @ y1 + q.p)
    torch.testing.assert_close(state.y["y"], y1, atol=1e-14, rtol=0)
    torch.testing.assert_close(state.x["x"], x1, atol=1e-14, rtol=0)
    assert float(metrics["upper/loss"]) == pytest.approx(float(q.upper_loss(x0, {"y": y1}, None)))


def test_implicit_cg_hypergradient_equals_the_closed_form(quadratic):
    x = {"x": torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)}
    y_star = quadratic.lower_solution(x)
    hypergrad, _ = implicit_hypergradient(
        quadratic,
        x,
        y_star,
        BilevelBatch(None, None),
        cg_steps=4,  # dim y: CG is exact
    )
    torch.testing.assert_close(hypergrad["x"], quadratic.hypergradient(x)["x"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", ["pbgd", "alt_pbgd", "f2sa"])
def test_penalty_methods_reach_the_penalty_solution(quadratic, method, origin):
    x0, y0 = origin
    res = br.solve(
        quadratic,
        x0,
        y0,
        method=method,
        steps=3000,
        lr_x=0.05,
        lr_y=0.2,
        gamma=GAMMA,
        report_every=500,
    )
    x_gamma, x_star = quadratic.penalty_solution(GAMMA), quadratic.solution()
    assert _distance(res.x, x_gamma) < 1e-8
    # Bound: ||x_T - x*|| <= ||x_gamma - x*|| + 1e-8, with ||x_gamma - x*|| = O(1/gamma).
    assert _distance(res.x, x_star) <= _distance(x_gamma, x_star) + 1e-8


def test_f2sa_growing_multiplier_tightens_the_bound(quadratic, origin):
    x0, y0 = origin
    res = br.solve(
        quadratic,
        x0,
        y0,
        method="f2sa",
        steps=3000,
        lr_x=0.05,
        lr_y=0.2,
        gamma=GAMMA,
        multiplier_growth=0.01,
        report_every=500,
    )
    lam = res.state.extra["multiplier"]
    assert lam == pytest.approx(GAMMA + 0.01 * 3000)
    x_star = quadratic.solution()
    assert _distance(res.x, x_star) < 0.5 * _distance(quadratic.penalty_solution(GAMMA), x_star)


def test_implicit_cg_reaches_x_star(quadratic, origin):
    x0, y0 = origin
    res = br.solve(
        quadratic,
        x0,
        y0,
        method="implicit_cg",
        steps=1500,
        lr_x=0.05,
        lr_y=0.2,
        inner_steps=20,
        cg_steps=4,
        report_every=500,
    )
    assert _distance(res.x, quadratic.solution()) < 1e-8


def test_bome_lands_within_the_penalty_error_of_its_multiplier(quadratic, origin):
    x0, y0 = origin
    res = br.solve(
        quadratic,
        x0,
        y0,
        method="bome",
        steps=3000,
        lr_x=0.01,
        lr_y=0.01,
        inner_steps=20,
        report_every=500,
    )
    lam = float(res.history["penalty/multiplier"][-1].as_py())
    x_star = quadratic.solution()
    assert lam > 10
    assert _distance(res.x, x_star) <= 1.1 * _distance(quadratic.penalty_solution(lam), x_star)


def test_pbgd_free_is_exact_when_f_is_flat_and_biased_when_not(quadratic, origin):
    flat = br.problems.QuadraticProblem(dim_x=3, dim_y=4, seed=0, flat=True)
    x0, y0 = origin
    res = br.solve(flat, x0, y0, steps=3000, lr_x=0.05, lr_y=0.2, gamma=GAMMA, report_every=500)
    assert _distance(res.x, flat.solution()) < 1e-8

    res = br.solve(
        quadratic, x0, y0, steps=3000, lr_x=0.05, lr_y=0.2, gamma=GAMMA, report_every=500
    )
    # Not flat (grad_y f(x*, y*) != 0): a bias that no gamma removes.
    assert _distance(res.x, quadratic.solution()) > 0.5
