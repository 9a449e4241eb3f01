"""Opening the MLflow store on the driver: the experiment, where its artifacts go, and the
stores that cannot be opened."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from bilevel_ray.errors import ConfigError
from bilevel_ray.tracking import TrackingSettings, open_experiment
from bilevel_ray.tracking.store import ALLOW_FILE_STORE

from .readers import MLFLOW_EXTRA

mlflow = pytest.importorskip("mlflow", reason=MLFLOW_EXTRA)
from mlflow.tracking import MlflowClient  # noqa: E402


def test_the_experiment_is_created_once_with_its_artifacts_beside_the_database(sqlite_uri):
    opened = open_experiment(TrackingSettings(mlflow=sqlite_uri, experiment="sweep"))
    experiment = MlflowClient(sqlite_uri).get_experiment(opened.experiment_id)
    assert experiment.name == "sweep"
    database = Path(sqlite_uri.removeprefix("sqlite:///"))
    # Not a folder in whichever process's working directory created the experiment.
    assert experiment.artifact_location == (database.parent / "mlartifacts").as_uri()
    again = open_experiment(TrackingSettings(mlflow=sqlite_uri, experiment="sweep"))
    assert again.experiment_id == opened.experiment_id and again.environment == ()


def test_nothing_to_open_without_mlflow(tmp_path):
    board = TrackingSettings(tensorboard=tmp_path)
    assert open_experiment(board) is board


def test_a_deleted_experiment_is_refused(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(ConfigError, match=r"experiment='gone': deleted in the store .*restore"):
        open_experiment(TrackingSettings(mlflow=sqlite_uri, experiment="gone"))


def _file_store_needs_the_variable() -> bool:
    from mlflow.store.tracking.file_store import FileStore

    return ALLOW_FILE_STORE in inspect.getsource(FileStore.__init__)


def test_a_file_store_this_mlflow_refuses_names_both_ways_out(tmp_path, monkeypatch):
    if not _file_store_needs_the_variable():
        pytest.skip("this MLflow opens a file store without being told to")
    monkeypatch.delenv(ALLOW_FILE_STORE, raising=False)
    with pytest.raises(ConfigError) as caught:
        open_experiment(TrackingSettings(mlflow=str(tmp_path / "mlruns")))
    message = str(caught.value)
    assert "this MLflow no longer opens a file store unless told to" in message
    assert f"mlflow='sqlite:///{tmp_path}/mlruns/mlflow.db'" in message
    assert f"set {ALLOW_FILE_STORE}=true" in message


def test_a_file_store_opted_into_carries_the_opt_in_to_every_process(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_FILE_STORE, "true")
    opened = open_experiment(TrackingSettings(mlflow=str(tmp_path / "mlruns")))
    assert opened.environment == ((ALLOW_FILE_STORE, "true"),)
    assert MlflowClient(opened.mlflow).get_experiment(opened.experiment_id).name == "bilevel_ray"


def test_a_file_that_is_no_database_is_refused(tmp_path):
    database = tmp_path / "notes.db"
    database.write_text("not a database, just notes\n" * 100)
    with pytest.raises(
        ConfigError, match=r"mlflow='sqlite:///.*notes.db': cannot open the tracking store \("
    ):
        open_experiment(TrackingSettings(mlflow=f"sqlite:///{database}"))


def test_a_server_nobody_answers_is_refused():
    """Refused by a socket check in seconds (MLflow's own client retried for minutes)."""
    import time

    expected = (
        r"^mlflow='http://127.0.0.1:9': no tracking server answers at 127\.0\.0\.1:9 \(.*\); "
        r"start the server .*or track into a local store instead: mlflow='mlruns' or "
        r"mlflow='sqlite:///mlflow\.db'$"
    )
    started = time.monotonic()
    with pytest.raises(ConfigError, match=expected):
        open_experiment(TrackingSettings(mlflow="http://127.0.0.1:9"))
    assert time.monotonic() - started < 10


def test_a_server_that_accepts_and_never_answers_is_refused_in_seconds():
    """MLflow's retries and timeout are lowered while the driver opens the experiment."""
    import socket
    import time

    from bilevel_ray.tracking import store

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections (the kernel does), answers nothing
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConfigError, match=rf"^mlflow='http://127\.0\.0\.1:{port}': "):
            open_experiment(TrackingSettings(mlflow=f"http://127.0.0.1:{port}"))
    limit = int(store.CHECK_HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    assert time.monotonic() - started < 4 * limit + 10


def test_a_server_that_refuses_is_refused_with_its_reason(monkeypatch):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Denying(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error_code": "PERMISSION_DENIED", "message": "no access"})
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):  # keep the test's output clean
            pass

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = HTTPServer(("127.0.0.1", 0), Denying)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(ConfigError) as caught:
            open_experiment(TrackingSettings(mlflow=uri))
    finally:
        server.shutdown()
        server.server_close()
    assert str(caught.value).startswith(f"mlflow={uri!r}: the tracking store refused the request (")
    assert "PERMISSION_DENIED" in str(caught.value)
