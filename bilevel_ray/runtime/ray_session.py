"""Connecting to Ray: the cluster at ``address``, the one already running, or a local one."""

from __future__ import annotations

import os

import ray

from bilevel_ray.errors import ConfigError

__all__ = ["connect"]


def connect(address: str | None = None) -> int:
    """Make sure this process is connected to Ray; returns the number of GPUs in the cluster.

    A local Ray starts without the dashboard (nothing listens beyond localhost by default).
    """
    # Train V2 is the default from Ray 2.51; say so explicitly for 2.43-2.50.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False if address is None else None,
                log_to_driver=True,
            )
        except ConnectionError as err:
            raise ConfigError(
                f"address={address!r}: cannot connect to a Ray cluster ({err}); start one with "
                "'ray start --head' or 'ray up cluster.yaml', or omit --address for a local one"
            ) from None
    return int(ray.cluster_resources().get("GPU", 0))
