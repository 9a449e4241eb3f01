"""How a solver evaluates losses and gradients in one step: precision, accumulation, features.

Every solver builds one :class:`Compute` from its settings and, at each step, one
:class:`StepEval` for the step's batch. Objectives are written against :class:`Losses`, the
problem's f and g on one micro-batch::

    ev = compute.at(state.x, batch, state.extra)
    objective = lambda L, y_: (L.upper(ev.x, y_) / gamma + L.lower(ev.x, y_), {})
    value, aux, (grad_y,) = ev.grads(objective, [y])

``ev.grads`` sums the gradient over the micro-batches of ``grad_accumulation``
(:mod:`~bilevel_ray.solvers.accumulation`; ``L.upper`` and ``L.lower`` return the weighted
micro-batch losses, so the aux metrics sum to the whole batch's too), runs every forward under
the autocast of ``precision`` (:mod:`~bilevel_ray.solvers.precision`; fp16 with loss scaling), and
passes each group's sum through the injected reduction once.

**x is passed as one of two objects.** ``ev.x`` is x_t held fixed: a lower-level step. It is the
state's tensors, which never require grad, so no lower-level step records a graph of x (for a
black-box problem the forward through x's part of the model runs without autograd). ``ev.xl``
is x_t as the leaves the step differentiates in x (the same leaves for the whole step).

**Features once per step.** A problem that declares its structure, i.e. has the two methods of
:class:`~bilevel_ray.problem.FeatureProblem` (``br.split_module_problem`` problems have them,
and so does the PEFT problem)::

    level_loss(x, y, b) == head_loss(y, features(x, b, level), b, level)

is evaluated through them: the features of x_t are computed once per step and level, with
autograd at ``ev.xl`` for the levels whose x-gradient the step will take (``attach``), and
reused, detached, by every lower-level step; the x step runs only the head and backpropagates
through the stored graph. With ``grad_accumulation > 1`` the detached features are still
computed once per micro-batch, but the x step recomputes them with autograd one micro-batch at
a time (holding every micro-batch's graph would undo what accumulation saves).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, detach_features, has_features
from bilevel_ray.solvers.accumulation import check_accumulation, split_batch
from bilevel_ray.solvers.base import GradReduce, Metrics, SolverState, initial_state
from bilevel_ray.solvers.precision import (
    GROWTH_INTERVAL,
    INITIAL_SCALE,
    MAX_HALVINGS,
    autocast,
    check_device,
    check_precision,
)
from bilevel_ray.tree import Params, leaves

__all__ = ["Compute", "LossReturnError", "Losses", "StepEval", "check_in_place"]

LEVELS = ("upper", "lower")


class LossReturnError(ConfigError):
    """A loss returned something other than a scalar floating tensor during the run; the
    runtime that knows the step adds it (:meth:`at_step`)."""

    def __init__(self, name: str, got: str, step: int | None = None):
        self.name, self.got, self.step = name, got, step
        at = "" if step is None else f" at step {step + 1}"
        super().__init__(
            f"{name} returned {got}{at}: it must return a scalar (0-d) floating tensor at every "
            "step; reduce it with .mean() or .sum() and return the tensor (not .item())"
        )

    def at_step(self, step: int) -> LossReturnError:
        return LossReturnError(self.name, self.got, step)


def check_loss_return(name: str, loss: Any) -> Tensor:
    """The guard around every call of a user's loss: a wrong return is a clear error naming the
    loss (the user's own exceptions propagate as they are)."""
    if not isinstance(loss, Tensor):
        raise LossReturnError(name, f"a {type(loss).__name__}")
    if loss.dim() != 0:
        raise LossReturnError(name, f"a tensor of shape {tuple(loss.shape)}")
    if not (loss.is_floating_point() or loss.is_complex()):
        raise LossReturnError(name, f"a tensor of dtype {loss.dtype}")
    return loss


def check_in_place(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"in_place={value!r}: must be True (the solver updates x0 and y0 themselves: one copy "
            "of the parameters) or False (it works on copies; the default)"
        )
    return value


class Compute:
    """A solver's evaluation settings: the problem, the reduction, precision, accumulation,
    and whether x0 / y0 are the working copy (``in_place``)."""

    def __init__(
        self,
        problem: BilevelProblem,
        reduce: GradReduce,
        precision: str = "fp32",
        grad_accumulation: int = 1,
        in_place: bool = False,
    ):
        self.problem, self.reduce = problem, reduce
        self.precision = check_precision(precision)
        self.k = check_accumulation(grad_accumulation)
        self.in_place = check_in_place(in_place)
        self.structured = has_features(problem)
        self._checked: set[torch.device] = set()

    def check_device(self, x: Params) -> torch.device:
        device = next(iter(x.values())).device
        if device not in self._checked:
            check_device(self.precision, device)
            self._checked.add(device)
        return device

    def init(
        self,
        x0: Params,
        y0: Params,
        update_x: Any,
        update_y: Any,
        copies: Sequence[str] = (),
        **numbers: float,
    ) -> SolverState:
        """:func:`~bilevel_ray.solvers.base.initial_state`, after refusing a precision the
        device of x0 cannot run; with fp16, the loss scale starts in ``extra``; with
        ``in_place``, x and y are x0 and y0 themselves."""
        self.check_device(x0)
        if self.precision == "fp16":
            numbers = {**numbers, "loss_scale": INITIAL_SCALE, "loss_scale_streak": 0}
        return initial_state(x0, y0, update_x, update_y, copies, in_place=self.in_place, **numbers)

    def at(
        self,
        x: Params,
        batch: Any,
        extra: dict[str, Any] | None = None,
        attach: Sequence[str] = LEVELS,
    ) -> StepEval:
        """The evaluation of one step at x_t = ``x`` on ``batch``; ``attach`` names the levels
        whose loss the step differentiates in x (their features keep their graph)."""
        return StepEval(self, x, batch, {} if extra is None else extra, tuple(attach))


class StepEval:
    """One step's batch split into micro-batches, x_t fixed (``x``) and as leaves (``xl``)."""

    def __init__(
        self, compute: Compute, x: Params, batch: Any, extra: dict[str, Any], attach: tuple
    ):
        self.compute, self.x, self.extra, self.attach = compute, x, extra, attach
        self.device = compute.check_device(x)
        self.xl = leaves(x)
        self.keep_graph = compute.structured and compute.k == 1
        uppers = split_batch(batch.upper, compute.k, "upper")
        lowers = split_batch(batch.lower, compute.k, "lower")
        self.micro = [Losses(self, u, wu, low, wl) for (u, wu), (low, wl) in zip(uppers, lowers)]

    def grads(
        self,
        fn: Callable[..., tuple[Tensor, Metrics]],
        groups: Sequence[Params],
        reduce: Sequence[bool] | None = None,
    ) -> tuple[Tensor, Metrics, list[Params]]:
        """``objective, aux = fn(L, *groups)`` and its gradient in every group, summed over the
        micro-batches (and aux summed likewise), each group reduced once (unless ``reduce``
        says otherwise for it). ``ev.x`` among the groups is differentiated as ``ev.xl``."""
        inputs = [self.xl if g is self.x else leaves(g) for g in groups]
        flat = [t for g in inputs for t in g.values()]
        # At least one micro-batch (k >= 1): the first starts the sums.
        first, *rest = self.micro
        value, aux_sum, grads = self._one(fn, first, inputs, flat)
        total, aux_sum = list(grads), dict(aux_sum)
        for losses in rest:
            objective, aux, grads = self._one(fn, losses, inputs, flat)
            torch._foreach_add_(total, list(grads))
            value = value + objective
            for key, v in aux.items():
                aux_sum[key] = aux_sum[key] + v if key in aux_sum else v
        out, i = [], 0
        for j, g in enumerate(inputs):
            part = dict(zip(g, total[i : i + len(g)]))
            out.append(self.compute.reduce(part) if reduce is None or reduce[j] else part)
            i += len(g)
        return value, aux_sum, out

    def _one(
        self, fn: Callable[..., Any], losses: Losses, inputs: list[Params], flat: list[Tensor]
    ) -> tuple[Tensor, Metrics, Sequence[Tensor]]:
        scaled = self.compute.precision == "fp16"
        for _ in range(MAX_HALVINGS):
            with torch.enable_grad(), autocast(self.compute.precision, self.device):
                objective, aux = fn(losses, *inputs)
            if not objective.requires_grad:
                return objective.detach(), aux, [torch.zeros_like(t) for t in flat]
            scale = float(self.extra["loss_scale"]) if scaled else 1.0
            grads = torch.autograd.grad(
                objective * scale if scaled else objective,
                flat,
                allow_unused=True,
                materialize_grads=True,
                retain_graph=self.keep_graph,
            )
            if not scaled:
                return objective.detach(), aux, grads
            if self._unscale(grads, scale):
                return objective.detach(), aux, grads
        raise FloatingPointError(
            f"precision='fp16': the gradient stayed non-finite after {MAX_HALVINGS} halvings of "
            "the loss scale; the loss itself is not finite (lower the step sizes)"
        )

    def _unscale(self, grads: Sequence[Tensor], scale: float) -> bool:
        """Divide by the loss scale; on a non-finite gradient halve the scale and say so."""
        torch._foreach_div_(list(grads), scale)
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if not finite:
            self.extra["loss_scale"] = scale / 2
            self.extra["loss_scale_streak"] = 0
            return False
        streak = int(self.extra["loss_scale_streak"]) + 1
        if streak >= GROWTH_INTERVAL:
            self.extra["loss_scale"], streak = scale * 2, 0
        self.extra["loss_scale_streak"] = streak
        return True

    def descend(
        self,
        fn: Callable[..., tuple[Tensor, Metrics]],
        params: Params,
        rule: Any,
        opt_state: Any,
        t: int,
        steps: int,
    ) -> Metrics:
        """``steps`` updates of ``params`` (in place) along the gradient of ``fn(L, params)``;
        the aux metrics of the last evaluation (taken before its update)."""
        aux: Metrics = {}
        for _ in range(steps):
            _, aux, (grads,) = self.grads(fn, [params])
            rule.apply(params, grads, opt_state, t)
        return aux


class Losses:
    """f and g on one micro-batch, times its weight ``|B_i| / |B|``."""

    def __init__(self, ev: StepEval, upper: Any, w_upper: float, lower: Any, w_lower: float):
        # A weak reference: the step's evaluation holds its micro-batches' Losses, and a strong
        # one back would make a cycle that keeps the cached features, and with them the step's
        # activations, alive until Python's cycle collector runs (RSS grew by a step's
        # activations per step on a language model).
        self.ev = weakref.proxy(ev)
        self.parts = {"upper": upper, "lower": lower}
        self.weights = {"upper": w_upper, "lower": w_lower}
        self._features: dict[tuple[str, bool], Any] = {}

    def upper(self, x: Params, y: Params) -> Tensor:
        return self._loss("upper", x, y)

    def lower(self, x: Params, y: Params) -> Tensor:
        return self._loss("lower", x, y)

    def _loss(self, level: str, x: Params, y: Params) -> Tensor:
        ev, problem, part = self.ev, self.ev.compute.problem, self.parts[level]
        if ev.compute.structured and (x is ev.x or x is ev.xl):
            name = "head_loss"
            loss = problem.head_loss(y, self.features(level, x is ev.xl), part, level)
        elif level == "upper":
            name = "upper_loss"
            loss = problem.upper_loss(x, y, part)
        else:
            name = "lower_loss"
            loss = problem.lower_loss(x, y, part)
        loss = check_loss_return(name, loss)
        w = self.weights[level]
        return loss if w == 1.0 else loss * w

    def features(self, level: str, attached: bool) -> Any:
        """The features of x_t for ``level``: with autograd at ``ev.xl`` (``attached``) or
        detached; computed once per step where possible (see the module docstring)."""
        ev, problem, part = self.ev, self.ev.compute.problem, self.parts[level]
        keep = ev.keep_graph and (attached or level in ev.attach)
        if keep:
            if (level, True) not in self._features:
                with torch.enable_grad():
                    self._features[level, True] = problem.features(ev.xl, part, level)
            feats = self._features[level, True]
            if attached:
                return feats
            if (level, False) not in self._features:
                self._features[level, False] = detach_features(feats)
            return self._features[level, False]
        if attached:  # accumulation: one micro-batch's graph at a time, not cached
            with torch.enable_grad():
                return problem.features(ev.xl, part, level)
        if (level, False) not in self._features:
            with torch.no_grad():
                self._features[level, False] = problem.features(ev.x, part, level)
        return self._features[level, False]
