"""precision='bf16' | 'fp16' | 'fp32': autocast for the losses, float32 parameters and moments.

bf16 runs on the CPU for every method; fp16 needs CUDA and is refused on the CPU naming the
device; the loss scaler of fp16 halves its scale on overflow and recomputes the gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch

METHODS = sorted(br.SOLVERS)


def _split_problem(dtype=torch.float32):
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh()).to(dtype)
    head = nn.Linear(8, 1).to(dtype)
    seen = []

    def mse(fx, fy, batch):
        inputs, target = batch
        out = fy(fx(inputs)).squeeze(-1)
        seen.append(out.dtype)
        return ((out - target) ** 2).mean()

    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)
    gen = torch.Generator().manual_seed(1)
    upper = (torch.randn(32, 5, generator=gen), torch.randn(32, generator=gen))
    lower = (torch.randn(32, 5, generator=gen), torch.randn(32, generator=gen))
    return problem, x0, y0, BilevelBatch(upper, lower), seen


def _run(method, precision, steps=3, **extra):
    problem, x0, y0, batch, seen = _split_problem()
    options = {"lr_x": 0.1, "lr_y": 0.1, "inner_steps": 2, "optimizer": "adam", **extra}
    if method == "implicit_cg":
        options["cg_steps"] = 3
    solver = br.SolverConfig(method=method, precision=precision, **options).build(problem)
    state = solver.init(x0, y0)
    for _ in range(steps):
        state, metrics = solver.step(state, batch)
    return state, metrics, seen


@pytest.mark.parametrize("method", METHODS)
def test_bf16_runs_on_the_cpu_with_float32_parameters_and_moments(method):
    state, metrics, seen = _run(method, "bf16")
    assert torch.bfloat16 in seen  # the head's output came out of autocast in bfloat16
    for group in (state.x, state.y):
        assert all(t.dtype == torch.float32 for t in group.values())
    for opt in state.opt.values():
        assert all(t.dtype == torch.float32 for t in opt["m"].values())
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    # With SGD the iterates differ from fp32's by bf16's rounding of the gradients (3
    # significant digits), a small fraction of how far they moved.
    x0 = _split_problem()[1]
    low, _, _ = _run(method, "bf16", optimizer="sgd")
    reference, _, seen32 = _run(method, "fp32", optimizer="sgd")
    assert torch.bfloat16 not in seen32
    for k, v in reference.x.items():
        moved = (v - x0[k]).norm()
        assert 0 < (low.x[k] - v).norm() <= 0.05 * moved + 1e-6, k


def test_bf16_through_br_solve_and_to_dict_round_trip():
    problem, x0, y0, batch, _ = _split_problem()
    res = br.solve(
        problem,
        x0,
        y0,
        steps=4,
        data=br.full_batch(batch.upper, batch.lower),
        precision="bf16",
        grad_accumulation=2,
    )
    assert res.config["precision"] == "bf16" and res.config["grad_accumulation"] == 2
    config = br.SolverConfig(precision="bf16", grad_accumulation=2)
    assert br.SolverConfig.from_dict(config.to_dict()) == config
    assert br.SolverConfig().to_dict()["precision"] == "fp32"


def test_fp16_on_the_cpu_is_refused_naming_the_device():
    problem, x0, y0, batch, _ = _split_problem()
    solver = br.SolverConfig(precision="fp16").build(problem)
    match = (
        r"^precision='fp16' needs a CUDA device, but the parameters are on cpu: float16 "
        r"autocast with loss scaling is a GPU feature; use precision='bf16' \(supported on the "
        r"CPU\) or 'fp32'$"
    )
    with pytest.raises(br.ConfigError, match=match):
        solver.init(x0, y0)
    with pytest.raises(br.ConfigError, match=match):
        br.solve(problem, x0, y0, steps=2, data=br.full_batch(*batch), precision="fp16")


@pytest.mark.parametrize("value", ["fp8", "bfloat16", None, 16])
def test_unknown_precision_is_refused(value):
    with pytest.raises(
        br.ConfigError,
        match=rf"^precision={value!r}: must be one of 'fp32', 'bf16', 'fp16'; use 'bf16' for "
        r"mixed precision on the CPU or a recent GPU, 'fp16' on older CUDA GPUs$",
    ):
        br.SolverConfig(precision=value)


def test_fp16_loss_scale_halves_on_overflow_and_recomputes(monkeypatch):
    """The scaler's logic, run on the CPU with the device check lifted: d/dx of
    sum(1000 x) through float16 overflows at the scale 2^16 (6.6e7 > 65504) until the scale is
    2^6, and the gradient then is exactly 1000."""
    from bilevel_ray.solvers.compute import Compute

    class Overflowing:
        def upper_loss(self, x, y, batch):
            return (x["x"].half() * 1000.0).sum().float()

        def lower_loss(self, x, y, batch):
            return (y["y"] ** 2).sum()

    compute = Compute(Overflowing(), lambda g: g, precision="fp16")
    monkeypatch.setattr(compute, "check_device", lambda x: torch.device("cpu"))
    x0, y0 = {"x": torch.ones(3)}, {"y": torch.zeros(1)}
    state = compute.init(x0, y0, br.sgd(0.1), br.sgd(0.1))
    assert state.extra == {"loss_scale": 2.0**16, "loss_scale_streak": 0}
    ev = compute.at(state.x, BilevelBatch(None, None), state.extra)
    _, _, (grad,) = ev.grads(lambda L, x_: (L.upper(x_, state.y), {}), [ev.x])
    assert state.extra["loss_scale"] == 2.0**6 and state.extra["loss_scale_streak"] == 1
    assert torch.equal(grad["x"], torch.full((3,), 1000.0))
