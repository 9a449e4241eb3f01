"""``br.tune`` and ``br.compare``, importable without Ray: Ray Tune loads when one starts."""

from __future__ import annotations

from typing import Any

__all__ = ["compare", "tune"]


def tune(factory: Any, **kwargs: Any) -> Any:
    """Search the penalty schedule and step sizes with Ray Tune; see
    :func:`bilevel_ray.runtime.tune.driver.run_sweep` for the arguments and the ranking rule."""
    from bilevel_ray.runtime.tune.driver import run_sweep

    return run_sweep(factory, **kwargs)


def compare(factory: Any, **kwargs: Any) -> Any:
    """Run every method under one wall-clock budget and recommend one; see
    :func:`bilevel_ray.runtime.compare.driver.compare` for the arguments and the rule."""
    from bilevel_ray.runtime.compare.driver import compare as run_compare

    return run_compare(factory, **kwargs)
