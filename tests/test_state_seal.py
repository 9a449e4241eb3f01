"""The keyed seal on Tune's pickled sweep state: a resume unpickles only files a sweep of this
account wrote (``runtime/tune/state_seal.py``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat

import pytest

import bilevel_ray as br
from bilevel_ray.account_key import key_path
from bilevel_ray.runtime.tune.state_seal import (
    KEEP,
    SEAL_FILE,
    check_state_seal,
    seal_files,
    state_files,
)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_RAY_STATE_KEY", str(tmp_path / "config" / "state.key"))
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"the tuner")
    (folder / "experiment_state-2026-12-06.json").write_text('{"trial_data": []}')
    (folder / "searcher-state-2026-12-06.pkl").write_bytes(b"the searcher")
    (folder / "sweep.json").write_text("{}")  # ours, read as JSON: not Tune's state
    return folder


def test_the_state_files_are_every_json_and_pkl_tune_restores_but_the_sweeps_own(sweep):
    (sweep / "basic-variant-state-1.json").write_text("{}")
    (sweep / "callback-states-1.pkl").write_bytes(b"")
    (sweep / "search_gen_state-1.json").write_bytes(b"")
    for own in ("best_schedule.json", "manifest.json", "trials.parquet"):
        (sweep / own).write_text("{}")
    assert [f.name for f in state_files(sweep)] == [
        "basic-variant-state-1.json",
        "callback-states-1.pkl",
        "experiment_state-2026-12-06.json",
        "search_gen_state-1.json",
        "searcher-state-2026-12-06.pkl",
        "tuner.pkl",
    ]


def test_a_sealed_sweep_resumes_and_the_seal_is_an_hmac_of_name_and_bytes(sweep):
    assert seal_files(sweep)
    check_state_seal(sweep, trust_state=False)
    key = key_path().read_bytes()
    assert len(key) == 32 and stat.S_IMODE(os.stat(key_path()).st_mode) == 0o600
    seal = json.loads((sweep / SEAL_FILE).read_text())
    expected = hmac.new(key, b"tuner.pkl\0the tuner", hashlib.sha256).hexdigest()
    assert seal["files"]["tuner.pkl"] == [expected]


@pytest.mark.parametrize(
    "tamper, named",
    [
        (lambda s: (s / "tuner.pkl").write_bytes(b"cos\nsystem\n(S'id'\ntR."), "tuner.pkl"),
        (lambda s: (s / "callback-states-9.pkl").write_bytes(b"planted"), "callback-states-9.pkl"),
        (
            lambda s: (s / "experiment_state-2026-12-06.json").write_text('{"x": 1}'),
            "experiment_state-2026-12-06.json",
        ),
        (
            lambda s: (s / "search_gen_state-9999.json").write_bytes(b"cos\nsystem\n"),
            "search_gen_state-9999.json",
        ),
        (lambda s: os.mkfifo(s / "searcher-state-9.pkl"), "searcher-state-9.pkl"),
        (lambda s: (s / "z.pkl").symlink_to("/dev/zero"), "z.pkl"),
    ],
    ids=["edited", "planted", "edited-json", "search-gen-state", "fifo", "link"],
)
def test_a_file_the_sweep_did_not_write_is_refused(sweep, tamper, named):
    seal_files(sweep)
    tamper(sweep)
    with pytest.raises(br.ConfigError) as err:
        check_state_seal(sweep, trust_state=False)
    message = str(err.value)
    assert f"Tune's saved state ({named})" in message
    assert "changed since the sweep wrote them" in message and "--trust-state" in message
    check_state_seal(sweep, trust_state=True)  # the user's word for a folder they wrote


def test_a_folder_without_a_seal_is_refused(sweep):
    with pytest.raises(br.ConfigError, match=rf"it has no {SEAL_FILE}\); resuming unpickles"):
        check_state_seal(sweep, trust_state=False)


def test_a_seal_made_with_another_key_is_refused(sweep, tmp_path, monkeypatch):
    seal_files(sweep)  # another machine's sweep, copied here
    monkeypatch.setenv("BILEVEL_RAY_STATE_KEY", str(tmp_path / "other" / "state.key"))
    with pytest.raises(br.ConfigError, match=r"this account has no sealing key"):
        check_state_seal(sweep, trust_state=False)
    seal_files(tmp_path / "no-sweep")  # makes this account's key
    with pytest.raises(br.ConfigError, match=r"changed since the sweep wrote them"):
        check_state_seal(sweep, trust_state=False)


def test_the_copy_may_lag_a_few_saves_behind(sweep):
    # Tune copies its staging folder to the sweep's in the background: a killed driver may
    # leave an earlier save there, which the seal still knows.
    versions = [f"state {i}".encode() for i in range(KEEP + 1)]
    for version in versions:
        (sweep / "tuner.pkl").write_bytes(version)
        seal_files(sweep)
    for version in versions[1:]:
        (sweep / "tuner.pkl").write_bytes(version)
        check_state_seal(sweep, trust_state=False)
    (sweep / "tuner.pkl").write_bytes(versions[0])  # older than the seal keeps
    with pytest.raises(br.ConfigError, match=r"\(tuner\.pkl\)"):
        check_state_seal(sweep, trust_state=False)


def test_without_a_writable_key_folder_the_sweep_runs_unsealed(sweep, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BILEVEL_RAY_STATE_KEY", str(blocker / "state.key"))
    assert not seal_files(sweep)
    assert not (sweep / SEAL_FILE).exists()


def test_a_damaged_seal_file_seals_nothing(sweep):
    seal_files(sweep)
    (sweep / SEAL_FILE).write_text("[" * 100_000)
    with pytest.raises(br.ConfigError, match=rf"it has no {SEAL_FILE}"):
        check_state_seal(sweep, trust_state=False)


def test_trust_state_resumes_what_the_seal_refuses(tmp_path, no_ray):
    """From the command line: the planted state is refused before Ray starts, and
    ``--trust-state`` goes on to Ray with it."""
    import contextlib
    import pickle

    from bilevel_ray.cli import main

    argv = f"tune quadratic --samples 2 --steps 20 --scheduler fifo --out {tmp_path} --name s"
    with contextlib.suppress(no_ray):  # the first call writes its sweep.json, then reaches Ray
        main([*argv.split(), "--quiet"])
    (tmp_path / "s" / "tuner.pkl").write_bytes(pickle.dumps(print))
    (tmp_path / "s" / "experiment_state-1.json").write_text("{}")
    assert main([*argv.split(), "--quiet", "--resume"]) == 2
    with pytest.raises(no_ray):
        main([*argv.split(), "--quiet", "--resume", "--trust-state"])
