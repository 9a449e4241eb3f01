"""nn.Module adapters: one model split by name, and separate upper / lower modules."""

from __future__ import annotations

import torch
from torch import nn

import bilevel_ray as br


class TinyAdapted(nn.Module):
    """A frozen backbone with a low-rank adapter (x) and an output head (y), like LoRA + lm_head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 6)
        self.lora_A = nn.Parameter(torch.randn(2, 4) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(6, 2))
        self.head = nn.Linear(6, 1)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, inputs):
        hidden = self.backbone(inputs) + self.scale * inputs @ self.lora_A.T @ self.lora_B.T
        return self.head(torch.relu(hidden)).squeeze(-1)


def _mse(forward, batch):
    inputs, targets = batch
    return ((forward(inputs) - targets) ** 2).mean()


def _data(seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 4, generator=gen)
    return inputs, inputs.sum(-1, keepdim=False) + 0.1 * torch.randn(64, generator=gen)


def test_module_problem_splits_one_model_and_freezes_the_rest():
    model = TinyAdapted()
    problem, x0, y0 = br.module_problem(
        model, x="lora_", y=r"^head\.", upper_loss=_mse, lower_loss=_mse
    )
    assert set(x0) == {"lora_A", "lora_B"} and set(y0) == {"head.weight", "head.bias"}
    batch = _data(1)
    # The adapter evaluates exactly the model's own forward at the given x and y.
    torch.testing.assert_close(problem.upper_loss(x0, y0, batch), _mse(model, batch))
    backbone = model.backbone.weight.detach().clone()
    res = br.solve(
        problem,
        x0,
        y0,
        data=br.full_batch(_data(1), _data(2)),
        steps=60,
        lr_x=0.05,
        lr_y=0.05,
        optimizer="adam",
        report_every=20,
    )
    assert not torch.equal(res.x["lora_B"], x0["lora_B"]) and not torch.equal(
        res.y["head.weight"], y0["head.weight"]
    )
    assert torch.equal(model.backbone.weight, backbone), "frozen parameters must not move"
    assert res.history["upper/loss"][-1].as_py() < res.history["upper/loss"][0].as_py()


def test_split_module_problem_prefixes_names_and_matches_the_composed_modules():
    extractor = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    head = nn.Linear(8, 1)

    def mse(fx, fy, batch):
        inputs, targets = batch
        return ((fy(fx(inputs)).squeeze(-1) - targets) ** 2).mean()

    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)
    assert set(x0) == {"upper.0.weight", "upper.0.bias"}
    assert set(y0) == {"lower.weight", "lower.bias"}
    batch = _data(3)
    expected = ((head(extractor(batch[0])).squeeze(-1) - batch[1]) ** 2).mean()
    torch.testing.assert_close(problem.lower_loss(x0, y0, batch), expected)
    # A second copy of y (a value-function head) is evaluated without touching the module.
    y_other = {k: torch.zeros_like(v) for k, v in y0.items()}
    assert float(problem.lower_loss(x0, y_other, batch)) == float((batch[1] ** 2).mean())


def test_frozen_parameters_of_separate_modules_stay_frozen():
    extractor = nn.Linear(4, 8)
    extractor.bias.requires_grad_(False)
    head = nn.Linear(8, 1)
    _, x0, _ = br.split_module_problem(
        extractor,
        head,
        upper_loss=lambda fx, fy, b: fy(fx(b[0])).sum(),
        lower_loss=lambda fx, fy, b: fy(fx(b[0])).pow(2).sum(),
    )
    assert set(x0) == {"upper.weight"}
