"""Where a run's rows go besides its own files: an MLflow store, TensorBoard event files.

:class:`TrackingSettings` is built and checked on the driver, before Ray starts, so that a bad
URI, a folder that cannot be written or a missing package fails at once and not in the first
trial; it is a frozen dataclass of strings, so it pickles to Train workers and Tune trials as it
is (unpickling does not check again: a worker's disk is not the driver's).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.tracking.uris import is_database, local_store_path, normalize_tracking_uri

__all__ = ["DEFAULT_EXPERIMENT", "TrackingSettings", "tracking_settings"]

DEFAULT_EXPERIMENT = "bilevel_ray"
MAX_KEY_LENGTH = 250  # MLflow's limit on a tag's (and a metric's, a param's) name
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag's value
# package -> the bilevel_ray extra that installs it; a database store (SQLite included) is
# opened through SQLAlchemy and set up by Alembic, which the slim mlflow-skinny leaves out.
EXTRAS = {
    "mlflow": "mlflow",
    "sqlalchemy": "mlflow",
    "alembic": "mlflow",
    "tensorboardX": "tensorboard",
}


@dataclass(frozen=True)
class TrackingSettings:
    """The trackers of a run (none, either or both) and how its runs are named there.

    Args:
        mlflow: an MLflow tracking URI (:mod:`bilevel_ray.tracking.uris`); a local store's path
            is made absolute.
        tensorboard: a folder for TensorBoard event files (made absolute); a run's files go to
            ``{tensorboard}/{experiment}/{run name}``.
        experiment: the MLflow experiment (and TensorBoard's first folder level).
        run_name: the run's name (a sweep's: its parent run); None lets the caller choose.
        tags: MLflow tags on every run (values made strings).
        experiment_id, environment: filled in by :func:`bilevel_ray.tracking.store.open_experiment`
            on the driver (the experiment's id; the MLflow variables every process needs).
    """

    mlflow: str | None = None
    tensorboard: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    tags: Any = ()
    experiment_id: str | None = None
    environment: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are set once, here
        _check_name("experiment", self.experiment, required=True)
        _check_name("run_name", self.run_name, required=False)
        set_(self, "tags", _tags(self.tags))
        if self.mlflow is not None:
            _require("mlflow", f"mlflow={self.mlflow!r}")
            uri = normalize_tracking_uri(self.mlflow)
            if is_database(uri):
                for package in ("sqlalchemy", "alembic"):
                    _require(package, f"mlflow={uri!r} (a database store)")
            set_(self, "mlflow", uri)
            _check_local_store(uri)
        if self.tensorboard is not None:
            _require("tensorboardX", f"tensorboard={self.tensorboard!r}")
            if not isinstance(self.tensorboard, (str, os.PathLike)) or not str(self.tensorboard):
                raise ConfigError(
                    f"tensorboard={self.tensorboard!r}: not a folder; give a folder for the "
                    "event files, e.g. tensorboard='runs/tb'"
                )
            folder = Path(self.tensorboard).expanduser().resolve()
            _probe_folder(folder, f"tensorboard={str(self.tensorboard)!r}")
            set_(self, "tensorboard", str(folder))

    @property
    def enabled(self) -> bool:
        """Whether anything is tracked."""
        return self.mlflow is not None or self.tensorboard is not None

    @property
    def tag_dict(self) -> dict[str, str]:
        return dict(self.tags)

    @property
    def local_store(self) -> Path | None:
        """The MLflow store's folder or database file when it is on this machine's disk."""
        return None if self.mlflow is None else local_store_path(self.mlflow)

    def check_cluster(self, num_nodes: int) -> None:
        """Refuse a SQLite store for a cluster of several nodes: the trials and workers on the
        other nodes cannot open a file on this one (and SQLite's locks do not hold over a
        network file system)."""
        if num_nodes > 1 and self.mlflow is not None and self.mlflow.startswith("sqlite"):
            raise ConfigError(
                f"mlflow={self.mlflow!r}: a SQLite file on this machine, and the Ray cluster has "
                f"{num_nodes} nodes whose trials and workers cannot open it; run a tracking "
                f"server on it (mlflow server --backend-store-uri {self.mlflow}) and pass its "
                "address: mlflow='http://<this host>:5000'"
            )


def tracking_settings(
    mlflow: str | os.PathLike[str] | None = None,
    tensorboard: str | os.PathLike[str] | None = None,
    **names: Any,
) -> TrackingSettings | None:
    """The checked settings, or None when neither tracker is asked for (``names``:
    ``experiment``, ``run_name``, ``tags``; an ``experiment`` of None means the default)."""
    if mlflow is None and tensorboard is None:
        return None
    if names.get("experiment") is None:
        names.pop("experiment", None)
    return TrackingSettings(mlflow=mlflow, tensorboard=tensorboard, **names)


def _require(package: str, where: str) -> None:
    if find_spec(package) is None:
        raise ConfigError(
            f"{where} needs the '{package}' package, which is not installed: "
            f"pip install 'bilevel_ray[{EXTRAS[package]}]'"
        )


def _check_name(what: str, value: Any, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}={value!r}: must be a non-empty string, e.g. {what}='sweep'")


def _tags(tags: Any) -> tuple[tuple[str, str], ...]:
    """Tags as (name, text) pairs: picklable, hashable, in the order given."""
    if tags is None:
        return ()
    if isinstance(tags, Mapping):
        pairs: Iterable[Any] = tags.items()
    elif isinstance(tags, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in tags
    ):
        pairs = tags
    else:
        raise ConfigError(
            f"tags={tags!r}: must be a dict of names to values, e.g. tags={{'team': 'nlp'}}"
        )
    out = []
    for key, value in pairs:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise ConfigError(
                f"tags: the name {key!r} must be a non-empty string of at most "
                f"{MAX_KEY_LENGTH} characters (MLflow's limit)"
            )
        text = str(value)
        if len(text) > MAX_TAG_LENGTH:
            raise ConfigError(
                f"tags[{key!r}]: a value of {len(text)} characters; MLflow keeps at most "
                f"{MAX_TAG_LENGTH}: log a long text as an artifact instead"
            )
        out.append((key, text))
    return tuple(out)


def _check_local_store(uri: str) -> None:
    """A local store's folder (or a SQLite file's folder) can be written, now."""
    path = local_store_path(uri)
    if path is None:
        return
    if uri.startswith("file:"):
        _probe_folder(path, f"mlflow={uri!r}")
        return
    if path.is_dir():
        raise ConfigError(
            f"mlflow={uri!r}: {path} is a folder, not a database file; give a file in it: "
            f"sqlite:///{(path / 'mlflow.db').as_posix()}"
        )
    # A database file that cannot be written fails when the store is opened (store.py).
    _probe_folder(path.parent, f"mlflow={uri!r}")


def _probe_folder(folder: Path, where: str) -> None:
    """Create ``folder`` (with its parents) and write a file in it: the one sure test that a
    run can write there (permissions, a read-only disk, a file in the way)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where}: {folder} is a file, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(
            f"{where}: cannot write in {folder} ({err.strerror or err}); choose a folder you "
            "can write to"
        ) from None
