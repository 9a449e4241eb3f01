"""Conformance suite: every solver in br.SOLVERS keeps the (init, step) contract.

Determinism, no autograd history in the state, a checkpoint round trip through
torch.save / torch.load(weights_only=True) that continues identically, schedules accepted where
scalars are, and every gradient passing through the injected reduction.
"""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.data import as_batches

METHODS = sorted(br.SOLVERS)


def _spec():
    return br.problems.BUILTIN_PROBLEMS["regression"]({"n": 200, "batch_size": 20})


def _solver(method, problem, grad_reduce=None, **options):
    options = {"lr_x": 0.002, "lr_y": 0.1, "inner_steps": 2, **options}
    if method == "implicit_cg":
        options["cg_steps"] = 3
    return br.SolverConfig(method=method, **options).build(problem, grad_reduce)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _run(solver, state, data, seed, start, stop):
    batches = as_batches(data, seed, start_step=start)
    for _ in range(start, stop):
        state, _ = solver.step(state, next(batches))
    return state


def _assert_same_state(a, b):
    da, db = br.state_to_dict(a), br.state_to_dict(b)
    assert da["step"] == db["step"]
    ta, tb = list(_tensors(da)), list(_tensors(db))
    assert len(ta) == len(tb) > 0
    for u, v in zip(ta, tb):
        assert torch.equal(u, v)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_identical_states(method):
    spec = _spec()
    solver = _solver(method, spec.problem)
    a = _run(solver, solver.init(spec.x0, spec.y0), spec.data, 7, 0, 15)
    b = _run(solver, solver.init(spec.x0, spec.y0), spec.data, 7, 0, 15)
    _assert_same_state(a, b)
    c = _run(solver, solver.init(spec.x0, spec.y0), spec.data, 8, 0, 15)
    assert not torch.equal(a.x["W"], c.x["W"]), "another seed must draw other batches"


@pytest.mark.parametrize("method", METHODS)
def test_state_has_no_autograd_history_and_does_not_alias_inputs(method):
    spec = _spec()
    x0 = {k: v.clone() for k, v in spec.x0.items()}
    solver = _solver(method, spec.problem)
    state = _run(solver, solver.init(spec.x0, spec.y0), spec.data, 0, 0, 3)
    for t in _tensors(br.state_to_dict(state)):
        assert t.grad_fn is None and not t.requires_grad
    assert torch.equal(spec.x0["W"], x0["W"]), "init must copy x0, not update it in place"
    assert state.step == 3


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_round_trip_continues_identically(method, tmp_path):
    spec = _spec()
    solver = _solver(method, spec.problem)
    uninterrupted = _run(solver, solver.init(spec.x0, spec.y0), spec.data, 3, 0, 12)

    half = _run(solver, solver.init(spec.x0, spec.y0), spec.data, 3, 0, 5)
    torch.save(br.state_to_dict(half), tmp_path / "state.pt")
    del half
    loaded = br.state_from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = _run(_solver(method, spec.problem), loaded, spec.data, 3, loaded.step, 12)
    _assert_same_state(uninterrupted, resumed)


@pytest.mark.parametrize("method", METHODS)
def test_every_gradient_passes_through_the_reduction(method):
    """A reduction that zeroes gradients must freeze every variable: then no update used a
    gradient that bypassed it. The spy also sees both levels."""
    spec = _spec()
    seen = []

    def zero_reduce(grads):
        seen.append(frozenset(grads))
        return {k: torch.zeros_like(v) for k, v in grads.items()}

    solver = _solver(method, spec.problem, grad_reduce=zero_reduce)
    state = solver.init(spec.x0, spec.y0)
    before = [t.clone() for t in _tensors(br.state_to_dict(state)["x"])]
    before += [t.clone() for t in _tensors(br.state_to_dict(state)["y"])]
    before += [t.clone() for t in _tensors(br.state_to_dict(state)["extra"])]
    state = _run(solver, state, spec.data, 0, 0, 3)
    after = (
        list(_tensors(br.state_to_dict(state)["x"]))
        + list(_tensors(br.state_to_dict(state)["y"]))
        + list(_tensors(br.state_to_dict(state)["extra"]))
    )
    for u, v in zip(before, after):
        assert torch.equal(u, v)
    assert frozenset({"W"}) in seen and frozenset({"v"}) in seen


