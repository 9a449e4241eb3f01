"""Shared fixtures. Math tests run in float64 on problems with closed-form answers."""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Keep reductions in a fixed order so that "identical" means bitwise identical.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _own_state_key(tmp_path_factory):
    # A sweep seals Tune's state with the account's key: the tests' sweeps use their own.
    import os

    os.environ["BILEVEL_RAY_STATE_KEY"] = str(tmp_path_factory.mktemp("key") / "state.key")
    yield


@pytest.fixture
def quadratic():
    return br.problems.QuadraticProblem(dim_x=3, dim_y=4, seed=0)


@pytest.fixture
def origin():
    """x0 = 0, y0 = 0 for the 3 x 4 quadratic."""
    return {"x": torch.zeros(3, dtype=torch.float64)}, {"y": torch.zeros(4, dtype=torch.float64)}


@pytest.fixture(scope="session")
def ray_2cpu():
    """One local Ray for every Ray test: 2 CPUs, no dashboard (starting Ray costs seconds)."""
    import os

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    # On the loopback address: the tests' Ray traffic never leaves this machine.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace="bilevel_ray_tests",
        _node_ip_address="127.0.0.1",
    )
    yield ray
    ray.shutdown()


class RayStarted(AssertionError):
    """The call reached Ray: its input was not refused before Ray started."""


@pytest.fixture
def no_ray(monkeypatch):
    """Connecting to Ray or starting a worker group fails the test; returns the error class
    (``pytest.raises(no_ray)`` where reaching Ray is the expected end)."""
    import bilevel_ray.runtime.cluster.session as ray_session
    import bilevel_ray.runtime.train.group as worker_group
    import bilevel_ray.runtime.tune.driver as tune_driver

    def refuse(*args, **kwargs):
        raise RayStarted("the input reached Ray before it was refused")

    monkeypatch.setattr(ray_session, "connect", refuse)
    monkeypatch.setattr(tune_driver, "connect", refuse)
    monkeypatch.setattr(worker_group, "fit_worker_group", refuse)
    return RayStarted
