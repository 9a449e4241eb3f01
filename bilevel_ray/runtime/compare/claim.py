"""A comparison's folder, claimed before any work: ``claim.json`` names the process writing it.

Two ``compare`` calls into one folder both found it empty (it stays empty until the runs end)
and wrote into it together. Now the first call creates ``{storage_path}/{name}/claim.json``
exclusively (written whole to a temporary file, then ``os.link``-ed into place, which fails
when the name exists: a reader never meets half a claim), holding its pid, host, process start
and time; a second call meets the claim and is refused. The claim is removed when the call
ends, however it ends; only a killed call leaves it, and then:

* a claim whose process is gone (on this host: no such pid, a zombie, or the pid reused by a
  later process) is stale: ``resume=True`` takes it over (replaced atomically, so a writer
  elsewhere always meets a claim), a call without it is told to pass ``--resume``;
* a claim whose process runs refuses even ``--resume`` ("is being written by pid N ...");
* a claim from another host cannot be judged from here: refused, with the file to remove once
  that call has ended.

On this host, the claim's judgement and takeover hold an ``flock`` on the folder, so two
resumes of one stale claim cannot both take it.

Then, the claim held, the folder's contents are checked against the call: a new comparison
needs it empty; ``resume=True`` needs an unfinished comparison in it (its ``manifest.json``).
A refused call leaves the folder as it found it (its own claim removed, a folder it created
removed).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel_ray.atomic_files import atomic_text
from bilevel_ray.errors import ConfigError
from bilevel_ray.records.manifest import MANIFEST, now, read_manifest
from bilevel_ray.runtime.local.output_files import check_output_folder, check_writable

try:  # POSIX; elsewhere the exclusive link alone guards the claim
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["CLAIM", "Claimed", "claim_folder", "claim_record", "is_alive"]

CLAIM = "claim.json"
MAX_CLAIM_BYTES = 1 << 16


@dataclass
class Claimed:
    """The folder this call holds: ``storage``, ``folder``, this call's claim, and the stale
    claim it took over (None when there was none)."""

    storage: Path
    folder: Path
    record: dict[str, Any]
    took_over: dict[str, Any] | None = None


def claim_record() -> dict[str, Any]:
    """This process's claim: pid, host, process start (to tell a reused pid), time, token."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "started": now(),
        "token": secrets.token_hex(8),
    }


@contextlib.contextmanager
def claim_folder(storage_path: Any, name: str, resume: bool) -> Iterator[Claimed]:
    """Claim ``{storage_path}/{name}`` (default storage ``~/ray_results``) for this call while
    the block runs (module docstring); raises ConfigError, the folder unchanged, when it is
    not this call's to write."""
    storage = check_writable(storage_path or Path.home() / "ray_results", "storage_path")
    # As solve / train check theirs: the name, no link out of storage_path, a folder if it
    # exists. Its files are written with atomic_write (a link is replaced, not followed).
    folder = check_output_folder(storage, name, "name")
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        with _locked(folder):
            record, took_over = _take(folder, resume)
    except BaseException:
        _tidy(folder, created)
        raise
    claimed = Claimed(storage, folder, record, took_over)
    try:
        yield claimed
    finally:
        _release(folder, claimed.record)
        _tidy(folder, created)