def test_pbgd_free_makes_one_reduction_per_level_per_step():
    spec = _spec()
    calls = []
    solver = _solver(
        "pbgd_free",
        spec.problem,
        grad_reduce=lambda g: calls.append(sorted(g)) or g,
        inner_steps=1,
    )
    _run(solver, solver.init(spec.x0, spec.y0), spec.data, 0, 0, 4)
    assert calls == [["v"], ["W"]] * 4


@pytest.mark.parametrize("method", METHODS)
def test_schedules_are_accepted_wherever_a_scalar_is(method):
    spec = _spec()
    options = {
        "lr_x": br.schedules.inverse_power(0.002, 0.5),
        "lr_y": br.schedules.linear(0.05, 0.1, 10),
    }
    if method in ("pbgd_free", "pbgd", "alt_pbgd"):
        options["gamma"] = br.schedules.pbgd_ramp(1.0, 10.0, 5)
    if method == "f2sa":
        options["multiplier_growth"] = br.schedules.inverse_power(1.0, 1.0)
    solver = _solver(method, spec.problem, **options)
    batches = as_batches(spec.data, 0)
    state = solver.init(spec.x0, spec.y0)
    for _ in range(6):
        state, metrics = solver.step(state, next(batches))
    if method in ("pbgd_free", "pbgd", "alt_pbgd"):
        assert metrics["penalty/gamma"] == 10.0  # the ramp's value at step 5
    if method == "f2sa":
        # lam_t = 10 + sum_{s < t} 1 / (s + 1): the multiplier lives in the state.
        assert state.extra["multiplier"] == pytest.approx(10 + sum(1 / (s + 1) for s in range(6)))


@pytest.mark.parametrize("method", METHODS)
def test_metrics_are_tensors_or_floats_without_history(method):
    spec = _spec()
    solver = _solver(method, spec.problem)
    _, metrics = solver.step(solver.init(spec.x0, spec.y0), next(as_batches(spec.data, 0)))
    assert {"upper/loss", "lower/loss"} <= set(metrics)
    for value in metrics.values():
        assert isinstance(value, float) or (value.dim() == 0 and value.grad_fn is None)


@pytest.mark.parametrize("method", METHODS)
def test_in_place_makes_x0_and_y0_the_working_copy(method):
    """in_place=True: the state's x and y are x0 and y0 (same memory, updated in place), and
    the iterates are those of a run on copies."""
    spec = _spec()
    x0 = {k: v.clone() for k, v in spec.x0.items()}
    y0 = {k: v.clone() for k, v in spec.y0.items()}
    copied = _run(
        _solver(method, spec.problem),
        _solver(method, spec.problem).init(x0, y0),
        spec.data,
        0,
        0,
        4,
    )
    assert torch.equal(x0["W"], spec.x0["W"])  # the default copies
    solver = _solver(method, spec.problem, in_place=True)
    state = _run(solver, solver.init(x0, y0), spec.data, 0, 0, 4)
    assert state.x["W"].data_ptr() == x0["W"].data_ptr()
    assert state.y["v"].data_ptr() == y0["v"].data_ptr()
    assert torch.equal(x0["W"], copied.x["W"]) and torch.equal(y0["v"], copied.y["v"])


def test_module_problem_without_copy_shares_the_model_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    _, x0, y0 = br.module_problem(
        model,
        x=r"^0\.",
        y=r"^1\.",
        upper_loss=lambda fw, b: fw(b).sum(),
        lower_loss=lambda fw, b: fw(b).sum(),
        copy=False,
    )
    assert x0["0.weight"].data_ptr() == model[0].weight.data_ptr()
    assert y0["1.bias"].data_ptr() == model[1].bias.data_ptr()
    assert not x0["0.weight"].requires_grad


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_in_place_must_be_a_bool(value):
    with pytest.raises(
        br.ConfigError,
        match=rf"^in_place={value!r}: must be True \(the solver updates x0 and y0 themselves: "
        r"one copy of the parameters\) or False \(it works on copies; the default\)$",
    ):
        br.SolverConfig(in_place=value)
