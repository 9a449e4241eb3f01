"""Small networks on scikit-learn's bundled data sets, written as a new user would write them:
an MLP feature extractor (x, the upper level) under a linear head (y, the lower level).

    g(x, y) = mean loss of head_y(features_x(a)) on the training rows + ridge ||y||^2   (lower)
    f(x, y) = mean loss of the same on the validation rows                               (upper)

The loss is cross-entropy for the classification sets (``wine``, ``breast_cancer``,
``digits``) and squared error for ``diabetes``. Rows are shuffled once (seed 0) and split into
half for g, a quarter for f and a quarter held out (``eval_data``). The features are
standardised with the training rows' mean and spread. No download: the data ships with
scikit-learn.

    bilevel-ray diagnose examples/sklearn_nets.py:wine
    bilevel-ray solve examples/sklearn_nets.py:wine --method alt_pbgd
    bilevel-ray compare examples/sklearn_nets.py:wine --budget 20

Settings (``--config KEY=VALUE``): ``hidden`` ("32,16": the MLP's widths), ``batch_size``
(32), ``seed`` (0: the network's initial weights; the split is fixed), ``ridge`` (1e-3),
``dtype`` ("float32"), and ``device`` (set by the runtimes).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

import bilevel_ray as br

__all__ = ["HeadOnMLP", "breast_cancer", "diabetes", "digits", "factory", "wine"]


class HeadOnMLP:
    """f and g of the module docstring for an MLP of ``layers`` tanh layers (x: ``w0, b0, w1,
    b1, ...``) and a linear head (y: ``w, b``)."""

    def __init__(self, layers: int, classify: bool, ridge: float):
        self.layers, self.classify, self.ridge = layers, classify, ridge

    def _loss(self, x: dict, y: dict, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        h = inputs
        for i in range(self.layers):
            h = torch.tanh(h @ x[f"w{i}"] + x[f"b{i}"])
        out = h @ y["w"] + y["b"]
        if self.classify:
            return F.cross_entropy(out, targets)
        return ((out.squeeze(-1) - targets) ** 2).mean()

    def upper_loss(self, x: dict, y: dict, batch: Any) -> torch.Tensor:
        return self._loss(x, y, batch)

    def lower_loss(self, x: dict, y: dict, batch: Any) -> torch.Tensor:
        return self._loss(x, y, batch) + self.ridge * (y["w"] ** 2).sum()


def _load(name: str) -> tuple[Any, Any, bool]:
    from sklearn import datasets

    loader = {
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
        "digits": datasets.load_digits,
    }[name]
    inputs, targets = loader(return_X_y=True)
    return inputs, targets, name != "diabetes"


def build(name: str, config: dict[str, Any]) -> br.ProblemSpec:
    """The problem on data set ``name`` with the module docstring's settings."""
    known = {"hidden", "batch_size", "seed", "ridge", "dtype", "device"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise br.ConfigError(f"{name}: no setting(s) {unknown}; its settings are {sorted(known)}")
    widths = [int(w) for w in str(config.get("hidden", "32,16")).split(",") if w.strip()]
    batch_size = int(config.get("batch_size", 32))
    ridge = float(config.get("ridge", 1e-3))
    dtype = getattr(torch, str(config.get("dtype", "float32")))
    device = config.get("device") or "cpu"
    raw_inputs, raw_targets, classify = _load(name)
    inputs = torch.tensor(raw_inputs, dtype=dtype)
    targets = torch.tensor(raw_targets, dtype=torch.long if classify else dtype)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    inputs, targets = inputs[order].to(device), targets[order].to(device)
    half, three_quarters = len(targets) // 2, (3 * len(targets)) // 4
    mean, spread = inputs[:half].mean(0), inputs[:half].std(0).clamp_min(1e-6)
    inputs = (inputs - mean) / spread
    if not classify:
        targets = (targets - targets[:half].mean()) / targets[:half].std()
    lower = (inputs[:half], targets[:half])
    upper = (inputs[half:three_quarters], targets[half:three_quarters])
    heldout = (inputs[three_quarters:], targets[three_quarters:])
    outputs = int(targets.max()) + 1 if classify else 1

    gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
    x0: dict[str, torch.Tensor] = {}
    sizes = [inputs.shape[1], *widths]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        x0[f"w{i}"] = torch.randn(fan_in, fan_out, generator=gen, dtype=dtype) / fan_in**0.5
        x0[f"b{i}"] = torch.zeros(fan_out, dtype=dtype)
    y0 = {"w": torch.zeros(sizes[-1], outputs, dtype=dtype), "b": torch.zeros(outputs, dtype=dtype)}
    return br.ProblemSpec(
        HeadOnMLP(len(widths), classify, ridge),
        {k: v.to(device) for k, v in x0.items()},
        {k: v.to(device) for k, v in y0.items()},
        data=br.minibatches(upper, lower, batch_size),
        defaults={"steps": 3000, "lr_x": 0.01, "lr_y": 0.05, "gamma": 10.0, "optimizer": "adam"},
        eval_data=br.BilevelBatch(heldout, lower),
    )


def wine(config: dict[str, Any]) -> br.ProblemSpec:
    """178 wines, 13 features, 3 classes: 89 rows for g, 44 for f, 45 held out."""
    return build("wine", config)


def breast_cancer(config: dict[str, Any]) -> br.ProblemSpec:
    """569 tumours, 30 features, 2 classes."""
    return build("breast_cancer", config)


def diabetes(config: dict[str, Any]) -> br.ProblemSpec:
    """442 patients, 10 features, a real-valued target (squared error)."""
    return build("diabetes", config)


def digits(config: dict[str, Any]) -> br.ProblemSpec:
    """1797 8x8 images, 64 features, 10 classes."""
    return build("digits", config)


factory = wine
