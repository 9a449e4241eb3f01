"""What a run leaves: no process of the local Ray it started once it has ended (even by SIGKILL),
and none of Ray's own tracebacks on the terminal (they go to a log file named on one line)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from bilevel_ray.runtime.cluster.ray_logs import WorkerLogFilter

DRIVER = """
import functools, os, time
import ray
ray.init = functools.partial(ray.init, num_cpus=1)  # a small Ray: the machine is shared
from bilevel_ray.runtime.cluster.session import connect
connect()  # a local Ray on 127.0.0.1, as the commands start it

@ray.remote(num_cpus=0)
class Probe:  # a worker of the session besides its agents
    def pid(self):
        return os.getpid()

probe = Probe.remote()
ray.get(probe.pid.remote())
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
time.sleep(600)
"""


def _start_time(pid: int) -> str | None:
    """The process's start (clock ticks since boot): a pid with another start is another process;
    None when gone or a zombie (ended, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _processes_of(session: str) -> dict[int, tuple[str | None, str]]:
    """Processes whose command line names the session folder or that have a file of it open:
    pid -> (start, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        links = []
        for fd in fds:
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        if session + "/" in cmd or any(link.startswith(session + "/") for link in links):
            found[pid] = (_start_time(pid), cmd)
    return found


def _children(pid: int) -> dict[int, tuple[str | None, str]]:
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry)] = (_start_time(int(entry)), cmd)
        except (OSError, ValueError):
            continue
    return found


def _alive(processes: dict[int, tuple[str | None, str]]) -> dict[int, str]:
    return {pid: cmd for pid, (start, cmd) in processes.items() if _start_time(pid) == start}


@pytest.mark.ray
def test_a_killed_driver_leaves_no_process_of_the_ray_it_started(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "driver.err", "w") as err:
        driver = subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**env, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
    session, before = "", {}
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 180)
        session = driver.stdout.readline().strip() if ready else ""
        assert session, (tmp_path / "driver.err").read_text()
        before = _processes_of(session)
        names = " ".join(cmd for _, cmd in before.values())
        for part in ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "Probe"):
            assert part in names, names  # what Ray 2.60 runs; the test means something
        guardians = {p: c for p, c in _children(driver.pid).items() if "guardian" in c[1]}
        assert guardians, "no guardian process"

        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30  # Ray's agents alone linger a minute
        while (left := _alive({**before, **guardians})) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running after the driver's SIGKILL: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in _alive({**before, **(_processes_of(session) if session else {})}):
            try:
                os.kill(pid, signal.SIGKILL)  # the processes of this test's own Ray only
            except OSError:
                continue


# Train V2's placement-group cleaner on a machine with two Ray instances (Ray 2.60), as the
# driver receives it from the worker.
CLEANER = """\
Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    self.run()
  File "/usr/lib/python3.11/threading.py", line 982, in run
    self._target(*self._args, **self._kwargs)
  File "/venv/lib/python3.11/site-packages/ray/util/tracing/tracing_helper.py", line 487, in _resume_span
    return method(self, *_args, **_kwargs)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor_loop
    alive = is_actor_alive(
            ^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/ray/util/state/api.py", line 586, in get_actor
    return StateApiClient(address=address).get(
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/ray/_private/services.py", line 759, in canonicalize_bootstrap_address_or_die
    raise ConnectionError(
ConnectionError: Found multiple active Ray instances: {'127.0.0.1:9', '127.0.0.1:6379'}. Please specify the one to connect to by setting the `--address` flag or `RAY_ADDRESS` environment variable."""  # noqa: E501

USERS = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 900, in main_loop
    fn()
  File "/home/me/problem.py", line 12, in factory
    raise KeyError("lr")
KeyError: 'lr'"""

CRASH = """\
[mutex.cc : 1420] RAW: Mutex corrupt: both reader and writer lock held: 0x55d5c1f0
Fatal Python error: Aborted

Thread 0x00007f3a (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/utils/data.py", line 20 in wait
Extension modules: numpy.core._multiarray_umath, torch._C (total: 2)"""


def test_rays_own_tracebacks_go_to_the_named_log_file_and_the_runs_own_show(tmp_path, capsys):
    shown = []
    log = tmp_path / "ray-errors.log"
    keep = WorkerLogFilter(lambda data: shown.extend(data["lines"]), log)

    def batch(pid, lines, name="PlacementGroupCleaner"):
        keep({"pid": pid, "is_err": True, "actor_name": name, "lines": lines})

    progress = "[pbgd_free] step 10/200 upper/loss=-1.2"
    cleaner = CLEANER.splitlines()
    batch(7, [progress, *cleaner[:9]])  # a traceback split across two batches
    batch(7, [*cleaner[9:], progress])
    batch(8, USERS.splitlines(), "RayTrainWorker")
    batch(9, CRASH.splitlines(), "RayTrainWorker")
    batch(9, ["Aborted (core dumped)"], "RayTrainWorker")  # the rest of a crash, later
    batch(8, ["[pbgd_free] step 20/200"], "RayTrainWorker")

    assert shown == [progress, progress, *USERS.splitlines(), "[pbgd_free] step 20/200"]
    held = log.read_text()
    assert CLEANER in held and CRASH in held and "Aborted (core dumped)" in held
    terminal = capsys.readouterr().err.splitlines()
    assert len(terminal) == 1, terminal  # one line, for all it held
    assert str(log) in terminal[0] and "Found multiple active Ray instances" in terminal[0]
