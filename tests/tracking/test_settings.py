"""TrackingSettings: URIs made absolute, and every refusal before Ray starts, by its message."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

from bilevel_ray.errors import ConfigError
from bilevel_ray.tracking import TrackingSettings, tracking_settings

from .readers import MLFLOW_EXTRA

pytest.importorskip("mlflow", reason=MLFLOW_EXTRA)


def test_nothing_asked_for_is_no_settings():
    assert tracking_settings() is None
    assert tracking_settings(experiment=None) is None


def test_local_stores_and_folders_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A trial runs in its own folder: a relative store would be a different one there.
    assert TrackingSettings(mlflow="mlruns").mlflow == (tmp_path / "mlruns").as_uri()
    assert TrackingSettings(mlflow=Path("runs")).mlflow == (tmp_path / "runs").as_uri()
    assert TrackingSettings(mlflow="file:rel").mlflow == (tmp_path / "rel").as_uri()
    relative = TrackingSettings(mlflow="sqlite:///db/mlflow.db")
    assert relative.mlflow == f"sqlite:///{tmp_path}/db/mlflow.db"
    assert relative.local_store == tmp_path / "db" / "mlflow.db"
    absolute = f"sqlite:///{tmp_path}/other.db"
    assert TrackingSettings(mlflow=absolute).mlflow == absolute
    board = tracking_settings(tensorboard="tb", experiment=None)
    assert board.tensorboard == str(tmp_path / "tb") and board.experiment == "bilevel_ray"
    assert (tmp_path / "tb").is_dir()


@pytest.mark.parametrize(
    "uri",
    [
        "http://tracking:5000",
        "https://tracking.example/mlflow",
        "postgresql+psycopg2://user@db/mlflow",
        "mysql://db/mlflow",
        "databricks",
        "databricks://profile",
    ],
)
def test_stores_elsewhere_are_kept_as_given(uri):
    settings = TrackingSettings(mlflow=uri)
    assert settings.mlflow == uri and settings.local_store is None


def test_settings_travel_by_pickle_without_being_checked_again(tmp_path):
    settings = TrackingSettings(
        mlflow=f"sqlite:///{tmp_path}/m.db",
        tensorboard=tmp_path / "tb",
        experiment="sweep",
        tags={"team": "nlp", "n": 3},
    )
    assert settings.tags == (("team", "nlp"), ("n", "3"))
    (tmp_path / "tb").rmdir()  # a worker's disk need not hold the driver's folders
    copy = pickle.loads(pickle.dumps(settings))
    assert copy == settings and copy.tag_dict == {"team": "nlp", "n": "3"}


def _refused(match: str, **kwargs):
    with pytest.raises(ConfigError, match=match) as caught:
        TrackingSettings(**kwargs)
    return str(caught.value)


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("ftp://host/x", r"mlflow='ftp://host/x': unknown tracking URI scheme 'ftp:'.*sqlite:///"),
        ("", r"mlflow='': not a tracking URI; give a folder \(mlruns\)"),
        (5, r"mlflow=5: not a tracking URI"),
        ("sqlite://", r"in-memory SQLite database lives in one process only"),
        ("sqlite:///:memory:", r"in-memory SQLite.*give a file: sqlite:///path/mlflow.db"),
        ("file://otherhost/x", r"a file store on host 'otherhost' cannot be opened from here"),
        ("file://", r"the file store has no path"),
        ("http://", r"a server address needs a host; give e.g. http://host:5000"),
    ],
)
def test_a_bad_tracking_uri_is_refused(uri, match):
    _refused(match, mlflow=uri)


def test_a_folder_given_as_the_sqlite_file_is_refused(tmp_path):
    message = _refused(r"is a folder, not a database file", mlflow=f"sqlite:///{tmp_path}")
    assert f"sqlite:///{tmp_path}/mlflow.db" in message


def test_a_file_in_the_way_is_refused(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    _refused(r"tensorboard='.*taken': .*taken is a file, not a folder", tensorboard=blocker)
    _refused(r"mlflow='file://.*taken': .*is a file, not a folder", mlflow=str(blocker))
    _refused(
        r"mlflow='sqlite:.*': .*taken is a file, not a folder", mlflow=f"sqlite:///{blocker}/m.db"
    )
    # A file further up: the folder cannot be made.
    _refused(r"cannot write in .*taken/a/b \(Not a directory\)", tensorboard=blocker / "a" / "b")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_nobody_can_write_is_refused():
    # /proc takes no new files, not even root's: the one unwritable folder every Linux has.
    _refused(
        r"tensorboard='/proc/bilevel_ray_tb': cannot write in", tensorboard="/proc/bilevel_ray_tb"
    )


@pytest.mark.parametrize(
    ("package", "kwargs", "extra"),
    [
        ("mlflow", {"mlflow": "sqlite:///m.db"}, "mlflow"),
        ("sqlalchemy", {"mlflow": "sqlite:///m.db"}, "mlflow"),
        ("alembic", {"mlflow": "postgresql://db/mlflow"}, "mlflow"),
        ("tensorboardX", {"tensorboard": "tb"}, "tensorboard"),
    ],
)
def test_a_missing_package_names_the_extra(monkeypatch, tmp_path, package, kwargs, extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, package, None)  # what an import of it finds: nothing
    message = _refused(f"needs the '{package}' package, which is not installed", **kwargs)
    assert message.endswith(f"pip install 'bilevel_ray[{extra}]'")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experiment": ""}, r"experiment='': must be a non-empty string"),
        ({"experiment": None}, r"experiment=None: must be a non-empty string"),
        ({"run_name": 3}, r"run_name=3: must be a non-empty string"),
        ({"tags": "team=nlp"}, r"tags='team=nlp': must be a dict of names to values"),
        ({"tags": {"": 1}}, r"tags: the name '' must be a non-empty string of at most 250"),
        ({"tags": {"long": "x" * 8001}}, r"tags\['long'\]: a value of 8001 characters"),
        ({"tensorboard": ""}, r"tensorboard='': not a folder"),
    ],
)
def test_bad_names_are_refused(kwargs, match):
    _refused(match, **kwargs)


def test_a_sqlite_store_is_refused_for_a_cluster_of_several_nodes(tmp_path):
    local = TrackingSettings(mlflow=f"sqlite:///{tmp_path}/m.db")
    local.check_cluster(1)
    with pytest.raises(ConfigError, match=r"the Ray cluster has 3 nodes.*mlflow server"):
        local.check_cluster(3)
    TrackingSettings(mlflow="http://tracking:5000").check_cluster(3)
