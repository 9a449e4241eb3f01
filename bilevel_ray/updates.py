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
from bilevel_ray.schedules import ScalarOrSchedule, positive_schedule, positive_value
from bilevel_ray.tree import Params, zeros_like

__all__ = ["OPTIMIZERS", "OPTIONS", "UpdateRule", "adam", "make_update", "sgd", "stray_options"]

OptState = dict[str, Any]


class UpdateRule(NamedTuple):
    """``init(params) -> state``; ``apply(params, grads, state, t) -> state``, params in place."""

    name: str
    init: Callable[[Params], OptState]
    apply: Callable[[Params, Params, OptState, int], OptState]


def _unit(name: str, value: Any, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        problems.append(f"{name}={value!r}: must be in [0, 1); typical values are 0.9 or 0.999")
        return 0.0
    return float(value)


def _nonnegative(name: str, value: Any, problems: list[str]) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0.0 <= value < math.inf)
    ):
        problems.append(
            f"{name}={value!r}: must be a finite number >= 0; use {name}=0.0 to disable"
        )
        return 0.0
    return float(value)


def _learning_rate(name: str, lr: Any, problems: list[str]) -> Any:
    try:
        return positive_schedule(name, lr)
    except ConfigError as err:
        problems.extend(err.problems)
        return None


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    name: str = "lr",
) -> UpdateRule:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum."""
    problems: list[str] = []
    lr_t = _learning_rate(name, lr, problems)
    momentum = _unit("momentum", momentum, problems)
    weight_decay = _nonnegative("weight_decay", weight_decay, problems)
    if nesterov and momentum == 0.0 and not problems:
        problems.append("nesterov=True needs momentum > 0; set momentum=0.9 or nesterov=False")
    if problems:
        raise ConfigError(problems)

    def init(params: Params) -> OptState:
        if momentum == 0.0:
            return {}
        return {"momentum": zeros_like(params), "count": 0}

    def apply(params: Params, grads: Params, state: OptState, t: int) -> OptState:
        p = list(params.values())
        d = [grads[k] for k in params]
        if weight_decay:
            d = torch._foreach_add(d, p, alpha=weight_decay)
        if momentum:
            bufs = [state["momentum"][k] for k in params]
            if state["count"] == 0:
                torch._foreach_copy_(bufs, d)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d)
            state["count"] += 1
            d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(p, d, alpha=-positive_value(name, lr_t, t))
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
    problems: list[str] = []
    lr_t = _learning_rate(name, lr, problems)
    b1 = b2 = 0.0
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        problems.append(f"betas={betas!r}: must be a pair (beta1, beta2) such as (0.9, 0.999)")
    else:
        b1, b2 = _unit("betas[0]", betas[0], problems), _unit("betas[1]", betas[1], problems)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < eps < math.inf):
        problems.append(f"eps={eps!r}: must be a finite number > 0; the usual value is 1e-8")
    weight_decay = _nonnegative("weight_decay", weight_decay, problems)
    if problems:
        raise ConfigError(problems)

    def init(params: Params) -> OptState:
        return {
            "count": 0,
            "m": zeros_like(params),
            "v": zeros_like(params),
        }

    def apply(params: Params, grads: Params, state: OptState, t: int) -> OptState:
        lr = positive_value(name, lr_t, t)
        p = list(params.values())
        d = [grads[k] for k in params]
        m, v = [state["m"][k] for k in params], [state["v"][k] for k in params]
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

OPTIONS = {
    "sgd": ("momentum", "weight_decay", "nesterov"),
    "adam": ("betas", "eps", "weight_decay", "decoupled_weight_decay"),
}
NEUTRAL_OPTIONS: dict[str, Any] = {
    "momentum": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "decoupled_weight_decay": False,
}


def make_update(kind: str, lr: ScalarOrSchedule, *, name: str = "lr", **options: Any) -> UpdateRule:
    """Build an update rule by name, passing it the options it takes (see :func:`stray_options`
    for refusing the ones no level takes)."""
    if not isinstance(kind, str) or kind not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer={kind!r}: unknown; choose one of {sorted(OPTIMIZERS)} "
            "(or a pair such as ('adam', 'sgd') for x and y)"
        )
    kept = {k: v for k, v in options.items() if k in OPTIONS[kind]}
    return OPTIMIZERS[kind](lr, name=name, **kept)


def stray_options(kinds: set[str], options: dict[str, Any]) -> list[str]:
    """Options set away from their neutral value that none of ``kinds`` takes (so that
    ``momentum=0.9`` with Adam is reported, not silently lost)."""
    taken = {o for k in kinds if k in OPTIONS for o in OPTIONS[k]}
    return [k for k, v in options.items() if k not in taken and v != NEUTRAL_OPTIONS.get(k)]
