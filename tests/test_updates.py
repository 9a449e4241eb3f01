"""The update rules reproduce torch.optim exactly, with state that checkpoints as a plain dict."""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.updates import make_update


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen)}


def _loss(params):
    # A fixed non-quadratic loss, so that gradients change from step to step.
    return (
        (params["a"].sin() ** 2).sum()
        + (params["b"] ** 4).sum()
        + params["a"].sum() * params["b"].sum()
    )


def _run_ours(rule, steps=20):
    params = _params()
    state = rule.init(params)
    for t in range(steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(_loss(leaves), list(leaves.values()))
        rule.apply(params, dict(zip(params, grads)), state, t)
    return params


def _run_torch(make_opt, steps=20):
    params = {k: v.clone().requires_grad_(True) for k, v in _params().items()}
    opt = make_opt(list(params.values()))
    for _ in range(steps):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (br.sgd(0.01), lambda p: torch.optim.SGD(p, lr=0.01)),
        (br.sgd(0.01, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
        (
            br.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=0.1),
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1),
        ),
        (br.adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
        (
            br.adam(0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        ),
        (
            br.adam(0.02, weight_decay=0.1, decoupled_weight_decay=True),
            lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
        ),
    ],
    ids=["sgd", "sgd-momentum", "sgd-nesterov-wd", "adam", "adam-options", "adamw"],
)
def test_matches_torch_optim_over_20_steps(ours, theirs):
    mine, reference = _run_ours(ours), _run_torch(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], reference[k], atol=1e-6, rtol=0)


def test_learning_rate_schedule_is_read_at_the_solver_step():
    rule = br.sgd(br.schedules.linear(1.0, 0.25, transition_steps=3))
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    state = rule.init(params)
    for t in range(5):  # unit gradient: the parameter moves by lr_t
        rule.apply(params, {"w": torch.ones(1, dtype=torch.float64)}, state, t)
    assert params["w"].item() == pytest.approx(-(1.0 + 0.75 + 0.5 + 0.25 + 0.25))


def test_state_round_trips_through_torch_save(tmp_path):
    rule = make_update("adam", 0.01)
    params = _params()
    state = rule.init(params)
    rule.apply(params, {k: torch.ones_like(v) for k, v in params.items()}, state, 0)
    torch.save(state, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["count"] == 1
    torch.testing.assert_close(loaded["m"]["a"], state["m"]["a"])
