"""Real trackers on local disk: an MLflow SQLite store (read back with MLflow's client) and
TensorBoard event files (read back with TensorBoard's own reader)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """A SQLite store with MLflow's tables, made once: creating them runs MLflow's schema
    migrations (seconds), copying the file takes none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(tmp_path, _empty_store) -> str:
    """A fresh SQLite store of this test's own: ``sqlite:////<tmp>/store/mlflow.db``."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_empty_store, db)
    return f"sqlite:///{db}"
