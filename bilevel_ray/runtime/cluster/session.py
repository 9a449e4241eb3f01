"""Connecting to Ray (the cluster at ``address``, the one already running, or a local one), and
keeping Ray's own log lines out of a user's terminal unless ``BILEVEL_RAY_VERBOSE=1``
(``--verbose`` on the command line): Ray's own errors go to a log file named on one line
(:mod:`ray_logs`), and a local Ray's processes end with the process that started it
(:mod:`guardian`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.cluster import guardian, ray_logs
from bilevel_ray.runtime.local.run_spec import verbose

__all__ = ["check_can_set_runtime_env", "connect", "quiet_train_worker", "steady_working_dir"]


def check_can_set_runtime_env(runtime_env: object) -> None:
    """Refuse a ``runtime_env`` this process cannot give its Ray job: a runtime environment is
    set when Ray starts, and Ray is already initialised here (a ``ray.init`` of the caller's,
    or an earlier call's). Checked before any work, not when connecting."""
    if runtime_env is not None and ray.is_initialized():
        raise ConfigError(
            "runtime_env: Ray is already initialised in this process, and a job's runtime "
            "environment is set when Ray starts; pass runtime_env to your own ray.init(...) "
            "instead, or call without ray.init first"
        )


def connect(address: str | None = None, runtime_env: object = None) -> int:
    """Make sure this process is connected to Ray; returns the number of GPUs in the cluster.
    ``runtime_env``: the Ray job's runtime environment (every task's and actor's), passed to
    ``ray.init`` (refused where Ray is already initialised: :func:`check_can_set_runtime_env`).

    A local Ray starts on the loopback address and without the dashboard: nothing of it is
    reachable from another machine. Its processes end with this process, however this one ends
    (a guardian process ends what Ray leaves: :mod:`guardian`).
    Unless verbose, it logs errors only, and the tracebacks and crash output of Ray's own that
    its processes print go to a log file named on one line (:mod:`ray_logs`); a run's own
    progress, warnings and tracebacks still show.
    """
    # Train V2 is the default from Ray 2.51; say so explicitly for 2.43-2.50.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train otherwise writes a worker's print() both to its log and to the console: each
    # progress line would show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ctrl-C stops a sweep or a comparison where it is, as SIGTERM does: Tune's own handler
    # would end every trial and return as if the sweep had finished (its best from stopped
    # trials, exit 0); the interrupt instead ends the record "interrupted", and --resume goes on
    # from the state Tune saved.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    quiet = not verbose()
    if quiet:
        # Tune's newer console output prints a box of the experiment's settings and a
        # TensorBoard hint around every fit, whatever its verbosity; sweeps print their own lines.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    check_can_set_runtime_env(runtime_env)
    if not ray.is_initialized():
        if quiet:
            logging.getLogger("ray").setLevel(logging.ERROR)  # start-up notices on the driver
        local = address is None and _starts_local_ray()
        _check_reachable(address)
        try:
            with _guarded(local), _keep_sigterm_handler(), _quiet_client(quiet and not local):
                ray.init(
                    address=address,
                    # A local Ray serves this machine only: it binds to the loopback address.
                    _node_ip_address="127.0.0.1" if address is None else None,
                    include_dashboard=False if address is None else None,
                    log_to_driver=True,
                    runtime_env=runtime_env,
                    logging_config=ray.LoggingConfig(log_level="ERROR") if quiet else None,
                )
        except (ConnectionError, ValueError) as err:  # unreachable, or not an address at all
            raise connect_error(address, err) from None
        if quiet:
            ray_logs.install()
    if quiet and len(ray.nodes()) == 1:
        # One node has nothing to be preempted from (if it goes, the cluster goes), and the
        # watcher actor logs an error at every group start (its arguments sit in the object
        # store). Train reads this when a group starts.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return _gpus()


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep the process's own SIGTERM handler through ``ray.init``, which replaces it with
    ``sys.exit`` and a handler of its core worker that prints a stack dump: the command line's
    handler ends a run as Ctrl-C does (its record says "interrupted"), a script's stays its own."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python, nothing to put back
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _quiet_client(quiet: bool) -> Iterator[None]:
    """While joining a cluster: Ray's client writes a warning a second to the process's stderr
    (from C++, past Python's logging and ``RAY_BACKEND_LOG_LEVEL``) for as long as the address
    does not answer as a cluster's head does; the refusal comes as one line instead, so the
    file descriptor itself is pointed elsewhere until ``ray.init`` returns."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _starts_local_ray() -> bool:
    """Whether ``ray.init()`` without an address starts a local Ray (rather than joining the
    one ``RAY_ADDRESS`` or ``ray start`` names)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # another Ray version, or an address it will refuse: guard anyway
        return True


@contextmanager
def _guarded(local: bool) -> Iterator[None]:
    """Start Ray (``local``: its own, here) so that its processes end with this process, however
    it ends: a guardian process ends them (see :mod:`guardian`), and they start with the
    marker the guardian knows them by in their environment."""
    if not local:
        yield
        return
    from ray._common.utils import get_default_ray_temp_dir

    guardian.start(get_default_ray_temp_dir())
    before = os.environ.get(guardian.MARKER)
    os.environ[guardian.MARKER] = str(os.getpid())
    try:
        yield
    finally:
        # Only Ray's processes carry it: not this process's later subprocesses.
        if before is None:
            os.environ.pop(guardian.MARKER, None)
        else:
            os.environ[guardian.MARKER] = before
    node = ray._private.worker._global_node
    if node is not None and node.all_processes:  # it did start them
        guardian.watch(node.get_session_dir_path())


REACH_S = 5.0  # for a cluster's head to accept a connection


def _check_reachable(address: str | None) -> None:
    """Refuse a ``host:port`` cluster address (``address``, else ``RAY_ADDRESS``) whose head
    does not accept a connection within :data:`REACH_S`: ``ray.init`` would retry for a minute,
    printing its client's warnings, before failing. ``auto`` and ``ray://`` are left to Ray."""
    given = address if address is not None else os.environ.get("RAY_ADDRESS")
    if not given or given in ("auto", "local") or "://" in given:
        return
    host, _, port = given.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise connect_error(address, ValueError(f"{given!r} is not host:port"))
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_S).close()
    except (OSError, UnicodeError) as err:  # refused, unreachable, no such host
        raise connect_error(address, err) from None


