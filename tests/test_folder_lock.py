"""One writer per folder (``runtime/local/folder_lock``): a second writer is refused with the
holder's pid, a killed holder never blocks the next, and two ``tune`` calls into one sweep
folder cannot both write it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import bilevel_ray as br
from bilevel_ray.runtime.local.folder_lock import LOCK_FILE, lock_folder
from bilevel_ray.runtime.tune.folder import SWEEP_FILE, claim_sweep_folder


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    folder = tmp_path / "sweep"
    first = lock_folder(folder, "sweep folder")
    with pytest.raises(br.ConfigError) as err:
        lock_folder(folder, "sweep folder")
    assert f"is being written by another process (pid {os.getpid()})" in str(err.value)
    first.release()
    assert not folder.exists()  # made by the lock and left empty: removed
    lock_folder(folder, "sweep folder").release()


def test_a_killed_writer_leaves_the_folder_free(tmp_path):
    folder = tmp_path / "sweep"
    code = (
        "import sys, time; from pathlib import Path;"
        "from bilevel_ray.runtime.local.folder_lock import lock_folder;"
        f"lock_folder(Path({str(folder)!r}), 'sweep folder'); print('held', flush=True);"
        "time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(br.ConfigError, match=rf"\(pid {child.pid}\)"):
            lock_folder(folder, "sweep folder")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases the lock with the process
        try:
            lock_folder(folder, "sweep folder").release()
            break
        except br.ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_link_at_the_locks_name_is_refused(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (tmp_path / "elsewhere").write_text("not yours\n")
    (folder / LOCK_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(br.ConfigError, match=rf"its {LOCK_FILE} cannot be opened as a plain file"):
        lock_folder(folder, "sweep folder")
    assert (tmp_path / "elsewhere").read_text() == "not yours\n"


def test_two_sweeps_into_one_folder_cannot_both_write_it(tmp_path):
    folder = tmp_path / "sweep"
    first = claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=False)
    try:
        with pytest.raises(br.ConfigError, match=r"sweep folder .* is being written by another"):
            claim_sweep_folder(folder, {"method": "bome"}, resume=False)
        assert '"pbgd_free"' in (folder / SWEEP_FILE).read_text()  # the first's, untouched
    finally:
        first.release()
    with pytest.raises(br.ConfigError, match=r"holds a sweep with other settings"):
        claim_sweep_folder(folder, {"method": "bome"}, resume=False)  # the folder's own check
