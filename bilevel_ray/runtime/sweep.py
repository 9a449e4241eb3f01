"""``br.tune``, importable without Ray: Ray Tune loads when a sweep starts."""

from __future__ import annotations

from typing import Any

__all__ = ["tune"]


def tune(factory: Any, **kwargs: Any) -> Any:
    """Search the penalty schedule and step sizes with Ray Tune; see
    :func:`bilevel_ray.runtime.tune_driver.run_sweep` for the arguments and the ranking rule."""
    from bilevel_ray.runtime.tune_driver import run_sweep

    return run_sweep(factory, **kwargs)
