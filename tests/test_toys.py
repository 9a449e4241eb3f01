"""The paper's toy results (digest §3.1, §3.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bilevel_ray as br
from bilevel_ray.problems.toys import DPO_CHOSEN, DPO_INPUTS, W_INIT, W_REF, toy_logits


def _negative():
    return br.problems.BUILTIN_PROBLEMS["toy-negative"]({})


@pytest.mark.parametrize("gamma", [5.0, 15.0, 50.0, 200.0])
def test_pbgd_free_stops_at_the_biased_point_x_0(gamma):
    spec = _negative()
    res = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        steps=3000,
        lr_x=0.01,
        lr_y=0.1,
        gamma=gamma,
        report_every=500,
    )
    x = res.x["x"]
    assert abs(float(x)) < 1e-3
    # The bias: phi'(x) = 2x + 10 = 10 at PBGD-Free's fixed point, whatever gamma.
    assert float(spec.problem.hypergradient(res.x)["x"]) == pytest.approx(10.0, abs=2e-3)
    # y tracks the perturbed response y_gamma(x) = x - 1 - 5 / gamma.
    assert float(res.y["y"]) == pytest.approx(float(x) - 1 - 5 / gamma, abs=1e-3)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("pbgd", {"gamma": 10.0, "inner_steps": 5, "lr_x": 0.01, "lr_y": 0.1}),
        ("alt_pbgd", {"gamma": 10.0, "inner_steps": 5, "lr_x": 0.01, "lr_y": 0.1}),
        ("implicit_cg", {"inner_steps": 10, "cg_steps": 1, "lr_x": 0.01, "lr_y": 0.1}),
    ],
)
def test_corrected_methods_reach_x_star(method, options):
    spec = _negative()
    res = br.solve(
        spec.problem, spec.x0, spec.y0, method=method, steps=3000, report_every=500, **options
    )
    assert abs(float(res.x["x"]) + 5.0) < 0.05


def test_reference_policy_of_the_positive_toy():
    """W_REF: Adam (lr 1e-2, 2000 steps) on the NLL of the chosen answers, from W_INIT.

    Each DPO input has equal entries at the w2 positions, so w2 shifts both logits alike and
    cannot change the policy: only w1 is determined (the notebook's -9.9375 for w2 is float32
    drift of a zero gradient under Adam), and the reference policy does not depend on w2.
    """
    w = torch.tensor(W_INIT, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    inputs, chosen = torch.tensor(DPO_INPUTS, dtype=torch.float64), torch.tensor(DPO_CHOSEN)
    for _ in range(2000):
        opt.zero_grad()
        F.cross_entropy(toy_logits(w[0], w[1], inputs), chosen).backward()
        opt.step()
    assert float(w[0].detach()) == pytest.approx(W_REF[0], abs=1e-3)
    policy = F.softmax(toy_logits(w[0], w[1], inputs), dim=-1)
    reference = F.softmax(toy_logits(*torch.tensor(W_REF, dtype=torch.float64), inputs), dim=-1)
    torch.testing.assert_close(policy.detach(), reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_positive_toy_pbgd_free_lands_in_its_flatness_neighbourhood():
    spec = br.problems.BUILTIN_PROBLEMS["toy-positive"]({})
    res = br.solve(spec.problem, spec.x0, spec.y0, report_every=5000, **spec.defaults)
    # digest §3.2: PBGD-Free -> (-7.16, 6.64), near the solution x* ~ -6.2 along phi's flat valley.
    assert float(res.x["w1"]) == pytest.approx(-7.16, abs=0.02)
    assert float(res.y["w2"]) == pytest.approx(6.64, abs=0.02)


@pytest.mark.slow
def test_positive_toy_value_function_methods_land_near_the_solution():
    spec = br.problems.BUILTIN_PROBLEMS["toy-positive"]({})
    # The notebook's "PBGD": 10 steps for y_g, 10 for y_gamma, then the x step (ALT-PBGD).
    res = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        method="alt_pbgd",
        steps=5000,
        lr_x=0.01,
        lr_y=0.01,
        gamma=16.0,
        inner_steps=10,
        report_every=5000,
    )
    assert float(res.x["w1"]) == pytest.approx(-6.03, abs=0.02)
    assert float(res.y["w2"]) == pytest.approx(5.95, abs=0.02)
    # V-PBGD's joint step gets there too.
    res = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        method="pbgd",
        steps=10000,
        lr_x=0.01,
        lr_y=0.3,
        gamma=16.0,
        inner_steps=10,
        report_every=5000,
    )
    assert float(res.x["w1"]) == pytest.approx(-6.2, abs=0.1)
