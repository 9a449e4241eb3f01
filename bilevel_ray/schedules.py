"""Schedules: values that change with the step count ``t`` (penalty gamma_t, step sizes).

A schedule is any callable ``int -> float``; wherever a scalar is accepted, a schedule is too.
The built-in ones are frozen dataclasses, so they pickle (Ray ships them to workers), serialise
to plain dicts (Tune search spaces, checkpoints) and know their range, which lets a solver reject
a gamma that would turn non-positive *before* the run starts.

Example:
    >>> ramp = pbgd_ramp(gamma_init=1.0, gamma_max=10.0, gamma_argmax_step=9)
    >>> [ramp(t) for t in (0, 3, 9, 100)]
    [1.0, 4.0, 10.0, 10.0]
    >>> inverse_power(scale=2.0, exponent=1.0)(3)
    0.5
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = [
    "ScalarOrSchedule",
    "Schedule",
    "as_schedule",
    "checked_value",
    "constant",
    "from_dict",
    "inverse_power",
    "linear",
    "nonnegative_schedule",
    "pbgd_ramp",
    "piecewise_constant",
    "positive_schedule",
    "positive_value",
    "to_dict",
]

Schedule = Callable[[int], float]
ScalarOrSchedule = float | Schedule


def _finite(name: str, value: Any) -> float:
    try:  # an int beyond a float's range (10**400) overflows here, not deep in a run
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        ok = ok and math.isfinite(float(value))
    except OverflowError:
        digits = len(str(abs(value)))
        raise ConfigError(
            f"{name}=<an integer of {digits} digits>: beyond a float's range (about 1.8e308); "
            "give a finite number such as 1e3"
        ) from None
    if not ok:
        raise ConfigError(f"{name}={value!r}: must be a finite number")
    return float(value)


@dataclass(frozen=True)
class constant:
    """gamma_t = value."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _finite("constant.value", self.value))

    def __call__(self, t: int) -> float:
        return self.value

    def minimum(self) -> tuple[float, bool]:
        return self.value, True


@dataclass(frozen=True)
class linear:
    """Linear interpolation from ``init_value`` to ``end_value``.

    value_t = init_value                                    for t <= transition_begin
            = init_value + (end_value - init_value) * (t - transition_begin) / transition_steps
            = end_value                          for t >= transition_begin + transition_steps
    """

    init_value: float
    end_value: float
    transition_steps: int
    transition_begin: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_value", _finite("linear.init_value", self.init_value))
        object.__setattr__(self, "end_value", _finite("linear.end_value", self.end_value))
        for name in ("transition_steps", "transition_begin"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"linear.{name}={v!r}: must be an integer >= 0")

    def __call__(self, t: int) -> float:
        if self.transition_steps == 0:
            return self.end_value if t >= self.transition_begin else self.init_value
        frac = min(max((t - self.transition_begin) / self.transition_steps, 0.0), 1.0)
        return self.init_value + (self.end_value - self.init_value) * frac

    def minimum(self) -> tuple[float, bool]:
        return min(self.init_value, self.end_value), True


def pbgd_ramp(gamma_init: float, gamma_max: float, gamma_argmax_step: int) -> linear:
    """The PBGD penalty ramp: gamma grows linearly from gamma_init to gamma_max at step
    gamma_argmax_step and stays there (Shen & Chen 2023's schedule, in their vocabulary)."""
    if (
        isinstance(gamma_argmax_step, bool)
        or not isinstance(gamma_argmax_step, int)
        or (gamma_argmax_step < 0)
    ):
        raise ConfigError(
            f"gamma_argmax_step={gamma_argmax_step!r}: must be an integer >= 0 (the step at "
            "which gamma reaches gamma_max)"
        )
    return linear(
        _finite("gamma_init", gamma_init), _finite("gamma_max", gamma_max), gamma_argmax_step
    )


@dataclass(frozen=True)
class inverse_power:
    """value_t = scale / (t + offset) ** exponent.

    ``exponent > 0`` decays (step sizes), ``exponent < 0`` grows (an F2SA-style multiplier).
    """

    scale: float
    exponent: float
    offset: float = 1.0

    def __post_init__(self) -> None:
        for name in ("scale", "exponent", "offset"):
            object.__setattr__(self, name, _finite(f"inverse_power.{name}", getattr(self, name)))
        if self.offset <= 0:
            raise ConfigError(
                f"inverse_power.offset={self.offset!r}: must be > 0 so that t + offset > 0 "
                "at t = 0; use offset=1"
            )

    def __call__(self, t: int) -> float:
        return self.scale / (t + self.offset) ** self.exponent

    def minimum(self) -> tuple[float, bool]:
        start = self.scale / self.offset**self.exponent
        if self.scale == 0 or self.exponent == 0:
            return start, True
        if self.exponent > 0:  # decays towards 0 from the side of the scale's sign
            return (0.0, False) if self.scale > 0 else (start, True)
        return (start, True) if self.scale > 0 else (-math.inf, False)


