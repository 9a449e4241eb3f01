"""One folder, one sweep: a sweep's folder remembers the settings it was started with
(``sweep.json``), and another sweep run into it, or a ``resume`` with other settings, is
refused with the differences named (Tune would otherwise reuse the old trials, or mix them with
the new ones, and the tables would describe neither sweep).

The folder is checked as ``solve`` / ``train`` check theirs, before Ray starts: a name with a
NUL byte, too long or not UTF-8, a link out of the storage folder, a folder or FIFO where a
table goes are refused (the sweep would otherwise run, then fail to write its results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.handed_files import read_json
from bilevel_ray.runtime.local.folder_lock import FolderLock, lock_folder
from bilevel_ray.runtime.local.output_files import atomic_write, check_output_folder
from bilevel_ray.runtime.tune.state_seal import check_state_seal

__all__ = ["SWEEP_FILE", "SWEEP_FILES", "claim_sweep_folder"]

SWEEP_FILE = "sweep.json"
SWEEP_FILES = (SWEEP_FILE, "trials.parquet", "history.parquet")  # each written atomically


def claim_sweep_folder(
    path: Path, settings: dict[str, Any], resume: bool, trust_state: bool = False
) -> FolderLock:
    """Refuse ``path`` when another process is writing it, when it holds another sweep, or this
    one without ``resume``, or Tune state this account did not seal (unless ``trust_state``);
    otherwise record ``settings`` as the folder's sweep. ``path`` is ``{storage_path}/{name}``.
    Returns the folder's lock, to release when the sweep ends."""
    check_output_folder(path.parent, path.name, "name", SWEEP_FILES, "sweep file")
    settings = json.loads(json.dumps(settings, default=repr))  # as the file will read back
    file = path / SWEEP_FILE
    started = file.is_file() or (path / "trials.parquet").exists() or _tune_state(path)
    if resume and not started:
        # Nothing to continue: a resume here would start a new sweep and say it resumed one.
        where = "does not exist" if not path.exists() else f"holds no sweep ({SWEEP_FILE})"
        raise ConfigError(
            f"sweep folder {str(path)!r} {where}: there is nothing to resume; run without "
            "--resume (resume=False) to start the sweep, or give the --name (name=...) of the "
            "sweep to resume"
        )
    # One writer: two sweeps into one folder at once would both find it new, or both resume it.
    lock = lock_folder(path, "sweep folder")
    try:
        _settle(path, settings, resume, trust_state)
    except BaseException:
        lock.release()
        raise
    return lock


def _settle(path: Path, settings: dict[str, Any], resume: bool, trust_state: bool) -> None:
    """The folder's own checks (this process holding it), then ``settings`` recorded."""
    file = path / SWEEP_FILE
    if file.is_file():
        # Bounded in size, nesting refused by name: the file is data anyone could have edited.
        fix = "delete the folder or choose a new --name"
        saved = read_json(file, f"sweep folder {str(path)!r}: {SWEEP_FILE}", fix)
        if not isinstance(saved, dict):
            raise ConfigError(
                f"sweep folder {str(path)!r}: {SWEEP_FILE} cannot be read (not a JSON object); "
                + fix
            )
        differences = [
            f"{key}: {saved.get(key)!r} then, {settings.get(key)!r} now"
            for key in sorted(set(saved) | set(settings))
            if saved.get(key) != settings.get(key)
        ]
        if differences:
            verb = "resume" if resume else "run"
            raise ConfigError(
                f"sweep folder {str(path)!r} holds a sweep with other settings ("
                + "; ".join(differences)
                + f"): cannot {verb} this sweep there; use a new --name (name=...), or resume "
                "the old sweep with its own settings"
            )
        if not resume:
            raise ConfigError(
                f"sweep folder {str(path)!r} already holds this sweep: pass --resume "
                "(resume=True) to continue it, or a new --name (name=...) to start afresh"
            )
        if (path / "trials.parquet").exists() and not _tune_state(path):
            # Resuming needs Tune's state; without it Tune would start the sweep over and
            # rewrite the finished sweep's tables.
            raise ConfigError(
                f"sweep folder {str(path)!r} holds a finished sweep whose Tune state "
                "(tuner.pkl, experiment_state-*.json) is gone: there is nothing to resume and "
                "its results stay as they are; choose a new --name (name=...) to run it again"
            )
        check_state_seal(path, trust_state)
        return
    if not resume and (path / "trials.parquet").exists():
        raise ConfigError(
            f"sweep folder {str(path)!r} holds an earlier sweep's results: pass --resume "
            "(resume=True) to continue it, or a new --name (name=...)"
        )
    atomic_write(file, lambda tmp: tmp.write_text(json.dumps(settings, indent=1, default=repr)))


def _tune_state(path: Path) -> bool:
    """Whether ``path`` holds the state Tune restores an interrupted sweep from."""
    return (path / "tuner.pkl").is_file() and any(path.glob("experiment_state-*.json"))
