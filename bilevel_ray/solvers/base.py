"""The solver contract and the gradient plumbing every solver shares.

A solver is a pair ``(init, step)``::

    state = solver.init(x0, y0)
    state, metrics = solver.step(state, batch)      # batch: BilevelBatch(upper, lower)

The contract (the conformance tests enforce it):

1. ``step`` returns the new state and the caller drops the old one; tensors are updated in place
   for memory, so the returned state may alias the input.
2. No tensor in a state has autograd history. Gradients come from ``torch.autograd.grad`` on
   detached leaf views, never from ``.backward()`` into ``.grad``.
3. No hidden state: the step count, optimizer moments, value-function copies and multipliers all
   live in :class:`SolverState`, which round-trips through :func:`state_to_dict` /
   :func:`state_from_dict` and ``torch.load(weights_only=True)``.
4. Every gradient a solver uses passes through the injected ``grad_reduce`` once per level and
   evaluation (identity locally, an all-reduce mean in data-parallel workers).
5. Metrics are 0-d tensors or floats; turning them into Python floats (a device sync) is the
   runtime's job, done only every ``report_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel_ray.errors import ConfigError
from bilevel_ray.schedules import positive_schedule
from bilevel_ray.tree import Params, clone, leaves

__all__ = [
    "BilevelSolver",
    "GradReduce",
    "Metrics",
    "Setting",
    "SolverState",
    "check_inner_steps",
    "check_number",
    "descend",
    "gamma_setting",
    "grads_of",
    "identity_reduce",
    "initial_state",
    "state_from_dict",
    "state_to_dict",
    "steps_setting",
]

Metrics = dict[str, Any]
GradReduce = Callable[[Params], Params]


class SolverState(NamedTuple):
    """One solver's whole state.

    ``opt`` holds one optimizer state per updated group (``"x"``, ``"y"`` and, where the method
    has them, ``"y_g"`` / ``"y_hat"``); ``extra`` holds the method's other variables (the
    value-function copy ``y_g``, a multiplier).
    """

    step: int
    x: Params
    y: Params
    opt: dict[str, Any]
    extra: dict[str, Any]


class BilevelSolver(NamedTuple):
    name: str
    init: Callable[[Params, Params], SolverState]
    step: Callable[[SolverState, Any], tuple[SolverState, Metrics]]


def initial_state(
    x0: Params,
    y0: Params,
    update_x: Any,
    update_y: Any,
    copies: Sequence[str] = (),
    in_place: bool = False,
    **numbers: float,
) -> SolverState:
    """Step 0: x and y copied from (x0, y0), and each named extra copy of y (a value-function
    copy) too; an optimizer state for every group (the copies use y's rule); ``numbers`` such as
    a multiplier go to ``extra`` as they are. ``in_place``: x and y ARE x0 and y0 (detached
    views of the same memory, updated in place), not copies: the caller opts in to having its
    tensors (e.g. a model's own parameters) be the solver's working copy."""
    if in_place:
        x = {k: v.detach() for k, v in x0.items()}
        y = {k: v.detach() for k, v in y0.items()}
    else:
        x, y = clone(x0), clone(y0)
    opt = {"x": update_x.init(x), "y": update_y.init(y)}
    extra: dict[str, Any] = dict(numbers)
    for name in copies:
        extra[name] = clone(y0)
        opt[name] = update_y.init(extra[name])
    return SolverState(0, x, y, opt, extra)


def identity_reduce(grads: Params) -> Params:
    return grads


def grads_of(
    fn: Callable[..., tuple[Tensor, Metrics]],
    groups: Sequence[Params],
    reduce: GradReduce,
) -> tuple[Tensor, Metrics, list[Params]]:
    """Gradients of ``objective, aux = fn(*groups)`` with respect to every group, in one backward.

    Each group is reduced on its own (one collective per level). A parameter the objective does
    not depend on gets a zero gradient.
    """
    inputs = [leaves(g) for g in groups]
    with torch.enable_grad():
        objective, aux = fn(*inputs)
    flat = [t for g in inputs for t in g.values()]
    if objective.requires_grad:
        flat_grads = torch.autograd.grad(objective, flat, allow_unused=True, materialize_grads=True)
    else:
        flat_grads = tuple(torch.zeros_like(t) for t in flat)
    out, i = [], 0
    for g in inputs:
        out.append(reduce(dict(zip(g, flat_grads[i : i + len(g)]))))
        i += len(g)
    return objective.detach(), aux, out


def descend(
    fn: Callable[[Params], tuple[Tensor, Metrics]],
    params: Params,
    rule: Any,
    opt_state: Any,
    t: int,
    steps: int,
    reduce: GradReduce,
) -> Metrics:
    """``steps`` updates of ``params`` (in place) along the gradient of ``fn``; returns the aux
    metrics of the last evaluation (taken before its update)."""
    aux: Metrics = {}
    for _ in range(steps):
        _, aux, (grads,) = grads_of(fn, [params], reduce)
        rule.apply(params, grads, opt_state, t)
    return aux


# An inner loop longer than this is a mistake, not a setting: one outer step would take hours
# (a sweep's pre-flight, which runs a step, would hang on it).
MAX_INNER_STEPS = 100_000


def check_inner_steps(value: Any, name: str = "inner_steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: must be an integer >= 1")
    if value > MAX_INNER_STEPS:
        shown = (
            repr(value) if len(str(value)) <= 30 else f"<an integer of {len(str(value))} digits>"
        )
        raise ConfigError(
            f"{name}={shown}: must be at most {MAX_INNER_STEPS:,} (inner steps per outer step; "
            f"a longer loop makes one step take hours), e.g. {name}=10"
        )
    return value


def check_number(name: str, value: Any, *, strict: bool, hint: str) -> float:
    """A finite number > 0 (``strict``) or >= 0; ``hint`` says what to use instead."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (0.0 < value < math.inf if strict else 0.0 <= value < math.inf)
    if not ok:
        rule = "> 0" if strict else ">= 0"
        raise ConfigError(f"{name}={value!r}: must be a finite number {rule}; {hint}")
    return float(value)


def state_to_dict(state: SolverState) -> dict[str, Any]:
    """A plain nested dict of tensors and numbers (``torch.load(weights_only=True)`` safe)."""
    return {"step": state.step, "x": state.x, "y": state.y, "opt": state.opt, "extra": state.extra}


def state_from_dict(d: Any) -> SolverState:
    keys = {"step", "x", "y", "opt", "extra"}
    if not isinstance(d, dict) or set(d) != keys:
        got = sorted(map(repr, d)) if isinstance(d, dict) else type(d).__name__
        raise ConfigError(
            f"not a solver state: expected the keys {sorted(keys)}, got {got}; load a file "
            "written by state_to_dict (a bilevel_ray checkpoint)"
        )
    if isinstance(d["step"], bool) or not isinstance(d["step"], int) or d["step"] < 0:
        raise ConfigError(f"solver state step={d['step']!r}: must be an integer >= 0")
    return SolverState(d["step"], d["x"], d["y"], d["opt"], d["extra"])


@dataclass(frozen=True)
class Setting:
    """A solver's own setting (a *knob*), declared once in its solver's file: the default, the
    check (returns the value to use, or raises ConfigError naming the fix), and whether it may
    be a schedule of the step. ``SolverConfig``, the CLI, Tune's search spaces and the flatness
    fallback derive their lists from these declarations (``solvers.SOLVER_SETTINGS``)."""

    default: Any
    check: Callable[[Any], Any]
    schedule: bool = False


def gamma_setting(default: float = 10.0) -> Setting:
    """The penalty gamma: a number or a schedule, > 0 at every step."""
    return Setting(default, lambda v: positive_schedule("gamma", v, example="10.0"), schedule=True)


def steps_setting(default: int, name: str = "inner_steps") -> Setting:
    """An iteration count >= 1 (``inner_steps`` K, or a method's own such as ``cg_steps``)."""
    return Setting(default, lambda v: check_inner_steps(v, name))
