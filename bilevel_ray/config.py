"""Solver settings as one typed, validated, serialisable dataclass.

``SolverConfig`` is what ``br.solve`` keywords, CLI ``--set KEY=VALUE`` pairs, Tune search spaces
and checkpoints all turn into. Defaults live here only. Every violated rule is collected and
reported at once, and unknown keys are refused by name with the list of allowed ones, so a typo
fails before a run (or a sweep) starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any

from bilevel_ray import schedules
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.schedules import ScalarOrSchedule
from bilevel_ray.solvers import SOLVER_SETTINGS, SOLVERS, BilevelSolver
from bilevel_ray.solvers.accumulation import check_accumulation
from bilevel_ray.solvers.base import GradReduce
from bilevel_ray.solvers.compute import check_in_place
from bilevel_ray.solvers.precision import check_precision
from bilevel_ray.updates import (
    NEUTRAL_OPTIONS,
    OPTIMIZERS,
    OPTIONS,
    UpdateRule,
    make_update,
    stray_options,
)

__all__ = ["METHOD_OPTIONS", "SolverConfig"]

# Keyword arguments that only some methods take, and each method's value when not given: derived
# from the declarations in each solver's file (solvers.SOLVER_SETTINGS).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    method: {name: setting.default for name, setting in settings.items()}
    for method, settings in SOLVER_SETTINGS.items()
}
_METHOD_SPECIFIC = tuple(dict.fromkeys(k for knobs in METHOD_OPTIONS.values() for k in knobs))
_SCHEDULE_FIELDS = (
    "lr_x",
    "lr_y",
    *dict.fromkeys(
        name
        for settings in SOLVER_SETTINGS.values()
        for name, setting in settings.items()
        if setting.schedule
    ),
)


@dataclass(frozen=True)
class _SolverConfigBase:
    """Settings of one solver. ``None`` means the method's own default (:data:`METHOD_OPTIONS`).

    Attributes:
        method: one of ``pbgd_free``, ``pbgd``, ``alt_pbgd``, ``f2sa``, ``bome``, ``implicit_cg``.
        lr_x, lr_y: upper / lower step sizes (numbers or schedules).
        gamma: penalty gamma (number or schedule); for ``f2sa`` the initial multiplier.
        inner_steps: K, lower-level steps per iteration.
        optimizer: ``"sgd"`` or ``"adam"``, or a pair ``(for_x, for_y)``.
        momentum, nesterov: SGD options. betas, eps, decoupled_weight_decay: Adam options.
        weight_decay: for either optimizer.
        precision: ``"fp32"`` (default), ``"bf16"`` (CPU and GPU) or ``"fp16"`` (CUDA, with
            loss scaling): the losses under ``torch.autocast``, parameters and optimizer
            moments in their own dtype (:mod:`bilevel_ray.solvers.precision`).
        grad_accumulation: k >= 1; every step's upper and lower batch is split into k
            micro-batches whose mean-scaled gradients are summed before the (single)
            reduction, so k micro-batches of B / k give the gradient of one batch of B
            (:mod:`bilevel_ray.solvers.accumulation`).
        in_place: False (default): the solver works on copies of x0 and y0. True: x0 and y0
            themselves are updated (one copy of the parameters; with ``module_problem(...,
            copy=False)`` they are the model's own parameters).
        and one field per method-specific setting (``METHOD_OPTIONS``), declared with its
        default and check in its solver's file: gamma (penalty, a number or schedule; for
        ``f2sa`` the initial multiplier), inner_steps (K, lower-level steps per iteration),
        multiplier_growth (F2SA), bome_eta (BOME), cg_steps and cg_ridge (implicit_cg).
    """

    method: str = "pbgd_free"
    lr_x: ScalarOrSchedule = 0.01
    lr_y: ScalarOrSchedule = 0.1
    optimizer: str | tuple[str, str] = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    precision: str = "fp32"
    grad_accumulation: int = 1
    in_place: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.optimizer, list):
            object.__setattr__(self, "optimizer", tuple(self.optimizer))
        problems = []
        for name in _SCHEDULE_FIELDS:
            if isinstance(getattr(self, name), Mapping):
                try:
                    value = schedules.from_dict(dict(getattr(self, name)), name=name)
                except ConfigError as err:
                    problems.extend(err.problems)
                    continue
                object.__setattr__(self, name, value)
        problems += self._problems()  # a bad dict schedule repeats there; dict.fromkeys dedups
        if problems:
            raise ConfigError(list(dict.fromkeys(problems)))

    def _problems(self) -> list[str]:
        if not isinstance(self.method, str) or self.method not in SOLVERS:
            return [f"method={self.method!r}: unknown; choose one of {', '.join(SOLVERS)}"]
        problems = []
        allowed = METHOD_OPTIONS[self.method]
        for name in _METHOD_SPECIFIC:
            if getattr(self, name) is not None and name not in allowed:
                takers = [m for m, opts in METHOD_OPTIONS.items() if name in opts]
                problems.append(
                    f"{name}={getattr(self, name)!r} does not apply to method={self.method!r} "
                    f"(only to {', '.join(takers)}); remove it"
                )
        try:
            kinds = self._kinds()
        except ConfigError as err:
            # Without valid kinds the step sizes can still be checked on their own.
            problems.extend(err.problems)
            for name in ("lr_x", "lr_y"):
                try:
                    schedules.positive_schedule(name, getattr(self, name))
                except ConfigError as lr_err:
                    problems.extend(lr_err.problems)
            return problems + self._knob_problems()
        stray = stray_options(set(kinds), self._optimizer_options())
        if stray:
            problems.append(
                f"optimizer={self.optimizer!r} does not take {', '.join(stray)}; "
                + "; ".join(f"{k} takes {', '.join(OPTIONS[k])}" for k in sorted(set(kinds)))
            )
        for build_rule in (self._update_x, self._update_y):
            try:
                build_rule()
            except ConfigError as err:
                problems.extend(err.problems)
        return problems + self._knob_problems()

    def _knob_problems(self) -> list[str]:
        problems = []
        for check, value in (
            (check_precision, self.precision),
            (check_accumulation, self.grad_accumulation),
            (check_in_place, self.in_place),
        ):
            try:
                check(value)
            except ConfigError as err:
                problems.extend(err.problems)
        for name in METHOD_OPTIONS[self.method]:
            try:
                SOLVER_SETTINGS[self.method][name].check(self.option(name))
            except ConfigError as err:
                problems.extend(err.problems)
        if self.method == "f2sa" and not isinstance(self.option("gamma"), (int, float)):
            problems.append(
                f"gamma={self.gamma!r}: for f2sa gamma is the initial multiplier lam_0 and must "
                "be a number; schedule its growth with multiplier_growth"
            )
        return problems

    @staticmethod
    def applicable(method: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of a problem's suggested settings that apply to ``method`` (a problem's
        ``gamma`` is no error for BOME: it is just not BOME's)."""
        knobs = METHOD_OPTIONS.get(method, {})
        return {k: v for k, v in defaults.items() if k not in _METHOD_SPECIFIC or k in knobs}

    def option(self, name: str) -> Any:
        """The value in force: the given one, else the method's default."""
        value = getattr(self, name)
        return METHOD_OPTIONS[self.method].get(name) if value is None else value

    def _kinds(self) -> tuple[str, str]:
        opt = self.optimizer
        kinds = (opt, opt) if isinstance(opt, str) else opt
        if (
            not isinstance(kinds, tuple)
            or len(kinds) != 2
            or not all(isinstance(k, str) and k in OPTIMIZERS for k in kinds)
        ):
            raise ConfigError(
                f"optimizer={opt!r}: must be one of {', '.join(OPTIMIZERS)} or a pair such as "
                "('adam', 'sgd') for (x, y)"
            )
        return kinds

    def _optimizer_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in NEUTRAL_OPTIONS}

    def _rule(self, level: int, lr: ScalarOrSchedule, name: str) -> UpdateRule:
        return make_update(self._kinds()[level], lr, name=name, **self._optimizer_options())

    def _update_x(self) -> UpdateRule:
        return self._rule(0, self.lr_x, "lr_x")

    def _update_y(self) -> UpdateRule:
        return self._rule(1, self.lr_y, "lr_y")

    def _factory(
        self,
        problem: BilevelProblem,
        update_x: UpdateRule,
        update_y: UpdateRule,
        grad_reduce: GradReduce | None = None,
    ) -> BilevelSolver:
        knobs = {name: self.option(name) for name in METHOD_OPTIONS[self.method]}
        return SOLVERS[self.method](
            problem,
            update_x=update_x,
            update_y=update_y,
            grad_reduce=grad_reduce,
            precision=self.precision,
            grad_accumulation=self.grad_accumulation,
            in_place=self.in_place,
            **knobs,
        )

    def build(
        self, problem: BilevelProblem, grad_reduce: GradReduce | None = None
    ) -> BilevelSolver:
        """The solver these settings describe, for ``problem``."""
        return self._factory(problem, self._update_x(), self._update_y(), grad_reduce)

    def to_dict(self, strict: bool = True) -> dict[str, Any]:
        """Plain JSON-able values (schedules as dicts); the inverse of :meth:`from_dict`.

        A user-written schedule (a plain callable) cannot be serialised: ``strict=True`` raises
        ConfigError, ``strict=False`` puts its ``repr`` instead (for display only).
        """
        d = asdict(self)
        for name in _SCHEDULE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if strict:
                try:
                    d[name] = schedules.to_dict(value)
                except ConfigError:
                    raise ConfigError(
                        f"{name}={value!r}: a user-written schedule cannot be saved with the "
                        "settings (checkpoints, Tune); use a br.schedules one"
                    ) from None
            else:
                d[name] = schedules.to_dict_or_repr(value)
        d["betas"] = list(self.betas)
        if isinstance(self.optimizer, tuple):
            d["optimizer"] = list(self.optimizer)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SolverConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"solver settings must be a dict, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown solver setting(s) {unknown}; the allowed ones are: {', '.join(allowed)}"
            )
        return cls(**d)


# The method-specific settings become fields (None: the method's default), so that a setting
# declared in a solver's file is a keyword of br.solve, a --set key and a Tune search key at once.
SolverConfig = make_dataclass(
    "SolverConfig",
    [(name, Any, field(default=None)) for name in _METHOD_SPECIFIC],
    bases=(_SolverConfigBase,),
    frozen=True,
)
SolverConfig.__module__ = __name__  # make_dataclass takes module= only from Python 3.12
SolverConfig.__doc__ = _SolverConfigBase.__doc__
