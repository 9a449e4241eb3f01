"""Per-level update rules (optimizers) over ``Params``, as ``(init, apply)`` pairs.

They reproduce ``torch.optim.SGD`` and ``torch.optim.Adam`` / ``AdamW`` exactly (to rounding), with
two differences that the solvers need: the state is a plain dict (it checkpoints with
``torch.save`` and loads with ``weights_only=True``), and the step size is read from a schedule
at the solver's step ``t``. Parameters are updated in place with ``torch._foreach_*`` kernels,
the same multi-tensor path ``torch.optim`` takes by default.

SGD (heavy ball), with weight decay ``wd`` and momentum ``mu``::

    d = grad + wd * p;   b = d (first step) or mu * b + d
    p <- p - lr_t * (d + mu * b if nesterov else b)

Adam (Kingma & Ba 2015; AdamW when ``decoupled_weight_decay``)::

    m <- b1 m + (1 - b1) d;   v <- b2 v + (1 - b2) d^2
    p <- p - lr_t / (1 - b1^n) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.schedules import ScalarOrSchedule, positive_schedule
from bilevel_ray.tree import Params

__all__ = ["OPTIMIZERS", "UpdateRule", "adam", "make_update", "sgd"]

OptState = dict[str, Any]


class UpdateRule(NamedTuple):
    """``init(params) -> state``; ``apply(params, grads, state, t) -> state``, params in place."""

    name: str
    init: Callable[[Params], OptState]
    apply: Callable[[Params, Params, OptState, int], OptState]


def _check_unit(name: str, value: float, *, upper_open: bool = True) -> float:
    if not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ConfigError(f"{name}={value!r}: must be in [0, 1); typical values are 0.9 or 0.999")
    return float(value)


def _check_nonneg(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not (0.0 <= value < math.inf):
        raise ConfigError(
            f"{name}={value!r}: must be a finite number >= 0; use {name}=0.0 to disable"
        )
    return float(value)


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    name: str = "lr",
) -> UpdateRule:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum."""
    lr_t = positive_schedule(name, lr)
    momentum = _check_unit("momentum", momentum)
    weight_decay = _check_nonneg("weight_decay", weight_decay)
    if nesterov and momentum == 0.0:
        raise ConfigError("nesterov=True needs momentum > 0; set momentum=0.9 or nesterov=False")

    def init(params: Params) -> OptState:
        if momentum == 0.0:
            return {}
        return {"momentum": {k: torch.zeros_like(v) for k, v in params.items()}, "count": 0}

    def apply(params: Params, grads: Params, state: OptState, t: int) -> OptState:
        p = list(params.values())
        d = [grads[k] for k in params]
        if weight_decay:
            d = torch._foreach_add(d, p, alpha=weight_decay)
        if momentum:
            bufs = list(state["momentum"].values())
            if state["count"] == 0:
                torch._foreach_copy_(bufs, d)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d)
            state["count"] += 1
            d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(p, d, alpha=-lr_t(t))
        return state

    return UpdateRule("sgd", init, apply)


def adam(
    lr: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    name: str = "lr",
) -> UpdateRule:
    """Adam; AdamW (the official LLM code's optimizer) with ``decoupled_weight_decay=True``."""
    lr_t = positive_schedule(name, lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas={betas!r}: must be a pair (beta1, beta2) such as (0.9, 0.999)")
    b1, b2 = _check_unit("betas[0]", betas[0]), _check_unit("betas[1]", betas[1])
    if not isinstance(eps, (int, float)) or not (0.0 < eps < math.inf):
        raise ConfigError(f"eps={eps!r}: must be > 0; the usual value is 1e-8")
    weight_decay = _check_nonneg("weight_decay", weight_decay)

    def init(params: Params) -> OptState:
        return {
            "count": 0,
            "m": {k: torch.zeros_like(v) for k, v in params.items()},
            "v": {k: torch.zeros_like(v) for k, v in params.items()},
        }

    def apply(params: Params, grads: Params, state: OptState, t: int) -> OptState:
        lr = lr_t(t)
        p = list(params.values())
        d = [grads[k] for k in params]
        m, v = list(state["m"].values()), list(state["v"].values())
        if weight_decay and decoupled_weight_decay:
            torch._foreach_mul_(p, 1.0 - lr * weight_decay)
        elif weight_decay:
            d = torch._foreach_add(d, p, alpha=weight_decay)
        state["count"] += 1
        n = state["count"]
        torch._foreach_lerp_(m, d, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, d, d, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1.0 - b2**n))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, value=-lr / (1.0 - b1**n))
        return state

    return UpdateRule("adam", init, apply)


OPTIMIZERS: dict[str, Callable[..., UpdateRule]] = {"sgd": sgd, "adam": adam}

_OPTIONS = {
    "sgd": ("momentum", "weight_decay", "nesterov"),
    "adam": ("betas", "eps", "weight_decay", "decoupled_weight_decay"),
}


def make_update(kind: str, lr: ScalarOrSchedule, *, name: str = "lr", **options: Any) -> UpdateRule:
    """Build an update rule by name; options that do not apply to ``kind`` are ignored only when
    they hold their neutral value, so that ``momentum=0.9`` with Adam is reported, not lost."""
    if kind not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer={kind!r}: unknown; choose one of {sorted(OPTIMIZERS)} "
            "(or a pair such as ('adam', 'sgd') for x and y)"
        )
    neutral = {
        "momentum": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "decoupled_weight_decay": False,
    }
    stray = [k for k, v in options.items() if k not in _OPTIONS[kind] and v != neutral.get(k)]
    if stray:
        raise ConfigError(
            f"optimizer={kind!r} does not take {', '.join(stray)}; it takes "
            f"{', '.join(_OPTIONS[kind])} (drop the others or choose the other optimizer)"
        )
    kept = {k: v for k, v in options.items() if k in _OPTIONS[kind]}
    return OPTIMIZERS[kind](lr, name=name, **kept)
