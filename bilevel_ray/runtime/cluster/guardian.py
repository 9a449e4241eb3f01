"""Ending the processes of a local Ray with the driver that started it, however the driver ends.

Ray ties the processes a driver starts itself (GCS, raylet, dashboard, monitors) to the driver
(``PR_SET_PDEATHSIG``), and the workers go with the raylet; but the raylet's agents
(``DashboardAgent``, ``RuntimeEnvAgent``) outlive a driver ended by SIGKILL by about a minute
(Ray 2.60: they notice the raylet is gone, then hang in their exit). The guardian is a small
process the driver starts before ``ray.init``: it waits on a pipe from the driver (end of file: the
driver is gone, whatever ended it) and then ends what is left of the driver's Ray sessions.

A session's processes are found by what they are, never by name: processes the driver started
(its descendants, which the guardian notes while the driver lives: once the driver is gone they
belong to init), or that carry ``BILEVEL_RAY_DRIVER_PID`` (set while ``ray.init`` starts Ray; Ray's
``setproctitle`` may overwrite a worker's copy); and of those, only the ones whose command line
names the session folder (GCS, raylet, dashboard, monitors) or that have a file of it open (agents
and workers: their logs). Another Ray instance, someone's ``tail`` of the session's logs and the
driver's own other subprocesses match neither.

This file runs as a script (``python -I -S guardian.py DRIVER_PID TEMP_ROOT``), standard library
only: it must not import torch or Ray, and must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

__all__ = ["end_session", "session_processes", "start", "watch"]

MARKER = "BILEVEL_RAY_DRIVER_PID"  # in the environment of the driver's Ray processes
GRACE_S = 3.0  # for SIGTERM before SIGKILL
LOG_NAME = "bilevel_ray-guardian.log"  # in the session's logs folder, when it ended anything

_guardian: subprocess.Popen[bytes] | None = None  # this driver's guardian; its stdin is the pipe


def start(temp_root: str) -> None:
    """Start this process's guardian (once): it ends the Ray sessions named to :func:`watch`,
    and any session named after this process in ``temp_root`` (Ray's default temporary folder;
    its session folders end in the starting driver's pid), once this process has ended."""
    global _guardian
    if _guardian is not None and _guardian.poll() is None:
        return
    if not sys.platform.startswith("linux") or not sys.executable:  # it reads /proc
        return
    try:
        _guardian = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), temp_root],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C or a closed terminal that ends the driver must not end it.
            start_new_session=True,
        )
    except OSError:  # no process to spare: the run goes on, as Ray alone would leave it
        return
    # A forked child (multiprocessing, a data loader) would hold the pipe open after the driver
    # ends, and the guardian would wait for it too.
    os.register_at_fork(after_in_child=_drop_pipe_in_child)


def watch(session_dir: str) -> None:
    """Tell the guardian the session folder of the local Ray this process started."""
    if _guardian is None or _guardian.stdin is None or _guardian.poll() is not None:
        return
    with contextlib.suppress(OSError):  # the guardian is gone: nothing to tell
        _guardian.stdin.write(f"{session_dir}\n".encode())
        _guardian.stdin.flush()


def _drop_pipe_in_child() -> None:
    global _guardian
    if _guardian is not None and _guardian.stdin is not None:
        with contextlib.suppress(OSError):
            _guardian.stdin.close()
    _guardian = None


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: [state, ppid, ...]; starttime is [19]."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 :].decode().split()


def _started(pid: int) -> str | None:
    """When the process started (a pid reused by another process differs); None: gone, or a
    zombie (ended, not yet reaped)."""
    try:
        stat = _stat(pid)
    except OSError:
        return None
    return None if stat[0] == "Z" else stat[19]


