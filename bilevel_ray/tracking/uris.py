"""The MLflow tracking URI a user gives, checked and made absolute on the driver.

A Tune trial runs in its own working directory and a Train worker wherever Ray starts it, so a
relative store (``mlruns``, ``sqlite:///mlflow.db``) is made absolute here, where the user's
working directory is the one they meant. Accepted:

* a folder or a ``file:`` URI: MLflow's file store (recent MLflow opens it only with
  ``MLFLOW_ALLOW_FILE_STORE=true``, which :mod:`bilevel_ray.tracking.store` says);
* ``sqlite:///path/mlflow.db``: a SQLite file (three slashes: relative; four: absolute);
* ``postgresql://``, ``mysql://``, ``mssql://`` (``+driver`` allowed): a database MLflow
  reaches through SQLAlchemy;
* ``http://``, ``https://``: a tracking server (``mlflow server``), the choice for a cluster;
* ``databricks`` or ``databricks://profile``;
* the scheme of a plugin: a package that registers an ``mlflow.tracking_store`` entry point.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from bilevel_ray.errors import ConfigError

__all__ = ["is_database", "local_store_path", "normalize_tracking_uri"]

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks")
EXAMPLES = (
    "a folder (mlruns), sqlite:///mlflow.db, or the http://host:5000 address of a tracking "
    "server (mlflow server)"
)


def normalize_tracking_uri(uri: str | os.PathLike[str]) -> str:
    """``uri`` as MLflow will be given it everywhere: a local store's path made absolute.

    Raises :class:`ConfigError` for an empty URI, an unknown scheme, an in-memory SQLite
    database (each process would have its own) or a ``file:`` URI on another host."""
    if isinstance(uri, os.PathLike):
        return Path(uri).expanduser().resolve().as_uri()
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"mlflow={uri!r}: not a tracking URI; give {EXAMPLES}")
    uri = uri.strip()
    if uri == "databricks" or uri.startswith("databricks://"):
        return uri
    scheme = urlparse(uri).scheme.lower()
    if not scheme:
        return Path(uri).expanduser().resolve().as_uri()
    if scheme == "file":
        return _file_uri(uri)
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2://...
    if base == "sqlite":
        return _sqlite_uri(uri)
    if base in DATABASE_SCHEMES:
        return uri
    if scheme in ("http", "https"):
        if not urlparse(uri).netloc:
            raise ConfigError(
                f"mlflow={uri!r}: a server address needs a host; give e.g. {scheme}://host:5000"
            )
        return uri
    if scheme in _plugin_schemes():
        return uri
    known = ", ".join(f"{s}:" for s in ("file", *DATABASE_SCHEMES, *SERVER_SCHEMES))
    raise ConfigError(
        f"mlflow={uri!r}: unknown tracking URI scheme '{scheme}:' (MLflow opens {known} and the "
        f"schemes of installed store plugins); give {EXAMPLES}"
    )


def is_database(uri: str) -> bool:
    """Whether MLflow opens the store through SQLAlchemy (SQLite, PostgreSQL, MySQL, MSSQL)."""
    return urlparse(uri).scheme.lower().split("+", 1)[0] in DATABASE_SCHEMES


def local_store_path(uri: str) -> Path | None:
    """The folder of a file store, or the database file of a SQLite store; None for a store
    elsewhere (a server, a remote database)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme.split("+", 1)[0] == "sqlite":
        return Path(uri.split(":///", 1)[1].split("?", 1)[0])
    return None


def _file_uri(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ConfigError(
            f"mlflow={uri!r}: a file store on host '{parsed.netloc}' cannot be opened from here; "
            "give a folder on this machine (file:///path/mlruns) or a tracking server's http:// "
            "address"
        )
    path = unquote(parsed.path)
    if not path:
        raise ConfigError(f"mlflow={uri!r}: the file store has no path; give file:///path/mlruns")
    return Path(path).expanduser().resolve().as_uri()


def _sqlite_uri(uri: str) -> str:
    """``sqlite:///relative.db`` made ``sqlite:////absolute/relative.db``; query kept."""
    scheme, _, rest = uri.partition("://")
    if not rest.startswith("/") or rest in ("/", "/:memory:") or rest.startswith("/:memory:?"):
        raise ConfigError(
            f"mlflow={uri!r}: an in-memory SQLite database lives in one process only, and every "
            "trial and worker logs from its own; give a file: sqlite:///path/mlflow.db"
        )
    path, sep, query = rest[1:].partition("?")
    absolute = Path(unquote(path)).expanduser().resolve()
    return f"{scheme}:///{absolute.as_posix()}{sep}{query}"  # four slashes: an absolute path


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register (``mlflow.tracking_store`` entry points)."""
    try:
        return {e.name.lower() for e in metadata.entry_points(group="mlflow.tracking_store")}
    except Exception:  # a broken distribution's metadata: no plugins rather than a crash
        return set()
