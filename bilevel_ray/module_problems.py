"""Problems from torch modules: one model whose parameters split into the two levels
(:func:`module_problem`, e.g. a LoRA backbone as x and an output head as y, the rest frozen), or
an upper and a lower module (:func:`split_module_problem`). Both evaluate the modules at the
given parameters with ``torch.func.functional_call``, so a solver can evaluate g at a second
copy of y without copying the model."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, detach_features
from bilevel_ray.tree import Params

__all__ = ["module_problem", "split_module_problem"]


def _refuse_running_stats(name: str, module: nn.Module) -> None:
    updating = [
        sub_name or type(module).__name__
        for sub_name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._NormBase)
        and sub.training
        and sub.track_running_stats
    ]
    if updating:
        raise ConfigError(
            f"{name} has normalisation layers that update running statistics in training mode "
            f"({', '.join(updating[:3])}): that state would not be part of x, y or checkpoints; "
            "call .eval() on them, or use LayerNorm / GroupNorm"
        )


def _selector(
    name: str, spec: str | Iterable[str] | Callable[[str], bool]
) -> Callable[[str], bool]:
    if callable(spec):
        return spec
    if not isinstance(spec, (str, Iterable)):
        raise ConfigError(
            f"{name}={spec!r}: select parameters with a regular expression, a list of names or "
            "a predicate name -> bool"
        )
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ConfigError(f"{name}={spec!r}: not a valid regular expression ({err})") from None
        return lambda n: pattern.search(n) is not None
    names = set(spec)
    return lambda n: n in names


class _SingleModelProblem:
    """One model; x and y are two disjoint groups of its parameters, the rest is frozen."""

    def __init__(self, model: nn.Module, frozen: Params, upper: Callable, lower: Callable):
        self.model, self.frozen, self._upper, self._lower = model, frozen, upper, lower

    def _forward(self, x: Params, y: Params) -> Callable[..., Any]:
        params = {**self.frozen, **x, **y}
        # strict: every parameter and buffer is given, so a misnamed x or y fails loudly.
        return lambda *args, **kwargs: functional_call(
            self.model, params, args, kwargs, strict=True
        )

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self._upper(self._forward(x, y), batch)

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self._lower(self._forward(x, y), batch)


def module_problem(
    model: nn.Module,
    *,
    x: str | Iterable[str] | Callable[[str], bool],
    y: str | Iterable[str] | Callable[[str], bool],
    upper_loss: Callable[[Callable[..., Any], Any], Tensor],
    lower_loss: Callable[[Callable[..., Any], Any], Tensor],
    copy: bool = True,
) -> tuple[BilevelProblem, Params, Params]:
    """Adapt one model whose parameters split by name into x (upper) and y (lower).

    ``x`` and ``y`` select parameter names: a regular expression (``"lora_"``), a list of exact
    names, or a predicate. Parameters in neither group are frozen; buffers are used as they are,
    and a module that would update buffers in its forward (normalisation layers with running
    statistics in training mode) is refused: that hidden state would escape the solver's state
    and its checkpoints. Tied weights appear once, under their first name.
    The losses receive ``forward`` (the model called with the current x and y) and the batch::

        problem, x0, y0 = br.module_problem(
            model, x="lora_", y=r"^lm_head\\.",
            upper_loss=lambda forward, batch: dpo_loss(forward(batch["ids"]), batch),
            lower_loss=lambda forward, batch: sft_loss(forward(batch["ids"]), batch))

    Returns ``(problem, x0, y0)`` with x0, y0 detached copies of the selected parameters, or,
    with ``copy=False``, detached views of them (no memory of their own): then a solver with
    ``in_place=True`` updates the model's own parameters, and x and y exist once in memory
    instead of three times (the model's, x0 / y0, the solver's).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}: must be a torch.nn.Module")
    _refuse_running_stats("model", model)
    in_x, in_y = _selector("x", x), _selector("y", y)
    named = dict(model.named_parameters())
    both = sorted(n for n in named if in_x(n) and in_y(n))
    if both:
        raise ConfigError(
            f"parameters {both} match both x={x!r} and y={y!r}: the groups must be disjoint; "
            "narrow one selector"
        )
    take = (lambda p: p.detach().clone()) if copy else (lambda p: p.detach())
    x0 = {n: take(p) for n, p in named.items() if in_x(n)}
    y0 = {n: take(p) for n, p in named.items() if in_y(n)}
    if not named:
        raise ConfigError(f"model {type(model).__name__} has no parameters to split into x and y")
    sample = ", ".join(list(named)[:6])
    for level, group, spec in (("x", x0, x), ("y", y0, y)):
        if not isinstance(spec, str) and not callable(spec):
            unknown = sorted(set(spec) - set(named))
            if unknown:
                raise ConfigError(
                    f"{level} names {unknown} that the model does not have; its parameters are "
                    f"named like: {sample}"
                )
        if not group:
            raise ConfigError(
                f"{level}={spec!r} selects no parameter of the model; its parameters are named "
                f"like: {sample}"
            )
    frozen = {n: p.detach() for n, p in named.items() if n not in x0 and n not in y0}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    return _SingleModelProblem(model, frozen, upper_loss, lower_loss), x0, y0


