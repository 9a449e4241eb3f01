"""The library's exceptions.

Every message follows one template: *where*, *what*, *the value*, *the rule*, *the fix*, e.g.
``lr_x=-0.1: must be > 0; pass a positive step size such as lr_x=0.01``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["BilevelRayError", "ConfigError", "DivergenceError"]


class BilevelRayError(Exception):
    """Base class of every error bilevel_ray raises on purpose."""


class ConfigError(BilevelRayError, ValueError):
    """Bad input found before any work started; lists every problem found, one per line."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class DivergenceError(BilevelRayError, FloatingPointError):
    """A loss became NaN or infinite, or exploded (``grew``: its first logged value and the
    value that crossed the bound); names the step and carries the last finite metrics."""

    def __init__(
        self,
        step: int,
        metric: str,
        last_finite: Mapping[str, float] | None,
        grew: tuple[float, float] | None = None,
    ):
        self.step = step
        self.metric = metric
        self.last_finite = dict(last_finite or {})
        self.grew = grew
        shown = (
            ", ".join(f"{k}={v:.6g}" for k, v in self.last_finite.items())
            if self.last_finite
            else "none (the first step already failed)"
        )
        super().__init__(
            f"diverged at step {step}: {self.what}; last finite metrics: {shown}. "
            "Lower the step sizes lr_x / lr_y; with a penalty method, a smaller gamma or a gamma "
            "ramp (br.schedules.pbgd_ramp) also helps."
        )

    @property
    def what(self) -> str:
        """What happened to the loss, in words."""
        if self.grew is None:
            return f"{self.metric} is not finite"
        start, value = self.grew
        return f"{self.metric} grew from {start:.6g} to {value:.6g}, past any converging run"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields, not its message, where it crosses processes (Ray).
        return (type(self), (self.step, self.metric, self.last_finite, self.grew))
