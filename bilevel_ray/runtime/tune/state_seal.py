"""A keyed seal on Tune's pickled sweep state, so that ``resume`` never unpickles a file this
account's sweeps did not write.

Tune restores an interrupted sweep from ``tuner.pkl``, ``searcher-state-*.pkl``,
``callback-states-*.pkl`` and ``experiment_state-*.json`` (whose trials embed cloudpickle
blobs): loading them runs whatever code they hold. A sweep records, as it saves that state, an
HMAC-SHA256 of each file's name and bytes under this account's key
(:mod:`bilevel_ray.account_key`). Before Ray starts, a resume checks every such file against the
seal: a file someone else wrote, edited or planted has no matching HMAC (they do not have the
key), and the resume is refused with the reason.
``trust_state=True`` (``--trust-state``) resumes anyway, for a folder the user knows they wrote
(copied from another machine, whose key differs).

Tune saves the state on the driver in a staging folder and copies it to the sweep's folder in a
background thread, so a file's bytes are sealed in the staging folder at the moment Tune has
written them (the :class:`SealCallback`), before the copy starts; the seal keeps the last few
digests of each file, since the sweep's folder may still hold the previous copy when the driver
is killed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from ray.tune import Callback

from bilevel_ray.account_key import account_key, key_path, read_key
from bilevel_ray.atomic_files import atomic_text
from bilevel_ray.errors import ConfigError

__all__ = [
    "SEAL_FILE",
    "SealCallback",
    "check_state_seal",
    "seal_files",
    "state_files",
]

SEAL_FILE = "state_seal.json"
KEEP = 8  # digests kept per file: the copy in the sweep's folder may lag a few saves behind
# Tune's restore copies every top-level .json and .pkl of the sweep's folder and may unpickle
# any of them (tuner.pkl, experiment_state-*, searcher-state-*, search_gen_state-*,
# basic-variant-state-*, callback-states-*, ...): all are sealed but the sweep's own files,
# which bilevel_ray reads as plain JSON and never unpickles.
_SUFFIXES = (".json", ".pkl")
_OWN = frozenset({SEAL_FILE, "sweep.json", "best_schedule.json", "manifest.json"})
_MAX_SEAL_BYTES = 1 << 20


def state_files(folder: Path) -> list[Path]:
    """The entries of ``folder`` that Tune may unpickle when it restores a sweep (whatever they
    are: a link or a FIFO at such a name is one too)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.suffix in _SUFFIXES and p.name not in _OWN)


def _regular(file: Path) -> bool:
    return not file.is_symlink() and file.is_file()


def _digest(key: bytes, file: Path) -> str:
    mac = hmac.new(key, file.name.encode() + b"\0", hashlib.sha256)
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def _read_seal(sweep: Path) -> dict[str, list[str]]:
    """The seal's digests by file name; {} when there is none or it is not one."""
    file = sweep / SEAL_FILE
    try:
        if not file.is_file() or file.stat().st_size > _MAX_SEAL_BYTES:
            return {}
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        str(name): [d for d in digests if isinstance(d, str)]
        for name, digests in files.items()
        if isinstance(digests, list)
    }


def seal_files(sweep: Path, source: Path | None = None, only: str | None = None) -> bool:
    """Add the digests of the state files in ``source`` (default: the sweep's folder; ``only``:
    that file alone) to the sweep's seal; False when there is no key to seal with."""
    key = account_key()
    if key is None:
        return False
    seal = _read_seal(sweep)
    changed = False
    files = [f for f in state_files(source or sweep) if _regular(f)]
    for file in files if only is None else [f for f in files if f.name == only]:
        digest = _digest(key, file)
        kept = seal.setdefault(file.name, [])
        if digest not in kept:
            kept.append(digest)
            del kept[:-KEEP]
            changed = True
    if changed:
        text = json.dumps({"version": 1, "files": seal}, indent=1, sort_keys=True)
        atomic_text(sweep / SEAL_FILE, text)
    return True


def check_state_seal(sweep: Path, trust_state: bool) -> None:
    """Refuse to resume ``sweep`` when a file Tune would unpickle is not sealed by this account
    (unless ``trust_state``)."""
    if trust_state:
        return
    files = state_files(sweep)
    if not files:
        return
    key, seal = read_key(), _read_seal(sweep)
    if key is None or not seal:
        why = (
            f"it has no {SEAL_FILE}"
            if not seal
            else f"this account has no sealing key ({key_path()})"
        )
        unsealed = [f.name for f in files]
    else:
        unsealed = [
            f.name for f in files if not _regular(f) or _digest(key, f) not in seal.get(f.name, [])
        ]
        why = "they changed since the sweep wrote them, or it never wrote them"
    if unsealed:
        raise ConfigError(
            f"sweep folder {str(sweep)!r}: Tune's saved state ({', '.join(unsealed)}) was not "
            f"sealed by a sweep of this account ({why}); resuming unpickles it, which runs "
            "any code it holds. Resume only sweeps you ran; for one you did run (copied from "
            "another machine, or killed while saving), pass --trust-state (trust_state=True)"
        )


class SealCallback(Callback):
    """Seals Tune's state files in the driver's staging folder as Tune saves them."""

    def __init__(self, sweep: Path):
        self.sweep = Path(sweep)
        self._staging: Path | None = None
        self._seen: dict[str, tuple[int, int]] = {}

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._staging is None and trials:
            storage = trials[0].storage
            self._staging = Path(storage.experiment_driver_staging_path)
            # A resumed sweep's callbacks come from its tuner.pkl: the folder may have moved.
            if Path(storage.experiment_fs_path).is_dir():
                self.sweep = Path(storage.experiment_fs_path)

    def get_state(self) -> dict | None:
        # Tune calls this within its save, after the trials' and the searcher's files are
        # written and before it starts copying them to the sweep's folder.
        self._seal()
        return None

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._seal()  # the callbacks' own states are written after get_state

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._seal()  # after Tune's last save

    def _seal(self) -> None:
        if self._staging is None or not self._staging.is_dir():
            return
        stats = {}
        for file in filter(_regular, state_files(self._staging)):
            st = file.stat()
            stats[file.name] = (st.st_size, st.st_mtime_ns)
        if stats != self._seen:
            seal_files(self.sweep, self._staging)
            self._seen = stats
