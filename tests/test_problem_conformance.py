"""Conformance suite: every built-in problem (br.problems.BUILTIN_PROBLEMS) keeps the factory
contract.

For each problem: the factory builds a ProblemSpec from small settings that run here (its
defaults where they are small; ``representation`` without its CSV, on synthetic data); one step
of every solver in br.SOLVERS that applies runs from x0 / y0 on the first batch and gives finite
losses (a solver that does not apply is refused by the check at the initial point, as br.solve
refuses it); an unknown setting is refused with a ConfigError that names it; ``eval_data`` is a
br.BilevelBatch whose upper loss at x0 / y0 is a finite scalar; and the suggested settings
(``defaults``) apply to every method. A new built-in problem must be added to ``SMALL``.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch, as_batches
from bilevel_ray.problem import check_losses, check_params, check_problem

METHODS = sorted(br.SOLVERS)

# The settings each problem is built with: its defaults where they are small enough to run
# here, else its smallest settings (a one-layer Llama of width 4 over 8 token ids).
SMALL: dict[str, dict[str, Any]] = {
    "toy-negative": {},
    "toy-positive": {},
    "quadratic": {},
    "regression": {},
    "representation": {},  # data=None: synthetic rows in the NLSY79 file's shape
    "hyperclean": {},
    "peft-dpo-sft": {
        "vocab": 8,
        "hidden": 4,
        "heads": 1,
        "layers": 1,
        "lora_rank": 2,
        "n_pref": 4,
        "n_sft": 4,
        "n_eval": 2,
        "batch": 2,
        "prompt_len": 2,
        "response_len": 2,
        "topics": 2,
    },
}
# The packages a problem imports beyond bilevel_ray's own.
NEEDS = {"hyperclean": ("sklearn",), "peft-dpo-sft": ("transformers", "peft")}
# (problem, method) pairs where the method does not apply, and why: the check at the initial
# point refuses them.
NOT_APPLICABLE = {
    # f is the validation loss of the classifier y: it reaches the weights x only through
    # y*(x), so PBGD-Free's x step (grad_x f) is undefined.
    ("hyperclean", "pbgd_free"): r"^upper_loss does not depend on x: .*PBGD-Free's x step",
}
NAMES = sorted(SMALL)


@functools.cache
def _built(name: str) -> br.ProblemSpec:
    return br.problems.BUILTIN_PROBLEMS[name](dict(SMALL[name]))


@pytest.fixture(params=NAMES)
def name(request) -> str:
    for module in NEEDS.get(request.param, ()):
        pytest.importorskip(module)
    return request.param


@pytest.fixture
def spec(name) -> br.ProblemSpec:
    return _built(name)


def _first_batch(spec: br.ProblemSpec) -> BilevelBatch:
    return next(as_batches(spec.data, 0))


def test_every_builtin_problem_is_covered():
    assert set(SMALL) == set(br.problems.BUILTIN_PROBLEMS)
    assert {problem for problem, _ in NOT_APPLICABLE} <= set(SMALL)
    assert {method for _, method in NOT_APPLICABLE} <= set(br.SOLVERS)


def test_the_factory_builds_a_problem_spec(name, spec):
    assert isinstance(spec, br.ProblemSpec)
    check_problem(spec.problem)
    check_params(spec.x0, spec.y0)
    for level in (spec.x0, spec.y0):
        assert all(t.is_floating_point() and t.requires_grad is False for t in level.values())
    batch = _first_batch(spec)
    assert isinstance(batch, BilevelBatch)
    assert isinstance(spec.defaults, dict)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_of_every_solver_that_applies(name, spec, method):
    batch = _first_batch(spec)
    if (name, method) in NOT_APPLICABLE:
        with pytest.raises(br.ConfigError, match=NOT_APPLICABLE[name, method]):
            check_losses(spec.problem, spec.x0, spec.y0, batch, upper_needs_x=True)
        return
    check_losses(spec.problem, spec.x0, spec.y0, batch, upper_needs_x=method == "pbgd_free")
    settings = br.SolverConfig.applicable(method, spec.defaults)
    settings.pop("steps", None)
    solver = br.SolverConfig(method=method, **settings).build(spec.problem)
    x0 = {k: v.clone() for k, v in spec.x0.items()}
    state, metrics = solver.step(solver.init(spec.x0, spec.y0), batch)
    assert state.step == 1
    for key in ("upper/loss", "lower/loss"):
        assert math.isfinite(float(metrics[key])), (key, metrics[key])
    for level in (state.x, state.y):
        assert all(bool(torch.isfinite(t).all()) for t in level.values())
    assert all(torch.equal(v, spec.x0[k]) for k, v in x0.items()), "the step changed x0"


def test_an_unknown_setting_is_refused_by_name(name):
    factory = br.problems.BUILTIN_PROBLEMS[name]
    with pytest.raises(br.ConfigError, match=r"\bno_such_setting\b"):
        factory({**SMALL[name], "no_such_setting": 1})


def test_eval_data_gives_a_finite_scalar_upper_loss(name, spec):
    if spec.eval_data is None:
        pytest.skip(f"{name} gives no eval_data")
    assert isinstance(spec.eval_data, br.BilevelBatch)
    with torch.no_grad():
        loss = spec.problem.upper_loss(spec.x0, spec.y0, spec.eval_data.upper)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()
    assert math.isfinite(float(loss))


def test_representation_without_its_csv_uses_synthetic_data(monkeypatch):
    """``data`` defaults to None: the rows are generated, no file is read."""
    module = importlib.import_module("bilevel_ray.problems.representation")

    def no_file(path):
        raise AssertionError(f"read {path!r}")

    monkeypatch.setattr(module, "load_nlsy", no_file)
    spec = br.problems.BUILTIN_PROBLEMS["representation"](SMALL["representation"])
    n, test_fraction = 7244, 0.2  # the factory's defaults
    assert sum(spec.data.sizes) == n - int(n * test_fraction)
    features = spec.data.upper[0]
    assert features.shape[1] == len(module.FEATURES) and bool(torch.isfinite(features).all())
