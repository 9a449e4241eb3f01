"""Features once per step: where x is a feature extractor and y a head, the inner loops run the
head alone; a black-box problem's lower-level steps never record a graph of x."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch

METHODS = sorted(br.SOLVERS)


class Counting(nn.Module):
    """An extractor that counts its forward passes and whether autograd recorded them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.calls = []

    def forward(self, inputs):
        out = self.net(inputs)
        self.calls.append(out.requires_grad)
        return out


def _setup(loss=None):
    torch.manual_seed(0)
    extractor, head = Counting().double(), nn.Linear(6, 1).double()

    def mse(fx, fy, batch):
        inputs, target = batch
        return ((fy(fx(inputs)).squeeze(-1) - target) ** 2).mean()

    loss = loss or mse
    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=loss, lower_loss=loss)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    targets = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(2)]
    batch = BilevelBatch((data[0], targets[0]), (data[1], targets[1]))
    return problem, x0, y0, batch, extractor


def _step(problem, x0, y0, batch, method, **options):
    options = {"lr_x": 0.01, "lr_y": 0.1, **options}
    if method == "implicit_cg":
        options["cg_steps"] = 2
    solver = br.SolverConfig(method=method, **options).build(problem)
    state = solver.init(x0, y0)
    return solver.step(state, batch)


@pytest.mark.parametrize("method", METHODS)
def test_the_extractor_runs_once_per_level_and_step_whatever_k(method):
    problem, x0, y0, batch, extractor = _setup()
    _step(problem, x0, y0, batch, method, inner_steps=5)
    # PBGD-Free differentiates only f in x: the lower features are computed without a graph.
    want = [True, False] if method == "pbgd_free" else [True, True]
    assert sorted(extractor.calls, reverse=True) == want


def test_with_accumulation_the_x_step_recomputes_one_micro_batch_at_a_time():
    problem, x0, y0, batch, extractor = _setup()
    _step(problem, x0, y0, batch, "pbgd_free", inner_steps=3, grad_accumulation=2)
    # detached features once per micro-batch and level (4), then f's features with a graph
    # for the x step, one micro-batch at a time (2)
    assert sorted(extractor.calls) == [False] * 4 + [True] * 2


@pytest.mark.parametrize(
    "loss",
    [
        # a new but equal tensor each call: replayed
        lambda fx, fy, b: ((fy(fx(b[0] * 1.0)).squeeze(-1) - b[1]) ** 2).mean(),
        # the extractor's input depends on y: it cannot be replayed and runs live
        lambda fx, fy, b: (
            (fx(b[0] * fy(torch.ones(1, 6, dtype=torch.float64))).sum(-1) - b[1]) ** 2
        ).mean(),
    ],
    ids=["equal-input", "input-depends-on-y"],
)
def test_a_loss_of_any_shape_is_evaluated_exactly(loss):
    problem, x0, y0, batch, _ = _setup(loss)
    state, _ = _step(problem, x0, y0, batch, "pbgd_free", inner_steps=2)

    class BlackBox:
        upper_loss, lower_loss = problem.upper_loss, problem.lower_loss

    ref, _ = _step(BlackBox(), x0, y0, batch, "pbgd_free", inner_steps=2)
    for group in ("x", "y"):
        for k, v in getattr(ref, group).items():
            assert torch.allclose(getattr(state, group)[k], v, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_a_black_box_lower_level_step_never_records_x(method):
    """The lower-level evaluations (y differentiated alone) get x without requires_grad, so no
    graph of x is built; x requires grad only in the step's final, x-differentiating phase."""
    spec = br.problems.BUILTIN_PROBLEMS["regression"]({"n": 100, "batch_size": 10})
    seen = []

    class Spy:
        def upper_loss(self, x, y, batch):
            seen.append((x["W"].requires_grad, y["v"].requires_grad))
            return spec.problem.upper_loss(x, y, batch)

        def lower_loss(self, x, y, batch):
            seen.append((x["W"].requires_grad, y["v"].requires_grad))
            return spec.problem.lower_loss(x, y, batch)

    batch = next(br.data.as_batches(spec.data, 0))
    _step(Spy(), spec.x0, spec.y0, batch, method, inner_steps=3)
    first_x = next(i for i, (x_grad, _) in enumerate(seen) if x_grad)
    inner = [i for i, (x_grad, y_grad) in enumerate(seen) if y_grad and not x_grad]
    assert len(inner) >= 3 and max(inner) < first_x
    if method == "pbgd_free":  # 3 x (f, g) at x_t fixed, then f for the x step
        assert seen == [(False, True)] * 6 + [(True, False)]