def descendants(pid: int) -> dict[int, str]:
    """The processes ``pid`` started, directly or not (pid: start time)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        started = _started(child)
        if started is not None and child not in found:
            found[child] = started
            todo.extend(children.get(child, []))
    return found


def session_processes(
    session_dir: str, driver_pid: int, started: dict[int, str] | None = None
) -> dict[int, str]:
    """The live processes of the Ray session in ``session_dir`` that the driver ``driver_pid``
    started (``started``: its descendants as noted while it lived) (pid: command line)."""
    inside = os.path.realpath(session_dir) + os.sep
    marker = f"\0{MARKER}={driver_pid}\0".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            ours = started is not None and pid in started and started[pid] == _started(pid)
            if not ours:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    ours = marker in b"\0" + f.read() and _started(pid) is not None
            if not ours:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            if any(_names(arg, inside) for arg in args) or _has_open(pid, inside):
                found[pid] = " ".join(args).strip()[:120]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _names(arg: str, inside: str) -> bool:
    """Whether a command-line argument names the session folder (``inside``: with a slash)."""
    return inside in arg or arg == inside[:-1] or arg.endswith("=" + inside[:-1])


def _has_open(pid: int, inside: str) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside):
                return True
    return False


def end_session(
    session_dir: str,
    driver_pid: int,
    started: dict[int, str] | None = None,
    grace_s: float = GRACE_S,
) -> dict[int, str]:
    """End the processes of the session in ``session_dir`` that ``driver_pid`` started: SIGTERM,
    then SIGKILL for those still there after ``grace_s``. Returns those it signalled."""
    ended: dict[int, str] = {}
    for signum in (signal.SIGTERM, signal.SIGKILL):
        left = session_processes(session_dir, driver_pid, started)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        ended.update(left)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_started(pid) for pid in left):
            time.sleep(0.1)
    return ended


def _sessions_named_after(driver_pid: int, temp_root: str, since: float) -> set[str]:
    """Session folders a driver with this pid started (``session_<time>_<pid>``) since the
    guardian started: the one of a driver ended before it could name it."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(temp_root):
            path = os.path.join(temp_root, name)
            with contextlib.suppress(OSError):
                if (
                    name.startswith("session_")
                    and name.endswith(f"_{driver_pid}")
                    and not os.path.islink(path)
                    and os.stat(path).st_mtime >= since - 1
                ):
                    found.add(path)
    return found


def _is_session_dir(path: str) -> bool:
    # Never a folder that would match half the machine (``/``, ``/tmp``).
    return os.path.isabs(path) and os.path.basename(path.rstrip(os.sep)).startswith("session_")


def main(argv: list[str]) -> int:
    driver_pid, temp_root = int(argv[1]), argv[2]
    since = time.time()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sessions: set[str] = set()
    started: dict[int, str] = {}
    pending = b""
    while True:
        # Note the driver's processes while it lives: Ray starts its agents while ray.init
        # runs, and a Tune or Train run starts workers all along (less often, later on).
        wait_s = 0.5 if time.time() - since < 60 else 2.0
        ready, _, _ = select.select([sys.stdin], [], [], wait_s)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:  # end of file: the driver has ended
                break
            *lines, pending = (pending + chunk).split(b"\n")
            sessions.update(line.decode(errors="replace").strip() for line in lines)
        started.update(descendants(driver_pid))
    sessions |= _sessions_named_after(driver_pid, temp_root, since)
    for session_dir in sorted(s for s in sessions if _is_session_dir(s)):
        ended = end_session(session_dir, driver_pid, started)
        if ended:
            _note(session_dir, driver_pid, ended)
    return 0


def _note(session_dir: str, driver_pid: int, ended: dict[int, str]) -> None:
    lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S')} driver {driver_pid} ended; ended:"]
    lines += [f"  {pid} {name}" for pid, name in sorted(ended.items())]
    with (
        contextlib.suppress(OSError),  # a record only: the ending is what matters
        open(os.path.join(session_dir, "logs", LOG_NAME), "a") as f,
    ):
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
