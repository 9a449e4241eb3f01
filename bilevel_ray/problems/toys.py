"""The PBGD-Free paper's two toy problems (digest §3.1, §3.2), with their known answers.

Negative toy (flatness fails)::

    f(x, y) = 10 y + x^2,   g(x, y) = (y - x + 1)^2
    y*(x) = x - 1,  phi(x) = 10 (x - 1) + x^2,  phi'(x) = 2x + 10   =>  x* = -5, y* = -6
    y_gamma(x) = x - 1 - 5 / gamma

PBGD-Free follows grad_x f = 2x and stops at x = 0, where phi'(0) = 10: the dropped term
gamma * (grad_x g(x, y_gamma) - grad_x g(x, y*)) equals 10 for every gamma.

Positive toy (SFT as the lower level, DPO as the upper level, on a 2-weight softmax model): the
logits of input row X are z_j = w1 X[2j] + w2 X[2j+1], j = 0, 1 (a Conv1d with kernel 2 and
stride 2), x = w1, y = w2::

    g = mean NLL(softmax(z(X1)), labels) + 0.01 ||w||^2
    f = -mean log sigmoid( beta [ log pi(yw)/pi(yl) - log pi_ref(yw)/pi_ref(yl) ] ) + 0.01 ||w||^2

with beta = 1 and pi_ref the model at W_REF. The bilevel solution is x* ~ -6.2, y* ~ 6.22
(phi ~ 1.272); PBGD lands near it and PBGD-Free at ~ (-7.16, 6.64), in its flatness floor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel_ray.data import BilevelBatch
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.limits import shown
from bilevel_ray.tree import Params

__all__ = ["NegativeToy", "PositiveToy", "negative_toy", "positive_toy"]


class NegativeToy:
    x_star = -5.0
    y_star = -6.0

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return (10.0 * y["y"] + x["x"] ** 2).sum()

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return ((y["y"] - x["x"] + 1.0) ** 2).sum()

    def lower_solution(self, x: Params) -> Params:
        return {"y": x["x"] - 1.0}

    def perturbed_solution(self, x: Params, gamma: float) -> Params:
        """argmin_y f / gamma + g."""
        return {"y": x["x"] - 1.0 - 5.0 / gamma}

    def hypergradient(self, x: Params) -> Params:
        """phi'(x) = 2x + 10."""
        return {"x": 2.0 * x["x"] + 10.0}


def negative_toy(config: dict[str, Any] | None = None) -> ProblemSpec:
    """The negative toy from x0 = 2, y0 = 0 (inside the notebook's init box)."""
    c = factory_config("toy-negative", config, {"dtype": "float64", "x0": 2.0, "y0": 0.0})
    for key in ("x0", "y0"):
        if isinstance(c[key], bool) or not isinstance(c[key], (int, float)):
            raise ConfigError(
                f"problem 'toy-negative': {key}={shown(c[key])}: must be a number, e.g. "
                f"--config {key}=2.0"
            )
        if isinstance(c[key], int) and abs(c[key]) >= 2**63:
            # Python holds it; float() and torch do not (an OverflowError in torch.tensor).
            raise ConfigError(
                f"problem 'toy-negative': {key}={shown(c[key])}: too large; must be below "
                f"2**63 in size, e.g. --config {key}=2.0"
            )
    like = {"dtype": c["dtype"], "device": c["device"]}
    return ProblemSpec(
        NegativeToy(),
        {"x": torch.tensor([float(c["x0"])], **like)},
        {"y": torch.tensor([float(c["y0"])], **like)},
        defaults={"steps": 3000, "lr_x": 0.01, "lr_y": 0.1, "gamma": 10.0},
        eval_data=BilevelBatch(None, None),  # deterministic: "held-out" is the problem itself
    )


# Rows of X are model inputs of length 4 (digest §3.2).
SFT_INPUTS = ((1.0, 1.0, 0.5, 0.5), (1.0, 0.5, 0.0, 0.5))
SFT_LABELS = (0, 1)
DPO_INPUTS = ((0.5, 1.0, 1.0, 1.0), (1.0, 0.5, 0.5, 0.5))
DPO_CHOSEN = (0, 1)
# The reference policy: Adam (lr 1e-2, 2000 steps) on the NLL of (DPO_INPUTS, DPO_CHOSEN) from
# W_INIT, as in the official notebook; tests/test_toys.py re-derives it.
W_INIT = (5.0, -9.9)
W_REF = (-5.3396, -9.9375)


def toy_logits(w1: Tensor, w2: Tensor, inputs: Tensor) -> Tensor:
    """z_j = w1 X[2j] + w2 X[2j+1]: the Conv1d(1, 1, kernel 2, stride 2) of the notebook."""
    return w1 * inputs[:, 0::2] + w2 * inputs[:, 1::2]


class PositiveToy:
    def __init__(
        self,
        dtype: torch.dtype = torch.float64,
        beta: float = 1.0,
        reg: float = 0.01,
        device: str | torch.device | None = None,
    ):
        self.beta, self.reg = beta, reg
        self.sft_inputs = torch.tensor(SFT_INPUTS, dtype=dtype, device=device)
        self.sft_labels = torch.tensor(SFT_LABELS, device=device)
        self.dpo_inputs = torch.tensor(DPO_INPUTS, dtype=dtype, device=device)
        self.chosen = torch.tensor(DPO_CHOSEN, device=device)
        w_ref = torch.tensor(W_REF, dtype=dtype, device=device)
        ref_logp = F.log_softmax(toy_logits(w_ref[0], w_ref[1], self.dpo_inputs), dim=-1)
        self.ref_margin = self._margin(ref_logp)

    def _margin(self, logp: Tensor) -> Tensor:
        rows = torch.arange(len(self.chosen), device=logp.device)
        return logp[rows, self.chosen] - logp[rows, 1 - self.chosen]

    def _l2(self, x: Params, y: Params) -> Tensor:
        return self.reg * (x["w1"] ** 2 + y["w2"] ** 2).sum()

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        logp = F.log_softmax(toy_logits(x["w1"], y["w2"], self.dpo_inputs), dim=-1)
        margin = self.beta * (self._margin(logp) - self.ref_margin)
        return -F.logsigmoid(margin).mean() + self._l2(x, y)

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        logits = toy_logits(x["w1"], y["w2"], self.sft_inputs)
        return F.cross_entropy(logits, self.sft_labels) + self._l2(x, y)


def positive_toy(config: dict[str, Any] | None = None) -> ProblemSpec:
    """The positive toy from the notebook's start w = (5, -9.9)."""
    c = factory_config("toy-positive", config, {"dtype": "float64"})
    like = {"dtype": c["dtype"], "device": c["device"]}
    return ProblemSpec(
        PositiveToy(**like),
        {"w1": torch.tensor([W_INIT[0]], **like)},
        {"w2": torch.tensor([W_INIT[1]], **like)},
        defaults={"steps": 40000, "lr_x": 0.01, "lr_y": 0.01, "gamma": 16.0, "inner_steps": 2},
        eval_data=BilevelBatch(None, None),
    )
