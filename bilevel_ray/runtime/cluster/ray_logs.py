"""Keeping Ray's own error output out of the terminal: what Ray's processes print on their stderr
that is about Ray and its environment, not about the run, goes to a log file that one line on the
terminal names.

The driver shows its workers' output (``log_to_driver``) through one handler; :func:`install`
wraps it with :class:`WorkerLogFilter`, which holds back, per process:

- a Python traceback whose frames are all Ray's (and the standard library's): e.g. Train's
  placement-group cleaner failing to find "the" Ray instance among several on the machine;
- a process's crash output, from its first crash line on ("Fatal Python error", an abseil
  "Mutex corrupt", "*** SIGSEGV received", ...): what a worker torn down at shutdown may print.

Everything else (progress lines, the run's own tracebacks, which name a frame of its code) is
shown as before. Only when not verbose (``--verbose`` shows all of Ray's output).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["WorkerLogFilter", "install", "log_path"]

_START = re.compile(
    r"^(Traceback \(most recent call last\):|Exception in thread .*:|Exception ignored in: .*)$"
)
_CHAIN = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')
# A process crashing: everything it prints on stderr from here on is its death, not the run's.
_CRASH = re.compile(
    r"Fatal Python error:|Mutex corrupt|\*\*\* SIG[A-Z]+ received|\*\*\* StackTrace Information"
    r"|terminate called after throwing"
)
# Ray's files: this installation's, another node's (another prefix), and Cython's relative names.
_RAY_FILE = re.compile(r"([/\\](site|dist)-packages[/\\]ray[/\\])|(^python[/\\]ray[/\\])")
_STDLIB_FILE = re.compile(
    r"(^<frozen [^>]+>$)|([/\\]lib[/\\]python3\.\d+[/\\](?!(site|dist)-packages))"
)
_HANDLER = "ray_print_logs"  # Ray's name for the driver's handler of worker output


def log_path() -> Path:
    """Where this driver writes what it holds back: the Ray session's logs folder."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    try:
        folder = Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # another Ray version
        folder = None
    if folder is None or not folder.is_dir():
        import tempfile

        folder = Path(tempfile.gettempdir())
    return folder / f"bilevel_ray-ray-errors-{os.getpid()}.log"


def _rays_own(lines: list[str]) -> bool:
    """A traceback whose frames are Ray's (at least one) and the standard library's only."""
    files = [m.group(1) for line in lines if (m := _FRAME.match(line))]
    ray_files = [f for f in files if _RAY_FILE.search(f)]
    return bool(ray_files) and all(f in ray_files or _STDLIB_FILE.search(f) for f in files)


class _Block:
    """A traceback being read: its lines, and whether its exception line has come."""

    def __init__(self, first: str) -> None:
        self.lines = [first]
        self.ended = False


class WorkerLogFilter:
    """Ray's handler of worker output (``show``), less Ray's own errors, which go to ``path``.

    Called with Ray's batches (``{"pid", "is_err", "lines", "actor_name", ...}``), one at a time
    per process in order; a traceback split across batches is held until it is complete."""

    def __init__(
        self, show: Callable[[dict[str, Any]], None], path: str | os.PathLike[str]
    ) -> None:
        self.show = show
        self.path = Path(path)
        self._open: dict[Any, _Block] = {}  # a traceback being read, per process
        self._crashed: set[Any] = set()  # processes whose crash output has begun
        self._named = False  # the terminal line naming the file was printed
        self._last: Any = None  # the process whose output the file has last
        self._lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> None:
        if not data.get("is_err") or data.get("pid") in ("autoscaler", "raylet"):
            self.show(data)  # stdout, and Ray's own event lines, which its level already sets
            return
        with self._lock:
            shown = self._sort(data)
        if shown:
            self.show({**data, "lines": shown})

    def _sort(self, data: dict[str, Any]) -> list[str]:
        key = data.get("pid")
        shown: list[str] = []
        for line in data.get("lines", []):
            if key in self._crashed:
                self._hold(data, [line])
                continue
            if _CRASH.search(line):
                if key in self._open:
                    self._close(data, shown)
                self._crashed.add(key)
                self._hold(data, [line])
                continue
            block = self._open.get(key)
            if block is not None:
                if not block.ended:
                    block.lines.append(line)
                    # Frames and code are indented; the first line that is not is the exception.
                    if line and not line[0].isspace() and line not in _CHAIN:
                        block.ended = not _START.match(line)
                    continue
                if line == "" or line in _CHAIN:  # a chained exception may follow
                    block.lines.append(line)
                    block.ended = line == ""
                    continue
                self._close(data, shown)
            if _START.match(line):
                self._open[key] = _Block(line)
            else:
                shown.append(line)
        block = self._open.get(key)
        if block is not None and block.ended:  # complete: a traceback is written at once
            self._close(data, shown)
        return shown

    def _close(self, data: dict[str, Any], shown: list[str]) -> None:
        block = self._open.pop(data.get("pid"))
        if _rays_own(block.lines):
            self._hold(data, block.lines)
        else:
            shown.extend(block.lines)

    def flush(self) -> None:
        """Decide on the tracebacks still being read (the driver is ending)."""
        with self._lock:
            for key in list(self._open):
                shown: list[str] = []
                data = {"pid": key, "is_err": True}
                self._close(data, shown)
                if shown:
                    self.show({**data, "lines": shown})

    def _hold(self, data: dict[str, Any], lines: list[str]) -> None:
        who = data.get("actor_name") or data.get("task_name") or "a Ray process"
        pid = data.get("pid")
        try:
            with open(self.path, "a") as f:
                if pid != self._last:
                    f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {who} pid={pid} ---\n")
                f.write("".join(f"{line}\n" for line in lines))
            self._last = pid
        except OSError as err:  # nowhere to write: say so instead of losing it silently
            print(
                f"note: cannot write Ray's own error output to {self.path}: {err}", file=sys.stderr
            )
            return
        if not self._named:
            self._named = True
            what = next((s.strip() for s in reversed(lines) if s.strip()), "")
            what = what if len(what) <= 100 else what[:97] + "..."
            print(
                f"note: Ray's own error output ({who}: {what}) is in {self.path}",
                file=sys.stderr,
                flush=True,
            )


def install(path: str | os.PathLike[str] | None = None) -> WorkerLogFilter | None:
    """Wrap the driver's handler of worker output (after ``ray.init``) with a
    :class:`WorkerLogFilter` writing to ``path`` (default :func:`log_path`); None where there is
    no such handler (``log_to_driver=False``, another Ray version)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        lock = dispatcher._lock
        handlers = dispatcher.handlers
    except (ImportError, AttributeError):
        return None
    with lock:
        for i, (name, handler) in enumerate(handlers):
            if name != _HANDLER:
                continue
            if isinstance(handler, WorkerLogFilter):
                return handler
            wrapped = WorkerLogFilter(handler, path or log_path())
            # The same name: Ray removes it at ray.shutdown() as its own.
            dispatcher.handlers = [*handlers[:i], (name, wrapped), *handlers[i + 1 :]]
            atexit.register(wrapped.flush)
            return wrapped
    return None
