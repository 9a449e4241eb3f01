"""Running one function as a Ray task on a cluster (``--address`` for ``solve`` and
``diagnose``): the problem factory, the run and its progress lines happen on the cluster; the
result comes back to this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.runtime.cluster.session import connect

__all__ = ["on_cluster"]


def on_cluster(address: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a one-CPU Ray task on the cluster at ``address``; bad input
    and divergence found there are raised here as themselves (not as Ray's wrapper)."""
    import ray

    connect(address)
    task = ray.remote(num_cpus=1, max_retries=0)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, (ConfigError, DivergenceError)):
            raise cause from None
        raise
