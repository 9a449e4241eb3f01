"""A linear representation-learning regression with data: the minibatch reference problem.

Two groups of samples share a linear feature map W (x, upper) and a head v (y, lower)::

    f(W, v) = mean over group 0 of (X0 W v - t0)^2                  (upper: the group of interest)
    g(W, v) = mean over group 1 of (X1 W v - t1)^2 + ridge ||v||^2    (lower: the head's fit)

It is the linear analogue of the paper's fair-representation experiment (digest §3.4) and small
enough to solve full-batch, which gives minibatch runs a reference to be compared against. A
fifth more group-0 rows are held out (``eval_data``) for sweeps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel_ray.data import BilevelBatch, full_batch, minibatches
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.limits import (
    MAX_SEED,
    SEED_RANGE,
    Limit,
    check_limits,
    finite_problem,
    memory_problem,
)
from bilevel_ray.tree import Params

__all__ = ["LIMITS", "LinearRepresentation", "make_regression_data", "regression"]

# Caps on each size alone (a full-batch solve of more rows, or a wider map, is no longer a
# reference a test can afford); what they allocate together is checked against the memory.
LIMITS = {
    "n": Limit(1, 10**8, 2000, "rows per group; the data is held in memory"),
    "dim": Limit(1, 10**5, 10, "input features"),
    "features": Limit(1, 10**5, 4, "width of the learned map"),
    "seed": Limit(0, MAX_SEED, 0, SEED_RANGE),
}


class LinearRepresentation:
    def __init__(self, ridge: float = 1e-2):
        self.ridge = ridge

    @staticmethod
    def _mse(x: Params, y: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return ((inputs @ x["W"] @ y["v"] - targets) ** 2).mean()

    def upper_loss(self, x: Params, y: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._mse(x, y, batch)

    def lower_loss(self, x: Params, y: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._mse(x, y, batch) + self.ridge * (y["v"] ** 2).sum()


def make_regression_data(
    n: int = 2000,
    dim: int = 10,
    seed: int = 0,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float64,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Two groups whose targets come from related linear models (group 1's is perturbed)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(dim, generator=gen, dtype=dtype)
    w1 = w0 + 0.3 * torch.randn(dim, generator=gen, dtype=dtype)
    groups = []
    for w in (w0, w1):
        inputs = torch.randn(n, dim, generator=gen, dtype=dtype)
        targets = inputs @ w + noise * torch.randn(n, generator=gen, dtype=dtype)
        groups.append((inputs, targets))
    return groups[0], groups[1]


def regression(config: dict[str, Any] | None = None) -> ProblemSpec:
    """Minibatches of 100 per group by default; ``{"batch_size": None}`` for full batch."""
    c = factory_config(
        "regression",
        config,
        {"n": 2000, "dim": 10, "features": 4, "seed": 0, "ridge": 1e-2, "batch_size": 100},
    )
    check_limits("regression", c, LIMITS)
    n, dim = c["n"], c["dim"]
    n_test = max(n // 5, 1)  # held-out upper-level rows, for a sweep's scores
    # Two groups of n + n_test rows of dim inputs and a target, and the map W, in float64.
    need = 8 * (2 * (n + n_test) * (dim + 1) + dim * c["features"])
    problems = [
        finite_problem("regression", "ridge", c["ridge"], 0.01, low=0.0),
        memory_problem("regression", need, f"n={n} rows of dim={dim}", "lower n or dim"),
    ]
    if any(problems):
        raise ConfigError([p for p in problems if p])
    upper_all, lower_all = make_regression_data(n + n_test, dim, c["seed"])
    upper = (upper_all[0][:n], upper_all[1][:n])
    lower = (lower_all[0][:n], lower_all[1][:n])
    heldout = (upper_all[0][n:], upper_all[1][n:])
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    w0 = torch.randn(dim, c["features"], generator=gen, dtype=torch.float64)
    # The data stays on the CPU (workers move each batch); x0 and y0 go to the device.
    x0 = {"W": (w0 / dim**0.5).to(c["device"])}
    y0 = {"v": torch.zeros(c["features"], dtype=torch.float64, device=c["device"])}
    batch_size = c["batch_size"]
    data = full_batch(upper, lower) if batch_size is None else minibatches(upper, lower, batch_size)
    return ProblemSpec(
        LinearRepresentation(float(c["ridge"])),
        x0,
        y0,
        data,
        defaults={"steps": 2000, "lr_x": 0.02, "lr_y": 0.1, "gamma": 10.0},
        eval_data=BilevelBatch(heldout, lower),
    )