def connect_error(address: str | None, err: BaseException) -> ConfigError:
    """The message for a cluster that cannot be reached, naming where the address came from:
    without ``address`` Ray reads ``RAY_ADDRESS`` from the environment."""
    from_env = os.environ.get("RAY_ADDRESS") if address is None else None
    if from_env:
        return ConfigError(
            f"RAY_ADDRESS={from_env!r} (from the environment): cannot connect to a Ray cluster "
            f"({err}); start it with 'ray start --head' or 'ray up cluster.yaml', or unset "
            "RAY_ADDRESS for a local Ray"
        )
    return ConfigError(
        f"address={address!r}: cannot connect to a Ray cluster ({err}); start one with "
        "'ray start --head' or 'ray up cluster.yaml', or omit --address for a local one"
    )


def _gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def quiet_train_worker() -> None:
    """In a Train worker: drop Train's per-report INFO line ("Reporting training result ...",
    a dict of every metric per rank per report); its logger is named after its file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Train version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@contextmanager
def steady_working_dir(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Work in ``folder`` (absolute, and every path of the run resolved) while Ray runs, then
    return. A driver started by ``ray job submit --working-dir`` runs in Ray's unpacked copy of
    that folder, and Ray deletes the copy while the job's trials and workers come and go: Tune
    and Train resolve paths against the working directory and would fail mid-run."""
    try:
        before = os.getcwd()
    except FileNotFoundError:
        before = None
    os.chdir(folder)
    try:
        yield
    finally:
        if before is not None and os.path.isdir(before):
            os.chdir(before)
