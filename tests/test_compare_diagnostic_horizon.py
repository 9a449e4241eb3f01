"""``br.compare``'s flatness diagnostic judges the horizon a run reaches within the budget, not
the problem's whole suggested run (a language model's 2000 suggested steps cost the diagnostic
an hour against a 5 s budget)."""

from __future__ import annotations

from bilevel_ray.runtime.compare.plan import MIN_DIAGNOSTIC_STEPS, Estimate, diagnostic_horizon


def test_the_horizon_is_what_a_run_reaches_within_the_budget():
    assert diagnostic_horizon(budget_s=30.0, step_s=0.01, suggested=2000) == 2000  # capped
    assert diagnostic_horizon(budget_s=5.0, step_s=0.01, suggested=2000) == 500
    assert diagnostic_horizon(budget_s=5.0, step_s=0.5, suggested=2000) == MIN_DIAGNOSTIC_STEPS
    assert diagnostic_horizon(budget_s=50.0, step_s=0.01, suggested=None) == 5000


def test_the_estimate_keeps_the_horizon():
    estimate = Estimate.of(4, 2, 5.0, 0.1, 50, False, 12.0, 500)
    assert estimate.diagnostic_steps == 500
    assert estimate.to_dict()["diagnostic_steps"] == 500
