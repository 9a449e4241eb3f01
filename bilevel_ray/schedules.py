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

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = [
    "ScalarOrSchedule",
    "Schedule",
    "as_schedule",
    "constant",
    "from_dict",
    "inverse_power",
    "linear",
    "pbgd_ramp",
    "positive_schedule",
    "positive_value",
    "to_dict",
]

Schedule = Callable[[int], float]
ScalarOrSchedule = float | Schedule


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
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

    def always_positive(self) -> bool:
        return self.value > 0


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

    def always_positive(self) -> bool:
        return min(self.init_value, self.end_value) > 0


def pbgd_ramp(gamma_init: float, gamma_max: float, gamma_argmax_step: int) -> linear:
    """The PBGD penalty ramp: gamma grows linearly from gamma_init to gamma_max at step
    gamma_argmax_step and stays there (Shen & Chen 2023's schedule, in their vocabulary)."""
    return linear(gamma_init, gamma_max, gamma_argmax_step)


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

    def always_positive(self) -> bool:
        return self.scale > 0


_KINDS: dict[str, type] = {"constant": constant, "linear": linear, "inverse_power": inverse_power}


def as_schedule(name: str, value: ScalarOrSchedule) -> Schedule:
    """A float becomes ``constant(value)``; a callable is used as is; anything else is refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return constant(float(value))
    if isinstance(value, dict):
        return from_dict(value, name=name)
    if callable(value):
        return value
    raise ConfigError(
        f"{name}={value!r}: must be a number or a schedule (a callable of the step, e.g. "
        f"br.schedules.linear(...)); got {type(value).__name__}"
    )


def positive_schedule(name: str, value: ScalarOrSchedule) -> Schedule:
    """:func:`as_schedule`, refusing a schedule that is or may become <= 0.

    Built-in schedules are checked over all steps at once; a user callable is checked at t = 0
    here and at every later step by :func:`positive_value`.
    """
    schedule = as_schedule(name, value)
    ok = schedule.always_positive() if hasattr(schedule, "always_positive") else True
    if ok:
        ok = positive_value(name, schedule, 0) > 0
    if not ok:
        raise ConfigError(
            f"{name}={to_dict_or_repr(schedule)}: must stay > 0 at every step; pass a positive "
            f"value such as {name}=10.0"
        )
    return schedule


def positive_value(name: str, schedule: Schedule, t: int) -> float:
    """schedule(t), checked to be a finite number > 0 (one float comparison per step)."""
    value = schedule(t)
    if not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ConfigError(
            f"{name} schedule returned {value!r} at step {t}: must be a finite number > 0; "
            "fix the schedule"
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
            return {"kind": kind, **asdict(schedule)}
    raise ConfigError(
        f"schedule {schedule!r}: only built-in schedules ({', '.join(_KINDS)}) and numbers can "
        "be serialised; build yours from br.schedules"
    )


def from_dict(d: dict[str, Any], name: str = "schedule") -> Schedule:
    """Inverse of :func:`to_dict`."""
    kind = d.get("kind")
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
