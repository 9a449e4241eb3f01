"""grad_accumulation=k: k micro-batches of B / k give the gradient of one batch of B.

Float64, every method, a black-box problem and a split module problem (the features-once path),
an even and an uneven split; the reduction still runs once per level and gradient; and the
refusals (a count above the batch, a problem without data, a bad value).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch, as_batches

METHODS = sorted(br.SOLVERS)
F64 = torch.float64


def _options(method, **extra):
    options = {"lr_x": 0.01, "lr_y": 0.1, "inner_steps": 2, "optimizer": "adam", **extra}
    if method == "implicit_cg":
        options["cg_steps"] = 3
    return options


def _run(problem, x0, y0, batch, method, steps=3, **options):
    solver = br.SolverConfig(method=method, **_options(method, **options)).build(problem)
    state = solver.init(x0, y0)
    for _ in range(steps):
        state, metrics = solver.step(state, batch)
    return state, metrics


def _assert_close(a, b, tol):
    for group in ("x", "y"):
        for k, v in getattr(a, group).items():
            assert (v - getattr(b, group)[k]).abs().max() <= tol, (group, k)
    for k, v in a.extra.items():
        if isinstance(v, dict):
            for name, t in v.items():
                assert (t - b.extra[k][name]).abs().max() <= tol, (k, name)


def _regression():
    spec = br.problems.BUILTIN_PROBLEMS["regression"]({"n": 200, "batch_size": 24})
    return spec.problem, spec.x0, spec.y0, next(as_batches(spec.data, 0))


def _split_problem():
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh()).double()
    head = nn.Linear(6, 1).double()

    def mse(fx, fy, batch):
        inputs, target = batch
        return ((fy(fx(inputs)).squeeze(-1) - target) ** 2).mean()

    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)
    gen = torch.Generator().manual_seed(1)
    upper = (
        torch.randn(24, 5, generator=gen, dtype=F64),
        torch.randn(24, generator=gen, dtype=F64),
    )
    lower = (
        torch.randn(24, 5, generator=gen, dtype=F64),
        torch.randn(24, generator=gen, dtype=F64),
    )
    return problem, x0, y0, BilevelBatch(upper, lower)


class _BlackBox:
    """The same losses with the structure hidden (no features / head_loss)."""

    def __init__(self, problem):
        self.upper_loss, self.lower_loss = problem.upper_loss, problem.lower_loss


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [3, 5])  # 24 = 3 x 8; 24 = 5 + 5 + 5 + 5 + 4
def test_k_micro_batches_give_the_whole_batch_gradient(method, k):
    problem, x0, y0, batch = _regression()
    whole, m1 = _run(problem, x0, y0, batch, method)
    split, mk = _run(problem, x0, y0, batch, method, grad_accumulation=k)
    _assert_close(whole, split, 1e-6)
    for key in ("upper/loss", "lower/loss"):  # the micro-batch losses add up to the batch's
        assert float(mk[key]) == pytest.approx(float(m1[key]), rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_on_a_split_module_problem_and_features_path_is_exact(method):
    """The features-once path (a split module problem) gives the black-box iterates, whole or
    in 4 micro-batches."""
    problem, x0, y0, batch = _split_problem()
    blackbox, _ = _run(_BlackBox(problem), x0, y0, batch, method)
    whole, _ = _run(problem, x0, y0, batch, method)
    split, _ = _run(problem, x0, y0, batch, method, grad_accumulation=4)
    _assert_close(blackbox, whole, 1e-10)
    _assert_close(blackbox, split, 1e-6)


def test_the_reduction_runs_once_per_level_per_step_whatever_k():
    problem, x0, y0, batch = _regression()
    calls = []
    config = br.SolverConfig(
        method="pbgd_free", lr_x=0.01, lr_y=0.1, inner_steps=1, grad_accumulation=4
    )
    solver = config.build(problem, lambda g: calls.append(sorted(g)) or g)
    state = solver.init(x0, y0)
    for _ in range(3):
        state, _ = solver.step(state, batch)
    assert calls == [["v"], ["W"]] * 3


def test_micro_batches_weigh_samples_and_split_nested_batches():
    from bilevel_ray.solvers.accumulation import split_batch

    part = {"a": torch.arange(5.0), "b": (torch.arange(5), "tag")}
    pieces = split_batch(part, 2, "upper")
    assert [w for _, w in pieces] == [0.6, 0.4]
    assert pieces[0][0]["a"].tolist() == [0.0, 1.0, 2.0]
    assert pieces[1][0]["b"][0].tolist() == [3, 4] and pieces[1][0]["b"][1] == "tag"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: _step(_regression(), grad_accumulation=25),
            r"^grad_accumulation=25 exceeds the 24 samples of the upper batch: each micro-batch "
            r"needs a sample; use grad_accumulation <= 24$",
        ),
        (
            lambda: _step(_toy(), grad_accumulation=2),
            r"^grad_accumulation=2: the upper batch is NoneType, with no tensor of samples to "
            r"split; use grad_accumulation=1 for a problem without data$",
        ),
        (
            lambda: br.SolverConfig(grad_accumulation=0),
            r"^grad_accumulation=0: must be an integer >= 1 \(the number of micro-batches",
        ),
        (
            lambda: br.SolverConfig(grad_accumulation=2.0),
            r"^grad_accumulation=2\.0: must be an integer >= 1",
        ),
        (
            lambda: _step(_ragged(), grad_accumulation=2),
            r"^grad_accumulation=2: the upper batch's tensors have different numbers of samples "
            r"\[3, 4\];",
        ),
    ],
)
def test_accumulation_refuses(make, match):
    with pytest.raises(br.ConfigError, match=match):
        make()


def _toy():
    return (
        br.problems.NegativeToy(),
        {"x": torch.tensor([2.0], dtype=F64)},
        {"y": torch.tensor([0.0], dtype=F64)},
        BilevelBatch(None, None),
    )


def _ragged():
    problem, x0, y0, _ = _regression()
    bad = (torch.zeros(3, 10, dtype=F64), torch.zeros(4, dtype=F64))
    return problem, x0, y0, BilevelBatch(bad, bad)


def _step(setup, **options):
    problem, x0, y0, batch = setup
    return _run(problem, x0, y0, batch, "pbgd_free", steps=1, **options)


def test_br_solve_takes_grad_accumulation():
    problem, x0, y0, _ = _regression()
    spec = br.problems.BUILTIN_PROBLEMS["regression"]({"n": 200, "batch_size": 24})
    runs = [
        br.solve(problem, x0, y0, steps=4, data=spec.data, lr_x=0.01, grad_accumulation=k)
        for k in (1, 3)
    ]
    assert runs[1].config["grad_accumulation"] == 3
    for k in runs[0].x:
        assert (runs[0].x[k] - runs[1].x[k]).abs().max() <= 1e-10


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_with_accumulation_equal_one_worker_whole(ray_2cpu, tmp_path):
    """2 workers x batch 25 in 5 micro-batches each = 1 worker with batch 50, whole."""
    common = dict(steps=6, report_every=3, lr_x=0.01, lr_y=0.1, gamma=10.0, method="pbgd")
    two = br.train(
        "regression",
        problem_config={"n": 400, "batch_size": 25},
        num_workers=2,
        in_process=False,
        grad_accumulation=5,
        storage_path=tmp_path,
        name="accumulated",
        inner_steps=2,
        **common,
    )
    one = br.train(
        "regression",
        problem_config={"n": 400, "batch_size": 50},
        storage_path=tmp_path,
        name="whole",
        inner_steps=2,
        **common,
    )
    for got, want in ((two.x, one.x), (two.y, one.y)):
        for k in want:
            assert (got[k] - want[k]).abs().max() <= 1e-6
