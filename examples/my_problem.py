"""Your own bilevel problem, as a file to copy: a small MLP feature extractor (x, the upper
level) under a linear head (y, the lower level) on scikit-learn's diabetes data.

    f(x, y) = mean over the validation rows of (head_y(features_x(a)) - t)^2          (upper)
    g(x, y) = mean over the training rows of (head_y(features_x(a)) - t)^2 + r ||y||^2  (lower)

The head is fitted to the training rows for the current features; the features are chosen so
that the fitted head does well on rows it was not fitted to. A *factory* builds everything a
run needs from a plain config dict and returns a ``br.ProblemSpec``:

- ``problem``: any object with ``upper_loss(x, y, batch)`` and ``lower_loss(x, y, batch)``,
  each returning a scalar tensor (a *mean* over the batch, so that data-parallel workers
  average to the one-worker gradient); x and y are dicts of tensors;
- ``x0``, ``y0``: the starting point (dicts of floating tensors, on ``config["device"]``);
- ``data``: ``br.minibatches(upper, lower, batch_size)`` or ``br.full_batch(upper, lower)``,
  where ``upper`` and ``lower`` are tensors or tuples of tensors with one row per sample; each
  loss receives its level's batch in the same shape (here an ``(inputs, targets)`` pair);
- ``eval_data``: ``br.BilevelBatch(upper_heldout, lower_sample)``, what ``bilevel-ray tune``
  scores each trial on (the upper loss on held-out rows, and the lower-level gap);
- ``defaults``: solver settings that suit the problem (a user's ``--set`` overrides them).

The data ships with scikit-learn (no download). Run it from this file's folder::

    bilevel-ray solve my_problem.py:factory
    bilevel-ray train my_problem.py:factory --workers 2
    bilevel-ray tune my_problem.py:factory --samples 8 --max-steps 300
"""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_diabetes

import bilevel_ray as br


class HeadOnFeatures:
    """f and g of the module docstring; ``ridge`` is r."""

    def __init__(self, ridge: float = 1e-3):
        self.ridge = ridge

    @staticmethod
    def _mse(x: dict, y: dict, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        features = torch.relu(inputs @ x["w1"] + x["b1"])
        return ((features @ y["w"] + y["b"] - targets) ** 2).mean()

    def upper_loss(self, x: dict, y: dict, batch: Any) -> torch.Tensor:
        return self._mse(x, y, batch)

    def lower_loss(self, x: dict, y: dict, batch: Any) -> torch.Tensor:
        return self._mse(x, y, batch) + self.ridge * (y["w"] ** 2).sum()


def factory(config: dict[str, Any]) -> br.ProblemSpec:
    """Settings: ``hidden`` (16), ``batch_size`` (32), ``seed`` (0), and ``device`` (set by the
    runtimes)."""
    hidden = int(config.get("hidden", 16))
    batch_size = int(config.get("batch_size", 32))
    device = config.get("device") or "cpu"
    inputs, targets = load_diabetes(return_X_y=True)
    inputs = torch.tensor(inputs, dtype=torch.float32)
    targets = torch.tensor(targets, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0)
    targets = (targets - targets.mean()) / targets.std()
    # A fixed shuffle, then 60% training rows (g), 20% validation rows (f), 20% held out.
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    inputs, targets = inputs[order], targets[order]
    cut1, cut2 = int(0.6 * len(targets)), int(0.8 * len(targets))
    lower = (inputs[:cut1], targets[:cut1])
    upper = (inputs[cut1:cut2], targets[cut1:cut2])
    heldout = (inputs[cut2:], targets[cut2:])

    gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
    x0 = {
        "w1": (torch.randn(inputs.shape[1], hidden, generator=gen) / inputs.shape[1] ** 0.5),
        "b1": torch.zeros(hidden),
    }
    y0 = {"w": torch.zeros(hidden), "b": torch.zeros(())}
    return br.ProblemSpec(
        HeadOnFeatures(),
        {k: v.to(device) for k, v in x0.items()},
        {k: v.to(device) for k, v in y0.items()},
        data=br.minibatches(upper, lower, batch_size),
        defaults={"steps": 500, "lr_x": 0.01, "lr_y": 0.05, "gamma": 10.0, "optimizer": "adam"},
        eval_data=br.BilevelBatch(heldout, lower),
    )
