"""The factory code every solver shares: its public signature, the checks, the Compute, init.

A solver file states only its own math: its ``SETTINGS`` and a *method*, a function that takes
the solver's own settings (checked) and returns its step::

    SETTINGS = {"gamma": gamma_setting(), "inner_steps": steps_setting(1)}


    @solver_factory(SETTINGS)
    def pbgd_free(s: Setup, *, gamma: ScalarOrSchedule, inner_steps: int = DEFAULT) -> Plan:
        def step(state, batch): ...  # s.compute.at(...), s.update_x.apply(...), ...

        return Plan(step, copies=())

:func:`solver_factory` turns the method into the public factory of the same name::

    pbgd_free(problem, *, update_x, update_y, gamma, inner_steps=1,
              grad_reduce=None, precision="fp32", grad_accumulation=1, in_place=False)

the method's keyword-only parameters (as the caller passes them: annotation and default, where
``DEFAULT`` stands for the Setting's declared default) standing between ``update_y`` and
``grad_reduce``. A call checks each of them with its ``Setting`` in that order, then builds the
:class:`~bilevel_ray.solvers.compute.Compute` (which checks precision, accumulation and
in_place), then calls the method with the checked values; the solver's ``init`` is
``compute.init`` with the :class:`Plan`'s copies of y and numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from inspect import Parameter, signature
from typing import Any, NamedTuple

from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import (
    BilevelSolver,
    GradReduce,
    Metrics,
    Setting,
    SolverState,
    identity_reduce,
)
from bilevel_ray.solvers.compute import Compute
from bilevel_ray.tree import Params
from bilevel_ray.updates import UpdateRule

__all__ = ["DEFAULT", "Plan", "Setup", "solver_factory"]


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


# A method's parameter default meaning "this setting's own default" (``SETTINGS[name].default``).
DEFAULT: Any = _Default()

Step = Callable[[SolverState, Any], tuple[SolverState, Metrics]]


class Setup(NamedTuple):
    """What a method's step works with: the update rules of x and y and the solver's Compute."""

    update_x: UpdateRule
    update_y: UpdateRule
    compute: Compute


@dataclass(frozen=True)
class Plan:
    """A method's step and what its state holds besides x, y and their optimizer states:
    ``copies``, named copies of y (updated with y's rule), and ``numbers`` (e.g. a multiplier),
    both in ``state.extra``."""

    step: Step
    copies: tuple[str, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)


def solver_factory(
    settings: dict[str, Setting], **checks: Callable[[Any], Any]
) -> Callable[[Callable[..., Plan]], Callable[..., BilevelSolver]]:
    """The public factory of the decorated method (see the module docstring). Each own setting
    is checked by ``settings[name].check``, or by ``checks[name]`` where the method needs a
    stricter one (f2sa's gamma must be a number)."""

    def decorate(method: Callable[..., Plan]) -> Callable[..., BilevelSolver]:
        name = method.__name__
        own = [
            p.replace(default=settings[p.name].default) if p.default is DEFAULT else p
            for p in signature(method).parameters.values()
            if p.kind is Parameter.KEYWORD_ONLY
        ]
        check = {p.name: checks.get(p.name, settings[p.name].check) for p in own}

        def factory(
            problem: BilevelProblem,
            *,
            update_x: UpdateRule,
            update_y: UpdateRule,
            grad_reduce: GradReduce | None = None,
            precision: str = "fp32",
            grad_accumulation: int = 1,
            in_place: bool = False,
            **given: Any,
        ) -> BilevelSolver:
            values = {key: check[key](value) for key, value in _bind(name, own, given).items()}
            compute = Compute(
                problem, grad_reduce or identity_reduce, precision, grad_accumulation, in_place
            )
            plan = method(Setup(update_x, update_y, compute), **values)

            def init(x0: Params, y0: Params) -> SolverState:
                return compute.init(x0, y0, update_x, update_y, plan.copies, **plan.numbers)

            return BilevelSolver(name, init, plan.step)

        # The public signature: the shared parameters with the method's own in the middle.
        shared = list(signature(factory).parameters.values())[:-1]  # without **given
        public = signature(factory).replace(parameters=[*shared[:3], *own, *shared[3:]])
        factory.__signature__ = public  # type: ignore[attr-defined]
        factory.__annotations__ = {p.name: p.annotation for p in public.parameters.values()}
        factory.__annotations__["return"] = public.return_annotation
        factory.__kwdefaults__ = {  # as a plain function's: only where there is a default
            p.name: p.default
            for p in public.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
        }
        factory.__name__ = factory.__qualname__ = name
        factory.__module__, factory.__doc__ = method.__module__, method.__doc__
        return factory

    return decorate


def _bind(name: str, own: list[Parameter], given: dict[str, Any]) -> dict[str, Any]:
    """The method's own settings of a call, in their order, defaults filled in; an unknown or a
    missing one is the TypeError that Python raises for a plain function."""
    names = {p.name for p in own}
    for key in given:
        if key not in names:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
    missing = [repr(p.name) for p in own if p.default is p.empty and p.name not in given]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise TypeError(
            f"{name}() missing {len(missing)} required keyword-only argument{plural}: "
            + " and ".join(missing)
        )
    return {p.name: given.get(p.name, p.default) for p in own}