@dataclass(frozen=True)
class piecewise_constant:
    """value_t = values[i] for boundaries[i-1] <= t < boundaries[i] (boundaries[-1] = inf,
    boundaries[0 - 1] = 0): one value per segment of the run, as a population-based sweep's
    best trial learned them (its lineage, ``best_schedule.json``).

        >>> s = piecewise_constant(boundaries=(100, 250), values=(10.0, 30.0, 20.0))
        >>> [s(t) for t in (0, 99, 100, 249, 250, 10**6)]
        [10.0, 10.0, 30.0, 30.0, 20.0, 20.0]
    """

    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        boundaries, values = self.boundaries, self.values
        if not isinstance(boundaries, (list, tuple)) or not isinstance(values, (list, tuple)):
            raise ConfigError(
                f"piecewise_constant(boundaries={boundaries!r}, values={values!r}): both must be "
                "lists, e.g. boundaries=[100], values=[10.0, 30.0]"
            )
        if len(values) != len(boundaries) + 1:
            raise ConfigError(
                f"piecewise_constant: {len(boundaries)} boundaries need {len(boundaries) + 1} "
                f"values (one per segment), got {len(values)}"
            )
        for b in boundaries:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 < b < 2**63:
                raise ConfigError(
                    f"piecewise_constant.boundaries={boundaries!r}: each must be an integer step "
                    "> 0 (and below 2**63)"
                )
        if any(a >= b for a, b in itertools.pairwise(boundaries)):
            raise ConfigError(
                f"piecewise_constant.boundaries={boundaries!r}: must increase strictly"
            )
        finite = tuple(_finite(f"piecewise_constant.values[{i}]", v) for i, v in enumerate(values))
        object.__setattr__(self, "boundaries", tuple(boundaries))
        object.__setattr__(self, "values", finite)

    def __call__(self, t: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, t)]

    def minimum(self) -> tuple[float, bool]:
        return min(self.values), True


_KINDS: dict[str, type] = {
    "constant": constant,
    "linear": linear,
    "inverse_power": inverse_power,
    "piecewise_constant": piecewise_constant,
}


def as_schedule(name: str, value: ScalarOrSchedule) -> Schedule:
    """A number becomes ``constant(value)``; a dict from :func:`to_dict` is rebuilt; a callable
    is used as is; anything else is refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return constant(_finite(name, value))
    if isinstance(value, dict):
        return from_dict(value, name=name)
    if callable(value):
        return value
    raise ConfigError(
        f"{name}={value!r}: must be a number or a schedule (a callable of the step, e.g. "
        f"br.schedules.linear(...)); got {type(value).__name__}"
    )


def positive_schedule(name: str, value: ScalarOrSchedule, example: str = "0.01") -> Schedule:
    """:func:`as_schedule`, refusing a schedule that is or may become <= 0.

    Built-in schedules are checked over all steps at once (their ``minimum()``); a user callable
    is checked at t = 0 here and must be checked at later steps with :func:`positive_value`.
    """
    return _bounded_schedule(name, value, example, strict=True)


def nonnegative_schedule(name: str, value: ScalarOrSchedule, example: str = "0.0") -> Schedule:
    """:func:`as_schedule`, refusing a schedule that is or may become < 0."""
    return _bounded_schedule(name, value, example, strict=False)


def _bounded_schedule(name: str, value: Any, example: str, strict: bool) -> Schedule:
    schedule = as_schedule(name, value)
    if hasattr(schedule, "minimum"):
        try:
            low, attained = schedule.minimum()
        except (OverflowError, ZeroDivisionError) as err:
            raise ConfigError(
                f"{name}={value!r}: its values leave a float's range ({err}); e.g. {name}={example}"
            ) from None
        ok = low > 0 or (low == 0 and not attained) if strict else low >= 0
    else:
        ok = True
    if ok:
        checked_value(name, schedule, 0, strict=strict)
        return schedule
    rule = "> 0" if strict else ">= 0"
    raise ConfigError(f"{name}={value!r}: must stay {rule} at every step; e.g. {name}={example}")


def positive_value(name: str, schedule: Schedule, t: int) -> float:
    """schedule(t), checked to be a finite number > 0 (one float comparison per step)."""
    return checked_value(name, schedule, t, strict=True)


def checked_value(name: str, schedule: Schedule, t: int, strict: bool = True) -> float:
    try:
        value = schedule(t)
    except (OverflowError, ZeroDivisionError) as err:  # e.g. inverse_power growing past 1e308
        raise ConfigError(
            f"{name} cannot be computed at step {t} ({err}); fix the schedule so that it stays "
            "a finite number"
        ) from None
    ok = (
        isinstance(value, (int, float))
        and value < math.inf
        and (value > 0 if strict else value >= 0)
    )
    if not ok:
        rule = "> 0" if strict else ">= 0"
        raise ConfigError(
            f"{name} is {value!r} at step {t}: must be a finite number {rule}; fix the schedule"
        )
    return float(value)


def to_dict_or_repr(schedule: ScalarOrSchedule) -> Any:
    try:
        return to_dict(schedule)
    except ConfigError:
        return repr(schedule)


def to_dict(schedule: ScalarOrSchedule) -> dict[str, Any] | float:
    """A plain, JSON-able form of a built-in schedule (a float stays a float)."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    for kind, cls in _KINDS.items():
        if type(schedule) is cls:
            return {"kind": kind, **{k: _plain(v) for k, v in asdict(schedule).items()}}
    raise ConfigError(
        f"schedule {schedule!r}: only built-in schedules ({', '.join(_KINDS)}) and numbers can "
        "be serialised; build yours from br.schedules"
    )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # JSON has lists, not tuples


def from_dict(d: dict[str, Any], name: str = "schedule") -> Schedule:
    """Inverse of :func:`to_dict`."""
    kind = d.get("kind") if isinstance(d, dict) else None
    kind = kind if isinstance(kind, str) else None
    if kind not in _KINDS:
        raise ConfigError(
            f"{name}={d!r}: 'kind' must be one of {sorted(_KINDS)}; e.g. "
            "{'kind': 'linear', 'init_value': 1, 'end_value': 10, 'transition_steps': 100}"
        )
    fields = {k: v for k, v in d.items() if k != "kind"}
    try:
        return _KINDS[kind](**fields)
    except TypeError as err:
        raise ConfigError(f"{name}={d!r}: wrong fields for a {kind} schedule ({err})") from None
