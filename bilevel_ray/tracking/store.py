"""Opening the MLflow store on the driver, before Ray starts.

:func:`open_experiment` reaches the store once (a SQLite file's tables are created here, a
server is asked here), gets or creates the experiment and returns the settings with its id, so
that every trial and worker logs into one experiment without racing to create it, and a store
that cannot be opened is a :class:`ConfigError` before any work starts.

A tracking server (``http://``, ``https://``) is first reached with a plain socket, within
:data:`REACH_TIMEOUT_S` seconds: MLflow's own client retries an address that does not answer
for minutes. The calls that open the experiment then run with MLflow's retries and timeout
lowered (:data:`CHECK_HTTP_SETTINGS`, unless the environment sets them): a server that accepts
connections and does not answer is refused in seconds too; the run's own logging keeps
MLflow's settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from bilevel_ray.errors import ConfigError
from bilevel_ray.tracking.settings import TrackingSettings

__all__ = ["ALLOW_FILE_STORE", "CHECK_HTTP_SETTINGS", "REACH_TIMEOUT_S", "open_experiment"]

REACH_TIMEOUT_S = 5.0  # to resolve and connect to a tracking server's address, together
# MLflow's HTTP settings while the driver opens the experiment (its defaults: 7 retries with
# backoff, 120 s a request).
CHECK_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"  # recent MLflow opens a file store only with it
ARTIFACTS = "mlartifacts"  # beside a SQLite file: where its experiments keep their artifacts


def open_experiment(settings: TrackingSettings) -> TrackingSettings:
    """``settings`` with the experiment's id (created when missing) and the MLflow variables
    every process needs; unchanged when MLflow is not asked for.

    Raises :class:`ConfigError` when the store cannot be opened (a file store that this MLflow
    refuses, a database it cannot read, a server it cannot reach) or the experiment was
    deleted."""
    if settings.mlflow is None:
        return settings
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, name = settings.mlflow, settings.experiment
    check_server(uri)
    with _quick_http():
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(name, _artifact_location(settings))
                except MlflowException:
                    # Another driver created it in between: use theirs.
                    experiment = client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
                    experiment_id = experiment.experiment_id
            else:
                experiment_id = experiment.experiment_id
        except MlflowException as err:
            raise ConfigError(_store_problem(uri, err)) from None
        except Exception as err:  # the database driver's, or the HTTP client's, own errors
            raise ConfigError(
                f"mlflow={uri!r}: cannot open the tracking store ({type(err).__name__}: "
                f"{_first_line(err)}); check the URI"
            ) from None
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment={name!r}: deleted in the store {uri} (MLflow keeps its name); restore "
            f"it (mlflow experiments restore --experiment-id {experiment_id}) or choose another "
            "experiment name"
        )
    return dataclasses.replace(
        settings, experiment_id=str(experiment_id), environment=_environment(uri)
    )


def check_server(uri: str) -> None:
    """Refuse a tracking server's address (``http(s)://host:port``) that does not accept a
    connection within :data:`REACH_TIMEOUT_S` seconds; any other URI passes."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() not in ("http", "https"):
        return
    fix = (
        "start the server (mlflow server --host 0.0.0.0 --port 5000) or correct the address, or "
        "track into a local store instead: mlflow='mlruns' or mlflow='sqlite:///mlflow.db'"
    )
    try:
        port = parsed.port or (443 if parsed.scheme.lower() == "https" else 80)
    except ValueError:
        raise ConfigError(f"mlflow={uri!r}: the port is not a number in 1..65535; {fix}") from None
    host = parsed.hostname or ""
    deadline = time.monotonic() + REACH_TIMEOUT_S
    addresses = _resolve(host, port, REACH_TIMEOUT_S)
    if isinstance(addresses, str):
        raise ConfigError(f"mlflow={uri!r}: the host {host!r} {addresses}; {fix}")
    why = "no address answered"
    for family, kind, proto, _, address in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            why = f"no answer within {REACH_TIMEOUT_S:g} s"
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(address)
            return
        except TimeoutError:
            why = f"no answer within {REACH_TIMEOUT_S:g} s"
        except OSError as err:
            why = err.strerror or str(err)
    raise ConfigError(f"mlflow={uri!r}: no tracking server answers at {host}:{port} ({why}); {fix}")


def _resolve(host: str, port: int, timeout: float) -> list[Any] | str:
    """The addresses of ``host``, or why there are none. Resolving has no timeout of its own
    (a missing DNS server blocks it): it runs in a thread that is left behind after ``timeout``."""
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as err:
            found.append(f"cannot be resolved ({getattr(err, 'strerror', None) or err})")

    thread = threading.Thread(target=lookup, name="bilevel_ray-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        return f"was not resolved within {timeout:g} s"
    return found[0] or "has no address"


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP retries and timeout lowered for the duration (where the environment does
    not set them): the driver's check of a server fails in seconds, not minutes."""
    lowered = {k: v for k, v in CHECK_HTTP_SETTINGS.items() if k not in os.environ}
    os.environ.update(lowered)
    try:
        yield
    finally:
        for key in lowered:
            os.environ.pop(key, None)


def _artifact_location(settings: TrackingSettings) -> str | None:
    """Beside a SQLite file (MLflow's default would be a folder in the current directory of
    whichever process created the experiment); the store's or the server's choice otherwise."""
    path = settings.local_store
    if path is None or not settings.mlflow.startswith("sqlite"):
        return None
    return (path.parent / ARTIFACTS).as_uri()


def _environment(uri: str) -> tuple[tuple[str, str], ...]:
    """The driver's file-store opt-in, which every trial and worker needs too (Ray starts them
    with the cluster's environment, not the driver's)."""
    value = os.environ.get(ALLOW_FILE_STORE)
    return ((ALLOW_FILE_STORE, value),) if uri.startswith("file:") and value else ()


def _store_problem(uri: str, err: Any) -> str:
    if ALLOW_FILE_STORE in str(err):
        folder = uri.removeprefix("file://")
        return (
            f"mlflow={uri!r}: this MLflow no longer opens a file store unless told to; use a "
            f"SQLite file instead (mlflow='sqlite:///{folder.rstrip('/')}/mlflow.db'), or set "
            f"{ALLOW_FILE_STORE}=true in the environment"
        )
    text = str(err)
    if "Max retries exceeded" in text or "NewConnectionError" in text:
        why = "connection refused" if "refused" in text.lower() else "no answer"
        return (
            f"mlflow={uri!r}: no tracking server answers there ({why}); start one "
            "(mlflow server --host 0.0.0.0 --port 5000) or correct the address"
        )
    return f"mlflow={uri!r}: the tracking store refused the request ({_first_line(err)})"


def _first_line(err: Any) -> str:
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
