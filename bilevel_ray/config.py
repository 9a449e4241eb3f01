"""Solver settings as one typed, validated, serialisable dataclass.

``SolverConfig`` is what ``br.solve`` keywords, CLI ``--set KEY=VALUE`` pairs, Tune search spaces
and checkpoints all turn into. Defaults live here only. Every violated rule is collected and
reported at once, and unknown keys are refused by name with the list of allowed ones, so a typo
fails before a run (or a sweep) starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from bilevel_ray import schedules
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.schedules import ScalarOrSchedule
from bilevel_ray.solvers import SOLVERS, BilevelSolver
from bilevel_ray.solvers.base import GradReduce
from bilevel_ray.updates import UpdateRule, make_update

__all__ = ["METHOD_OPTIONS", "SolverConfig"]

# Keyword arguments that only some methods take, and each method's value when not given.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "pbgd_free": {"gamma": 10.0, "inner_steps": 1},
    "pbgd": {"gamma": 10.0, "inner_steps": 5},
    "alt_pbgd": {"gamma": 10.0, "inner_steps": 5},
    "f2sa": {"gamma": 10.0, "inner_steps": 5, "multiplier_growth": 0.0},
    "bome": {"inner_steps": 5, "bome_eta": 0.5},
    "implicit_cg": {"inner_steps": 20, "cg_steps": 10, "cg_ridge": 0.0},
}
_SCHEDULE_FIELDS = ("lr_x", "lr_y", "gamma", "multiplier_growth")


@dataclass(frozen=True)
class SolverConfig:
    """Settings of one solver. ``None`` means the method's own default (:data:`METHOD_OPTIONS`).

    Attributes:
        method: one of ``pbgd_free``, ``pbgd``, ``alt_pbgd``, ``f2sa``, ``bome``, ``implicit_cg``.
        lr_x, lr_y: upper / lower step sizes (numbers or schedules).
        gamma: penalty gamma (number or schedule); for ``f2sa`` the initial multiplier.
        inner_steps: K, lower-level steps per iteration.
        optimizer: ``"sgd"`` or ``"adam"``, or a pair ``(for_x, for_y)``.
        momentum, nesterov: SGD options. betas, eps, decoupled_weight_decay: Adam options.
        weight_decay: for either optimizer.
        multiplier_growth: F2SA's multiplier increment per step. bome_eta: BOME's eta.
        cg_steps, cg_ridge: implicit_cg's CG iterations and Hessian ridge.
    """

    method: str = "pbgd_free"
    lr_x: ScalarOrSchedule = 0.01
    lr_y: ScalarOrSchedule = 0.1
    gamma: ScalarOrSchedule | None = None
    inner_steps: int | None = None
    optimizer: str | tuple[str, str] = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    multiplier_growth: ScalarOrSchedule | None = None
    bome_eta: float | None = None
    cg_steps: int | None = None
    cg_ridge: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.optimizer, list):
            object.__setattr__(self, "optimizer", tuple(self.optimizer))
        problems = []
        if self.method not in SOLVERS:
            problems.append(f"method={self.method!r}: unknown; choose one of {', '.join(SOLVERS)}")
        else:
            allowed = METHOD_OPTIONS[self.method]
            for name in (
                "gamma",
                "inner_steps",
                "multiplier_growth",
                "bome_eta",
                "cg_steps",
                "cg_ridge",
            ):
                if getattr(self, name) is not None and name not in allowed:
                    takers = [m for m, opts in METHOD_OPTIONS.items() if name in opts]
                    problems.append(
                        f"{name}={getattr(self, name)!r} does not apply to method={self.method!r} "
                        f"(only to {', '.join(takers)}); remove it"
                    )
        if not problems:
            # Building the update rules and the solver checks every value; collect them all.
            # The factories only capture the problem, so building for None is a dry run.
            for check in (self._update_x, self._update_y):
                try:
                    check()
                except ConfigError as err:
                    problems.extend(err.problems)
            if not problems:
                try:
                    self.build(None)  # type: ignore[arg-type]
                except ConfigError as err:
                    problems.extend(err.problems)
        if problems:
            raise ConfigError(list(dict.fromkeys(problems)))

    def option(self, name: str) -> Any:
        """The value in force: the given one, else the method's default."""
        value = getattr(self, name)
        return METHOD_OPTIONS[self.method].get(name) if value is None else value

    def _kinds(self) -> tuple[str, str]:
        if isinstance(self.optimizer, str):
            return self.optimizer, self.optimizer
        if isinstance(self.optimizer, tuple) and len(self.optimizer) == 2:
            return self.optimizer
        raise ConfigError(
            f"optimizer={self.optimizer!r}: must be 'sgd', 'adam' or a pair such as "
            "('adam', 'sgd') for (x, y)"
        )

    def _rule(self, level: int, lr: ScalarOrSchedule, name: str) -> UpdateRule:
        return make_update(
            self._kinds()[level],
            lr,
            name=name,
            momentum=self.momentum,
            nesterov=self.nesterov,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            decoupled_weight_decay=self.decoupled_weight_decay,
        )

    def _update_x(self) -> UpdateRule:
        return self._rule(0, self.lr_x, "lr_x")

    def _update_y(self) -> UpdateRule:
        return self._rule(1, self.lr_y, "lr_y")

    def build(
        self, problem: BilevelProblem, grad_reduce: GradReduce | None = None
    ) -> BilevelSolver:
        """The solver these settings describe, for ``problem``."""
        knobs = {name: self.option(name) for name in METHOD_OPTIONS[self.method]}
        factory: Callable[..., BilevelSolver] = SOLVERS[self.method]
        return factory(
            problem,
            update_x=self._update_x(),
            update_y=self._update_y(),
            grad_reduce=grad_reduce,
            **knobs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (schedules as dicts); the inverse of :meth:`from_dict`."""
        d = asdict(self)
        for name in _SCHEDULE_FIELDS:
            if d[name] is not None:
                d[name] = schedules.to_dict(getattr(self, name))
        d["betas"] = list(self.betas)
        if isinstance(self.optimizer, tuple):
            d["optimizer"] = list(self.optimizer)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SolverConfig:
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown solver setting(s) {unknown}; the allowed ones are: {', '.join(allowed)}"
            )
        values = dict(d)
        for name in _SCHEDULE_FIELDS:
            if isinstance(values.get(name), Mapping):
                values[name] = schedules.from_dict(dict(values[name]), name=name)
        return cls(**values)