class _StopRecording(BaseException):
    """Raised by the head while x's calls are recorded (BaseException: a user's ``except
    Exception`` in a loss does not swallow it)."""


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are the same: identical objects, equal tensors, equal nests."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # an object whose == is not a bool: treat it as different
        return False


class _Recording:
    """The features of x for one loss and batch: what ``x_forward`` returned, call by call, up
    to the loss's first call of ``y_forward``; and x itself, for any later calls."""

    def __init__(self, x: Params, calls: list[tuple[tuple, dict, Any]]):
        self.x, self.calls = x, calls

    def detach(self) -> _Recording:
        return _Recording(
            {k: v.detach() for k, v in self.x.items()},
            [(a, kw, detach_features(out)) for a, kw, out in self.calls],
        )


class _TwoModuleProblem:
    """Separate upper (x) and lower (y) modules; names carry an ``upper.`` / ``lower.`` prefix.

    It declares the :class:`FeatureProblem` structure by record and replay: ``features`` runs a
    loss until its first call of ``y_forward`` and keeps what each ``x_forward`` call returned;
    ``head_loss`` runs the loss again with a ``x_forward`` that returns the kept outputs for
    the same arguments, in the same order (equal tensors count as the same), and calls the
    upper module for anything else. So ``fy(fx(batch[0]))`` runs the extractor once per step,
    and a loss of any other shape is still evaluated exactly (it just gains nothing). The
    upper module must be deterministic (``eval()`` for dropout) for the replay to be exact.
    """

    def __init__(
        self,
        modules: tuple[nn.Module, nn.Module],
        frozen: tuple[Params, Params],
        upper: Callable,
        lower: Callable,
    ):
        self.modules, self.frozen, self._upper, self._lower = modules, frozen, upper, lower

    def _forwards(self, x: Params, y: Params) -> tuple[Callable[..., Any], Callable[..., Any]]:
        px = {**self.frozen[0], **{k.removeprefix("upper."): v for k, v in x.items()}}
        py = {**self.frozen[1], **{k.removeprefix("lower."): v for k, v in y.items()}}
        return (
            lambda *a, **kw: functional_call(self.modules[0], px, a, kw, strict=True),
            lambda *a, **kw: functional_call(self.modules[1], py, a, kw, strict=True),
        )

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self._upper(*self._forwards(x, y), batch)

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self._lower(*self._forwards(x, y), batch)

    def _x_forward(self, x: Params) -> Callable[..., Any]:
        px = {**self.frozen[0], **{k.removeprefix("upper."): v for k, v in x.items()}}
        return lambda *a, **kw: functional_call(self.modules[0], px, a, kw, strict=True)

    def features(self, x: Params, batch: Any, level: str) -> _Recording:
        live, calls = self._x_forward(x), []

        def record(*args: Any, **kwargs: Any) -> Any:
            out = live(*args, **kwargs)
            calls.append((args, kwargs, out))
            return out

        def stop(*args: Any, **kwargs: Any) -> Any:
            raise _StopRecording

        with contextlib.suppress(_StopRecording):
            (self._upper if level == "upper" else self._lower)(record, stop, batch)
        return _Recording(x, calls)

    def head_loss(self, y: Params, features: _Recording, batch: Any, level: str) -> Tensor:
        live, position = self._x_forward(features.x), [0]

        def replay(*args: Any, **kwargs: Any) -> Any:
            i = position[0]
            position[0] += 1
            if i < len(features.calls):
                a, kw, out = features.calls[i]
                if _same(a, args) and _same(kw, kwargs):
                    return out
            return live(*args, **kwargs)

        py = {**self.frozen[1], **{k.removeprefix("lower."): v for k, v in y.items()}}
        y_forward = lambda *a, **kw: functional_call(self.modules[1], py, a, kw, strict=True)  # noqa: E731
        return (self._upper if level == "upper" else self._lower)(replay, y_forward, batch)