def _take(folder: Path, resume: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This call's claim on ``folder`` (created, or a stale one taken over by a resume: then
    the stale one too), the folder's contents fit for the call; raises ConfigError
    otherwise."""
    path, mine = folder / CLAIM, claim_record()
    try:
        _create(path, mine)
    except FileExistsError:
        held = _read(path)
        _refuse_held(folder, held, resume)
        _check_contents(folder, resume)  # before the takeover: a refusal changes nothing
        atomic_text(path, json.dumps(mine, indent=1) + "\n")
        return mine, held
    try:
        _check_contents(folder, resume)
    except BaseException:
        _release(folder, mine)
        raise
    return mine, None


def _create(path: Path, record: dict[str, Any]) -> None:
    """``record`` at ``path``, whole, or FileExistsError when a claim is there."""
    text = json.dumps(record, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CLAIM}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        linked = _link(tmp, path)
    finally:
        os.unlink(tmp)
    if linked:
        return
    # A file system without hard links: created exclusively, then written.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _link(tmp: str, path: Path) -> bool:
    """Link ``tmp`` at ``path``: atomic, and FileExistsError where the name exists (also on
    NFS); False where the file system has no hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        return False
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The claim at ``path``; None when it cannot be read as one."""
    try:
        if path.stat().st_size > MAX_CLAIM_BYTES:
            return None
        held = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(held, dict) or not isinstance(held.get("pid"), int):
        return None
    return held


def _refuse_held(folder: Path, held: dict[str, Any] | None, resume: bool) -> None:
    """Refuse a claim this call cannot take: unreadable, live, from another host, or stale
    without ``resume``."""
    where = f"comparison folder {str(folder)!r}"
    if held is None:
        raise ConfigError(
            f"{where}: its {CLAIM} cannot be read as a claim (pid, host, time): if no comparison "
            f"is writing the folder, remove {CLAIM} and pass --resume (resume=True); or use a "
            "new --name (name=...)"
        )
    who = f"pid {held['pid']} on {held.get('host')!r} since {held.get('started')}"
    if held.get("host") != socket.gethostname():
        raise ConfigError(
            f"{where} is claimed by {who}, and this host cannot tell whether that process still "
            f"runs: use a new --name (name=...), or once it has ended remove {CLAIM} and pass "
            "--resume (resume=True)"
        )
    if is_alive(held["pid"], held.get("process_start")):
        raise ConfigError(
            f"{where} is being written by {who}: use a new --name (name=...), or wait until "
            "it ends and pass --resume (resume=True) if it did not finish"
        )
    if not resume and _held(folder):  # a writer killed before it wrote anything: a new start
        raise ConfigError(
            f"{where} holds an unfinished comparison (its writer, {who}, ended without "
            "finishing it): pass --resume (resume=True) to continue it, or use a new --name "
            "(name=...)"
        )


def _check_contents(folder: Path, resume: bool) -> None:
    """A new comparison needs an empty folder; a resume, an unfinished comparison."""
    where = f"comparison folder {str(folder)!r}"
    held = _held(folder)
    if not resume:
        if not held:
            return
        if _unfinished(folder):
            raise ConfigError(
                f"{where} holds an unfinished comparison: pass --resume (resume=True) to "
                "continue it, or use a new --name (name=...)"
            )
        raise ConfigError(
            f"{str(folder)!r} already holds a comparison: use a new --name (name=...) or "
            "remove the folder"
        )
    if not held:
        raise ConfigError(
            f"{where} holds no comparison to resume: run it without --resume (resume=False) "
            "to start it there"
        )
    manifest = read_manifest(folder, where)
    if manifest is None:
        raise ConfigError(
            f"{where} holds files but no comparison's record ({MANIFEST}): there is nothing to "
            "check a resume against; use a new --name (name=...)"
        )
    if manifest.get("kind") != "comparison":
        raise ConfigError(
            f"{where} holds a {manifest.get('kind')}, not a comparison: use a new --name (name=...)"
        )
    outcome = manifest.get("outcome") or {}
    if outcome.get("status") == "completed":
        raise ConfigError(
            f"{where} holds a finished comparison (recommended: {outcome.get('recommended')}): "
            "there is nothing to resume, and its files stay as they are (bilevel-ray show "
            "shows it); use a new --name (name=...) to run it again"
        )


def _held(folder: Path) -> list[Path]:
    """What the folder holds besides claims."""
    return [p for p in folder.iterdir() if p.name != CLAIM and not p.name.startswith(f".{CLAIM}")]


def _unfinished(folder: Path) -> bool:
    """Whether ``folder`` holds a comparison that started and did not finish."""
    try:
        manifest = read_manifest(folder, "")
    except ConfigError:
        return False
    if manifest is not None:
        status = (manifest.get("outcome") or {}).get("status")
        return manifest.get("kind") == "comparison" and status != "completed"
    return False


def is_alive(pid: int, process_start: Any = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not; nor a later process that
    reuses the pid, where the process start differs from ``process_start``)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's process: it exists; its state is read below
        return _alive_by_stat(pid, process_start)
    return _alive_by_stat(pid, process_start)


def _alive_by_stat(pid: int, process_start: Any) -> bool:
    """From /proc: not a zombie, and started when the claim says (not a reused pid)."""
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc: the pid answering is all we know
    state, started = stat
    return state != "Z" and (process_start is None or started == process_start)


def _process_start(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc; None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` while the claim is judged and taken (this host)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _release(folder: Path, record: dict[str, Any]) -> None:
    """Remove this call's claim (only while it is still this call's)."""
    path = folder / CLAIM
    held = _read(path)
    if held is not None and held.get("token") == record.get("token"):
        path.unlink(missing_ok=True)


def _tidy(folder: Path, created: bool) -> None:
    """Remove the folder when this call created it and left nothing in it."""
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()