def split_module_problem(
    upper_module: nn.Module,
    lower_module: nn.Module,
    *,
    upper_loss: Callable[[Callable[..., Any], Callable[..., Any], Any], Tensor],
    lower_loss: Callable[[Callable[..., Any], Callable[..., Any], Any], Tensor],
    copy: bool = True,
) -> tuple[BilevelProblem, Params, Params]:
    """Adapt separate modules: x = the trainable parameters of ``upper_module`` (named
    ``upper.<name>``), y = those of ``lower_module`` (``lower.<name>``); parameters with
    ``requires_grad=False`` and buffers stay frozen.

    The losses receive ``(x_forward, y_forward, batch)``, e.g. for representation learning
    (x = feature extractor, y = head)::

        mse = lambda fx, fy, b: ((fy(fx(b[0])).squeeze(-1) - b[1]) ** 2).mean()
        problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)

    ``copy=False``: x0 and y0 are views of the modules' own parameters (see
    :func:`module_problem`). The problem declares its structure (x computes features, y is a
    head on them) through record and replay; see ``_TwoModuleProblem``.
    """
    modules = (upper_module, lower_module)
    for name, module in zip(("upper_module", "lower_module"), modules):
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{name} is a {type(module).__name__}: must be a torch.nn.Module")
        _refuse_running_stats(name, module)
    if {id(p) for p in upper_module.parameters()} & {id(p) for p in lower_module.parameters()}:
        raise ConfigError(
            "upper_module and lower_module share parameter tensors: each level needs its own; "
            "pass separate modules (or use module_problem to split one model by name)"
        )
    groups, frozen = [], []
    for name, prefix, module in zip(
        ("upper_module", "lower_module"), ("upper.", "lower."), modules
    ):
        params = dict(module.named_parameters())
        trainable = {
            prefix + n: p.detach().clone() if copy else p.detach()
            for n, p in params.items()
            if p.requires_grad
        }
        if not trainable:
            why = "all have requires_grad=False" if params else "it has no parameters"
            raise ConfigError(
                f"{name} has no trainable parameter ({why}): its level would have nothing to "
                "optimize"
            )
        rest = {n: p.detach() for n, p in params.items() if not p.requires_grad}
        rest.update({n: b.detach() for n, b in module.named_buffers()})
        groups.append(trainable)
        frozen.append(rest)
    problem = _TwoModuleProblem(modules, (frozen[0], frozen[1]), upper_loss, lower_loss)
    return problem, groups[0], groups[1]
